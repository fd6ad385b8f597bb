"""
Preparing data, the Hugging Face way: text -> a `datasets` Dataset of rows -> one batched `.map` to token ids (on
--num_proc processes, cached by datasets) -> the token shards + meta.json + tokenizer/ that nanogpt_hf/data.py
describes and reads. examples/prepare.py is its command line.

    rows    local files: Dataset.from_generator over the text, cut into rows of ~64K characters at whitespace
            (where GPT-2's pre-tokenizer splits anyway, so the tokens are those of the whole text); Hub datasets:
            load_dataset (memory-mapped Arrow, or an IterableDataset with --streaming), one row per document
    tokens  rows.map(_encode, batched=True, num_proc=...): ids per row, <|endoftext|> placed per document
    shards  the mapped Arrow files are read a batch at a time and cut into shards of shard_size tokens, each
            committed into .NAME.partial/ (progress.json says where the rows continue, so a killed prepare
            resumes after its last complete shard); the finished dataset then replaces data_dir in one rename.

Memory does not grow with the input: rows are generated, mapped and read back a batch at a time. A second run
with the same input and tokenizer finds the text and its tokens in the datasets cache (HF_DATASETS_CACHE).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from .data import FORMAT_VERSION, LLMC_FILE, LLMC_HEADER_BYTES, SHARD_FILE, llmc_header, load_tokenizer, shard_name, \
    token_dtype
from .tokenization import (
    GPT2_EOT,
    build_char_tokenizer,
    bytes_per_token,
    char_vocab,
    default_unk_char,
    gpt2_tokenizer,
    is_byte_level_bpe,
    load_pretrained_tokenizer,
    tiktoken_gpt2,
    train_bpe,
)

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per .bin file (200 MB in uint16)
DEFAULT_SEED = 2357  # nanoGPT's openwebtext split seed
DEFAULT_MAX_BYTES = 4_000_000  # python_char: how much of the standard library to read
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SLEEP_ENV = "NANOGPT_HF_PREPARE_SLEEP"  # test hook: seconds to sleep after each shard is written
CHUNK_CHARS = 1 << 16  # long texts go to the tokenizer as rows of about this many chars
BATCH_BYTES = 1 << 21  # text per .map batch (and per Arrow record batch): this bounds each process's memory
IN_PROCESS_BYTES = 1 << 22  # a split smaller than this is mapped in this process (forking costs more than it saves)
READ_BYTES = 1 << 22  # local files are read this many bytes at a time
DEFAULT_VAL_TOKENS = 100_000_000  # streamed datasets: val = the first ~100M tokens, llm.c's first shard
COMPRESSION_BYTES = 1 << 23  # --tokenizer bpe: bytes of val text on which its compression is measured
PREPARE_VERSION = 2  # in progress.json: a .partial/ of another writer version starts over
PROGRESS_FILE, LOCK_FILE = "progress.json", ".lock"

BUILTIN = {  # the datasets of nanoGPT's data/ folder, plus an offline one
    "shakespeare_char": dict(tokenizer="char", val_fraction=0.1, inputs=[SHAKESPEARE_URL]),
    "shakespeare": dict(tokenizer="gpt2", val_fraction=0.1, inputs=[SHAKESPEARE_URL]),
    "openwebtext": dict(tokenizer="gpt2", val_fraction=0.0005, hf_dataset="Skylion007/openwebtext"),
    # what modded-nanogpt / llm.c / build-nanogpt train GPT-2 124M on; streamed, val = the first ~100M tokens
    "fineweb_edu10B": dict(tokenizer="gpt2", hf_dataset="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT",
                           streaming=True, val_tokens=DEFAULT_VAL_TOKENS),
    "fineweb10B": dict(tokenizer="gpt2", hf_dataset="HuggingFaceFW/fineweb", hf_config="sample-10BT",
                       streaming=True, val_tokens=DEFAULT_VAL_TOKENS),
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


def iter_text(path, block=READ_BYTES, digest=None):
    """A local UTF-8 file -> its text as str pieces of about `block` bytes, read as a stream (any file size).
    digest: a hashlib object fed the bytes read."""
    import codecs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found (--input)")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if digest is not None:
                digest.update(data)
            pending = len(decoder.buffer)  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"input file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                    f"{offset - pending + e.start}); convert it first, e.g. iconv -t UTF-8") from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


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
    """Cut one long text into rows of ~size chars so that the tokenizer can work on it in parallel and in
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


def load_hub_dataset(name, config=None, split="train", revision=None, text_column="text", streaming=False):
    """A Hub dataset id or local dataset folder -> a Dataset (memory-mapped Arrow) or, with streaming, an
    IterableDataset read as it downloads (nothing stored in the cache), with one "text" column."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision, streaming=streaming)
    except Exception as e:
        if "scripts are no longer supported" in str(e) and revision is None:
            # datasets >= 4 refuses loading scripts (the old openwebtext); the Hub keeps a parquet export
            print(f"{name} is a script dataset; loading its parquet export (revision refs/convert/parquet)")
            return load_hub_dataset(name, config, split, "refs/convert/parquet", text_column, streaming)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load --hf_dataset {name} ({type(e).__name__}: {msg})") from None
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)))
    if text_column not in columns:
        raise ValueError(f"--hf_dataset {name} has no column {text_column!r} (it has {columns}); "
                         "pass --text_column")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def _chars(pieces, start, stop=None):
    """The characters [start, stop) of a stream of str pieces, as a stream of pieces."""
    pos = 0
    for piece in pieces:
        a, b = max(start - pos, 0), len(piece) if stop is None else min(stop - pos, len(piece))
        if a < b:
            yield piece[a:b]
        pos += len(piece)
        if stop is not None and pos >= stop:
            return


def chunk_stream(pieces, size=CHUNK_CHARS):
    """chunk_text over a stream of str pieces: the same rows as chunk_text("".join(pieces)), in memory
    bounded by one piece plus one row (a cut depends only on the two characters around it)."""
    cut = re.compile(r"(?<=\S)[ \n]")
    buf, i = "", 0
    for piece in pieces:
        buf, i = buf[i:] + piece, 0
        while len(buf) - i > size and (m := cut.search(buf, i + size)):
            yield buf[i:m.start()]
            i = m.start()
    yield from chunk_text(buf[i:], size)


def _train_val(ds, val_fraction, seed, source):
    """A map-style dataset of documents -> {"train": ..., "val": ...}: datasets' seeded train_test_split, as
    nanoGPT's openwebtext/prepare.py."""
    if len(ds) < 2:
        raise ValueError(f"{source} has {len(ds)} document(s): too few to split into train and val")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": parts["train"], "val": parts["test"]}


def _scan_file(path, chars=False):
    """One streaming pass over a local input: (number of characters, its distinct characters if chars else None,
    sha256 of its bytes); refuses empty and non-UTF-8 files before any tokenizing starts."""
    n, found, blank, digest = 0, set() if chars else None, True, hashlib.sha256()
    for piece in iter_text(path, digest=digest):
        n += len(piece)
        if chars:
            found.update(piece)
        blank = blank and piece.isspace()
    if blank:
        raise ValueError(f"input file {path} is empty (--input)")
    return n, found, digest.hexdigest()


# -----------------------------------------------------------------------------
# rows: the datasets that .map tokenizes


def _text_rows(path, start, stop, digest):
    """The characters [start, stop) of one text file as rows (digest, the file's sha256: the cache key)."""
    for row in chunk_stream(_chars(iter_text(path), start, stop)):
        yield {"text": row}


def _document_rows(paths, digests, cut):
    """Files as documents, each as rows flagged first/last of its document. cut: long documents into rows (keeps
    the tokens of char level and GPT-2-style BPE); else one row per document (any other tokenizer)."""
    for path in paths:
        rows = chunk_stream(iter_text(path)) if cut else ["".join(iter_text(path))]
        prev, first = None, True
        for row in rows:
            if prev is not None:
                yield {"text": prev, "first": first, "last": False}
                first = False
            prev = row
        yield {"text": prev if prev is not None else "", "first": first, "last": True}


def _rows_dataset(generator, split, **gen_kwargs):
    """A generator's rows as an Arrow dataset in the datasets cache, reused by a run with the same gen_kwargs."""
    return datasets.Dataset.from_generator(generator, gen_kwargs=gen_kwargs, split=datasets.NamedSplit(split),
                                           writer_batch_size=max(1, BATCH_BYTES // CHUNK_CHARS))


def text_sources(dataset, data_dir, inputs, hf_dataset, hf_config, hf_split, hf_revision, text_column, streaming,
                 val_fraction, seed, max_bytes, cut, want_chars):
    """The text of a dataset as rows: dict(rows={"train": Dataset, "val": Dataset}, or stream=IterableDataset
    (whose first documents, up to val_tokens tokens, are val), source, by_documents, and for local files
    inputs=[their sha256] and chars=their distinct characters (want_chars))."""
    recipe = BUILTIN.get(dataset, {})
    hf_dataset = hf_dataset or (None if inputs else recipe.get("hf_dataset"))
    if hf_dataset:
        hf_config = hf_config or recipe.get("hf_config")
        source = hf_dataset + (f" ({hf_config})" if hf_config else "")
        ds = load_hub_dataset(hf_dataset, hf_config, hf_split, hf_revision, text_column, streaming)
        if streaming:  # like llm.c: the first val_tokens tokens' worth of documents are val, the rest train
            return dict(stream=ds, source=source, by_documents=True)
        return dict(rows=_train_val(ds, val_fraction, seed, source), source=source, by_documents=True)
    if recipe.get("stdlib"):
        root, docs = stdlib_files(max_bytes)
        source = f"{root}/**/*.py (Python {sys.version.split()[0]}, {len(docs)} files)"
        rows = _train_val(datasets.Dataset.from_dict({"text": docs}), val_fraction, seed, source)
        return dict(rows=rows, source=source, by_documents=True)
    paths = resolve_inputs(inputs or recipe["inputs"], data_dir)
    source = " ".join(inputs or recipe["inputs"])
    scans = [_scan_file(p, chars=want_chars) for p in paths]  # validates every file first
    digests = [digest for _, _, digest in scans]
    out = dict(source=source, inputs=digests, chars=set().union(*(found or () for _, found, _ in scans)))
    if len(paths) == 1:  # one text: the first (1 - val_fraction) of its characters is train, like nanoGPT
        total = scans[0][0]
        n = int(total * (1 - val_fraction))
        if n == 0 or n == total:
            raise ValueError(f"{source} is too short to split with --val_fraction {val_fraction} ({total} characters)")
        rows = {split: _rows_dataset(_text_rows, split, path=str(paths[0]), start=a, stop=b, digest=digests[0])
                for split, a, b in (("train", 0, n), ("val", n, None))}
        return dict(out, rows=rows, by_documents=False)
    # several files: each one is a document, split by documents like openwebtext
    split = _train_val(datasets.Dataset.from_dict({"i": list(range(len(paths)))}), val_fraction, seed, source)
    rows = {s: _rows_dataset(_document_rows, s, paths=[str(paths[i]) for i in part["i"]],
                             digests=[digests[i] for i in part["i"]], cut=cut) for s, part in split.items()}
    return dict(out, rows=rows, by_documents=True)


# -----------------------------------------------------------------------------
# tokens: one batched .map over the rows

_TIKTOKEN = []  # tiktoken's GPT-2 encoding, loaded once per process (before the workers fork: they share it)


def _tiktoken():
    if not _TIKTOKEN:
        _TIKTOKEN.append(tiktoken_gpt2())
    return _TIKTOKEN[0]


def _encode(rows, kind, table, eot, before, dtype, threads=1):
    """The .map function: a batch of rows (pa.Table: text, plus first/last when a document spans several rows)
    -> pa.Table: ids (the row's token ids, <|endoftext|> (eot) before the first row of each document (llm.c) or
    after its last (nanoGPT); none when eot is None) and eod (the row ends a document)."""
    texts = rows.column("text").to_pylist()
    if kind == "char":  # nanoGPT's [stoi[c] for c in text], vectorized through a lookup table (holes -> unk)
        ids = [table[np.minimum(np.frombuffer(t.encode("utf-32-le"), np.uint32), len(table) - 1)] for t in texts]
    elif kind == "gpt2" and threads > 1:  # a stream, mapped in this process: tiktoken's threads use the cores
        ids = _tiktoken().encode_ordinary_batch(texts, num_threads=threads)
    elif kind == "gpt2":  # one of num_proc processes
        ids = [_tiktoken().encode_to_numpy(t, disallowed_special=()) for t in texts]
    elif hasattr(table, "backend_tokenizer"):  # a fast tokenizer: its Rust batch encode, what __call__ runs
        backend = table.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers 0.21)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    else:
        ids = table(texts, add_special_tokens=False)["input_ids"]
    whole = "last" not in rows.column_names  # one row per document
    first = np.ones(len(texts), bool) if whole else rows.column("first").to_numpy(zero_copy_only=False)
    last = np.ones(len(texts), bool) if whole else rows.column("last").to_numpy(zero_copy_only=False)
    sep, parts, lens = np.array([eot or 0], dtype), [], np.zeros(len(texts) + 1, np.int64)
    for i, x in enumerate(ids):
        with_eot = eot is not None and (first[i] if before else last[i])
        parts += ([sep, x] if before else [x, sep]) if with_eot else [x]
        lens[i + 1] = len(x) + with_eot
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    offsets = pa.array(np.cumsum(lens).astype(np.int32))
    return pa.table({"ids": pa.ListArray.from_arrays(offsets, pa.array(flat)), "eod": pa.array(last)})


def tokenizer_digest(tok):
    """sha256 of a tokenizer's tokenizer.json (what encodes), for the .map cache key and resuming."""
    if hasattr(tok, "backend_tokenizer"):
        return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    return Hasher.hash(tok)


def tokenize(rows, encoder, digest, num_proc):
    """rows -> rows of (ids, eod): one batched .map of _encode. A map-style dataset is mapped by num_proc
    processes into the datasets cache under a fingerprint of the rows, _encode, its arguments and the tokenizer
    (digest), so a re-run reads the tokens back instead of encoding again; a stream is mapped as it is read."""
    rows = rows.with_format("arrow")
    if isinstance(rows, datasets.IterableDataset):
        return rows.map(_encode, batched=True, batch_size=256, fn_kwargs=dict(encoder, threads=num_proc))
    nbytes = rows.data.nbytes * len(rows) // max(rows.data.num_rows, 1)  # of this split (rows may be a selection)
    batch = max(1, min(1000, BATCH_BYTES * len(rows) // max(nbytes, 1)))  # rows per batch: ~BATCH_BYTES of text
    encoder_args = {k: v for k, v in encoder.items() if k != "table"}  # the table is what digest stands for
    fingerprint = Hasher.hash([rows._fingerprint, Hasher.hash(_encode), encoder_args, digest])
    return rows.map(_encode, batched=True, batch_size=batch, writer_batch_size=batch, fn_kwargs=encoder,
                    num_proc=num_proc if num_proc > 1 and nbytes > IN_PROCESS_BYTES else None,
                    new_fingerprint=fingerprint, desc="tokenizing")


def _token_batches(tokens, start=0):
    """(ids, eod) of tokenized rows from row `start` on, an Arrow record batch at a time. The cache files of a
    mapped dataset are read with plain reads, not memory-mapped, so the tokens written do not stay in memory."""
    if isinstance(tokens, datasets.IterableDataset):
        batches = (b for t in tokens.iter(batch_size=256) for b in t.to_batches())
    elif tokens.cache_files:
        batches = (b for f in tokens.cache_files for b in pa.ipc.open_stream(pa.OSFile(f["filename"])))
    else:  # mapped in memory
        batches = tokens.data.table.to_batches()
    for b in batches:
        if start < b.num_rows:
            b, start = b.slice(start), 0
            yield b.column("ids"), b.column("eod").to_numpy(zero_copy_only=False)
        else:
            start -= b.num_rows


def make_tokenizer(spec, chars, by_documents, train_texts=None, vocab_size=None, tokenizer_from=None):
    """--tokenizer -> (the HF tokenizer saved with the shards, _encode's arguments but eot/before/dtype, eot id
    or None). chars: a callable giving the text's characters (char level); train_texts: the train split's
    texts, a callable (bpe)."""
    if spec == "char":
        tok = build_char_tokenizer(chars())
        stoi = char_vocab(tok)
        lut = np.full(max(map(ord, stoi)) + 2, stoi[default_unk_char(stoi)], dtype=np.int64)
        lut[[ord(c) for c in stoi]] = list(stoi.values())
        # the vocab: the characters, then the tokenizer's <|endoftext|> (not inserted into the shards)
        return tok, dict(kind="char", table=lut), None
    if spec == "gpt2":
        _tiktoken()  # fail early and clearly when the BPE files are unavailable
        return gpt2_tokenizer(), dict(kind="gpt2", table=None), GPT2_EOT if by_documents else None
    if spec == "bpe" and tokenizer_from:
        tok = load_tokenizer(tokenizer_from)
        if not is_byte_level_bpe(tok):
            raise ValueError(f"--tokenizer_from {tokenizer_from} is not a byte-level BPE trained by --tokenizer bpe; "
                             "use --tokenizer DIR for other tokenizers")
    elif spec == "bpe":
        tok = train_bpe(train_texts(), vocab_size)
    else:
        tok = load_pretrained_tokenizer(spec)
    return tok, dict(kind="hf", table=tok), tok.eos_token_id if by_documents else None


def _texts(rows, limit=None):
    """The texts of a map-style dataset of rows, streamed; limit: stop after about this many UTF-8 bytes."""
    size = 0
    for batch in rows.iter(batch_size=32):
        for text in batch["text"]:
            yield text
            size += len(text.encode("utf-8"))
            if limit is not None and size >= limit:
                return


def compression(tok, rows):
    """Bytes per token of tok and of GPT-2's BPE (None without its files) on the first COMPRESSION_BYTES of rows
    (the val split: text the trained tokenizer never saw)."""
    texts = list(_texts(rows, COMPRESSION_BYTES))
    size, ours = bytes_per_token(tok, texts)
    try:
        gpt2 = bytes_per_token(_tiktoken(), texts)[1]
    except ValueError:  # no GPT-2 files (offline, no tiktoken cache)
        gpt2 = None
    return dict(val_bytes=size, bytes_per_token=round(size / max(ours, 1), 4),
                gpt2_bytes_per_token=round(size / gpt2, 4) if gpt2 else None)


# -----------------------------------------------------------------------------
# writing shards, resumably: .NAME.partial/ holds the finished shards and progress.json until all are done


def _save_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Appends a split's token stream to shards of shard_size tokens. Each full shard is fsynced, renamed
    from .part to its name and recorded in progress.json with where the input continues (row index, tokens
    of that row already written), so a killed prepare resumes after its last complete shard."""

    def __init__(self, out_dir, split, state, progress, dtype, shard_size, fmt, dataset):
        self.out_dir, self.split, self.state, self.progress = out_dir, split, state, progress
        self.dtype, self.shard_size, self.fmt, self.dataset = np.dtype(dtype), shard_size, fmt, dataset
        self.sleep = float(os.environ.get(SLEEP_ENV) or 0)
        self.f = None

    def _open(self):
        self.name = shard_name(self.fmt, self.dataset, self.split, len(self.state["shards"]))
        self.f = open(self.out_dir / (self.name + ".part"), "wb")
        if self.fmt == "llmc":
            self.f.write(llmc_header(0))
        self.n, self.max = 0, 0

    def _finish(self, next_item, skip_tokens, documents):
        if self.fmt == "llmc":
            self.f.seek(0)
            self.f.write(llmc_header(self.n))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        os.replace(self.out_dir / (self.name + ".part"), self.out_dir / self.name)
        nbytes = (LLMC_HEADER_BYTES if self.fmt == "llmc" else 0) + self.n * self.dtype.itemsize
        self.state["shards"].append(dict(file=self.name, num_tokens=self.n, bytes=nbytes, max_token_id=self.max))
        self.state.update(next_item=next_item, skip_tokens=skip_tokens, documents=documents)
        _save_json(self.out_dir / PROGRESS_FILE, self.progress)

    def write(self, flat, lens, ends, first_item, first_offset):
        """flat: the tokens of rows first_item, first_item+1, ... (lens each; the first row's first
        first_offset tokens were written before)."""
        cum, pos, docs = np.cumsum(lens), 0, self.state["documents"]  # documents complete before this batch
        while pos < len(flat):
            if self.f is None:
                self._open()
            n = min(len(flat) - pos, self.shard_size - self.n)
            piece = flat[pos:pos + n]
            self.f.write(piece.tobytes())
            self.n, self.max, pos = self.n + n, max(self.max, int(piece.max())), pos + n
            if self.n == self.shard_size:
                k = int(np.searchsorted(cum, pos, side="right"))  # rows written completely
                self._finish(first_item + k, pos - (int(cum[k - 1]) if k else -first_offset),
                             docs + int(ends[:k].sum()))
                time.sleep(self.sleep)  # test hook (SLEEP_ENV): a kill lands between two shards
        self.state["documents"] = docs + int(ends.sum())  # kept in memory; saved with the next shard

    def close(self, next_item):
        if self.f is not None:
            self._finish(next_item, 0, self.state["documents"])
        if not self.state["shards"]:
            raise ValueError(f"the {self.split} split has no tokens; give more text or change --val_fraction")
        self.state["done"] = True
        _save_json(self.out_dir / PROGRESS_FILE, self.progress)


def write_split(batches, writer, max_tokens=None):
    """Token rows -> writer. batches start at the writer's recorded row (next_item), whose first skip_tokens
    tokens a killed run wrote already. max_tokens: stop at the end of the first document that brings the split
    to that many tokens (a streamed dataset's val split)."""
    state = writer.state
    first, offset = state["next_item"], state["skip_tokens"]
    written = sum(sh["num_tokens"] for sh in state["shards"])
    with tqdm(unit="tok", unit_scale=True, desc=f"writing {writer.split}", initial=written) as bar:
        for ids, ends in batches:
            flat = ids.flatten().to_numpy()  # the tokens of the batch's rows, one after the other
            lens = np.diff(ids.offsets.to_numpy()).astype(np.int64)
            if offset:
                flat, lens[0] = flat[offset:], lens[0] - offset
            stop = False
            if max_tokens is not None:
                over = np.flatnonzero(ends & (written + np.cumsum(lens) >= max_tokens))
                if len(over):
                    k = over[0] + 1
                    ends, flat, lens, stop = ends[:k], flat[:int(lens[:k].sum())], lens[:k], True
            writer.write(flat, lens, ends, first, offset)
            first, offset, written = first + len(lens), 0, written + len(flat)
            bar.update(len(flat))
            if stop:
                break
    writer.close(first)


# -----------------------------------------------------------------------------
# committing: the finished dataset replaces data_dir in one step


def _exchange(a, b):
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); OSError where not supported."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def _ours(p):
    """A file prepare writes (anything else in a data_dir is the user's and is kept)."""
    return p.name in ("meta.json", "tokenizer", PROGRESS_FILE, LOCK_FILE) or p.name.endswith((".part", ".tmp")) \
        or SHARD_FILE.fullmatch(p.name) is not None or LLMC_FILE.fullmatch(p.name) is not None


def _commit(new, data_dir):
    """Put the finished dataset `new` (a sibling folder) in place of data_dir. The old dataset stays
    complete and readable until the swap: other files of data_dir (e.g. a downloaded input.txt) move into
    `new` first, then the two folders are exchanged atomically (two renames where the OS can't)."""
    (new / LOCK_FILE).unlink(missing_ok=True)
    if data_dir.exists():
        for p in data_dir.iterdir():
            if not _ours(p) and not (new / p.name).exists():
                os.replace(p, new / p.name)
        time.sleep(float(os.environ.get(SLEEP_ENV) or 0))  # test hook: a kill lands just before the swap
        try:
            _exchange(new, data_dir)
        except OSError:
            old = _old_dir(data_dir)
            os.replace(data_dir, old)  # a kill right here is repaired by the next prepare (_recover)
            os.replace(new, old.with_name(new.name))
            os.replace(old.with_name(new.name), data_dir)
            new = old
        shutil.rmtree(new, ignore_errors=True)  # the old dataset
    else:
        os.replace(new, data_dir)
    (data_dir / PROGRESS_FILE).unlink(missing_ok=True)


def _partial_dir(data_dir):
    return data_dir.parent / f".{data_dir.name}.partial"


def _old_dir(data_dir):
    return data_dir.parent / f".{data_dir.name}.old"


def _recover(data_dir):
    """Repairs what a kill can leave: data_dir moved aside mid-commit; .NAME.tmp-PID of older versions."""
    if not data_dir.exists() and _old_dir(data_dir).exists():
        os.replace(_old_dir(data_dir), data_dir)
    shutil.rmtree(_old_dir(data_dir), ignore_errors=True)
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


def _lock(folder):
    """An exclusive lock on folder (held until the process ends): two prepares never write one data_dir."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    f = open(folder / LOCK_FILE, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another prepare is writing {folder}; wait for it or stop it") from None
    return f


# -----------------------------------------------------------------------------
# prepare


def prepare_dataset(dataset, data_dir=None, inputs=None, tokenizer=None, hf_dataset=None, hf_config=None,
                    hf_split="train", hf_revision=None, text_column="text", val_fraction=None,
                    shard_size=None, num_proc=None, seed=DEFAULT_SEED, max_bytes=DEFAULT_MAX_BYTES,
                    overwrite=False, streaming=None, val_tokens=None, format="nanogpt", vocab_size=None,
                    tokenizer_from=None):
    """Tokenize a dataset into data_dir (default data/<dataset>) and return its meta.json as a dict.
    Memory stays bounded whatever the input size. A killed run resumes from its last complete shard when run
    again with the same arguments; a finished one run again reads its tokens from the datasets cache."""
    t0 = time.time()
    recipe = BUILTIN.get(dataset, {})
    if not recipe and not inputs and not hf_dataset:
        raise ValueError(f"unknown dataset {dataset!r} (built-in: {', '.join(BUILTIN)}); for your own text "
                         "pass --input FILE or --hf_dataset ID")
    if recipe.get("stdlib") and (inputs or hf_dataset):
        raise ValueError(f"{dataset} reads the Python standard library; for other text use --dataset custom")
    if tokenizer_from and tokenizer not in (None, "bpe"):
        raise ValueError(f"--tokenizer_from reuses a trained BPE; drop --tokenizer {tokenizer}")
    tokenizer = "bpe" if tokenizer_from else tokenizer or recipe.get("tokenizer") or "gpt2"
    if (tokenizer == "bpe") != (vocab_size is not None or tokenizer_from is not None) or \
            (vocab_size is not None and tokenizer_from is not None):
        raise ValueError("--tokenizer bpe needs --vocab_size N (to train one) or --tokenizer_from DIR (to reuse "
                         "one); --vocab_size goes with --tokenizer bpe only")
    val_fraction = recipe.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    shard_size = shard_size or recipe.get("shard_size", DEFAULT_SHARD_SIZE)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_size < 1 or (num_proc is not None and num_proc < 1) or seed < 0:
        raise ValueError("--shard_size and --num_proc must be >= 1 and --seed >= 0")
    if format not in ("nanogpt", "llmc"):
        raise ValueError(f"--format must be nanogpt or llmc, got {format!r}")
    num_proc = num_proc or default_num_proc()
    data_dir = Path(data_dir or Path("data") / dataset)
    _check_overwrite(data_dir, dataset, tokenizer, overwrite)
    streaming = recipe.get("streaming", False) if streaming is None else streaming
    if streaming and tokenizer in ("char", "bpe") and not tokenizer_from:
        raise ValueError(f"--tokenizer {tokenizer} needs all the training text before tokenizing, which a streamed "
                         "dataset does not give; prepare without --streaming (or reuse a BPE: --tokenizer_from)")

    # 1) text -> rows per split (datasets); 2) the tokenizer (char level: the text's characters; bpe: trained)
    src = text_sources(dataset, data_dir, inputs, hf_dataset, hf_config, hf_split, hf_revision, text_column,
                       streaming, val_fraction, seed, max_bytes, cut=tokenizer in ("char", "gpt2", "bpe"),
                       want_chars=tokenizer == "char")
    limits = {"val": val_tokens or recipe.get("val_tokens") or DEFAULT_VAL_TOKENS} if "stream" in src else {}
    tok, encoder, eot = make_tokenizer(
        tokenizer, lambda: src.get("chars") or {c for r in src["rows"].values() for t in _texts(r) for c in t},
        src["by_documents"], lambda: _texts(src["rows"]["train"]), vocab_size, tokenizer_from)
    vocab_size, dtype, digest = len(tok), token_dtype(len(tok)), tokenizer_digest(tok)
    if format == "llmc" and dtype != "uint16":
        raise ValueError(f"--format llmc holds uint16 tokens; the vocab_size {vocab_size} of --tokenizer "
                         f"{tokenizer} needs uint32")
    encoder.update(eot=eot, before=format == "llmc", dtype=dtype)  # llm.c: the EOT before each document
    request = dict(version=FORMAT_VERSION, writer=PREPARE_VERSION, dataset=dataset, source=src["source"],
                   inputs=src.get("inputs"), tokenizer=tokenizer, tokenizer_digest=digest, vocab_size=vocab_size,
                   hf=[hf_split, hf_revision, text_column, streaming], val_fraction=val_fraction,
                   val_tokens=limits.get("val"), seed=seed, shard_size=shard_size, format=format,
                   max_bytes=max_bytes if recipe.get("stdlib") else None)
    meta = dict(format_version=FORMAT_VERSION if format == "llmc" else 1, dataset=dataset, source=src["source"],
                tokenizer=tokenizer, tokenizer_class=type(tok).__name__, vocab_size=vocab_size, eot_token_id=eot,
                dtype=dtype, split_by="documents" if src["by_documents"] else "characters", val_fraction=val_fraction,
                seed=seed, shard_size=shard_size, splits=None)
    if format == "llmc":
        meta.update(format="llmc", eot_position="before")
    if limits:
        meta.update(split_by="documents (the first val_tokens tokens are val)", val_tokens=limits["val"])
    if tokenizer == "char":
        meta["unk_char"] = default_unk_char(char_vocab(tok))  # what unknown characters are encoded as
    if tokenizer == "bpe":
        meta.update(tokenizer_from=str(tokenizer_from) if tokenizer_from else None,
                    compression=compression(tok, src["rows"]["val"]) if "rows" in src else None)

    # 3) shards -> .NAME.partial/ (resumed if a run with the same request was killed), then into place
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(data_dir)
    work = _partial_dir(data_dir)
    work.mkdir(exist_ok=True)
    lock = _lock(work)
    try:
        meta = _write_dataset(work, data_dir, request, meta, src, limits, tok, encoder, digest, num_proc)
    except ValueError:  # bad input, not an interruption: nothing worth resuming
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()
    _report(meta, data_dir, num_proc, time.time() - t0)
    return meta


def default_num_proc():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_overwrite(data_dir, dataset, tokenizer, overwrite):
    if (data_dir / "meta.json").is_file() and not overwrite:
        try:
            old = json.loads((data_dir / "meta.json").read_text())
        except ValueError:
            old = {}  # a damaged meta.json: nothing worth protecting
        if (old.get("tokenizer"), old.get("dataset")) != (tokenizer, dataset):
            raise ValueError(f"data_dir {data_dir} holds {old.get('dataset')!r} prepared with tokenizer "
                             f"{old.get('tokenizer')!r}, not {dataset!r} with {tokenizer!r}; choose another "
                             "--data_dir or pass --overwrite")


def _report(meta, data_dir, num_proc, seconds):
    total = sum(info["num_tokens"] for info in meta["splits"].values())
    print(f"prepared {meta['dataset']} in {data_dir}: tokenizer {meta['tokenizer']}, vocab_size "
          f"{meta['vocab_size']}, {meta['dtype']}, {num_proc} process(es)")
    for s, info in meta["splits"].items():
        nbytes = sum(sh["bytes"] for sh in info["shards"])
        print(f"  {s:5s} {info['num_tokens']:>14,} tokens  {nbytes / 1e6:10.2f} MB  {len(info['shards'])} shard(s)")
    if meta.get("compression"):
        c = meta["compression"]
        gpt2 = f"{c['gpt2_bytes_per_token']:.2f}" if c["gpt2_bytes_per_token"] else "n/a (no GPT-2 files)"
        print(f"  compression on val ({c['val_bytes']:,} bytes): {c['bytes_per_token']:.2f} bytes/token; "
              f"GPT-2's BPE: {gpt2}")
    print(f"  {seconds:.1f} s, {total / seconds:,.0f} tokens/s")


def _write_dataset(work, data_dir, request, meta, src, limits, tok, encoder, digest, num_proc):
    """The shards of every split into work/ (resuming what progress.json lists), then tokenizer/ and meta.json,
    then work/ into place: meta."""
    try:
        progress = json.loads((work / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        progress = None
    if progress is None or progress.get("request") != request:
        for p in work.iterdir():  # another request's leftovers; a user's file moved here by a killed commit goes back
            if not _ours(p) and data_dir.is_dir() and not (data_dir / p.name).exists():
                os.replace(p, data_dir / p.name)
            elif p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        order = ("val", "train") if limits else ("train", "val")
        progress = dict(request=request, splits={s: dict(shards=[], next_item=0, skip_tokens=0, documents=0,
                                                          done=False) for s in order})
        _save_json(work / PROGRESS_FILE, progress)
    else:
        done = {s: len(st["shards"]) for s, st in progress["splits"].items()}
        print(f"resuming the prepare in {work}: {done} shard(s) per split already complete")
    for p in work.glob("*.part"):
        p.unlink()

    for split, state in progress["splits"].items():
        if state["done"]:
            continue
        writer = ShardWriter(work, split, state, progress, meta["dtype"], request["shard_size"], request["format"],
                             request["dataset"])
        if "stream" in src:  # rows already written are skipped unread, and train starts after val's documents
            skip = state["next_item"] + (progress["splits"]["val"]["documents"] if split == "train" else 0)
            batches = _token_batches(tokenize(src["stream"].skip(skip), encoder, digest, num_proc))
        else:
            batches = _token_batches(tokenize(src["rows"][split], encoder, digest, num_proc), state["next_item"])
        write_split(batches, writer, limits.get(split))
    meta["splits"] = {}
    for s in ("train", "val"):
        st = progress["splits"][s]
        meta["splits"][s] = dict(num_tokens=sum(sh["num_tokens"] for sh in st["shards"]), shards=st["shards"])
        if src["by_documents"]:
            meta["splits"][s]["num_documents"] = st["documents"]
    shutil.rmtree(work / "tokenizer", ignore_errors=True)
    tok.save_pretrained(work / "tokenizer")
    (work / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _commit(work, data_dir)
    return meta
