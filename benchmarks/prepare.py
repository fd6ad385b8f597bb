"""
Data prep throughput: examples/prepare.py's path (rows -> datasets .map on --num_proc processes -> shards), end to
end, against the bare tokenizer on the same text on all cores, and the re-run that finds the .map cache.

    python -m benchmarks.prepare --text input.txt --mb 100               # tiny-shakespeare repeated to 100 MB
    python -m benchmarks.prepare --tokenizers gpt2 --repeats 3

    from benchmarks.prepare import bench_prepare, format_prepare
    print(format_prepare(bench_prepare("input.txt", "/tmp/bench", mb=100)))

Each repeat runs the bare tokenizer, then prepare_dataset into a fresh datasets cache (so .map encodes), then
prepare_dataset again with that cache (the re-run); the medians are reported, with every run and the load
average (the machine may be shared: compare only numbers from one run). The bare tokenizer reads the whole file,
cuts it into prepare's rows, encodes them in one batch call (tiktoken encode_ordinary_batch on all cores; HF
tokenizers encode_batch, Rust threads) and writes one uint16 array: nothing of datasets, no shards, no resuming.
"""

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from nanogpt_hf.prepare import default_num_proc, prepare_dataset  # noqa: E402
from nanogpt_hf.sources import chunk_text, stdlib_files  # noqa: E402
from nanogpt_hf.tokenization import gpt2_tokenizer, tiktoken_gpt2  # noqa: E402

TARGET = 0.9  # the .map path >= 0.9x the bare tokenizer's tokens/s (issue 23)


def bench_text(text_file, root, mb):
    """The text to prepare: text_file (or, offline, Python's standard library source) repeated to mb MB."""
    text = Path(text_file).read_text(encoding="utf-8") if text_file else "\n".join(stdlib_files(10**9)[1])
    if mb:
        text = (text * (int(mb * 1e6) // len(text.encode("utf-8")) + 1))[:int(mb * 1e6)]
    path = Path(root) / "prepare_bench.txt"
    path.write_text(text, encoding="utf-8")
    return path


def bare_encode(text_file, out_file, encode_batch):
    """The baseline: tokens/s of reading, cutting into rows, one batch encode, writing one uint16 array."""
    t0 = time.perf_counter()
    ids = encode_batch(chunk_text(Path(text_file).read_text(encoding="utf-8")))
    tokens = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids])
    tokens.tofile(out_file)
    return len(tokens) / (time.perf_counter() - t0)


def timed_prepare(text_file, data_dir, tokenizer, num_proc, cache):
    """prepare_dataset with the datasets cache in `cache`: (tokens, tokens/s)."""
    datasets.config.HF_DATASETS_CACHE = Path(cache)  # read when a builder or .map needs it
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        meta = prepare_dataset("prepare_bench", data_dir=data_dir, inputs=[str(text_file)], tokenizer=tokenizer,
                               num_proc=num_proc, overwrite=True)
    n = sum(split["num_tokens"] for split in meta["splits"].values())
    return n, n / (time.perf_counter() - t0)


def load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def bench_prepare(text_file, root, num_proc=None, repeats=3, tokenizers=("gpt2", "hf")):
    """{tokenizer: medians and every run} of the bare tokenizer, prepare (first run) and prepare (re-run, cached),
    alternating, for GPT-2 through tiktoken ("gpt2") and as a Hugging Face tokenizers folder ("hf")."""
    num_proc = num_proc or default_num_proc()
    root = Path(root)
    enc, hf_dir = tiktoken_gpt2(), root / "hf_gpt2"
    gpt2_tokenizer().save_pretrained(hf_dir)
    backend = gpt2_tokenizer().backend_tokenizer
    bare = {"gpt2": lambda rows: enc.encode_ordinary_batch(rows, num_threads=num_proc),
            "hf": lambda rows: [e.ids for e in getattr(backend, "encode_batch_fast", backend.encode_batch)(
                rows, add_special_tokens=False)]}
    default_cache = datasets.config.HF_DATASETS_CACHE
    out = dict(text=str(text_file), mb=Path(text_file).stat().st_size / 1e6, num_proc=num_proc, tokenizers={})
    try:
        for name in tokenizers:
            spec = "gpt2" if name == "gpt2" else str(hf_dir)
            runs = []
            for i in range(repeats):
                cache = root / f"cache_{name}_{i}"
                run = dict(load=load(), bare=bare_encode(text_file, root / "bare.bin", bare[name]))
                tokens, run["prepare"] = timed_prepare(text_file, root / f"out_{name}", spec, num_proc, cache)
                _, run["rerun"] = timed_prepare(text_file, root / f"out_{name}", spec, num_proc, cache)
                shutil.rmtree(cache, ignore_errors=True)
                runs.append(run)
            med = {k: statistics.median(r[k] for r in runs) for k in ("bare", "prepare", "rerun", "load")}
            out["tokenizers"][name] = dict(tokens=tokens, **med, ratio=med["prepare"] / med["bare"],
                                           rerun_speedup=med["rerun"] / med["prepare"], runs=runs)
    finally:
        datasets.config.HF_DATASETS_CACHE = default_cache
    return out


def format_prepare(r):
    lines = []
    for name, v in r["tokenizers"].items():
        bare = "tiktoken encode_ordinary_batch" if name == "gpt2" else "tokenizers encode_batch"
        label = "GPT-2 tiktoken" if name == "gpt2" else "GPT-2 HF tokenizers"
        lines.append(f"prepare     {label}, {r['mb']:.0f} MB, {v['tokens']:,} tokens, {r['num_proc']} process(es), "
                     f"load {v['load']:.1f}: .map path {v['prepare'] / 1e6:.2f} M tok/s | bare {bare} "
                     f"{v['bare'] / 1e6:.2f} M tok/s | ratio {v['ratio']:.2f}x (target >= {TARGET:.1f}x) | "
                     f"re-run (.map cache) {v['rerun'] / 1e6:.1f} M tok/s, {v['rerun_speedup']:.0f}x faster")
        for i, run in enumerate(v["runs"]):
            lines.append(f"            run {i + 1}: load {run['load']:.1f}, .map {run['prepare'] / 1e6:.2f}, bare "
                         f"{run['bare'] / 1e6:.2f}, ratio {run['prepare'] / run['bare']:.2f}x, re-run "
                         f"{run['rerun'] / 1e6:.1f} M tok/s")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="a UTF-8 text file (default: Python's standard library source)")
    p.add_argument("--mb", type=float, default=100, help="repeat the text to this many MB (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each (median)")
    p.add_argument("--tokenizers", default="gpt2,hf", help="gpt2 (tiktoken) and/or hf (GPT-2 as a tokenizers folder)")
    p.add_argument("--num_proc", type=int, help="processes (default: all cores)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nanogpt_bench_prepare_") as tmp:
        text = bench_text(args.text, tmp, args.mb)
        r = bench_prepare(text, tmp, num_proc=args.num_proc, repeats=args.repeats,
                          tokenizers=[t for t in args.tokenizers.split(",") if t])
    print(format_prepare(r))
    return r


if __name__ == "__main__":
    main()
