"""scripts/gpu_check.sh --dry-run: every step of the GPU check (train step bench, shakespeare_char.yaml, an
accelerate-launched run with checkpoint + resume, cached generation) runs at tiny shapes on a CPU, so the script
is known to work before a GPU is ever lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    table = tmp_path / "table.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--work_dir", str(tmp_path / "w"),
                           "--json", str(table)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(table.read_text())
    assert [r["ok"] for r in rows] == [True] * 5, rows
    assert "| step | ok | seconds | result |" in proc.stdout
    assert "resumed at iter 20" in rows[3]["result"] and "tok/s" in rows[4]["result"]
    assert "val loss" in rows[2]["result"] and "?" not in rows[2]["result"]
