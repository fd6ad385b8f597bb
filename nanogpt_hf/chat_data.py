"""
Conversation data for SFT: rows with a `messages` column ([{role, content}, ...]) -> token shards + a parallel loss
mask, with the tokenizer (plus the chat tokens and template of chat.py) saved next to them. examples/prepare.py --chat
is its command line.

    python examples/prepare.py --chat --dataset mychat --input conversations.jsonl --tokenizer out-base --block_size 128

Each conversation is rendered with the chat template, checked (a malformed row is a one-line error naming it), and
padded to one row of block_size + 1 tokens (the pad is <|end|> with mask 0), so that the reader's windows start at a
conversation and never mix two. --pack fills the train rows with several whole conversations in order (fewer rows,
less padding; attention runs across the conversations of a row, the simplification TRL and nanochat make too, and
the mask still keeps the loss on the answers only); val rows stay one conversation each. A longer conversation is
cut to the row if that keeps some assistant tokens, else dropped; how many of each is printed and kept in meta.json.
Rows are rendered through datasets' .map (memory-mapped, cached), then written by prepare.py's ShardWriter: shards
committed one by one, resumable, the dataset moved into place in one rename, memory bounded by one batch of rows.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np

from . import prepare as prep
from .sources import check_input, load_hub_dataset, resolve_inputs
from .chat import add_chat_tokens, assemble, check_messages, end_token_id
from .data_format import FORMAT_VERSION, token_dtype
from .tokenization import build_char_tokenizer, gpt2_tokenizer, load_pretrained_tokenizer

DEFAULT_BLOCK_SIZE = 256
KEPT, TRUNCATED, DROPPED = 0, 1, 2


def load_conversations(inputs=None, hf_dataset=None, hf_config=None, hf_split="train", hf_revision=None,
                       column="messages"):
    """A JSONL file (--input), a local dataset folder or a Hub dataset (--hf_dataset) -> a Dataset with one
    `messages` column (memory-mapped Arrow)."""
    import datasets

    if inputs:
        paths = [str(check_input(p)) for p in resolve_inputs(inputs, ".")]
        try:
            ds = datasets.load_dataset("json", data_files=paths, split="train")
        except Exception as e:
            if type(e).__name__ == "DatasetGenerationError":  # its message says nothing; its cause names the row
                e = e.__cause__ or e.__context__ or e
            # the json builder found no line at all (datasets 4.0 says it with a SchemaInferenceError)
            if isinstance(e, StopIteration) or type(e).__name__ == "SchemaInferenceError":
                raise ValueError(f"--input {' '.join(paths)} holds no JSON lines (empty?)") from None
            raise ValueError(f"could not read {' '.join(paths)} as JSON lines ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        if column not in ds.column_names:
            raise ValueError(f"--input {' '.join(paths)} has no {column!r} field (it has {ds.column_names})")
        ds = ds.select_columns([column])
        return ds.rename_column(column, "messages") if column != "messages" else ds
    ds = load_hub_dataset(hf_dataset, hf_config, hf_split, hf_revision, text_column=column)
    return ds.rename_column("text", "messages")


def chat_tokenizer(spec, ds):
    """--tokenizer (char: the distinct characters of every message; gpt2; a tokenizer folder, e.g. the base model's
    out_dir, or Hub id) with the chat tokens and template added."""
    if spec == "char":
        chars = set()
        for batch in ds.iter(batch_size=1000):
            for messages in batch["messages"]:
                for m in messages or ():
                    content = m.get("content") if isinstance(m, dict) else None
                    chars.update(content if isinstance(content, str) else "")  # others: check_messages says so
        tok = build_char_tokenizer(chars)
    elif spec == "gpt2":
        tok = gpt2_tokenizer()
    else:
        tok = load_pretrained_tokenizer(spec)
    return add_chat_tokens(tok)


def render_rows(batch, indices, tokenizer, row_len):
    """datasets .map function: {messages} -> {input_ids, loss_mask, status}, each conversation cut to row_len tokens
    (status TRUNCATED) or, when no assistant token would be left, dropped (status DROPPED)."""
    for i, messages in zip(indices, batch["messages"]):
        check_messages(messages, f"conversation {i}")
    contents = [m["content"] for messages in batch["messages"] for m in messages]
    bodies = iter(tokenizer(contents, add_special_tokens=False)["input_ids"]) if contents else iter(())
    out = {"input_ids": [], "loss_mask": [], "status": []}
    for messages in batch["messages"]:  # chat.render, with the batch's contents tokenized in one call
        ids, mask = assemble(tokenizer, messages, [next(bodies) for _ in messages])
        status = KEPT
        if len(ids) > row_len:
            ids, mask = ids[:row_len], mask[:row_len]
            status = TRUNCATED if any(mask[1:]) else DROPPED  # mask[0] is never a target
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["status"].append(status)
    return out


def prepare_chat(dataset, data_dir=None, inputs=None, tokenizer="gpt2", hf_dataset=None, hf_config=None,
                 hf_split="train", hf_revision=None, column="messages", block_size=DEFAULT_BLOCK_SIZE,
                 val_fraction=0.1, seed=prep.DEFAULT_SEED, shard_size=None, overwrite=False, num_proc=None,
                 pack=False):
    """Conversations -> data_dir (default data/<dataset>): shards, NAME.mask loss masks, meta.json, tokenizer/.
    pack: several conversations per train row (in order, while they fit; attention runs across them, as in TRL's
    and nanochat's packing, and the mask keeps the loss on the answers); val stays one conversation per row, so
    its loss is the same with or without packing. Returns meta.json as a dict."""
    t0 = time.time()
    if not inputs and not hf_dataset:
        raise ValueError("--chat needs the conversations: --input FILE.jsonl or --hf_dataset ID_OR_FOLDER")
    if block_size < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"--block_size must be >= 2 and --val_fraction between 0 and 1, got {block_size}, "
                         f"{val_fraction}")
    row_len, shard_size = block_size + 1, shard_size or prep.DEFAULT_SHARD_SIZE
    shard_size = max(row_len, shard_size // row_len * row_len)  # whole rows per shard
    data_dir = prep.check_data_dir(data_dir or Path("data") / dataset)
    if (data_dir / "meta.json").is_file() and not overwrite:
        old = json.loads((data_dir / "meta.json").read_text() or "{}")
        if (old.get("tokenizer"), old.get("dataset")) != (tokenizer, dataset):
            raise ValueError(f"data_dir {data_dir} holds {old.get('dataset')!r} prepared with tokenizer "
                             f"{old.get('tokenizer')!r}; choose another --data_dir or pass --overwrite")
    ds = load_conversations(inputs, hf_dataset, hf_config, hf_split, hf_revision, column)
    source = " ".join(inputs) if inputs else hf_dataset
    if len(ds) < 2:
        raise ValueError(f"{source} has {len(ds)} conversation(s): too few to split into train and val")
    tok = chat_tokenizer(tokenizer, ds)
    vocab_size, dtype = len(tok), token_dtype(len(tok))
    rendered = ds.map(render_rows, batched=True, with_indices=True, remove_columns=["messages"], num_proc=num_proc,
                      fn_kwargs=dict(tokenizer=tok, row_len=row_len), desc="rendering conversations")
    status = np.asarray(rendered["status"])
    counts = dict(conversations=len(ds), truncated=int((status == TRUNCATED).sum()),
                  dropped=int((status == DROPPED).sum()))
    if counts["truncated"] or counts["dropped"]:
        print(f"{counts['truncated']} of {len(ds)} conversations are longer than --block_size {block_size} + 1 "
              f"tokens and were cut to it; {counts['dropped']} were dropped (no assistant token within it)")
    kept = rendered.filter(lambda s: [x != DROPPED for x in s], input_columns="status", batched=True)
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} conversation(s) fit --block_size {block_size}; use a larger one")
    parts = kept.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    request = dict(version=FORMAT_VERSION, chat=True, dataset=dataset, source=source, fingerprint=ds._fingerprint,
                   tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size, val_fraction=val_fraction,
                   seed=seed, shard_size=shard_size, pack=pack)

    with prep.work_dir(data_dir) as work:  # a full disk: one line naming the file; the partial folder removed
        progress = _progress(work, data_dir, request)
        pad = end_token_id(tok)
        for split, part in (("train", parts["train"]), ("val", parts["test"])):
            state = progress["splits"][split]
            if not state["done"]:
                writer = prep.ShardWriter(work, split, state, progress, dtype, shard_size, "nanogpt", dataset, mask=True)
                _write_rows(part, writer, row_len, pad, dtype, pack=pack and split == "train")
        splits = {s: dict(num_tokens=sum(sh["num_tokens"] for sh in st["shards"]), shards=st["shards"],
                          num_documents=st["documents"]) for s, st in progress["splits"].items()}
        meta = dict(format_version=1, dataset=dataset, source=source, tokenizer=tokenizer,
                    tokenizer_class=type(tok).__name__, vocab_size=vocab_size, eot_token_id=None, dtype=dtype,
                    split_by="conversations", val_fraction=val_fraction, seed=seed, shard_size=shard_size,
                    loss_mask=True, row_len=row_len, packed=pack, chat=counts, splits=splits)
        prep.commit(work, data_dir, tok, meta)
    print(f"prepared {len(kept)} conversations of {dataset} in {data_dir}: tokenizer {tokenizer} + chat tokens, "
          f"vocab_size {vocab_size}, rows of {row_len} tokens, {time.time() - t0:.1f} s")
    for s, info in splits.items():
        masked = sum(int(np.fromfile(data_dir / sh["mask_file"], np.uint8).sum()) for sh in info["shards"])
        print(f"  {s:5s} {info['num_documents']:>8,} conversations in {info['num_tokens'] // row_len:>8,} rows "
              f"{info['num_tokens']:>12,} tokens, {masked:,} of them trained on")
    return meta


def _progress(work, data_dir, request):
    """progress.json of an interrupted prepare of the same request, or a fresh one (other leftovers removed)."""
    try:
        progress = json.loads((work / prep.PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        progress = None
    if progress is not None and progress.get("request") == request:
        print(f"resuming the prepare in {work}")
    else:
        for p in work.iterdir():
            if p.name != prep.LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        progress = dict(request=request, splits={s: dict(shards=[], next_item=0, skip_tokens=0, documents=0,
                                                          done=False) for s in ("train", "val")})
        prep._save_json(work / prep.PROGRESS_FILE, progress)
    for p in work.glob("*.part"):
        p.unlink()
    return progress


def _write_rows(part, writer, row_len, pad, dtype, pack=False, batch_size=1000):
    """The split's rendered rows -> writer, from its recorded resume point (shards hold whole rows, so a resume
    starts at a row). Each conversation is padded to row_len; pack=True puts consecutive conversations into one
    row while they fit (then the padding), batches aligned to batch_size so a resumed run packs as an
    uninterrupted one did."""
    i = writer.state["next_item"]
    while i < len(part):
        end = min(len(part), (i // batch_size + 1) * batch_size)
        rows = part[i:end]
        ids, masks = rows["input_ids"], rows["loss_mask"]
        where = row_of([len(t) for t in ids], row_len, pack)  # (n,) the row of each conversation
        n_rows = where[-1] + 1
        flat = np.full((n_rows, row_len), pad, dtype=dtype)  # (n_rows, row_len)
        mask = np.zeros((n_rows, row_len), dtype=np.uint8)
        spans, used = np.zeros(len(ids), np.int64), np.zeros(n_rows, np.int64)
        for k, (r, t, m) in enumerate(zip(where, ids, masks)):
            flat[r, used[r]:used[r] + len(t)], mask[r, used[r]:used[r] + len(m)] = t, m
            used[r] += len(t)
            spans[k] = len(t)
        last = np.r_[where[1:] != where[:-1], True]  # the last conversation of its row owns the row's padding
        spans[last] += row_len - used
        writer.write(flat.reshape(-1), spans, np.ones(len(ids), bool), i, 0, mask.reshape(-1))
        i = end
    writer.close(len(part))


def row_of(lengths, row_len, pack):
    """(n,) the row of each conversation (of lengths <= row_len tokens): one each, or next-fit packed in order (a
    row takes the next conversation while it fits: where the rows go depends only on where the first one starts)."""
    if not pack:
        return np.arange(len(lengths))
    out, row, used = np.empty(len(lengths), np.int64), 0, 0
    for k, n in enumerate(lengths):
        if used and used + n > row_len:
            row, used = row + 1, 0
        out[k], used = row, used + n
    return out
