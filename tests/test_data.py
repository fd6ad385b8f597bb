"""Token shards: prepare (char, GPT-2, HF tokenizers, documents, uint32), the reader and its sampler.

    python -m pytest tests/test_data.py -q
"""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from benchmarks.data_loader import benchmark_get_batch
from nanogpt_hf.data import TokenShards, load_tokenizer, read_meta
from nanogpt_hf.prepare import prepare_dataset
from nanogpt_hf.sources import chunk_text, stdlib_files


def stream(data_dir, split):
    """The whole split as one array, read straight from the files listed in meta.json."""
    meta = read_meta(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]]).astype(np.int64)


def all_files(data_dir):
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# prepare


def test_char_round_trip_split_sizes_and_shards(tmp_path, tiny_text):
    text = tiny_text.read_text(encoding="utf-8")
    meta = prepare_dataset("tiny", data_dir=tmp_path / "d", inputs=[str(tiny_text)], tokenizer="char",
                           shard_size=1000)
    d = tmp_path / "d"
    n = int(len(text) * 0.9)  # nanoGPT: the first 90% of the characters are train
    assert meta["splits"]["train"]["num_tokens"] == n and meta["splits"]["val"]["num_tokens"] == len(text) - n
    # the characters + the tokenizer's <|endoftext|> (never in the shards: eot_token_id stays None)
    assert meta["vocab_size"] == len(set(text)) + 1 and meta["dtype"] == "uint16" and meta["eot_token_id"] is None
    assert meta["format_version"] == 1 and meta["tokenizer"] == "char" and meta["split_by"] == "characters"
    shards = meta["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [f"train_{i:03d}.bin" for i in range(-(-n // 1000))]
    assert all(s["num_tokens"] <= 1000 and (d / s["file"]).stat().st_size == s["bytes"] for s in shards)
    assert json.loads((d / "meta.json").read_text()) == meta
    tok = load_tokenizer(d)
    assert tok.decode(stream(d, "train")) + tok.decode(stream(d, "val")) == text
    # windows -> decode == the source text, across all the shard boundaries
    ds = TokenShards(d, "train")
    xs = [x for x, _ in ds.iter_sequential(batch_size=5, block_size=64)]
    assert ds.num_windows(64) == (n - 1) // 64 and sum(len(x) for x in xs) == ds.num_windows(64)
    assert tok.decode(torch.cat(xs).flatten()) == text[:ds.num_windows(64) * 64]


def test_gpt2_matches_tiktoken_and_nanogpt_split(tmp_path, tiny_text, tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    text = tiny_text.read_text(encoding="utf-8")
    meta = prepare_dataset("shakespeare", data_dir=tmp_path / "s", inputs=[str(tiny_text)], shard_size=700)
    n = int(len(text) * 0.9)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert stream(tmp_path / "s", "train").tolist() == enc.encode_ordinary(text[:n])  # nanoGPT's shakespeare
    assert stream(tmp_path / "s", "val").tolist() == enc.encode_ordinary(text[n:])
    tok = load_tokenizer(tmp_path / "s")  # the HF tokenizer shipped with the data agrees with tiktoken
    assert tok(text[:n])["input_ids"] == enc.encode_ordinary(text[:n]) and tok.eos_token_id == 50256


def test_chunking_keeps_gpt2_tokens(tiny_text, tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    text = tiny_text.read_text(encoding="utf-8") + "x \n\n  y\n   \n z"
    for size in (1, 7, 50, 300):
        rows = chunk_text(text, size)
        assert "".join(rows) == text and len(rows) > 1
        assert [t for r in rows for t in enc.encode_ordinary(r)] == enc.encode_ordinary(text)


def test_documents_split_with_eot_from_a_local_hf_dataset(tmp_path, tiktoken_cache):
    docs = [f"Document number {i}.\nIt says {'la ' * i}and ends." for i in range(10)]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "data.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        prepare_dataset("docs", hf_dataset=str(tmp_path / "hf"), data_dir=tmp_path / "d")
    meta = prepare_dataset("docs", hf_dataset=str(tmp_path / "hf"), text_column="body", val_fraction=0.2,
                           data_dir=tmp_path / "d", num_proc=2)  # parallel map, as for openwebtext
    assert meta["split_by"] == "documents" and meta["eot_token_id"] == 50256
    assert (meta["splits"]["train"]["num_documents"], meta["splits"]["val"]["num_documents"]) == (8, 2)
    tok = load_tokenizer(tmp_path / "d")
    got = []
    for split in ("train", "val"):
        ids = stream(tmp_path / "d", split).tolist()
        assert ids[-1] == 50256  # one EOT after every document
        got += tok.decode(ids).split("<|endoftext|>")[:-1]
    assert sorted(got) == sorted(docs)


def test_uint32_with_a_large_vocab_hf_tokenizer(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<eos>": 70_001}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        tmp_path / "tok")
    files = []
    for i in range(3):  # several files: one document each, split by documents
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(f"w{69_999 - i} w1 w65536 w{i}\nw70")
    meta = prepare_dataset("big", inputs=[str(f) for f in files], tokenizer=str(tmp_path / "tok"),
                           data_dir=tmp_path / "d", val_fraction=0.3)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eot_token_id"] == 70_001
    ids = np.concatenate([stream(tmp_path / "d", "train"), stream(tmp_path / "d", "val")])
    assert sorted(ids[(ids > 69_990) & (ids < 70_000)].tolist()) == [69_997, 69_998, 69_999]
    assert (ids == 70_001).sum() == 3  # one <eos> per document
    x, y = TokenShards(tmp_path / "d", "train").get_batch(2, 3, step=0)
    assert x.dtype == torch.int64 and x.max() < 70_002


def test_uint32_char_vocab(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(66_000)) + "\nend\n"
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare_dataset("wide", inputs=[str(tmp_path / "wide.txt")], tokenizer="char", data_dir=tmp_path / "d")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(set(text)) + 1
    tok = load_tokenizer(tmp_path / "d")
    assert tok.decode(stream(tmp_path / "d", "train")) + tok.decode(stream(tmp_path / "d", "val")) == text


def test_python_char_is_deterministic(tmp_path):
    a = prepare_dataset("python_char", data_dir=tmp_path / "a", max_bytes=150_000)
    b = prepare_dataset("python_char", data_dir=tmp_path / "b", max_bytes=150_000)
    assert a == b and all_files(tmp_path / "a") == all_files(tmp_path / "b")
    _, texts = stdlib_files(150_000)
    assert a["split_by"] == "documents" and sum(len(t) for t in texts) == sum(
        s["num_tokens"] for s in a["splits"].values())
    assert a["splits"]["train"]["num_documents"] + a["splits"]["val"]["num_documents"] == len(texts)


def test_rerun_is_idempotent_and_keeps_other_files(tmp_path, tiny_text):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    args = dict(data_dir=d, inputs=[str(tiny_text)], tokenizer="char")
    prepare_dataset("tiny", shard_size=500, **args)
    first = all_files(d)
    prepare_dataset("tiny", shard_size=500, **args)
    assert all_files(d) == first
    prepare_dataset("tiny", shard_size=10**6, **args)  # fewer shards: the old ones must go
    assert sorted(p.name for p in d.glob("*.bin")) == ["train_000.bin", "val_000.bin"]
    assert (d / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".d.*"))


# -----------------------------------------------------------------------------
# reading


def test_get_batch_shapes_shift_and_determinism(char_data_dir):
    ds = TokenShards(char_data_dir, "train")
    full = torch.from_numpy(stream(char_data_dir, "train"))
    x, y = ds.get_batch(12, 64, step=3, seed=1)
    assert x.shape == y.shape == (12, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y, s in zip(x, y, ds.sample_starts(12, 64, step=3, seed=1)):  # real windows of the split
        assert torch.equal(row_x, full[s:s + 64]) and torch.equal(row_y, full[s + 1:s + 65])
    again = TokenShards(char_data_dir, "train").get_batch(12, 64, step=3, seed=1)  # a "resumed" reader
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(ds.get_batch(12, 64, step=4, seed=1)[0], x)
    assert not torch.equal(ds.get_batch(12, 64, step=3, seed=2)[0], x)
    assert not torch.equal(ds.get_batch(12, 64, step=3, seed=1, micro_step=1)[0], x)


def test_ranks_draw_disjoint_slices_of_one_global_batch(char_data_dir):
    ds = TokenShards(char_data_dir, "train")
    world = [ds.get_batch(4, 32, step=7, rank=r, world_size=3) for r in range(3)]
    x_all, y_all = ds.get_batch(12, 32, step=7)  # same draw, one rank
    assert torch.equal(torch.cat([x for x, _ in world]), x_all)
    assert torch.equal(torch.cat([y for _, y in world]), y_all)
    for step in range(100):  # offsets are distinct within the global batch -> no window is shared by two ranks
        starts = [s for r in range(3) for s in ds.sample_starts(4, 32, step=step, rank=r, world_size=3)]
        assert len(set(starts)) == 12 and max(starts) + 33 <= ds.num_tokens
    with pytest.raises(ValueError, match="rank 3"):
        ds.get_batch(4, 32, step=0, rank=3, world_size=3)


def test_windows_across_shard_boundaries(char_data_dir):
    ds = TokenShards(char_data_dir, "train")
    assert len(ds.shards) > 3
    full = stream(char_data_dir, "train")
    starts = np.array(sorted({b + d for b in ds.bounds[1:-1] for d in range(-70, 3)} | {0, ds.num_tokens - 65}))
    windows = ds._gather(starts, 65)
    assert all((windows[i] == full[s:s + 65]).all() for i, s in enumerate(starts))


def test_iter_sequential_covers_split_once_across_ranks(char_data_dir):
    ds = TokenShards(char_data_dir, "val")
    one = torch.cat([x for x, _ in ds.iter_sequential(7, 16)])
    parts = [torch.cat([x for x, _ in ds.iter_sequential(7, 16, rank=r, world_size=2)]) for r in range(2)]
    assert len(one) == ds.num_windows(16) == len(parts[0]) + len(parts[1])
    assert torch.equal(torch.stack([parts[i % 2][i // 2] for i in range(len(one))]), one)
    assert torch.equal(one.flatten(), torch.from_numpy(stream(char_data_dir, "val")[:len(one) * 16]))


def test_reader_validation(tmp_path, char_data_dir):
    import shutil

    ds = TokenShards(char_data_dir, "train")
    ds.check_vocab(ds.vocab_size)
    with pytest.raises(ValueError, match=f"vocab_size {ds.vocab_size - 1} is smaller"):
        ds.check_vocab(ds.vocab_size - 1)
    with pytest.raises(ValueError, match="too few"):
        TokenShards(char_data_dir, "val").get_batch(10_000, 64, step=0)
    with pytest.raises(ValueError, match="no 'test' split"):
        TokenShards(char_data_dir, "test")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards(tmp_path)
    d = tmp_path / "copy"
    shutil.copytree(char_data_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(meta | {"format_version": 3}))
    with pytest.raises(ValueError, match=r"prepared by a newer nanogpt_hf \(format 3\); upgrade"):
        TokenShards(d)
    (d / "meta.json").write_text(json.dumps(meta | {"dtype": "float32"}))
    with pytest.raises(ValueError, match="unsupported dtype"):
        TokenShards(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        TokenShards(d)
    (d / "meta.json").write_text(json.dumps(meta))
    with open(d / "train_001.bin", "r+b") as f:  # a truncated shard is refused, not read as garbage
        f.truncate(10)
    with pytest.raises(ValueError, match="train_001.bin is 10 bytes"):
        TokenShards(d)


def test_get_batch_is_cheap(char_data_dir):
    seconds = benchmark_get_batch(char_data_dir, batch_size=12, block_size=64, n=200)
    assert 0 < seconds < 0.04 * 0.02 * 5  # budget: 2% of a ~40 ms step (x5 slack for a busy test machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_get_batch_to_cuda(char_data_dir):
    ds = TokenShards(char_data_dir, "train")
    x, y = ds.get_batch(12, 64, step=0, device="cuda")
    assert x.is_cuda and y.is_cuda
    cpu = ds.get_batch(12, 64, step=0)
    assert torch.equal(x.cpu(), cpu[0]) and torch.equal(y.cpu(), cpu[1])
