#!/usr/bin/env bash
# The GPU check: on a CUDA machine, GPU tests, 124M bf16+compile train step, shakespeare_char.yaml to the end,
# one-GPU FSDP2 save + resume, cached generation (static+compile vs dynamic); one table at the end.
#   bash scripts/gpu_check.sh [--text path/to/tinyshakespeare/input.txt] [--json table.json]
#   bash scripts/gpu_check.sh --dry-run      # CPU, tiny shapes: proves every step runs (a default-suite test)
# Whole run capped at 9 minutes (GPU) / 5 minutes (dry run). Exit status 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
limit=540
for arg in "$@"; do [ "$arg" = "--dry-run" ] && limit=300; done
exec timeout "$limit" "$PYTHON" scripts/gpu_check.py "$@"
