"""
The on-disk format of a prepared dataset: the layout of a data_dir, meta.json and the schema read_meta checks it
against, llm.c's shard header, the tokenizer hash. data.py reads it (TokenShards), prepare.py writes it.

Layout of a data_dir (meta.json is written last: a data_dir without it is not a dataset):
    meta.json     format_version, dataset, source, tokenizer, vocab_size, dtype, split_by, eot_token_id (the id
                  appended after every document; null for one-text datasets and char level), splits
                  {train: {num_tokens, shards: [{file, num_tokens, bytes, max_token_id}, ...]}, val: ...}
                  tokenizer_hash (data.tokenizer_hash of tokenizer/; data prepared before it has none); read_meta
                  checks all of it against this schema
    tokenizer/    AutoTokenizer.from_pretrained(data_dir + "/tokenizer") works
    train_000.bin train_001.bin ... val_000.bin   each at most shard_size tokens; read them as one stream
With format "llmc" (format_version 2): NAME_train_000000.bin ... with llm.c's 1 KB header, the EOT before each
document (eot_position "before"). A folder of llm.c shards without meta.json reads as GPT-2 tokens.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .tokenization import GPT2_EOT

FORMAT_VERSION = 2  # 1: nanoGPT .bin shards; 2: also llm.c shards (format "llmc"), which older readers refuse
DTYPES = ("uint16", "uint32")
SHARD_FILE = re.compile(r"(train|val)_\d{3,}\.bin")
LLMC_FILE = re.compile(r".*_(train|val)_\d+\.bin")  # llm.c / modded-nanogpt: fineweb_train_000001.bin
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4  # header: 256 int32, then uint16 tokens
LLMC_VOCAB_SIZE = 50257  # their shards are GPT-2 BPE

# -----------------------------------------------------------------------------
# the format


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(fmt, dataset, split, k):
    return f"{dataset}_{split}_{k:06d}.bin" if fmt == "llmc" else f"{split}_{k:03d}.bin"


def llmc_header(num_tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = LLMC_MAGIC, LLMC_VERSION, num_tokens
    return header.tobytes()


# -----------------------------------------------------------------------------
# reading


def llmc_meta(data_dir):
    """A folder of llm.c / modded-nanogpt shards (*_train_*.bin, *_val_*.bin: a 256 x int32 header with magic
    20240520, version 1 and the token count, then uint16 GPT-2 tokens) -> the meta.json it would have, or
    None when the folder holds no such shards."""
    data_dir = Path(data_dir)
    files = {s: sorted(p for p in data_dir.glob(f"*_{s}_*.bin") if LLMC_FILE.fullmatch(p.name))
             for s in ("train", "val")}
    if not any(files.values()):
        return None
    splits = {}
    for split, paths in files.items():
        shards = []
        for path in paths:
            header = np.fromfile(path, dtype="<i4", count=256)
            if len(header) < 256 or header[0] != LLMC_MAGIC or header[1] != LLMC_VERSION:
                found = f"magic {header[0]}, version {header[1]}" if len(header) >= 2 else "no header"
                raise ValueError(f"{path} is not an llm.c GPT-2 token shard (expected magic {LLMC_MAGIC}, version "
                                 f"{LLMC_VERSION}; found {found})")
            shards.append(dict(file=path.name, num_tokens=int(header[2]),
                               bytes=LLMC_HEADER_BYTES + 2 * int(header[2])))
        splits[split] = dict(num_tokens=sum(s["num_tokens"] for s in shards), shards=shards)
    if data_dir.resolve() not in _ANNOUNCED and int(os.environ.get("RANK", 0)) == 0:
        _ANNOUNCED.add(data_dir.resolve())
        print(f"{data_dir}: llm.c token shards without meta.json; assuming the GPT-2 tokenizer "
              f"(vocab_size {LLMC_VOCAB_SIZE}, <|endoftext|> {GPT2_EOT} before each document)")
    return dict(format_version=FORMAT_VERSION, format="llmc", dataset=data_dir.name,
                source=f"llm.c shards in {data_dir}", tokenizer="gpt2", vocab_size=LLMC_VOCAB_SIZE,
                eot_token_id=GPT2_EOT, eot_position="before", dtype="uint16", split_by="documents",
                splits={s: v for s, v in splits.items() if v["shards"]})


_ANNOUNCED = set()  # llm.c folders whose "GPT-2 assumed" line was printed


def read_meta(data_dir):
    """data_dir/meta.json, validated (format version, dtype, vocab fits dtype); for a folder of llm.c
    shards without one, the meta.json it would have."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        meta = llmc_meta(data_dir) if Path(data_dir).is_dir() else None
        if meta is not None:
            check_meta(meta, path)  # the shards' sizes against their headers' token counts
            return meta
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
    if meta.get("format", "nanogpt") not in ("nanogpt", "llmc"):
        raise ValueError(f"{path}: unsupported shard format {meta['format']!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{path}: unsupported dtype {dtype!r} (expected one of {DTYPES})")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 0 < vocab_size <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{path}: vocab_size {vocab_size!r} is not a whole number that fits dtype {dtype}; "
                         "prepare the data again")
    check_meta(meta, path)
    return meta


def _whole(value, low=0, high=None):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value < high)


def check_meta(meta, path):
    """The rest of meta.json's schema, checked once where it is read: eot_token_id and tokenizer_hash, each split a
    list of shards whose file is a plain name in the folder, a regular file of the size its num_tokens says, and
    whose recorded max_token_id is inside the vocab. ValueError naming the file and the key."""
    vocab, data_dir = meta["vocab_size"], Path(path).parent

    def bad(what):
        return ValueError(f"{path}: {what}; prepare the data again")

    if meta.get("eot_token_id") is not None and not _whole(meta["eot_token_id"], 0, vocab):
        raise bad(f"eot_token_id {meta['eot_token_id']!r} is not a token id below vocab_size {vocab}")
    if not isinstance(meta.get("tokenizer_hash", ""), (str, type(None))):
        raise bad(f"tokenizer_hash {meta['tokenizer_hash']!r} is not a string")
    if not isinstance(meta["splits"], dict) or not meta["splits"]:
        raise bad("'splits' is not a mapping of split names to their shards")
    header = LLMC_HEADER_BYTES if meta.get("format") == "llmc" else 0
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise bad(f"split {split!r} has no list of 'shards'")
        for i, sh in enumerate(info["shards"]):
            where = f"splits.{split}.shards[{i}]"
            if not isinstance(sh, dict) or not isinstance(sh.get("file"), str) or not _whole(sh.get("num_tokens")):
                raise bad(f"{where} needs a 'file' name and a whole 'num_tokens'")
            if Path(sh["file"]).name != sh["file"] or sh["file"] in ("", ".", ".."):  # never read outside data_dir
                raise bad(f"{where}: file {sh['file']!r} is not a plain file name inside the data_dir")
            if sh.get("max_token_id") is not None and not _whole(sh["max_token_id"], 0, vocab):
                raise bad(f"{where}: max_token_id {sh['max_token_id']!r} is not a token id below vocab_size {vocab}")
            shard = data_dir / sh["file"]
            size = shard.stat().st_size if shard.is_file() else None  # is_file: a regular file (or a link to one)
            if size != header + sh["num_tokens"] * itemsize:
                raise ValueError(f"shard {shard} is {'missing' if size is None else f'{size} bytes'}, meta.json says "
                                 f"{sh['num_tokens']} {meta['dtype']} tokens"
                                 + (f" after a {header}-byte header" if header else "") + "; prepare the data again")


class TokenizerMismatch(ValueError):
    """Tokenizer files that are not the ones recorded: a data_dir's tokenizer/ against meta.json's tokenizer_hash,
    a model folder's against config.json's."""


def tokenizer_hash(tokenizer):
    """A short hash of a tokenizer's vocabulary (token -> id), or None without a tokenizer: recorded in meta.json
    at prepare time, and in checkpoints; the same size is not the same vocab."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_tokenizer_hash(tokenizer, recorded, what, record, fix):
    """The one check of loaded tokenizer files against the hash recorded for them (None: nothing recorded, nothing
    to check): a tokenizer of the same size swapped in would decode every id to other text, silently.
    TokenizerMismatch: "{what} (vocab hash ..., {record} records ...): ...; {fix}"."""
    found = tokenizer_hash(tokenizer)
    if recorded is not None and found != recorded:
        raise TokenizerMismatch(f"{what} (vocab hash {found}, {record} records {recorded}): the ids would decode to "
                                f"other text; {fix}")


def scan_max_token_id(shard, chunk=1 << 24):
    """The largest id in a memory-mapped shard, read chunk by chunk (for shards whose meta has none)."""
    return max((int(shard[i:i + chunk].max()) for i in range(0, len(shard), chunk)), default=0)


SAMPLED_IDS = 4096  # ids read per shard at open (strided): a shard of random bytes fails there, not in training


def sample_ids(path, header, dtype, num_tokens, n=SAMPLED_IDS):
    """n ids spread evenly over a shard, read with pread: through the memmap, each read would map the kernel's
    readahead window into the process (~256 MB of RSS for 4096 reads of a 1.2 GB shard)."""
    positions = np.linspace(0, num_tokens - 1, min(num_tokens, n)).astype(np.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = b"".join(os.pread(fd, dtype.itemsize, header + int(p) * dtype.itemsize) for p in positions)
    finally:
        os.close(fd)
    return np.frombuffer(raw, dtype=dtype)
