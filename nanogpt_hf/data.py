"""
The reader training uses. nanoGPT-style token shards: train_000.bin,
val_000.bin ... (raw uint16 or uint32 token ids, one long stream per split) + meta.json + tokenizer/ (Hugging Face
format); `TokenShards` serves random (x, y) windows from them through np.memmap. Also reads llm.c's shards.
Writing them is nanogpt_hf/prepare.py's job (examples/prepare.py).

    python examples/prepare.py --dataset shakespeare_char        # -> data/shakespeare_char/

    from nanogpt_hf.data import TokenShards, load_tokenizer
    ds = TokenShards("data/shakespeare_char", split="train")
    x, y = ds.get_batch(batch_size=12, block_size=64, step=0)   # (12, 64) int64 each, y = x shifted by one
    tok = load_tokenizer("data/shakespeare_char")               # the tokenizer the shards were made with

The format itself (meta.json, its schema, llm.c's header) is in data_format.py.
"""

import zlib
from pathlib import Path

import numpy as np
import torch

from .data_format import (LLMC_HEADER_BYTES, TokenizerMismatch, check_tokenizer_hash, llmc_meta,  # noqa: F401
                          read_meta, sample_ids, scan_max_token_id, tokenizer_hash)
from .tokenization import gpt2_tokenizer, load_pretrained_tokenizer

_SCANNED = {}  # llm.c shard path -> its largest token id


class TokenShards:
    """One split of a prepared data_dir (or of a folder of llm.c shards) as a single token stream over
    memory-mapped shards: nothing of a split is loaded into memory."""

    def __init__(self, data_dir, split="train"):
        self.data_dir, self.split = Path(data_dir), split
        self.meta = read_meta(data_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"{data_dir} has no {split!r} split (it has {list(self.meta['splits'])})")
        self.dtype = np.dtype(self.meta["dtype"])
        header = LLMC_HEADER_BYTES if self.meta.get("format") == "llmc" else 0
        self.shards, self.paths = [], []
        for sh in self.meta["splits"][split]["shards"]:  # read_meta checked each one's size
            path = self.data_dir / sh["file"]
            # one memmap per shard for the reader's lifetime: pages are file-backed and shared (the RSS growth
            # nanoGPT avoided by re-opening is page cache the kernel can drop, not a leak)
            shard = np.memmap(path, dtype=self.dtype, mode="r", offset=header, shape=(sh["num_tokens"],)) \
                if sh["num_tokens"] else np.zeros(0, self.dtype)
            self._check_ids(sample_ids(path, header, self.dtype, len(shard)), path)  # random bytes show at once
            self.shards.append(shard)
            self.paths.append(path)
        # chat data (nanogpt_hf/chat_data.py): a uint8 loss mask per token, in parallel files, and conversations
        # padded to rows of row_len tokens: windows start at a row, and y is -100 where the mask is 0
        self.masks, self.row_len = None, self.meta.get("row_len")
        if self.meta.get("loss_mask"):
            self.masks = [np.memmap(self.data_dir / sh["mask_file"], dtype=np.uint8, mode="r", shape=(len(s),))
                          for sh, s in zip(self.meta["splits"][split]["shards"], self.shards)]
        self.bounds = np.cumsum([0] + [len(s) for s in self.shards])  # (num_shards+1,) start of each shard
        self.num_tokens = int(self.bounds[-1])
        self._split_key = zlib.crc32(split.encode())  # decorrelates the train and val draws of a step

    def _check_ids(self, ids, path):
        """Every id in ids must be below vocab_size (the embedding would fail with an IndexError, or a larger
        model's would train on garbage): else one line naming the shard."""
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"shard {path} holds token id {int(ids.max())}, beyond meta.json's vocab_size "
                             f"{self.vocab_size}: it is damaged or was not made with this tokenizer; prepare the "
                             "data again")

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]

    @property
    def eot_token_id(self):
        return self.meta.get("eot_token_id")

    def shard_max_token_ids(self, split=None):
        """[(path, largest token id or None)] of a split's shards, from meta.json (None for data prepared
        before it was recorded); llm.c folders are scanned once per process."""
        out = []
        for sh in self.meta["splits"][split or self.split]["shards"]:
            path, m = self.data_dir / sh["file"], sh.get("max_token_id")
            if m is None and self.meta.get("format") == "llmc":
                if path not in _SCANNED:
                    _SCANNED[path] = scan_max_token_id(np.memmap(path, dtype=self.dtype, mode="r",
                                                                 offset=LLMC_HEADER_BYTES, shape=(sh["num_tokens"],)))
                m = _SCANNED[path]
            out.append((path, m))
        return out

    @property
    def max_token_id(self):
        """The largest token id of this split (None when unknown: data prepared before it was recorded)."""
        ids = [m for _, m in self.shard_max_token_ids()]
        return None if None in ids else max(ids, default=0)

    def check_vocab(self, model_vocab_size):
        """Refuse a model whose vocab does not cover the data: its vocab_size, then the largest token id
        recorded for each shard of every split (unknown for old data_dirs: skipped)."""
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"the model's vocab_size {model_vocab_size} is smaller than the vocab_size "
                             f"{self.vocab_size} of {self.data_dir}; use vocab_size >= {self.vocab_size}")
        for split in self.meta["splits"]:
            for path, m in self.shard_max_token_ids(split):
                if m is not None and m >= model_vocab_size:
                    raise ValueError(f"shard {path} holds token id {m}, beyond the model's vocab_size "
                                     f"{model_vocab_size} (and meta.json's {self.vocab_size}): it was not made "
                                     "with this tokenizer; prepare the data again")

    @property
    def masked(self):
        """True for chat data: batches carry y = -100 where the loss mask is 0 (train with token-mean losses)."""
        return self.masks is not None

    def _gather(self, starts, length, shards=None):
        """(B,) start offsets in the split -> (B, length) tokens (or mask values, shards=self.masks); a window may
        run across shard boundaries."""
        shards = self.shards if shards is None else shards
        shard_idx = np.searchsorted(self.bounds, starts, side="right") - 1  # (B,) shard of each window start
        k = shard_idx[0] if len(starts) else 0
        if (shard_idx == k).all() and starts.max(initial=0) + length <= self.bounds[k + 1]:
            # fast path, the usual case: every window lies inside one shard -> a single fancy-index read
            idx = (starts - self.bounds[k])[:, None] + np.arange(length)  # (B, length)
            return np.asarray(shards[k][idx])
        out = np.empty((len(starts), length), dtype=shards[0].dtype)
        for i, (start, k) in enumerate(zip(starts, shard_idx)):
            pos, filled = start - self.bounds[k], 0
            while filled < length:
                piece = shards[k][pos:pos + length - filled]
                out[i, filled:filled + len(piece)] = piece
                filled, k, pos = filled + len(piece), k + 1, 0
        return out

    def _windows(self, starts, length, device):
        """(B,) start offsets -> (x, y) on device, bound-checked against the vocab."""
        windows = self._gather(starts, length)  # (B, length)
        if windows.max(initial=0) >= self.vocab_size:  # the bound check: one max over the batch, ~1 us
            row = int(np.argmax(windows.max(axis=1)))
            self._check_ids(windows[row], self.paths[np.searchsorted(self.bounds, starts[row], side="right") - 1])
        mask = None if self.masks is None else self._gather(starts, length, self.masks)
        return self._to_torch(windows, device, mask)

    @staticmethod
    def _to_torch(windows, device, mask=None):
        t = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
        if mask is not None:  # a target whose mask is 0 (prompt, padding) is ignored by the loss
            y[torch.from_numpy(mask[:, 1:] == 0)] = -100
        if device is not None and torch.device(device).type == "cuda":
            # pinned host memory lets the copy overlap with compute (nanoGPT's get_batch)
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return (x, y) if device is None else (x.to(device), y.to(device))

    def get_batch(self, batch_size, block_size, step, seed=0, rank=0, world_size=1, micro_step=0, device=None):
        """Random windows like nanoGPT's get_batch, but a pure function of (seed, step, micro_step, rank):
        every rank draws the same world_size*batch_size distinct offsets and takes its own slice, so ranks
        never share a window and a resumed run draws exactly the batches it would have drawn."""
        starts = self.sample_starts(batch_size, block_size, step, seed, rank, world_size, micro_step)
        return self._windows(starts, block_size + 1, device)

    def sample_starts(self, batch_size, block_size, step, seed=0, rank=0, world_size=1, micro_step=0):
        """(batch_size,) offsets in the split of the windows get_batch returns."""
        if not 0 <= rank < world_size or batch_size < 1 or block_size < 1:
            raise ValueError(f"need batch_size, block_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                             f"{block_size}, rank {rank}, world_size {world_size}")
        n_starts, k = self.num_tokens - block_size, world_size * batch_size
        if self.row_len:  # chat data: windows start at a conversation's row
            if block_size + 1 > self.row_len:
                raise ValueError(f"block_size {block_size} is larger than the rows of {self.data_dir} ({self.row_len}"
                                 f" tokens = its block_size + 1); use --block_size {self.row_len - 1} or prepare again")
            n_starts = self.num_tokens // self.row_len
        if n_starts < k:
            raise ValueError(f"the {self.split} split of {self.data_dir} has {self.num_tokens} tokens: too few "
                             f"for {k} distinct windows of block_size {block_size}; use a smaller block_size "
                             "or batch_size, or more data")
        rng = np.random.default_rng([seed, step, micro_step, self._split_key])
        starts = rng.choice(n_starts, size=k, replace=False)[rank * batch_size:(rank + 1) * batch_size]
        return starts * self.row_len if self.row_len else starts

    def num_windows(self, block_size):
        """How many non-overlapping (x, y) windows iter_sequential yields over the whole split (all ranks)."""
        if self.row_len:  # chat data: one window per conversation
            return self.num_tokens // self.row_len
        return max(0, (self.num_tokens - 1) // block_size)

    def iter_sequential(self, batch_size, block_size, rank=0, world_size=1, device=None):
        """Non-overlapping windows covering the split once (x = tokens[i*T:(i+1)*T], y shifted by one; the last
        partial window is dropped) for exact evaluation. Rank r gets windows r, r+W, r+2W, ...: the ranks'
        counts differ by at most one, and a rank's last batch may be smaller than batch_size."""
        starts = np.arange(rank, self.num_windows(block_size), world_size) * (self.row_len or block_size)
        for i in range(0, len(starts), batch_size):
            yield self._windows(starts[i:i + batch_size], block_size + 1, device)


def load_tokenizer(path):
    """The tokenizer of a prepared data_dir (data_dir/tokenizer; the one meta.json's tokenizer_hash names, where
    recorded), or of a tokenizer/model folder."""
    path = Path(path)
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        if not (path / "meta.json").is_file() and path.is_dir() and llmc_meta(path) is not None:
            return gpt2_tokenizer()  # a folder of llm.c shards: GPT-2 tokens by that format's definition
        raise FileNotFoundError(
            f"no tokenizer in {path} (expected {path}/tokenizer/tokenizer.json); prepare the data with "
            "examples/prepare.py"
        )
    tokenizer = load_pretrained_tokenizer(tok_dir)
    meta_path = path / "meta.json"
    recorded = read_meta(path).get("tokenizer_hash") if tok_dir != path and meta_path.is_file() else None
    check_tokenizer_hash(tokenizer, recorded, f"{tok_dir} is not the tokenizer {path}'s shards were made with",
                         "meta.json", "restore it or prepare the data again")  # a tokenizer/ swapped after prepare
    return tokenizer

