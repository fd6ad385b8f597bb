"""The data loader: what sampling a batch (TokenShards.get_batch, memory-mapped shards) costs, as a share of a
training step. nanoGPT's get_batch is cheap enough to ignore; ours must stay so (< 2 % of a step).

    from benchmarks.data_loader import benchmark_get_batch
    seconds = benchmark_get_batch("data/shakespeare_char", batch_size=12, block_size=64)
"""

import time
from pathlib import Path

from nanogpt_hf.data import TokenShards
from nanogpt_hf.prepare import prepare_dataset

DATA_TARGET = 0.02  # get_batch < 2% of a train step


def benchmark_get_batch(data_dir, batch_size, block_size, n=1000, split="train"):
    """Seconds per get_batch call (CPU tensors), averaged over n calls after a warm-up."""
    ds = TokenShards(data_dir, split)
    for step in range(10):
        ds.get_batch(batch_size, block_size, step)
    t0 = time.perf_counter()
    for step in range(n):
        ds.get_batch(batch_size, block_size, step)
    return (time.perf_counter() - t0) / n


def prepare_bench_data(text_file, root):
    """A small char-level data_dir under root: from text_file, or (offline, None) Python's standard library."""
    root = Path(root)
    if text_file is not None:
        prepare_dataset("bench_char", data_dir=root / "bench_char", inputs=[str(text_file)], tokenizer="char")
        return root / "bench_char"
    prepare_dataset("python_char", data_dir=root / "python_char", max_bytes=2_000_000)
    return root / "python_char"


def bench_data(data_dir, batch_size, block_size, step_ms, n=1000):
    """Cost of TokenShards.get_batch relative to one train step of step_ms milliseconds."""
    seconds = benchmark_get_batch(data_dir, batch_size, block_size, n=n)
    return dict(data_dir=str(data_dir), batch_size=batch_size, block_size=block_size, batch_ms=seconds * 1e3,
                step_ms=step_ms, fraction=seconds * 1e3 / step_ms)


def format_data(r):
    return (f"data        get_batch({r['batch_size']}, {r['block_size']}) {r['batch_ms']:.3f} ms | train step "
            f"{r['step_ms']:.1f} ms | {100 * r['fraction']:.2f}% of a step (target < {100 * DATA_TARGET:.0f}%)")
