"""Preparing data: examples/prepare.py's tokens/s (prepare_dataset end to end: read, tokenize, write shards +
meta.json + tokenizer/) against the bare tokenizer's batch encode of the same text on all cores.

    from benchmarks.prepare_speed import bench_prepare, bench_text, format_prepare
    print(format_prepare(bench_prepare(bench_text("input.txt", "tmp", mb=30), "tmp")))
"""

import contextlib
import io
import statistics
import time
from pathlib import Path

import numpy as np

from nanogpt_hf.prepare import chunk_text, default_num_proc, prepare_dataset, stdlib_files
from nanogpt_hf.tokenization import gpt2_tokenizer, tiktoken_gpt2

PREPARE_TARGET = 0.9  # prepare's tokens/s >= 0.9x the bare tokenizer's batch encode on the same text


def bench_text(text_file, root, mb):
    """The text to prepare: text_file, or (offline) Python's standard library source, repeated up to mb MB."""
    root = Path(root)
    text = Path(text_file).read_text(encoding="utf-8") if text_file else "\n".join(stdlib_files(10**9)[1])
    if mb:
        text = (text * (int(mb * 1e6) // len(text.encode("utf-8")) + 1))[:int(mb * 1e6)]
    path = root / "prepare_bench.txt"
    path.write_text(text, encoding="utf-8")
    return path


def bare_encode(text_file, out_file, encode_batch):
    """The baseline: read the whole file, cut it in prepare's rows, encode them in one batch call of the
    tokenizer on all cores, write the tokens as one uint16 array. Tokens/s."""
    t0 = time.perf_counter()
    ids = encode_batch(chunk_text(Path(text_file).read_text(encoding="utf-8")))
    tokens = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids])
    tokens.tofile(out_file)
    return len(tokens) / (time.perf_counter() - t0)


def bench_prepare(text_file, root, num_proc=None, repeats=3, tokenizers=("gpt2", "hf")):
    """examples/prepare.py (prepare_dataset, end to end: read, tokenize, write shards + meta.json) against
    bare_encode, alternating, median tokens/s of each; for GPT-2 through tiktoken and through a Hugging
    Face tokenizers folder (the same BPE, batch-encoded in Rust)."""
    num_proc = num_proc or default_num_proc()
    root = Path(root)
    enc = tiktoken_gpt2()
    hf_dir = root / "hf_gpt2"
    gpt2_tokenizer().save_pretrained(hf_dir)
    backend = gpt2_tokenizer().backend_tokenizer
    bare = {"gpt2": lambda rows: enc.encode_ordinary_batch(rows, num_threads=num_proc),
            "hf": lambda rows: [e.ids for e in getattr(backend, "encode_batch_fast", backend.encode_batch)(
                rows, add_special_tokens=False)]}
    out = dict(text=str(text_file), mb=Path(text_file).stat().st_size / 1e6, num_proc=num_proc, tokenizers={})
    for name in tokenizers:
        spec = "gpt2" if name == "gpt2" else str(hf_dir)
        ours, base = [], []
        for i in range(repeats):
            base.append(bare_encode(text_file, root / "bare.bin", bare[name]))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                meta = prepare_dataset("prepare_bench", data_dir=root / f"out_{name}", inputs=[str(text_file)],
                                       tokenizer=spec, num_proc=num_proc, overwrite=True)
            n = sum(sp["num_tokens"] for sp in meta["splits"].values())
            ours.append(n / (time.perf_counter() - t0))
        out["tokenizers"][name] = dict(tokens=n, ours=statistics.median(ours), bare=statistics.median(base),
                                       ratio=statistics.median(ours) / statistics.median(base),
                                       ours_all=ours, bare_all=base)
    return out


def format_prepare(r):
    lines = []
    for name, v in r["tokenizers"].items():
        bare = "tiktoken encode_ordinary_batch" if name == "gpt2" else "tokenizers encode_batch(_fast)"
        label = "GPT-2 tiktoken" if name == "gpt2" else "GPT-2 HF tokenizers"
        lines.append(f"prepare     {label}, {r['mb']:.0f} MB, {v['tokens']:,} tokens, {r['num_proc']} process(es): "
                     f"prepare.py {v['ours'] / 1e6:.2f} M tok/s | bare {bare} {v['bare'] / 1e6:.2f} M tok/s | "
                     f"ratio {v['ratio']:.2f}x (target >= {PREPARE_TARGET:.1f}x)")
    return "\n".join(lines)

