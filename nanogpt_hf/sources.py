"""
Where prepare's text comes from, as `datasets` rows: local files and URLs (read as a stream, cut into rows at
whitespace), Hub datasets (load_dataset, or streamed), the Python standard library (the offline python_char).

    rows = text_sources("mytext", "data/mytext", ["a.txt"], ...)["rows"]   # {"train": Dataset, "val": Dataset}

A local text becomes rows of ~64K characters, each cut just before a space or newline that follows a non-space
character: GPT-2's pre-tokenizer always splits there, so the tokens of the rows are those of the whole text (and
char level does not care). Rows go into an Arrow dataset in the datasets cache (Dataset.from_generator), keyed by
the sha256 of the file, so a second prepare of the same text finds them there.
"""

import codecs
import hashlib
import os
import re
import sys
import sysconfig
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import datasets
from tqdm.auto import tqdm

DEFAULT_MAX_BYTES = 4_000_000  # python_char: how much of the standard library to read
DEFAULT_VAL_TOKENS = 100_000_000  # streamed datasets: val = the first ~100M tokens, llm.c's first shard
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHUNK_CHARS = 1 << 16  # long texts go to the tokenizer as rows of about this many chars
READ_BYTES = 1 << 22  # local files are read this many bytes at a time
ROWS_PER_BATCH = 32  # rows per Arrow record batch (2M characters)
CUT = re.compile(r"(?<=\S)[ \n]")  # where a row may end: before a space/newline that follows a non-space

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
# text


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
    path = check_input(path)
    decoder, offset = codecs.getincrementaldecoder("utf-8-sig")(), 0  # a leading BOM is not text: dropped
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


def check_input(path):
    """An --input that is not a readable file -> FileNotFoundError saying what it is instead."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"--input {path} is a folder; pass its files, e.g. --input '{path}/*.txt'")
    if path.is_symlink():
        raise FileNotFoundError(f"--input {path} is a symlink to nothing (or to itself)")
    raise FileNotFoundError(f"input file {path} not found (--input)")


def resolve_inputs(inputs, data_dir):
    """--input values -> local paths: globs expanded (sorted), URLs downloaded into data_dir once."""
    paths = []
    for item in inputs:
        if urlparse(item).scheme in ("http", "https"):
            paths.append(download(item, Path(data_dir) / (Path(urlparse(item).path).name or "input.txt")))
        elif any(c in item for c in "*?["):
            matches = sorted(Path().glob(item) if not Path(item).is_absolute() else Path("/").glob(item[1:]))
            matches = [m for m in matches if m.is_file()]  # a pattern's folders are not text
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


MAX_ROW_CHARS = 64 * CHUNK_CHARS  # 4M chars: a row is cut here even without whitespace, so memory stays bounded


def next_cut(text, i, size=CHUNK_CHARS, final=False):
    """Where the row starting at text[i] ends: at the first CUT at or past i + size, and at i + MAX_ROW_CHARS at
    the latest (text without whitespace: the one place where the tokens may differ from the whole text's, once
    every 4M characters). None when the text ends before either and more may follow; len(text) when final."""
    limit = i + max(size, MAX_ROW_CHARS)
    m = CUT.search(text, i + size, limit)
    if m:
        return m.start()
    if len(text) >= limit:
        return limit
    return len(text) if final else None


def chunk_stream(pieces, size=CHUNK_CHARS):
    """A text given as a stream of str pieces -> its rows of about `size` characters (see the top; at most
    MAX_ROW_CHARS), the same whatever the pieces, in memory bounded by one piece plus one row (a cut depends only
    on the two characters around it)."""
    buf, i = "", 0
    for piece in pieces:
        buf, i = buf[i:] + piece, 0
        while len(buf) - i > size and (j := next_cut(buf, i, size)) is not None:
            yield buf[i:j]
            i = j
    while i < len(buf):
        j = next_cut(buf, i, size, final=True)
        yield buf[i:j]
        i = j


def chunk_text(text, size=CHUNK_CHARS):
    return list(chunk_stream([text], size))


def bounded(text):
    """A row's text as the pieces the tokenizer gets, each at most MAX_ROW_CHARS: the text itself, or for a longer
    one (a Hub row, a document without whitespace) chunk_stream's rows, cut at a whitespace in the last CHUNK_CHARS
    before MAX_ROW_CHARS where there is one (GPT-2-style tokens unchanged), else at MAX_ROW_CHARS. prepare's _encode
    passes every row through here, whatever its source, so the tokenizer never holds more than one bounded piece
    per thread."""
    size = MAX_ROW_CHARS - CHUNK_CHARS  # as _document_rows cuts a local document: the same rows either way
    return [text] if len(text) <= size else list(chunk_stream([text], size))


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


def load_hub_dataset(name, config=None, split="train", revision=None, text_column="text", streaming=False):
    """A Hub dataset id or local dataset folder -> a Dataset (memory-mapped Arrow) or, with streaming, an
    IterableDataset read as it downloads (nothing stored in the cache), with one "text" column."""
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


def _train_val(ds, val_fraction, seed, source):
    """A map-style dataset of documents -> {"train": ..., "val": ...}: datasets' seeded train_test_split, as
    nanoGPT's openwebtext/prepare.py."""
    if len(ds) < 2:
        raise ValueError(f"{source} has {len(ds)} document(s): too few to split into train and val")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": parts["train"], "val": parts["test"]}


# -----------------------------------------------------------------------------
# rows: the datasets prepare tokenizes


def _text_rows(path, start, stop, digest):
    """The characters [start, stop) of one text file as rows (digest, the file's sha256: the cache key)."""
    for row in chunk_stream(_chars(iter_text(path), start, stop)):
        yield {"text": row}


def _document_rows(paths, digests, cut):
    """Files as documents, each as rows flagged first/last of its document. cut: long documents into rows (keeps
    the tokens of char level and GPT-2-style BPE); else one row per document up to MAX_ROW_CHARS (any other
    tokenizer; a longer document is cut as sources.bounded cuts a row, so memory stays bounded)."""
    for path in paths:  # (uncut, a document is still read as a stream, in rows of at most MAX_ROW_CHARS)
        rows = chunk_stream(iter_text(path), CHUNK_CHARS if cut else MAX_ROW_CHARS - CHUNK_CHARS)
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
                                           writer_batch_size=ROWS_PER_BATCH)


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


def texts(rows, limit=None):
    """The texts of a map-style dataset of rows, streamed; limit: stop after about this many UTF-8 bytes."""
    size = 0
    for batch in rows.iter(batch_size=ROWS_PER_BATCH):
        for text in batch["text"]:
            yield text
            size += len(text.encode("utf-8"))
            if limit is not None and size >= limit:
                return
