"""
Preparing data: text -> tokenizer -> the token shards + meta.json + tokenizer/ that nanogpt_hf/data.py describes
and reads (examples/prepare.py is its command line).

Preparing streams: local files are read a few MB at a time and cut into rows at whitespace (the GPT-2 tokens of
the whole text), Hub datasets are memory-mapped or streamed, and tokens go to disk a batch at a time, so memory
does not grow with the input. Shards are committed one by one into .NAME.partial/ (progress.json says what is
done, so a killed prepare resumes there); the finished dataset then replaces data_dir in one rename.
"""

import collections
import errno
import functools
import itertools
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

import numpy as np
from tqdm.auto import tqdm

from .data import FORMAT_VERSION, LLMC_FILE, LLMC_HEADER_BYTES, SHARD_FILE, llmc_header, shard_name, token_dtype, \
    tokenizer_hash
from .tokenization import (
    GPT2_EOT,
    build_char_tokenizer,
    char_vocab,
    default_unk_char,
    gpt2_tokenizer,
    load_pretrained_tokenizer,
    tiktoken_gpt2,
)

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per .bin file (200 MB in uint16)
DEFAULT_SEED = 2357  # nanoGPT's openwebtext split seed
DEFAULT_MAX_BYTES = 4_000_000  # python_char: how much of the standard library to read
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SLEEP_ENV = "NANOGPT_HF_PREPARE_SLEEP"  # test hook: seconds to sleep after each shard is written
CHUNK_CHARS = 1 << 16  # long texts go to the tokenizer as rows of about this many chars
BATCH_CHARS = 1 << 21  # chars per tokenizer batch: with 2 batches per process in flight, this bounds memory
READ_BYTES = 1 << 22  # local files are read this many bytes at a time
DEFAULT_VAL_TOKENS = 100_000_000  # streamed datasets: val = the first ~100M tokens, llm.c's first shard
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


def iter_text(path, block=READ_BYTES):
    """A local UTF-8 file -> its text as str pieces of about `block` bytes, read as a stream (any file size)."""
    import codecs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found (--input)")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
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


def read_text(path):
    return "".join(iter_text(path))


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


_CUT = re.compile(r"(?<=\S)[ \n]")
MAX_ROW_CHARS = 64 * CHUNK_CHARS  # 4M chars: a row is cut here even without whitespace, so memory stays bounded


def next_cut(text, i, size=CHUNK_CHARS, final=True):
    """Where the row starting at text[i] ends: just before the first space/newline after a non-space character
    at or past i + size (GPT-2's pre-tokenizer always splits there, so BPE gives exactly the tokens of the whole
    text; char level does not care); at i + MAX_ROW_CHARS at the latest (text without whitespace: the one place
    where the tokens may differ from the whole text's, at a cut every 4M characters). None when text ends before
    either and more may follow (final=False); len(text) when it is all there is (final=True)."""
    limit = i + max(size, MAX_ROW_CHARS)
    m = _CUT.search(text, i + size, limit)
    if m:
        return m.start()
    if len(text) >= limit:
        return limit
    return len(text) if final else None


def chunk_text(text, size=CHUNK_CHARS):
    """Cut one long text into rows of ~size chars (next_cut) so that the tokenizer can work on it in parallel and
    in bounded memory."""
    rows, i = [], 0
    while i < len(text):
        j = next_cut(text, i, size)
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
    buf, i = "", 0
    for piece in pieces:
        buf, i = buf[i:] + piece, 0
        while len(buf) - i > size and (j := next_cut(buf, i, size, final=False)) is not None:
            yield buf[i:j]
            i = j
    yield from chunk_text(buf[i:], size)


def _doc_pieces(doc):
    return (doc,) if isinstance(doc, str) else doc()  # a text, or a callable streaming one (a big file)


def iter_items(docs, chunk=True):
    """Documents -> (text, first piece of its document?, last piece?) rows for the tokenizer. chunk: cut
    long documents with chunk_stream (same tokens for GPT-2 and char level); else one row per document."""
    for doc in docs:
        rows = chunk_stream(_doc_pieces(doc)) if chunk else ["".join(_doc_pieces(doc))]
        prev, first = None, True
        for row in rows:
            if prev is not None:
                yield prev, first, False
                first = False
            prev = row
        yield (prev if prev is not None else ""), first, True  # an empty document still ends (its EOT)


def _permuted_split(n, val_fraction, seed, source):
    """Indices of the (train, val) documents: datasets' seeded train_test_split, as nanoGPT's openwebtext."""
    import datasets

    if n < 2:
        raise ValueError(f"{source} has {n} document(s): too few to split into train and val")
    split = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
        test_size=val_fraction, seed=seed, shuffle=True)
    return split["train"]["i"], split["test"]["i"]


def _scan_file(path, chars=False):
    """One streaming pass over a local input: (number of characters, its distinct characters if chars else
    None); refuses empty and non-UTF-8 files before any tokenizing starts."""
    n, found, blank = 0, set() if chars else None, True
    for piece in iter_text(path):
        n += len(piece)
        if chars:
            found.update(piece)
        blank = blank and piece.isspace()
    if blank:
        raise ValueError(f"input file {path} is empty (--input)")
    return n, found


# -----------------------------------------------------------------------------
# tokenization (one batch of rows -> one flat token array; in worker processes for GPT-2 on several cores)

_tiktoken = None
_ENCODER = None  # (kind, lut | tokenizer | None, eot, eot_before, dtype), set before the workers fork


def _encode_batch(batch):
    """[(text, doc_start, doc_end), ...] -> (flat token ids, tokens per row) with the EOT of each document
    before its first row (llm.c) or after its last row (nanoGPT)."""
    global _tiktoken
    kind, arg, eot, before, dtype = _ENCODER
    texts = [t for t, _, _ in batch]
    if kind == "char":  # nanoGPT's [stoi[c] for c in text], vectorized through a lookup table (holes -> unk)
        ids = [arg[np.minimum(np.frombuffer(t.encode("utf-32-le"), np.uint32), len(arg) - 1)] for t in texts]
    elif kind == "gpt2":
        _tiktoken = _tiktoken or tiktoken_gpt2()
        if hasattr(_tiktoken, "encode_to_numpy"):  # tiktoken >= 0.8: no Python list in between
            ids = [_tiktoken.encode_to_numpy(t, disallowed_special=()) for t in texts]
        else:
            ids = [np.array(_tiktoken.encode_ordinary(t), dtype) for t in texts]
    elif hasattr(arg, "backend_tokenizer"):  # a fast tokenizer: its Rust batch encode, what __call__ runs
        backend = arg.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers 0.21)
        ids = [np.asarray(e.ids, dtype) for e in encode(texts, add_special_tokens=False)]
    else:
        ids = [np.asarray(x, dtype) for x in arg(texts, add_special_tokens=False)["input_ids"]]
    if eot is None:
        parts, lens = ids, [len(x) for x in ids]
    else:
        sep, parts, lens = np.array([eot], dtype), [], []
        for x, (_, start, end) in zip(ids, batch):
            extra = [sep] if (start if before else end) else []
            parts += extra + [x] if before else [x] + extra
            lens.append(len(x) + len(extra))
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    return flat, np.array(lens, dtype=np.int64)


def _batches(items, batch_chars):
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[0])
        if size >= batch_chars or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(batches, pool, depth):
    """(doc_end flags, flat ids, lens) per batch, in order; at most `depth` batches in flight (bounded memory)."""
    if pool is None:
        for b in batches:
            yield np.array([e for _, _, e in b], bool), *_encode_batch(b)
        return
    queue = collections.deque()
    for b in batches:
        queue.append((np.array([e for _, _, e in b], bool), pool.apply_async(_encode_batch, (b,))))
        if len(queue) >= depth:
            ends, result = queue.popleft()
            yield ends, *result.get()
    while queue:
        ends, result = queue.popleft()
        yield ends, *result.get()


def default_num_proc():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_num_proc(num_proc):
    """--num_proc -> the worker count: all cores by default, and never more (1000 forked workers only thrash)."""
    cores = default_num_proc()
    if num_proc is not None and num_proc > cores:
        print(f"note: --num_proc {num_proc} is more than the {cores} cores here; using {cores}")
        return cores
    return num_proc or cores


def make_tokenizer(spec, chars, by_documents):
    """--tokenizer -> (HF tokenizer to save, encoder spec for _encode_batch minus EOT placement, vocab_size,
    eot id or None). chars: a callable returning the set of characters of the text (char level only)."""
    if spec == "char":
        tok = build_char_tokenizer(chars())
        stoi = char_vocab(tok)
        lut = np.full(max(map(ord, stoi)) + 2, stoi[default_unk_char(stoi)], dtype=np.int64)
        lut[[ord(c) for c in stoi]] = list(stoi.values())
        # the vocab: the characters, then the tokenizer's <|endoftext|> (not inserted into the shards)
        return tok, ("char", lut), len(tok), None
    if spec == "gpt2":
        tiktoken_gpt2()  # fail early and clearly when the BPE files are unavailable
        return gpt2_tokenizer(), ("gpt2", None), 50257, GPT2_EOT if by_documents else None
    tok = load_pretrained_tokenizer(spec)
    return tok, ("hf", tok), len(tok), tok.eos_token_id if by_documents else None


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


def write_split(items, writer, pool, depth, batch_chars, max_tokens=None):
    """Rows -> tokens -> writer, resuming at the writer's recorded row. max_tokens: stop at the end of the
    first document that brings the split to that many tokens (a streamed dataset's val split)."""
    state = writer.state
    first, offset = state["next_item"], state["skip_tokens"]
    written = sum(sh["num_tokens"] for sh in state["shards"])
    items = itertools.islice(items, first, None)  # rows before the resume point are read, not tokenized
    with tqdm(unit="tok", unit_scale=True, desc=f"writing {writer.split}", initial=written) as bar:
        for ends, flat, lens in _encoded(_batches(items, batch_chars), pool, depth):
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


def _fingerprint(paths):
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


# -----------------------------------------------------------------------------
# prepare


def prepare_dataset(dataset, data_dir=None, inputs=None, tokenizer=None, hf_dataset=None, hf_config=None,
                    hf_split="train", hf_revision=None, text_column="text", val_fraction=None,
                    shard_size=None, num_proc=None, seed=DEFAULT_SEED, max_bytes=DEFAULT_MAX_BYTES,
                    overwrite=False, streaming=None, val_tokens=None, format="nanogpt", batch_chars=BATCH_CHARS):
    """Tokenize a dataset into data_dir (default data/<dataset>) and return its meta.json as a dict.
    Memory stays bounded whatever the input size: local files are read as a stream, Hub datasets are
    memory-mapped (or streamed), tokens go to disk a batch at a time. A killed run resumes from its last
    complete shard when run again with the same arguments."""
    t0 = time.time()
    recipe = BUILTIN.get(dataset, {})
    if not recipe and not inputs and not hf_dataset:
        raise ValueError(f"unknown dataset {dataset!r} (built-in: {', '.join(BUILTIN)}); for your own text "
                         "pass --input FILE or --hf_dataset ID")
    if recipe.get("stdlib") and (inputs or hf_dataset):
        raise ValueError(f"{dataset} reads the Python standard library; for other text use --dataset custom")
    tokenizer = tokenizer or recipe.get("tokenizer") or "gpt2"
    val_fraction = recipe.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    shard_size = shard_size or recipe.get("shard_size", DEFAULT_SHARD_SIZE)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_size < 1 or (num_proc is not None and num_proc < 1) or seed < 0:
        raise ValueError("--shard_size and --num_proc must be >= 1 and --seed >= 0")
    if format not in ("nanogpt", "llmc"):
        raise ValueError(f"--format must be nanogpt or llmc, got {format!r}")
    num_proc = cap_num_proc(num_proc)
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

    # 1) text -> per split, a callable giving its documents (str, or a callable streaming a big file's text);
    #    its argument: progress.json's splits (a streamed train split starts after val's documents)
    hf_dataset = hf_dataset or (None if inputs else recipe.get("hf_dataset"))
    streaming = recipe.get("streaming", False) if streaming is None else streaming
    limits, fingerprint, text_chars = {}, None, None
    if hf_dataset:
        hf_config = hf_config or recipe.get("hf_config")
        source = hf_dataset + (f" ({hf_config})" if hf_config else "")
        ds = load_hub_dataset(hf_dataset, hf_config, hf_split, hf_revision, text_column, streaming)
        if streaming:  # like llm.c: the first val_tokens tokens' worth of documents are val, the rest train
            limits["val"] = val_tokens or recipe.get("val_tokens") or DEFAULT_VAL_TOKENS
            splits = {"val": lambda done: (r["text"] for r in ds),  # train starts after val's documents:
                      "train": lambda done: (r["text"] for r in ds.skip(done["val"]["documents"]))}
        else:
            if len(ds) < 2:
                raise ValueError(f"{source} has {len(ds)} document(s): too few to split into train and val")
            parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
            rows = lambda d: (t for b in d.iter(batch_size=1000) for t in b["text"])  # noqa: E731
            splits = {"train": lambda done: rows(parts["train"]), "val": lambda done: rows(parts["test"])}
        by_documents = True
    elif recipe.get("stdlib"):
        root, docs = stdlib_files(max_bytes)
        source = f"{root}/**/*.py (Python {sys.version.split()[0]}, {len(docs)} files)"
        train, val = _permuted_split(len(docs), val_fraction, seed, source)
        splits = {"train": lambda done: (docs[i] for i in train), "val": lambda done: (docs[i] for i in val)}
        by_documents = True
    else:
        paths = resolve_inputs(inputs or recipe["inputs"], data_dir)
        source = " ".join(inputs or recipe["inputs"])
        scans = [_scan_file(p, chars=tokenizer == "char") for p in paths]  # validates every file first
        fingerprint = _fingerprint(paths)
        text_chars = set().union(*(found or () for _, found in scans))
        if len(paths) == 1:  # one text: the first (1 - val_fraction) of its characters is train, like nanoGPT
            total, path = scans[0][0], paths[0]
            n = int(total * (1 - val_fraction))
            if n == 0 or n == total:
                raise ValueError(f"{source} is too short to split with --val_fraction {val_fraction} "
                                 f"({total} characters)")
            splits = {"train": lambda done: [lambda: _chars(iter_text(path), 0, n)],
                      "val": lambda done: [lambda: _chars(iter_text(path), n)]}
            by_documents = False
        else:  # several files: each one is a document, split by documents like openwebtext
            train, val = _permuted_split(len(paths), val_fraction, seed, source)
            doc = lambda i: functools.partial(iter_text, paths[i])  # noqa: E731
            splits = {"train": lambda done: map(doc, train), "val": lambda done: map(doc, val)}
            by_documents = True

    # 2) the tokenizer (char level: the distinct characters of all the text, one more streaming pass)
    def all_chars():
        return text_chars if text_chars is not None else {c for docs in splits.values() for d in docs(None)
                                                         for piece in _doc_pieces(d) for c in set(piece)}

    if "val" in limits and tokenizer == "char":
        raise ValueError("--tokenizer char needs all the text before tokenizing, which a streamed dataset "
                         "does not give; use a BPE tokenizer or prepare without --streaming")
    tok, (kind, arg), vocab_size, eot = make_tokenizer(tokenizer, all_chars, by_documents)
    dtype = token_dtype(vocab_size)
    if format == "llmc" and dtype != "uint16":
        raise ValueError(f"--format llmc holds uint16 tokens; the vocab_size {vocab_size} of --tokenizer "
                         f"{tokenizer} needs uint32")
    request = dict(version=FORMAT_VERSION, dataset=dataset, source=source, inputs=fingerprint, tokenizer=tokenizer,
                   vocab_size=vocab_size, hf=[hf_split, hf_revision, text_column, streaming], val_fraction=val_fraction,
                   val_tokens=limits.get("val"), seed=seed, shard_size=shard_size, format=format,
                   max_bytes=max_bytes if recipe.get("stdlib") else None)

    # 3) shards -> .NAME.partial/ (resumed if a run with the same request was killed), then into place
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(data_dir)
    work = _partial_dir(data_dir)
    work.mkdir(exist_ok=True)
    lock = _lock(work)
    try:
        split_info, meta = _write_dataset(work, data_dir, request, splits, limits, by_documents, tok, kind, arg,
                                          eot, dtype, format, num_proc, batch_chars, shard_size)
    except ValueError:  # bad input, not an interruption: nothing worth resuming
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()

    dt = time.time() - t0
    total = sum(info["num_tokens"] for info in split_info.values())
    print(f"prepared {dataset} in {data_dir}: tokenizer {tokenizer}, vocab_size {vocab_size}, {dtype}, "
          f"{num_proc} process(es)")
    for s, info in split_info.items():
        nbytes = sum(sh["bytes"] for sh in info["shards"])
        print(f"  {s:5s} {info['num_tokens']:>14,} tokens  {nbytes / 1e6:10.2f} MB  {len(info['shards'])} shard(s)")
    print(f"  {dt:.1f} s, {total / dt:,.0f} tokens/s")
    return meta


def _write_dataset(work, data_dir, request, splits, limits, by_documents, tok, kind, arg, eot, dtype, format,
                   num_proc, batch_chars, shard_size):
    """The shards of every split into work/ (resuming what progress.json lists), then tokenizer/ and meta.json,
    then work/ into place: (split_info, meta)."""
    dataset, source, tokenizer = request["dataset"], request["source"], request["tokenizer"]
    val_fraction, seed, vocab_size = request["val_fraction"], request["seed"], request["vocab_size"]
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
        order = ("val", "train") if "val" in limits else ("train", "val")
        progress = dict(request=request, splits={s: dict(shards=[], next_item=0, skip_tokens=0, documents=0,
                                                          done=False) for s in order})
        _save_json(work / PROGRESS_FILE, progress)
    else:
        done = {s: len(st["shards"]) for s, st in progress["splits"].items()}
        print(f"resuming the prepare in {work}: {done} shard(s) per split already complete")
    for p in work.glob("*.part"):
        p.unlink()

    global _ENCODER
    before = format == "llmc"  # llm.c puts the separator before each document, nanoGPT after
    _ENCODER = (kind, arg, eot, before, dtype)
    chunk = kind != "hf" or not by_documents  # HF pre-tokenizers may not split where we cut: whole documents
    pool = None
    if kind == "gpt2" and num_proc > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = ctx.Pool(num_proc)
    elif kind == "hf":  # Rust encodes on all cores without the GIL: one thread overlaps it with reading and writing
        from multiprocessing.pool import ThreadPool

        pool = ThreadPool(1)
    try:
        for split, state in progress["splits"].items():
            if not state["done"]:
                writer = ShardWriter(work, split, state, progress, dtype, shard_size, format, dataset)
                write_split(iter_items(splits[split](progress["splits"]), chunk), writer, pool, 2 * num_proc,
                            max(batch_chars, num_proc * CHUNK_CHARS), limits.get(split))
    finally:
        _ENCODER = None
        if pool is not None:
            pool.terminate()
    split_info = {}
    for s in ("train", "val"):
        st = progress["splits"][s]
        split_info[s] = dict(num_tokens=sum(sh["num_tokens"] for sh in st["shards"]), shards=st["shards"])
        if by_documents:
            split_info[s]["num_documents"] = st["documents"]
    shutil.rmtree(work / "tokenizer", ignore_errors=True)
    tok.save_pretrained(work / "tokenizer")
    meta = dict(format_version=FORMAT_VERSION if format == "llmc" else 1, dataset=dataset, source=source,
                tokenizer=tokenizer, tokenizer_class=type(tok).__name__, vocab_size=vocab_size, eot_token_id=eot,
                dtype=dtype, split_by="documents" if by_documents else "characters", val_fraction=val_fraction,
                seed=seed, shard_size=shard_size, splits=split_info)
    if format == "llmc":
        meta.update(format="llmc", eot_position="before")
    if "val" in limits:
        meta.update(split_by="documents (the first val_tokens tokens are val)", val_tokens=limits["val"])
    if tokenizer == "char":
        meta["unk_char"] = default_unk_char(char_vocab(tok))  # what unknown characters are encoded as
    meta["tokenizer_hash"] = tokenizer_hash(tok)  # readers refuse a tokenizer/ swapped for another of the same size
    (work / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _commit(work, data_dir)
    return split_info, meta
