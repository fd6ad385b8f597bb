"""
Preparing data, the Hugging Face way: the text as `datasets` rows (nanogpt_hf/sources.py) -> one batched `.map`
to token ids, on --num_proc processes, cached by datasets -> the token shards + meta.json + tokenizer/ that
nanogpt_hf/data_format.py describes and nanogpt_hf/data.py reads. examples/prepare.py is its command line.

    prepare_dataset("shakespeare_char")                                  # -> data/shakespeare_char/
    prepare_dataset("mine", inputs=["a.txt"], tokenizer="bpe", vocab_size=8192)   # trains a BPE first

Shards are committed one by one into .NAME.partial/ (progress.json says where the rows continue, so a killed
prepare resumes after its last complete shard); the finished dataset then replaces data_dir in one rename.
Memory does not grow with the input: rows are generated, mapped and read back a batch at a time. The same
command again finds the rows and their tokens in the datasets cache and only writes the shards.
"""

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from .cli import disk_error, naming
from .data import load_tokenizer
from .data_format import FORMAT_VERSION, LLMC_FILE, LLMC_HEADER_BYTES, SHARD_FILE, llmc_header, shard_name, \
    token_dtype, tokenizer_hash
from .sources import BUILTIN, DEFAULT_MAX_BYTES, DEFAULT_VAL_TOKENS, bounded, text_sources, texts
from .tokenization import GPT2_EOT, MAX_VOCAB, build_char_tokenizer, char_vocab, compression, default_unk_char, \
    gpt2_tokenizer, is_byte_level_bpe, load_pretrained_tokenizer, tiktoken_gpt2, train_bpe

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per .bin file (200 MB in uint16)
DEFAULT_SEED = 2357  # nanoGPT's openwebtext split seed
SLEEP_ENV = "NANOGPT_HF_PREPARE_SLEEP"  # test hook: seconds to sleep after each shard is written
BATCH_BYTES = 1 << 21  # text per .map batch (and per Arrow record batch it writes): bounds each process's memory
IN_PROCESS_BYTES = 1 << 22  # a split smaller than this is mapped in this process (forking costs more than it saves)
COMPRESSION_BYTES = 1 << 23  # --tokenizer bpe: bytes of val text its compression is measured on
PREPARE_VERSION = 2  # in progress.json: a .partial/ left by another version of this writer starts over
PROGRESS_FILE, LOCK_FILE = "progress.json", ".lock"

# -----------------------------------------------------------------------------
# tokens: one batched .map over the rows


def _encode(rows, kind, table, eot, before, dtype, threads=1):
    """The .map function: a batch of rows (pa.Table: text, plus first/last when a document spans several rows)
    -> pa.Table: ids (the row's token ids, <|endoftext|> (eot) before the first row of each document (llm.c) or
    after its last (nanoGPT); none when eot is None) and eod (the row ends a document)."""
    pieces = [bounded(t) for t in rows.column("text").to_pylist()]  # a huge row (any source): in bounded pieces
    texts = [p for ps in pieces for p in ps]
    pieces = pieces if len(texts) > rows.num_rows else None
    if kind == "char":  # nanoGPT's [stoi[c] for c in text], vectorized through a lookup table (holes -> unk)
        ids = [table[np.minimum(np.frombuffer(t.encode("utf-32-le"), np.uint32), len(table) - 1)] for t in texts]
    elif kind == "gpt2" and threads > 1:  # a stream, mapped in this process: tiktoken's threads use the cores
        ids = tiktoken_gpt2().encode_ordinary_batch(texts, num_threads=threads)
    elif kind == "gpt2":  # one of num_proc processes (tiktoken's encoding is loaded once, before they fork)
        enc = tiktoken_gpt2()  # encode_to_numpy (tiktoken >= 0.8): no Python list of the tokens in between
        ids = [enc.encode_to_numpy(t, disallowed_special=()) if hasattr(enc, "encode_to_numpy")
               else enc.encode_ordinary(t) for t in texts]
    elif hasattr(table, "backend_tokenizer"):  # a fast tokenizer: its Rust batch encode, what __call__ runs
        ids = [e.ids for e in table.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = table(texts, add_special_tokens=False)["input_ids"]
    if pieces is not None:  # each row's ids: its pieces' ids one after the other
        ids = iter(ids)
        ids = [np.concatenate([np.asarray(next(ids), np.int64) for _ in ps]) for ps in pieces]
    n, whole = rows.num_rows, "last" not in rows.column_names  # whole: one row per document
    first = np.ones(n, bool) if whole else rows.column("first").to_numpy(zero_copy_only=False)
    last = np.ones(n, bool) if whole else rows.column("last").to_numpy(zero_copy_only=False)
    sep, parts, lens = np.array([eot or 0], dtype), [], np.zeros(n + 1, np.int64)
    for i, x in enumerate(ids):
        with_eot = eot is not None and (first[i] if before else last[i])
        parts += ([sep, x] if before else [x, sep]) if with_eot else [x]
        lens[i + 1] = len(x) + with_eot
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
    offsets = pa.array(np.cumsum(lens).astype(np.int32))
    return pa.table({"ids": pa.ListArray.from_arrays(offsets, pa.array(flat)), "eod": pa.array(last)})


def tokenizer_digest(tok):
    """sha256 of a tokenizer's tokenizer.json (what encodes): part of the .map cache key and of a resume's."""
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
    # a Hugging Face tokenizer encodes a batch on all cores itself (Rust threads), which datasets turns off in
    # forked workers: mapped in this process it ran 0.96x the bare encode_batch, on 2 workers 0.64x (20 MB)
    workers = num_proc > 1 and nbytes > IN_PROCESS_BYTES and encoder["kind"] != "hf"
    return rows.map(_encode, batched=True, batch_size=batch, writer_batch_size=batch, fn_kwargs=encoder,
                    num_proc=num_proc if workers else None, new_fingerprint=fingerprint, desc="tokenizing")


def _arrow_batches(tokens):
    """The record batches of tokenized rows. The cache files of a mapped dataset are read with plain reads, not
    memory-mapped, so the tokens already written do not stay in this process's memory."""
    if isinstance(tokens, datasets.IterableDataset):
        for table in tokens.iter(batch_size=256):
            yield from table.to_batches()
    elif tokens.cache_files:
        for f in tokens.cache_files:
            with pa.OSFile(f["filename"]) as source:
                yield from pa.ipc.open_stream(source)
    else:  # mapped in memory
        yield from tokens.data.table.to_batches()


def _token_batches(tokens, start=0):
    """(ids, eod) of tokenized rows from row `start` on, a record batch at a time."""
    for b in _arrow_batches(tokens):
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
        tiktoken_gpt2()  # fail early and clearly when the BPE files are unavailable
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


# -----------------------------------------------------------------------------
# writing shards, resumably: .NAME.partial/ holds the finished shards and progress.json until all are done


def _save_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp), open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _naming_the_shard(method):
    """A ShardWriter method whose failed write names the shard file being written."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with naming(lambda: self.f and self.f.name):
            return method(self, *args, **kwargs)

    return wrapper


class ShardWriter:
    """Appends a split's token stream to shards of shard_size tokens. Each full shard is fsynced, renamed
    from .part to its name and recorded in progress.json with where the input continues (row index, tokens
    of that row already written), so a killed prepare resumes after its last complete shard."""

    def __init__(self, out_dir, split, state, progress, dtype, shard_size, fmt, dataset, mask=False):
        self.out_dir, self.split, self.state, self.progress = out_dir, split, state, progress
        self.dtype, self.shard_size, self.fmt, self.dataset = np.dtype(dtype), shard_size, fmt, dataset
        self.sleep = float(os.environ.get(SLEEP_ENV) or 0)
        self.f = self.mf = None
        self.mask = mask  # chat data: a uint8 loss mask per token, in NAME.mask next to each shard

    def _open(self):
        self.name = shard_name(self.fmt, self.dataset, self.split, len(self.state["shards"]))
        self.f = open(self.out_dir / (self.name + ".part"), "wb")
        if self.mask:
            self.mf = open(self.out_dir / (self.name[:-4] + ".mask.part"), "wb")
        if self.fmt == "llmc":
            self.f.write(llmc_header(0))
        self.n, self.max = 0, 0

    @_naming_the_shard
    def _finish(self, next_item, skip_tokens, documents):
        if self.fmt == "llmc":
            self.f.seek(0)
            self.f.write(llmc_header(self.n))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        extra = {}
        if self.mf is not None:  # the mask is in place before its shard is, and both before progress.json says so
            self.mf.flush()
            os.fsync(self.mf.fileno())
            self.mf.close()
            self.mf, extra["mask_file"] = None, self.name[:-4] + ".mask"
            os.replace(self.out_dir / (extra["mask_file"] + ".part"), self.out_dir / extra["mask_file"])
        os.replace(self.out_dir / (self.name + ".part"), self.out_dir / self.name)
        nbytes = (LLMC_HEADER_BYTES if self.fmt == "llmc" else 0) + self.n * self.dtype.itemsize
        self.state["shards"].append(dict(file=self.name, num_tokens=self.n, bytes=nbytes, max_token_id=self.max,
                                         **extra))
        self.state.update(next_item=next_item, skip_tokens=skip_tokens, documents=documents)
        _save_json(self.out_dir / PROGRESS_FILE, self.progress)

    @_naming_the_shard
    def write(self, flat, lens, ends, first_item, first_offset, mask=None):
        """flat: the tokens of rows first_item, first_item+1, ... (lens each; the first row's first
        first_offset tokens were written before); mask: their loss mask (uint8, same length), with mask=True."""
        cum, pos, docs = np.cumsum(lens), 0, self.state["documents"]  # documents complete before this batch
        while pos < len(flat):
            if self.f is None:
                self._open()
            n = min(len(flat) - pos, self.shard_size - self.n)
            piece = flat[pos:pos + n]
            self.f.write(piece.tobytes())
            if self.mf is not None:
                self.mf.write(mask[pos:pos + n].tobytes())
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
        or re.fullmatch(r"(train|val)_\d{3,}\.mask", p.name) is not None \
        or SHARD_FILE.fullmatch(p.name) is not None or LLMC_FILE.fullmatch(p.name) is not None


def commit(work, data_dir, tok, meta):
    """The shards in work are complete: the tokenizer, then meta.json (last: a folder without it is not a dataset)
    into work, and work into data_dir's place (_commit)."""
    shutil.rmtree(work / "tokenizer", ignore_errors=True)
    with naming(work / "tokenizer"):
        tok.save_pretrained(work / "tokenizer")
    with naming(work / "meta.json"):
        (work / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _commit(work, data_dir)


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
    """Repairs what a kill can leave: data_dir moved aside in the middle of a commit."""
    if not data_dir.exists() and _old_dir(data_dir).exists():
        os.replace(_old_dir(data_dir), data_dir)
    shutil.rmtree(_old_dir(data_dir), ignore_errors=True)


@contextlib.contextmanager
def work_dir(data_dir):
    """.NAME.partial/ next to data_dir, locked, for the shards until _commit puts them in place. Bad input
    (ValueError) removes it: nothing worth resuming. A write the disk refuses (full, quota, read-only, I/O error,
    file too large) becomes one line naming the file, and removes what this run wrote: the folder if this run
    made it, else its unfinished files (the shards a killed run left stay resumable). data_dir is never touched
    before _commit, so a dataset already there stays complete."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(data_dir)
    work = _partial_dir(data_dir)
    made = not work.exists()
    work.mkdir(exist_ok=True)
    lock = _lock(work)
    try:
        yield work
    except Exception as e:
        disk = disk_error(e)
        if isinstance(e, ValueError) or (disk and made):
            shutil.rmtree(work, ignore_errors=True)
        elif disk:
            for p in [*work.glob("*.part"), *work.glob("*.tmp")]:
                p.unlink(missing_ok=True)
        if disk is None:
            raise
        path = disk.filename or f"{work} (or the datasets cache, {datasets.config.HF_DATASETS_CACHE})"
        left = f"removed {work}" if made else f"kept the complete shards in {work}"
        kept = f"; {data_dir} is as it was" if (data_dir / "meta.json").is_file() else ""
        raise ValueError(f"could not write {path}: {disk.strerror or str(disk)}; free space there (or choose "
                         f"another --data_dir) and run prepare again ({left}{kept})") from None
    finally:
        if lock is not None:
            lock.close()


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
    if vocab_size is not None and vocab_size > MAX_VOCAB:  # the BPE trainer allocates for it up front
        raise ValueError(f"--vocab_size {vocab_size}: at most {MAX_VOCAB:,}")
    num_proc = cap_num_proc(num_proc)
    data_dir = check_data_dir(data_dir or Path("data") / dataset)
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
        tokenizer, lambda: src.get("chars") or {c for r in src["rows"].values() for t in texts(r) for c in t},
        src["by_documents"], lambda: texts(src["rows"]["train"]), vocab_size, tokenizer_from)
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
    meta["tokenizer_hash"] = tokenizer_hash(tok)  # readers refuse a tokenizer/ swapped for another of the same size
    if tokenizer == "bpe":
        meta.update(tokenizer_from=str(tokenizer_from) if tokenizer_from else None,
                    compression=compression(tok, list(texts(src["rows"]["val"], COMPRESSION_BYTES)))
                    if "rows" in src else None)

    # 3) shards -> .NAME.partial/ (resumed if a run with the same request was killed), then into place
    with work_dir(data_dir) as work:
        meta = _write_dataset(work, data_dir, request, meta, src, limits, tok, encoder, digest, num_proc)
    _report(meta, data_dir, num_proc, time.time() - t0)
    return meta


def cap_num_proc(num_proc):
    """--num_proc -> the worker count: all cores by default, and never more (1000 forked workers only thrash)."""
    cores = default_num_proc()
    if num_proc is not None and num_proc > cores:
        print(f"note: --num_proc {num_proc} is more than the {cores} cores here; using {cores}")
        return cores
    return num_proc or cores


def default_num_proc():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_data_dir(data_dir):
    """--data_dir -> a Path, refused before any work where it (or a folder above it) is a file."""
    data_dir = Path(data_dir)
    for p in (data_dir, *data_dir.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"--data_dir {data_dir}: {p} is a file, not a folder; choose another --data_dir")
    return data_dir


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
        print(f"  compression on val ({c['bytes']:,} bytes): {c['bytes_per_token']:.2f} bytes/token; "
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
    commit(work, data_dir, tok, meta)
    return meta
