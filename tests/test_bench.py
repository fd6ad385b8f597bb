"""examples/bench.py: a smoke run at tiny shapes (the numbers mean nothing here; the format and plumbing do).
The real measurements are in docs/performance.md, with the commands that produced them."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import Shape, time_alternating
from benchmarks.train_step import bench_train

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_prints_every_comparison(char_data_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "examples" / "bench.py"), "--preset", "custom", "--n_layer", "1", "--n_head",
           "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "64", "--batch_size", "2", "--iters", "2",
           "--warmup", "1", "--gen_shape", "custom", "--gen_tokens", "4", "--gen_batch_sizes", "1,2",
           "--gen_repeats", "1", "--sample_num", "1", "--sample_tokens", "24", "--no_compile_decode", "--data_dir", str(char_data_dir), "--data_iters", "5", "--device", "cpu",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()

    def line(prefix):
        found = [x for x in lines if x.startswith(prefix)]
        assert found, f"no line starting with {prefix!r} in:\n{proc.stdout}"
        return found[0]

    train = line("train step")
    assert "nanogpt_hf" in train and "GPT2LMHeadModel" in train and "plain PyTorch" in train
    assert "ratio" in train and "(target >= 1.30x)" in train
    assert "ratio" in line("fwd+bwd")
    assert "always has biases" in proc.stdout  # the fairness note
    # the default is the README's headline row: both models with GPT-2's own tanh GELU
    assert "activation nanogpt_hf gelu_new, GPT2LMHeadModel gelu_new" in proc.stdout
    for b in (1, 2):
        assert "cache speedup" in line(f"generate b={b} ") and "(target >= 4x)" in line(f"generate b={b} ")
        assert any(x.startswith(f"generate b={b}") and "ratio" in x and "target >= 1.0x" in x for x in lines)
    assert "(target >= 10x)" in line("sample ratio: nanogpt_hf (best) vs nanoGPT")  # sample.py's job, past block 16
    assert "(target >= 1.0x)" in line("sample ratio: nanogpt_hf generate() vs bare eager loop")
    assert "% of a step (target < 2%)" in line("data")
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "train", "generate", "sample", "data"}
    assert len(results["sample"]["tokens_per_s"]) == 4
    assert results["train"]["ratio_train"] > 0 and results["data"]["fraction"] > 0


def test_models_take_turns_in_rotating_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_alternating(fns, iters=3, warmup=1, device="cpu")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]  # nobody always goes first


def test_page_faults_are_counted_per_call():
    # 64 MB is above glibc's largest mmap threshold: each call maps fresh memory and the kernel faults in every
    # page (16,384 of 4 KB; at least 32 where transparent huge pages are always on)
    faults = {}
    time_alternating({"alloc": lambda: torch.ones(16 * 2**20), "idle": lambda: None}, iters=3, warmup=1,
                     device="cpu", faults=faults)
    assert min(faults["alloc"]) >= 32 and max(faults["idle"]) < min(faults["alloc"]) // 4, faults


def test_bench_train_in_process_returns_medians():
    r = bench_train(Shape(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, batch_size=2), iters=2,
                    warmup=0, reference=False)
    assert set(r["models"]) == {"nanogpt_hf", "GPT2LMHeadModel"}
    assert r["params"]["GPT2LMHeadModel"] > r["params"]["nanogpt_hf"]  # GPT-2's biases
    assert r["models"]["nanogpt_hf"]["mfu"] is None  # CPU: peak unknown -> "n/a"
    assert all(v["page_faults"] >= 0 for v in r["models"].values())


def test_the_library_never_reaches_into_benchmarks_examples_or_tests():
    """The dependency runs one way: benchmarks/, examples/ and tests/ use nanogpt_hf, never the reverse (not by
    import, and not by loading a file by path, as nanogpt_hf/benchmark.py once loaded tests/reference_nanogpt.py)."""
    outside = {"benchmarks", "examples", "tests"}
    found = []
    for path in sorted((ROOT / "nanogpt_hf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                names = [str(node.right.value)]  # a path segment: Path(__file__).parent.parent / "tests"
            found += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in outside]
    assert not found, found
