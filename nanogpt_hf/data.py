"""
Token shards, nanoGPT-style: text -> datasets.map(tokenize) -> train_000.bin, val_000.bin ... (raw uint16 or
uint32 token ids, one long stream per split) + meta.json + tokenizer/ (Hugging Face format), and the reader
that serves random (x, y) windows from them through np.memmap.

    python examples/prepare.py --dataset shakespeare_char        # -> data/shakespeare_char/

    from nanogpt_hf.data import TokenShards
    ds = TokenShards("data/shakespeare_char", split="train")
    x, y = ds.get_batch(batch_size=12, block_size=64, step=0)   # (12, 64) int64 each, y = x shifted by one

Layout of a data_dir (meta.json is written last: a data_dir without it is not a dataset):
    meta.json     format_version, dataset, source, tokenizer, vocab_size, dtype, split_by, eot_token_id (the id
                  appended after every document; null for one-text datasets and char level), splits
                  {train: {num_tokens, shards: [{file, num_tokens, bytes}, ...]}, val: ...}
    tokenizer/    AutoTokenizer.from_pretrained(data_dir + "/tokenizer") works
    train_000.bin train_001.bin ... val_000.bin   each at most shard_size tokens; read them as one stream
"""

import json
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from .tokenization import (
    GPT2_EOT,
    build_char_tokenizer,
    char_vocab,
    default_unk_char,
    gpt2_tokenizer,
    load_pretrained_tokenizer,
    tiktoken_gpt2,
)

FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
DEFAULT_SHARD_SIZE = 100_000_000  # tokens per .bin file (200 MB in uint16)
DEFAULT_SEED = 2357  # nanoGPT's openwebtext split seed
DEFAULT_MAX_BYTES = 4_000_000  # python_char: how much of the standard library to read
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SLEEP_ENV = "NANOGPT_HF_PREPARE_SLEEP"  # test hook: seconds to sleep after each shard is written
CHUNK_CHARS = 1 << 16  # a long single text goes through datasets.map as rows of about this many chars
WRITE_BATCH_ROWS = 256  # rows per write batch: bounds the writer's memory (<= 16M tokens for text chunks)
SHARD_FILE = re.compile(r"(train|val)_\d{3,}\.bin")

BUILTIN = {  # the datasets of nanoGPT's data/ folder, plus an offline one
    "shakespeare_char": dict(tokenizer="char", val_fraction=0.1, inputs=[SHAKESPEARE_URL]),
    "shakespeare": dict(tokenizer="gpt2", val_fraction=0.1, inputs=[SHAKESPEARE_URL]),
    "openwebtext": dict(tokenizer="gpt2", val_fraction=0.0005, hf_dataset="Skylion007/openwebtext"),
    "python_char": dict(tokenizer="char", val_fraction=0.1, stdlib=True),
}

# -----------------------------------------------------------------------------
# text sources


def download(url, dest):
    """url -> dest (kept as a cache: a second call does nothing). Atomic: dest appears only when complete."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        part.unlink(missing_ok=True)
        if not any(dest.parent.iterdir()):
            dest.parent.rmdir()  # leave no empty data_dir behind
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"could not download {url} ({reason}); pass a local copy with --input FILE") from None
    os.replace(part, dest)
    return dest


def read_text(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found (--input)")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"input file {path} is empty (--input)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"input file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. iconv -t UTF-8"
        ) from None


def resolve_inputs(inputs, data_dir):
    """--input values -> local paths: globs expanded (sorted), URLs downloaded into data_dir once."""
    paths = []
    for item in inputs:
        if urlparse(item).scheme in ("http", "https"):
            paths.append(download(item, Path(data_dir) / (Path(urlparse(item).path).name or "input.txt")))
        elif any(c in item for c in "*?["):
            matches = sorted(Path().glob(item) if not Path(item).is_absolute() else Path("/").glob(item[1:]))
            if not matches:
                raise FileNotFoundError(f"--input {item} matches no file")
            paths += matches
        else:
            paths.append(Path(item))
    return paths


def stdlib_files(max_bytes=DEFAULT_MAX_BYTES):
    """The python_char corpus: this Python's standard library *.py, sorted by path, up to max_bytes.
    Test suites (deliberately odd files) and installed packages are left out, as are non-UTF-8 files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: site-packages alone can be huge
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    texts, total = [], 0
    for f in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        if text.strip():
            texts.append(text)
            total += size
    if not texts:
        raise ValueError(f"no standard library source found under {root} within --max_bytes {max_bytes}")
    return root, texts


def chunk_text(text, size=CHUNK_CHARS):
    """Cut one long text into rows of ~size chars so that datasets.map can work on it in parallel and in
    bounded memory. Each cut goes just before a space/newline that follows a non-space character: GPT-2's
    pre-tokenizer always splits there, so BPE gives exactly the tokens of the whole text (and char-level
    tokenization does not care)."""
    cut = re.compile(r"(?<=\S)[ \n]")
    rows, i = [], 0
    while i < len(text):
        m = cut.search(text, i + size)
        j = m.start() if m else len(text)
        rows.append(text[i:j])
        i = j
    return rows


def load_hub_dataset(name, config=None, split="train", revision=None, text_column="text"):
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:
        if "scripts are no longer supported" in str(e) and revision is None:
            # datasets >= 4 refuses loading scripts (the old openwebtext); the Hub keeps a parquet export
            print(f"{name} is a script dataset; loading its parquet export (revision refs/convert/parquet)")
            return load_hub_dataset(name, config, split, "refs/convert/parquet", text_column)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load --hf_dataset {name} ({type(e).__name__}: {msg})") from None
    if text_column not in ds.column_names:
        raise ValueError(f"--hf_dataset {name} has no column {text_column!r} (it has {ds.column_names}); "
                         "pass --text_column")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def split_train_val(docs, val_fraction, seed, source):
    """A list of texts or a Dataset of documents -> ({"train": Dataset, "val": Dataset}, by_documents).
    One text: the first (1 - val_fraction) of its characters is train, like nanoGPT's shakespeare. Several
    documents: a seeded random split of the documents, like nanoGPT's openwebtext."""
    import datasets

    if isinstance(docs, list) and len(docs) == 1:
        text = docs[0]
        n = int(len(text) * (1 - val_fraction))
        if not text[:n] or not text[n:]:
            raise ValueError(f"{source} is too short to split with --val_fraction {val_fraction} "
                             f"({len(text)} characters)")
        return {s: datasets.Dataset.from_dict({"text": chunk_text(t)})
                for s, t in (("train", text[:n]), ("val", text[n:]))}, False
    docs = datasets.Dataset.from_dict({"text": docs}) if isinstance(docs, list) else docs
    if len(docs) < 2:
        raise ValueError(f"{source} has {len(docs)} document(s): too few to split into train and val")
    split = docs.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": split["train"], "val": split["test"]}, True


# -----------------------------------------------------------------------------
# tokenization (functions run inside datasets.map, possibly in worker processes)

_tiktoken = None


def _encode_chars(batch, lut, dtype):
    # nanoGPT's [stoi[c] for c in text], vectorized: code points -> ids through a lookup table whose last
    # entry (and every hole) is the replacement id, as in build_char_tokenizer
    ids = [lut[np.minimum(np.frombuffer((t or "").encode("utf-32-le"), np.uint32), len(lut) - 1)].astype(dtype)
           for t in batch["text"]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def _encode_tiktoken(batch, eot):
    global _tiktoken
    _tiktoken = _tiktoken or tiktoken_gpt2()
    ids = _tiktoken.encode_ordinary_batch([t or "" for t in batch["text"]])
    ids = [x + [eot] for x in ids] if eot is not None else ids
    return {"ids": ids, "len": [len(x) for x in ids]}


def _encode_hf(batch, tokenizer, eot):
    ids = tokenizer([t or "" for t in batch["text"]], add_special_tokens=False)["input_ids"]
    ids = [x + [eot] for x in ids] if eot is not None else ids
    return {"ids": ids, "len": [len(x) for x in ids]}


def _distinct_chars(splits, num_proc):
    def chars(batch):
        return {"chars": ["".join(set("".join(t or "" for t in batch["text"])))]}

    found = set()
    for ds in splits.values():
        out = ds.map(chars, batched=True, batch_size=64, remove_columns=ds.column_names, num_proc=num_proc,
                     desc="collecting characters")
        found.update("".join(out["chars"]))
    return found


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 2**16 else "uint32"


def make_tokenizer(spec, splits, by_documents, num_proc):
    """--tokenizer -> (HF tokenizer to save, map function, its kwargs, vocab_size, eot id or None)."""
    if spec == "char":
        tok = build_char_tokenizer(_distinct_chars(splits, num_proc))
        stoi = char_vocab(tok)
        unk = stoi[default_unk_char(stoi)]
        lut = np.full(max(map(ord, stoi)) + 2, unk, dtype=np.int64)
        lut[[ord(c) for c in stoi]] = list(stoi.values())
        # the vocab: the characters, then the tokenizer's <|endoftext|> (not inserted into the shards)
        return tok, _encode_chars, dict(lut=lut, dtype=token_dtype(len(tok))), len(tok), None
    eot = None
    if spec == "gpt2":
        tiktoken_gpt2()  # fail early and clearly when the BPE files are unavailable
        tok = gpt2_tokenizer()
        eot = GPT2_EOT if by_documents else None
        return tok, _encode_tiktoken, dict(eot=eot), 50257, eot
    tok = load_pretrained_tokenizer(spec)
    eot = tok.eos_token_id if by_documents else None
    return tok, _encode_hf, dict(tokenizer=tok, eot=eot), len(tok), eot


# -----------------------------------------------------------------------------
# writing shards


def write_split(ds, out_dir, split, dtype, shard_size):
    """Tokenized rows -> split_000.bin, split_001.bin ... of at most shard_size tokens each, through np.memmap,
    WRITE_BATCH_ROWS rows at a time (an OpenWebText-size split never has to fit in memory)."""
    import pyarrow.compute as pc

    total = int(ds.data.column("len").to_numpy().sum())
    if total == 0:
        raise ValueError(f"the {split} split has no tokens; give more text or change --val_fraction")
    sizes = [min(shard_size, total - start) for start in range(0, total, shard_size)]
    names = [f"{split}_{i:03d}.bin" for i in range(len(sizes))]
    sleep = float(os.environ.get(SLEEP_ENV) or 0)
    shard, k, pos = None, -1, 0  # the open memmap, its index, the write position in it
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"writing {split}") as bar:
        for batch in ds.with_format("arrow").iter(batch_size=WRITE_BATCH_ROWS):
            ids = pc.list_flatten(batch["ids"]).to_numpy()
            while len(ids):
                if shard is None or pos == len(shard):  # next file
                    if shard is not None:
                        shard.flush()
                        time.sleep(sleep)
                    k, pos = k + 1, 0
                    shard = np.memmap(out_dir / names[k], dtype=dtype, mode="w+", shape=(sizes[k],))
                n = min(len(ids), len(shard) - pos)
                shard[pos:pos + n] = ids[:n]
                pos, ids = pos + n, ids[n:]
                bar.update(n)
    shard.flush()
    del shard
    itemsize = np.dtype(dtype).itemsize
    return {"num_tokens": total,
            "shards": [{"file": f, "num_tokens": n, "bytes": n * itemsize} for f, n in zip(names, sizes)]}


def _commit(tmp, data_dir):
    """Move a finished dataset from tmp into data_dir. meta.json leaves first and arrives last, so at no
    moment does data_dir hold a meta.json next to shards it does not describe."""
    if not data_dir.exists():
        os.replace(tmp, data_dir)
        return
    (data_dir / "meta.json").unlink(missing_ok=True)
    for p in data_dir.iterdir():  # our old files; anything else (e.g. a downloaded input.txt) stays
        if p.name == "tokenizer" and p.is_dir():
            shutil.rmtree(p)
        elif SHARD_FILE.fullmatch(p.name):
            p.unlink()
    for p in tmp.iterdir():
        if p.name != "meta.json":
            os.replace(p, data_dir / p.name)
    os.replace(tmp / "meta.json", data_dir / "meta.json")
    tmp.rmdir()


def _remove_stale_tmp_dirs(data_dir):
    # leftovers of prepares that were killed: .NAME.tmp-PID whose process is gone
    for p in data_dir.parent.glob(f".{data_dir.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# -----------------------------------------------------------------------------
# prepare


def prepare_dataset(dataset, data_dir=None, inputs=None, tokenizer=None, hf_dataset=None, hf_config=None,
                    hf_split="train", hf_revision=None, text_column="text", val_fraction=None,
                    shard_size=DEFAULT_SHARD_SIZE, num_proc=None, seed=DEFAULT_SEED,
                    max_bytes=DEFAULT_MAX_BYTES, overwrite=False):
    """Tokenize a dataset into data_dir (default data/<dataset>) and return its meta.json as a dict."""
    import datasets

    t0 = time.time()
    recipe = BUILTIN.get(dataset, {})
    if not recipe and not inputs and not hf_dataset:
        raise ValueError(f"unknown dataset {dataset!r} (built-in: {', '.join(BUILTIN)}); for your own text "
                         "pass --input FILE or --hf_dataset ID")
    if recipe.get("stdlib") and (inputs or hf_dataset):
        raise ValueError(f"{dataset} reads the Python standard library; for other text use --dataset custom")
    tokenizer = tokenizer or recipe.get("tokenizer") or "gpt2"
    val_fraction = recipe.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_size < 1 or (num_proc is not None and num_proc < 1) or seed < 0:
        raise ValueError("--shard_size and --num_proc must be >= 1 and --seed >= 0")
    data_dir = Path(data_dir or Path("data") / dataset)
    if (data_dir / "meta.json").is_file() and not overwrite:
        try:
            old = json.loads((data_dir / "meta.json").read_text())
        except ValueError:
            old = {}  # a damaged meta.json: nothing worth protecting
        if (old.get("tokenizer"), old.get("dataset")) != (tokenizer, dataset):
            raise ValueError(f"data_dir {data_dir} holds {old.get('dataset')!r} prepared with tokenizer "
                             f"{old.get('tokenizer')!r}, not {dataset!r} with {tokenizer!r}; choose another "
                             "--data_dir or pass --overwrite")

    # 1) text -> {"train": Dataset, "val": Dataset} with one "text" column
    hf_dataset = hf_dataset or (None if inputs else recipe.get("hf_dataset"))
    if hf_dataset:
        docs = load_hub_dataset(hf_dataset, hf_config, hf_split, hf_revision, text_column)
        source = hf_dataset + (f" ({hf_config})" if hf_config else "")
        num_proc = num_proc or min(8, os.cpu_count() or 1)
    else:
        if recipe.get("stdlib"):
            root, docs = stdlib_files(max_bytes)
            source = f"{root}/**/*.py (Python {sys.version.split()[0]}, {len(docs)} files)"
        else:
            docs = [read_text(p) for p in resolve_inputs(inputs or recipe["inputs"], data_dir)]
            source = " ".join(inputs or recipe["inputs"])
        num_proc = num_proc or 1  # local text is small: worker processes would cost more than they save
    splits, by_documents = split_train_val(docs, val_fraction, seed, source)

    # 2) tokenize: datasets.map(batched=True, num_proc=...) -> rows of token ids
    tok, encode, encode_kwargs, vocab_size, eot = make_tokenizer(tokenizer, splits, by_documents, num_proc)
    dtype = token_dtype(vocab_size)
    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype)), "len": datasets.Value("int64")})
    tokenized = {s: ds.map(encode, batched=True, fn_kwargs=encode_kwargs, remove_columns=ds.column_names,
                           features=features, num_proc=min(num_proc, len(ds)), desc=f"tokenizing {s}")
                 for s, ds in splits.items()}

    # 3) write shards + tokenizer + meta.json into a temporary sibling dir, then move it into place
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(data_dir)
    tmp = data_dir.parent / f".{data_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        split_info = {s: write_split(ds, tmp, s, dtype, shard_size) for s, ds in tokenized.items()}
        if by_documents:
            for s, ds in tokenized.items():
                split_info[s]["num_documents"] = len(ds)
        tok.save_pretrained(tmp / "tokenizer")
        meta = dict(format_version=FORMAT_VERSION, dataset=dataset, source=source, tokenizer=tokenizer,
                    tokenizer_class=type(tok).__name__, vocab_size=vocab_size, eot_token_id=eot, dtype=dtype,
                    split_by="documents" if by_documents else "characters", val_fraction=val_fraction,
                    seed=seed, shard_size=shard_size, splits=split_info)
        if tokenizer == "char":
            meta["unk_char"] = default_unk_char(char_vocab(tok))  # what unknown characters are encoded as
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _commit(tmp, data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    dt = time.time() - t0
    total = sum(info["num_tokens"] for info in split_info.values())
    print(f"prepared {dataset} in {data_dir}: tokenizer {tokenizer}, vocab_size {vocab_size}, {dtype}")
    for s, info in split_info.items():
        nbytes = sum(sh["bytes"] for sh in info["shards"])
        print(f"  {s:5s} {info['num_tokens']:>14,} tokens  {nbytes / 1e6:10.2f} MB  {len(info['shards'])} shard(s)")
    print(f"  {dt:.1f} s, {total / dt:,.0f} tokens/s")
    return meta


# -----------------------------------------------------------------------------
# reading


def read_meta(data_dir):
    """data_dir/meta.json, validated (format version, dtype, vocab fits dtype)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} has no meta.json: not a prepared dataset (or its prepare was "
                                "interrupted); run examples/prepare.py with --data_dir " + str(data_dir))
    try:
        meta = json.loads(path.read_text())
        version, dtype, vocab_size = meta["format_version"], meta["dtype"], meta["vocab_size"]
        meta["splits"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); prepare the data again") from None
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has an invalid format_version {version!r}; prepare the data again")
    if version > FORMAT_VERSION:
        raise ValueError(f"data_dir {data_dir} was prepared by a newer nanogpt_hf (format {version}); upgrade")
    if dtype not in DTYPES:
        raise ValueError(f"{path}: unsupported dtype {dtype!r} (expected one of {DTYPES})")
    if not 0 < vocab_size <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{path}: vocab_size {vocab_size} does not fit dtype {dtype}")
    return meta


class TokenShards:
    """One split of a prepared data_dir as a single token stream over memory-mapped shards."""

    def __init__(self, data_dir, split="train"):
        self.data_dir, self.split = Path(data_dir), split
        self.meta = read_meta(data_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"{data_dir} has no {split!r} split (it has {list(self.meta['splits'])})")
        self.dtype = np.dtype(self.meta["dtype"])
        self.shards = []
        for sh in self.meta["splits"][split]["shards"]:
            path = self.data_dir / sh["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != sh["num_tokens"] * self.dtype.itemsize:
                raise ValueError(f"shard {path} is {'missing' if size is None else f'{size} bytes'}, meta.json "
                                 f"says {sh['num_tokens']} {self.dtype} tokens; prepare the data again")
            # one memmap per shard for the reader's lifetime: pages are file-backed and shared (the RSS growth
            # nanoGPT avoided by re-opening is page cache the kernel can drop, not a leak)
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.bounds = np.cumsum([0] + [len(s) for s in self.shards])  # (num_shards+1,) start of each shard
        self.num_tokens = int(self.bounds[-1])
        self._split_key = zlib.crc32(split.encode())  # decorrelates the train and val draws of a step

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]

    @property
    def eot_token_id(self):
        return self.meta.get("eot_token_id")

    def check_vocab(self, model_vocab_size):
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"the model's vocab_size {model_vocab_size} is smaller than the vocab_size "
                             f"{self.vocab_size} of {self.data_dir}; use vocab_size >= {self.vocab_size}")

    def _gather(self, starts, length):
        """(B,) start offsets in the split -> (B, length) tokens; a window may run across shard boundaries."""
        shard_idx = np.searchsorted(self.bounds, starts, side="right") - 1  # (B,) shard of each window start
        k = shard_idx[0] if len(starts) else 0
        if (shard_idx == k).all() and starts.max(initial=0) + length <= self.bounds[k + 1]:
            # fast path, the usual case: every window lies inside one shard -> a single fancy-index read
            idx = (starts - self.bounds[k])[:, None] + np.arange(length)  # (B, length)
            return np.asarray(self.shards[k][idx])
        out = np.empty((len(starts), length), dtype=self.dtype)
        for i, (start, k) in enumerate(zip(starts, shard_idx)):
            pos, filled = start - self.bounds[k], 0
            while filled < length:
                piece = self.shards[k][pos:pos + length - filled]
                out[i, filled:filled + len(piece)] = piece
                filled, k, pos = filled + len(piece), k + 1, 0
        return out

    @staticmethod
    def _to_torch(windows, device):
        t = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
        if device is not None and torch.device(device).type == "cuda":
            # pinned host memory lets the copy overlap with compute (nanoGPT's get_batch)
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return (x, y) if device is None else (x.to(device), y.to(device))

    def get_batch(self, batch_size, block_size, step, seed=0, rank=0, world_size=1, micro_step=0, device=None):
        """Random windows like nanoGPT's get_batch, but a pure function of (seed, step, micro_step, rank):
        every rank draws the same world_size*batch_size distinct offsets and takes its own slice, so ranks
        never share a window and a resumed run draws exactly the batches it would have drawn."""
        starts = self.sample_starts(batch_size, block_size, step, seed, rank, world_size, micro_step)
        return self._to_torch(self._gather(starts, block_size + 1), device)

    def sample_starts(self, batch_size, block_size, step, seed=0, rank=0, world_size=1, micro_step=0):
        """(batch_size,) offsets in the split of the windows get_batch returns."""
        if not 0 <= rank < world_size or batch_size < 1 or block_size < 1:
            raise ValueError(f"need batch_size, block_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                             f"{block_size}, rank {rank}, world_size {world_size}")
        n_starts, k = self.num_tokens - block_size, world_size * batch_size
        if n_starts < k:
            raise ValueError(f"the {self.split} split of {self.data_dir} has {self.num_tokens} tokens: too few "
                             f"for {k} distinct windows of block_size {block_size}; use a smaller block_size "
                             "or batch_size, or more data")
        rng = np.random.default_rng([seed, step, micro_step, self._split_key])
        return rng.choice(n_starts, size=k, replace=False)[rank * batch_size:(rank + 1) * batch_size]

    def num_windows(self, block_size):
        """How many non-overlapping (x, y) windows iter_sequential yields over the whole split (all ranks)."""
        return max(0, (self.num_tokens - 1) // block_size)

    def iter_sequential(self, batch_size, block_size, rank=0, world_size=1, device=None):
        """Non-overlapping windows covering the split once (x = tokens[i*T:(i+1)*T], y shifted by one; the last
        partial window is dropped) for exact evaluation. Rank r gets windows r, r+W, r+2W, ...: the ranks'
        counts differ by at most one, and a rank's last batch may be smaller than batch_size."""
        starts = np.arange(rank, self.num_windows(block_size), world_size) * block_size
        for i in range(0, len(starts), batch_size):
            yield self._to_torch(self._gather(starts[i:i + batch_size], block_size + 1), device)


def benchmark_get_batch(data_dir, batch_size, block_size, n=1000, split="train"):
    """Seconds per get_batch call (CPU tensors), averaged over n calls after a warm-up."""
    ds = TokenShards(data_dir, split)
    for step in range(10):
        ds.get_batch(batch_size, block_size, step)
    t0 = time.perf_counter()
    for step in range(n):
        ds.get_batch(batch_size, block_size, step)
    return (time.perf_counter() - t0) / n
