"""Data at scale: resumable prep under SIGKILL, the old dataset kept by --overwrite, memory that does not grow
with the input, llm.c shards (read, write, train), token ids beyond the model's vocab, a split larger than 1 GB,
and the FineWeb recipes on a local stand-in with the Hub's layout and columns.

    python -m pytest tests/test_data_scale.py -q
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import make_text

from nanogpt_hf.data import TokenShards, read_meta
from nanogpt_hf.prepare import SLEEP_ENV, prepare_dataset
from nanogpt_hf.sources import chunk_stream, chunk_text
from nanogpt_hf.train_config import TrainConfig
from nanogpt_hf.trainer import train

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "examples" / "prepare.py"


def all_files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def prepare_cli(*argv):
    subprocess.run([sys.executable, str(PREPARE), *map(str, argv)], check=True, capture_output=True, timeout=300)


def committed(work, name):
    """name is in work/ and, for a shard, listed in progress.json (renamed first, recorded right after)."""
    try:
        return (work / name).exists() and (name == "meta.json" or f'"{name}"' in (work / "progress.json").read_text())
    except FileNotFoundError:
        return False


def kill_prepare_after(d, argv, name):
    """Run prepare.py into d as a real process; SIGKILL it once `name` exists in .d.partial/ (a shard is
    complete, or meta.json: the new dataset is about to replace the old one)."""
    cmd = [sys.executable, str(PREPARE), "--data_dir", str(d), *map(str, argv)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{SLEEP_ENV: "0.3"}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = d.parent / f".{d.name}.partial"
    try:
        deadline = time.time() + 120
        while not committed(work, name):  # the writer is between shards
            assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return work


def train_tiny(data_dir, out_dir, capsys=None):
    """train() a 1-layer model for 2 iterations on data_dir, with an evaluation: its results."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return train(TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16,
                                 block_size=16, batch_size=2, gradient_accumulation_steps=1, max_iters=2,
                                 eval_interval=2, eval_iters=1, log_interval=1, warmup_iters=1, lr_decay_iters=2,
                                 cpu=True, mixed_precision="no"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# -----------------------------------------------------------------------------
# resumable, atomic


def test_sigkill_mid_prepare_resumes_to_the_same_bytes(tmp_path, tiny_text, capsys, monkeypatch):
    """A real prepare process, killed with SIGKILL between two shards, leaves nothing that is accepted; the
    same command again continues after the last complete shard and gives the bytes of an uninterrupted run."""
    import nanogpt_hf.prepare as data

    prepare_dataset("x", data_dir=tmp_path / "ref", inputs=[str(tiny_text)], tokenizer="char", shard_size=400)
    d = tmp_path / "d"
    work = kill_prepare_after(d, ["--dataset", "x", "--input", tiny_text, "--tokenizer", "char", "--shard_size",
                                  "400"], "train_003.bin")
    assert (work / "train_000.bin").exists() and not (work / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards(d)
    kept = {f: (work / f).stat().st_ino for f in ("train_000.bin", "train_003.bin")}
    capsys.readouterr()
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char", shard_size=400)
    assert "resuming the prepare" in capsys.readouterr().out
    assert {f: (d / f).stat().st_ino for f in kept} == kept  # the shards done before the kill were kept
    assert all_files(d) == all_files(tmp_path / "ref") and not work.exists()
    # interrupted, then run again with other arguments: the leftovers are not mixed in
    monkeypatch.setenv(SLEEP_ENV, "0.001")
    monkeypatch.setattr(data.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char", shard_size=300, overwrite=True)
    monkeypatch.undo()
    assert (work / "train_000.bin").stat().st_size == 300 * 2
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char", shard_size=500)
    prepare_dataset("x", data_dir=tmp_path / "ref500", inputs=[str(tiny_text)], tokenizer="char", shard_size=500)
    assert all_files(d) == all_files(tmp_path / "ref500")


def test_sigkill_just_before_the_swap_keeps_the_old_dataset(tmp_path, tiny_text):
    """prepare --overwrite into an existing data_dir, killed when the new dataset is complete and about to
    take the old one's place: the old dataset is untouched, loads and trains; the re-run then replaces it.
    (Killed between two shards: test_prepare_cli's test_interrupted_rerun_keeps_the_old_dataset.)"""
    d = tmp_path / "d"
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char")
    old = all_files(d)
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text(encoding="utf-8").upper(), encoding="utf-8")
    (d / "notes.txt").write_text("mine")
    kill_prepare_after(d, ["--dataset", "y", "--input", other, "--tokenizer", "char", "--overwrite"], "meta.json")
    assert {k: v for k, v in all_files(d).items() if k != "notes.txt"} == old
    assert TokenShards(d).num_tokens == read_meta(d)["splits"]["train"]["num_tokens"]
    assert np.isfinite(train_tiny(d, tmp_path / "out")["val_loss"])
    prepare_dataset("y", data_dir=d, inputs=[str(other)], tokenizer="char", overwrite=True)
    assert read_meta(d)["dataset"] == "y" and TokenShards(d).vocab_size == len(set(other.read_text())) + 1  # + <|endoftext|>
    assert (d / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".d.*"))


# -----------------------------------------------------------------------------
# bounded memory

RSS_CHILD = """
import sys
from nanogpt_hf.prepare import prepare_dataset

def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

for name in sys.argv[1:]:
    prepare_dataset("rss", data_dir=name + ".d", inputs=[name], tokenizer="char", shard_size=1 << 20)
    print(name, peak_mb(), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_rss_does_not_grow_with_the_input(tmp_path):
    """One child process prepares an 8 MB and then a 32 MB text: its peak RSS after the second is within
    1.3x of the peak after the first (reading whole files, it grew by ~10x the input)."""
    block = make_text(1 << 20, seed=3)
    for name, n in (("small.txt", 8), ("large.txt", 32)):
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(block.replace("the", f"the{i % 7}"))
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "small.txt"), str(tmp_path / "large.txt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    peaks = dict(line.split() for line in run.stdout.splitlines() if line.endswith(tuple("0123456789")))
    small, large = float(peaks[str(tmp_path / "small.txt")]), float(peaks[str(tmp_path / "large.txt")])
    assert large <= 1.3 * small, f"peak RSS {small:.0f} MB for 8 MB of text, {large:.0f} MB for 32 MB"
    assert read_meta(tmp_path / "large.txt.d")["splits"]["train"]["num_tokens"] > 30_000_000


def test_chunk_stream_gives_the_rows_of_chunk_text(tiny_text):
    text = tiny_text.read_text(encoding="utf-8") + "x \n\n  y\n   \n z  "
    for size in (1, 7, 50, 300):
        for piece in (1, 13, 1000, len(text)):
            pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
            assert list(chunk_stream(pieces, size)) == chunk_text(text, size)


# -----------------------------------------------------------------------------
# llm.c / modded-nanogpt shards


def write_llmc_shard(path, tokens):
    """A shard as llm.c's dev/data/data_common.py describes it, written here without our writer: a header of
    256 int32 (magic 20240520, version 1, number of tokens, then zeros), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_a_folder_of_llmc_shards_trains_and_evaluates(tmp_path, capsys, tiktoken_cache):
    from nanogpt_hf import NanoGPTForCausalLM
    from nanogpt_hf.evaluation import evaluate_loss

    d = tmp_path / "fineweb10B"
    d.mkdir()
    rng = np.random.default_rng(0)
    # 50 of the 50,257 ids, drawn at random: learnable in 2 steps, so the run has a best model to save
    vocab = rng.integers(0, 50257, 50)
    val, train = rng.choice(vocab, 3000), rng.choice(vocab, 20000)
    write_llmc_shard(d / "fineweb_val_000000.bin", val)
    write_llmc_shard(d / "fineweb_train_000001.bin", train[:12000])
    write_llmc_shard(d / "fineweb_train_000002.bin", train[12000:])
    ds = TokenShards(d, "train")
    assert ds.num_tokens == 20000 and ds.vocab_size == 50257 and ds.eot_token_id == 50256
    assert np.array_equal(np.concatenate(ds.shards), train) and ds.max_token_id == train.max()
    results = train_tiny(d, tmp_path / "out")
    out = capsys.readouterr().out
    assert out.count("llm.c token shards without meta.json; assuming the GPT-2 tokenizer") == 1
    assert np.isfinite(results["val_loss"]) and results["val_loss"] > 0
    assert "will have no tokenizer" not in out  # the GPT-2 tokenizer the format implies goes into out_dir
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode("Hello world") == [15496, 995]
    model = NanoGPTForCausalLM.from_pretrained(tmp_path / "out")
    loss = evaluate_loss(model, TokenShards(d, "val"), batch_size=8, block_size=16, full=True, progress=False)
    assert np.isfinite(loss["loss"] if isinstance(loss, dict) else loss)
    (d / "fineweb_val_000000.bin").write_bytes((d / "fineweb_val_000000.bin").read_bytes()[:-2])  # truncated
    with pytest.raises(ValueError, match="fineweb_val_000000.bin is 7022 bytes.*3000 uint16 tokens after a 1024"):
        TokenShards(d, "val")
    write_llmc_shard(d / "fineweb_val_000000.bin", val)
    header = np.fromfile(d / "fineweb_val_000000.bin", dtype=np.int32)
    header[0] = 20240801  # llm.c's llama-3 shards: another magic
    header.tofile(d / "fineweb_val_000000.bin")
    with pytest.raises(ValueError, match="not an llm.c GPT-2 token shard .*magic 20240801"):
        TokenShards(d, "val")


def test_token_ids_beyond_the_model_vocab_are_refused_at_start(tmp_path, char_data_dir):
    d = tmp_path / "llmc"
    d.mkdir()
    write_llmc_shard(d / "x_train_000000.bin", [1, 2, 3] * 100)
    write_llmc_shard(d / "x_val_000000.bin", [1, 2, 65535] * 100)  # e.g. shards of another tokenizer
    with pytest.raises(ValueError) as e:
        train_tiny(d, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and f"{d / 'x_val_000000.bin'} holds token id 65535" in msg and "vocab_size 50257" in msg
    # a prepared data_dir: the largest id of each shard is recorded in meta.json
    meta = read_meta(char_data_dir)
    shards = meta["splits"]["train"]["shards"]
    assert all(s["max_token_id"] == int(np.fromfile(char_data_dir / s["file"], np.uint16).max()) for s in shards)
    ds = TokenShards(char_data_dir)
    assert ds.max_token_id == max(s["max_token_id"] for s in shards) < ds.vocab_size
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in char_data_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    meta["splits"]["val"]["shards"][0]["max_token_id"] = ds.vocab_size - 1  # a model with a smaller vocab
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"the model's vocab_size {ds.vocab_size - 10} is smaller than the "
                                         f"vocab_size {ds.vocab_size} of"):
        TokenShards(bad).check_vocab(ds.vocab_size - 10)
    meta["splits"]["val"]["shards"][0]["max_token_id"] = 65535  # beyond the data's own vocab: meta.json is wrong
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"splits.val.shards\[0\]: max_token_id 65535 is not a token id below "
                                         f"vocab_size {ds.vocab_size}"):
        TokenShards(bad)
    for split in meta["splits"].values():  # a data_dir prepared before max_token_id existed: not checked
        for s in split["shards"]:
            del s["max_token_id"]
    (bad / "meta.json").write_text(json.dumps(meta))
    assert TokenShards(bad).max_token_id is None
    TokenShards(bad).check_vocab(ds.vocab_size)


def test_prepare_writes_llmc_shards(tmp_path, tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    docs = [f"Doc {i}: " + "word " * (i * 7 % 40) + "end." for i in range(30)]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"doc{i:02d}.txt")
        files[-1].write_text(doc)
    d = tmp_path / "d"
    meta = prepare_dataset("mine", inputs=[str(tmp_path / "doc*.txt")], data_dir=d, format="llmc", shard_size=100)
    assert meta["format"] == "llmc" and meta["eot_position"] == "before"
    names = sorted(p.name for p in d.glob("*.bin"))
    assert names[0] == "mine_train_000000.bin" and "mine_val_000000.bin" in names
    got = []
    for name in names:  # read back by the format description, not by our reader
        raw = (d / name).read_bytes()
        header = np.frombuffer(raw[:1024], np.int32)
        assert header[0] == 20240520 and header[1] == 1 and len(raw) == 1024 + 2 * header[2]
        tokens = np.frombuffer(raw[1024:], np.uint16)
        assert tokens.max() == next(s["max_token_id"] for sp in meta["splits"].values() for s in sp["shards"]
                                    if s["file"] == name)
        got.append(tokens)
    train = np.concatenate([g for n, g in zip(names, got) if "_train_" in n]).tolist()
    assert train[0] == 50256 and train.count(50256) == meta["splits"]["train"]["num_documents"]  # EOT first
    texts = enc.decode(train).split("<|endoftext|>")[1:]
    assert all(t in docs for t in texts)
    assert np.array_equal(np.concatenate(TokenShards(d).shards), train)
    (d / "meta.json").unlink()  # as llm.c would see the folder
    assert np.array_equal(np.concatenate(TokenShards(d).shards), train)
    (tmp_path / "wide.txt").write_text("".join(chr(0x10000 + i) for i in range(66_000)), encoding="utf-8")
    with pytest.raises(ValueError, match="--format llmc holds uint16 tokens"):
        prepare_dataset("wide", inputs=[str(tmp_path / "wide.txt")], tokenizer="char", data_dir=tmp_path / "w",
                        format="llmc")


# -----------------------------------------------------------------------------
# a split larger than 1 GB


def test_a_split_larger_than_1gb_is_memory_mapped(tmp_path):
    """A 1.2 GB train shard (a sparse file: no disk, no allocation): windows read from its far end, and the
    reader's memory does not grow by the split's size."""
    n = 600_000_000
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "train_000.bin", "wb") as f:
        f.truncate(2 * n)
        f.seek(2 * (n - 100))
        f.write(np.arange(100, dtype=np.uint16).tobytes())
    np.arange(1000, dtype=np.uint16).tofile(d / "val_000.bin")
    split = lambda f, k, m: dict(num_tokens=k, shards=[dict(file=f, num_tokens=k, bytes=2 * k, max_token_id=m)])  # noqa
    (d / "meta.json").write_text(json.dumps(dict(format_version=1, dtype="uint16", vocab_size=1000,
                                                 splits=dict(train=split("train_000.bin", n, 99),
                                                             val=split("val_000.bin", 1000, 999)))))
    rss = lambda: int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1]) * 1024  # noqa
    before = rss()
    ds = TokenShards(d, "train")
    assert ds.num_tokens == n and ds.max_token_id == 99
    x = ds._gather(np.array([n - 101, 0, n // 2]), 101)
    assert x[0].tolist() == [0] + list(range(100)) and not x[1:].any()
    xb, yb = ds.get_batch(64, 1024, step=0)
    assert xb.shape == (64, 1024) and torch.equal(xb[:, 1:], yb[:, :-1])
    ds.check_vocab(1000)
    assert rss() - before < 200 * 2**20


# -----------------------------------------------------------------------------
# FineWeb recipes, offline: a local folder laid out like the Hub repos, with their columns

FINEWEB_README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""


def fineweb_standin(root, docs, edu=True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "sample" / "10BT").mkdir(parents=True)
    (root / "README.md").write_text(FINEWEB_README)
    n = len(docs)
    columns = dict(text=docs, id=[f"<urn:uuid:{i}>" for i in range(n)], dump=["CC-MAIN-2024-10"] * n,
                   url=[f"https://example.com/{i}" for i in range(n)], date=["2024-02-20T00:00:00Z"] * n,
                   file_path=["s3://commoncrawl/x.warc.gz"] * n, language=["en"] * n,
                   language_score=[0.9] * n, token_count=[len(d.split()) for d in docs])
    if edu:
        columns.update(score=[3.1] * n, int_score=[3] * n)
    half = n // 2  # two parquet files, read in order
    pq.write_table(pa.table({k: v[:half] for k, v in columns.items()}), root / "sample/10BT/000_00000.parquet")
    pq.write_table(pa.table({k: v[half:] for k, v in columns.items()}), root / "sample/10BT/001_00000.parquet")


@pytest.mark.parametrize("recipe, fmt", [("fineweb_edu10B", "nanogpt"), ("fineweb10B", "llmc")])
def test_fineweb_recipes_on_a_local_standin(tmp_path, tiktoken_cache, recipe, fmt):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    docs = [make_text(200 + 37 * i, seed=i) for i in range(40)]
    fineweb_standin(tmp_path / "hub", docs, edu=recipe == "fineweb_edu10B")
    d = tmp_path / recipe
    meta = prepare_dataset(recipe, hf_dataset=str(tmp_path / "hub"), data_dir=d, val_tokens=1000, shard_size=3000,
                           format=fmt)
    assert meta["source"] == f"{tmp_path / 'hub'} (sample-10BT)" and meta["tokenizer"] == "gpt2"
    val_docs, train_docs = meta["splits"]["val"]["num_documents"], meta["splits"]["train"]["num_documents"]
    assert val_docs + train_docs == len(docs) and len(meta["splits"]["train"]["shards"]) > 1
    expected = {}
    for split, part in (("val", docs[:val_docs]), ("train", docs[val_docs:])):  # in stream order, like llm.c
        ids = [t for doc in part for t in ([50256] if fmt == "llmc" else []) + enc.encode_ordinary(doc)
               + ([] if fmt == "llmc" else [50256])]
        expected[split] = ids
        assert np.concatenate(TokenShards(d, split).shards).tolist() == ids
    assert len(expected["val"]) >= 1000 > len(expected["val"]) - len(enc.encode_ordinary(docs[val_docs - 1])) - 1
    if fmt == "llmc":
        assert sorted(p.name for p in d.glob("*_val_*.bin")) == ["fineweb10B_val_000000.bin"]


def test_fineweb_config_is_the_llmc_schedule():
    from nanogpt_hf.train_config import parse_config

    cfg = parse_config([str(ROOT / "examples/configs/train_gpt2_fineweb.yaml")])
    assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * 8 == 524_288  # 8 GPUs
    assert (cfg.n_layer, cfg.n_embd, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters) == (12, 768, 6e-4, 715, 19073)
    assert cfg.data_dir == "data/fineweb_edu10B"


def test_bench_prepare_prints_the_ratio_to_the_bare_tokenizer(tmp_path, tiktoken_cache):
    from benchmarks.prepare import bench_prepare, format_prepare

    text = tmp_path / "t.txt"
    text.write_text(make_text(30_000, seed=5), encoding="utf-8")
    r = bench_prepare(text, tmp_path, num_proc=2, repeats=1)
    lines = format_prepare(r).splitlines()
    assert len(lines) == 4 and all("ratio" in x and "re-run" in x for x in lines)
    assert all("(target >= 0.9x)" in x and "bare" in x and "load" in x for x in lines[::2])
    assert r["tokenizers"]["gpt2"]["tokens"] == r["tokenizers"]["hf"]["tokens"] > 0  # the same BPE both ways
    assert all(v["bare"] > 0 and v["prepare"] > 0 and v["rerun"] > 0 for v in r["tokenizers"].values())


def test_a_streamed_prepare_resumes_to_the_same_bytes(tmp_path, tiktoken_cache, monkeypatch):
    """Interrupted in train (after val, whose document count tells train where to start), then run again."""
    import nanogpt_hf.prepare as data

    fineweb_standin(tmp_path / "hub", [make_text(300 + 41 * i, seed=i) for i in range(30)])
    args = dict(hf_dataset=str(tmp_path / "hub"), val_tokens=800, shard_size=1500)
    prepare_dataset("fineweb_edu10B", data_dir=tmp_path / "ref", **args)
    calls = []

    def interrupt(seconds):
        calls.append(seconds)
        if len(calls) == 2:  # after train's second shard (val, shorter than a shard, is complete)
            raise KeyboardInterrupt

    monkeypatch.setenv(SLEEP_ENV, "0.001")
    monkeypatch.setattr(data.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("fineweb_edu10B", data_dir=tmp_path / "d", **args)
    monkeypatch.undo()
    progress = json.loads((tmp_path / ".d.partial" / "progress.json").read_text())
    assert progress["splits"]["val"]["done"] and len(progress["splits"]["train"]["shards"]) == 2
    prepare_dataset("fineweb_edu10B", data_dir=tmp_path / "d", **args)
    assert all_files(tmp_path / "d") == all_files(tmp_path / "ref")
