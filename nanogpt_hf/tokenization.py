"""
Tokenizers for nanogpt_hf, all saved in Hugging Face format so every trained model ships one.

- `build_char_tokenizer(chars)`: nanoGPT's character-level "stoi/itos" as a real `tokenizers`-backed
  PreTrainedTokenizerFast. ids are the sorted distinct characters, 0..n-1, exactly like nanoGPT's
  shakespeare_char/prepare.py, so the vocab of tiny-shakespeare is 65. decode(encode(text)) == text for any
  text made of vocabulary characters (spaces and newlines included; no cleanup, no inserted spaces).
  Unknown characters: the vocab has no spare id (that would make it 66), so a character that is not in the
  vocabulary is encoded as the replacement character `unk_char` (a space when the vocab has one, recorded in
  meta.json). prepare never meets one: it builds the vocab from all of the text it encodes.
  One special token follows the characters: `<|endoftext|>` (id n, the last one, like GPT-2's EOT), declared as the
  tokenizer's bos/eos/pad token. Tools that need one (lm-evaluation-harness: a prefix for an empty context, a
  stop string, a pad id) then work, and no character is sacrificed: declaring "\n" instead would make
  decode(skip_special_tokens=True), which pipeline() uses, drop every newline. prepare does not insert it into
  the shards (their ids are nanoGPT's); it only makes vocab_size n + 1. Data dirs prepared before it existed
  (vocab n, no special token) keep working as they are (lm-eval then needs prefix_token_id=...).
- `gpt2_tokenizer()`: GPT-2 BPE as a GPT2TokenizerFast built from the very files tiktoken uses (its cache, or
  a download), so it agrees with tiktoken's "gpt2" encoding id for id. prepare encodes with tiktoken (fast,
  nanoGPT's) and saves this one next to the shards.
- `train_bpe(texts, vocab_size)`: a byte-level BPE like GPT-2's (its pre-tokenization, 256 byte symbols), merges
  learned from texts with the `tokenizers` library, `<|endoftext|>` its one special token (bos/eos/pad).
  Deterministic: the same texts give the same tokenizer.json. examples/prepare.py --tokenizer bpe --vocab_size N.
- `load_pretrained_tokenizer(name)`: AutoTokenizer with a one-line error. (The tokenizer of a data_dir:
  nanogpt_hf.data.load_tokenizer.)
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

GPT2_EOT = 50256
CHAR_EOT = "<|endoftext|>"  # a character tokenizer's one special token (bos = eos = pad), id len(chars)
GPT2_FILES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# sha256 of encoder.json / vocab.bpe, as tiktoken_ext.openai_public checks them
GPT2_FILE_HASHES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# -----------------------------------------------------------------------------
# character level


def default_unk_char(chars):
    """The replacement for out-of-vocabulary characters: a space if the vocab has one, else its first char."""
    chars = sorted(chars)
    return " " if " " in chars else chars[0]


def build_char_tokenizer(chars, unk_char=None, eot=CHAR_EOT):
    """chars: any iterable of characters (a string works: its distinct characters are used). eot: the special
    token after them (bos/eos/pad, id len(chars)), or None for none (vocab = the characters, as before)."""
    chars = sorted(set(chars))
    if not chars:
        raise ValueError("cannot build a character tokenizer from empty text")
    unk_char = unk_char if unk_char is not None else default_unk_char(chars)
    if unk_char not in chars:
        raise ValueError(f"unk_char {unk_char!r} is not in the vocabulary")
    stoi = {ch: i for i, ch in enumerate(chars)}
    # BPE with no merges = one token per character, and without a pre-tokenizer it sees the text as is
    # (whitespace included). It is ~4x faster than WordLevel over a per-character split. The Fuse decoder
    # joins tokens with "" (the default would insert spaces between them).
    backend = Tokenizer(models.BPE(stoi, [], unk_token=unk_char))
    backend.decoder = decoders.Fuse()
    # clean_up_tokenization_spaces would turn "a ." into "a." on decode; a char model must round-trip exactly.
    # unk_char is deliberately not declared as the HF unk_token: decode(skip_special_tokens=True), which
    # pipeline() uses, would then drop every space.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    if eot is not None:
        tokenizer.add_special_tokens({"bos_token": eot, "eos_token": eot, "pad_token": eot})  # id len(chars)
    return tokenizer


def char_vocab(tokenizer):
    """The {char: id} table of a character tokenizer (what nanoGPT called stoi), special tokens left out."""
    special = set(tokenizer.all_special_tokens)
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in special}
    if any(len(t) != 1 for t in vocab):
        raise ValueError("not a character-level tokenizer (it has multi-character tokens)")
    return vocab


# -----------------------------------------------------------------------------
# GPT-2 BPE


def _gpt2_file(name):
    # tiktoken's own cache ($TIKTOKEN_CACHE_DIR, keyed by the sha1 of the URL), downloading if it is not there
    import tiktoken.load

    return tiktoken.load.read_file_cached(GPT2_FILES_URL + name, GPT2_FILE_HASHES[name])


def gpt2_tokenizer():
    """GPT-2's BPE as a GPT2TokenizerFast, identical to tiktoken.get_encoding("gpt2") (eot 50256)."""
    try:
        encoder = json.loads(_gpt2_file("encoder.json"))
        bpe = _gpt2_file("vocab.bpe").decode("utf-8")
    except Exception as e:  # offline without a tiktoken cache: try the Hugging Face cache instead
        try:
            return AutoTokenizer.from_pretrained("gpt2")
        except Exception:
            raise ValueError(
                f"cannot load the GPT-2 BPE files ({type(e).__name__}); when offline, set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached encoder.json/vocab.bpe"
            ) from None
    merges = [tuple(line.split()) for line in bpe.split("\n")[1:] if line]  # line 0 is '#version: 0.2'
    # transformers 5: vocab=/merges= (the old vocab_file=/merges_file= build an empty tokenizer)
    return GPT2TokenizerFast(vocab=encoder, merges=merges, model_max_length=1024)


def tiktoken_gpt2():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ValueError(
            f"tiktoken cannot load 'gpt2' ({type(e).__name__}); when offline, set TIKTOKEN_CACHE_DIR "
            "to a folder holding its cached encoder.json/vocab.bpe"
        ) from None


# -----------------------------------------------------------------------------
# byte-level BPE, trained


MAX_VOCAB = 1 << 20  # --vocab_size: the BPE trainer allocates ~70 bytes per token up front (1e9 aborted the process)


def train_bpe(texts, vocab_size, eot=CHAR_EOT):
    """A byte-level BPE with exactly vocab_size tokens (eot, the 256 byte symbols, then the merges learned from
    texts, an iterable of str read once as a stream). The trainer keeps a count per distinct pre-token (word),
    so its memory grows with the vocabulary of the text, not with its length."""
    if vocab_size < 257:
        raise ValueError(f"--vocab_size must be at least 257 (256 bytes + {eot}), got {vocab_size}")
    if vocab_size > MAX_VOCAB:  # (prepare checks it too, before reading any text)
        raise ValueError(f"--vocab_size {vocab_size}: at most {MAX_VOCAB:,}")
    backend = Tokenizer(models.BPE())
    # GPT-2's pre-tokenization: its regex (words, numbers, punctuation, whitespace runs), then bytes as symbols
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eot], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(f"the training text gives only {backend.get_vocab_size()} tokens (too little text for "
                         f"--vocab_size {vocab_size}); use a smaller --vocab_size or more text")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"bos_token": eot, "eos_token": eot, "pad_token": eot})
    return tokenizer


def is_byte_level_bpe(tokenizer):
    """A tokenizer train_bpe made (or GPT-2's): BPE on bytes after GPT-2's pre-tokenization regex."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    pre = spec.get("pre_tokenizer") or {}
    return spec.get("model", {}).get("type") == "BPE" and pre.get("type") == "ByteLevel" and \
        pre.get("use_regex", True) and not pre.get("add_prefix_space")


def compression(tokenizer, texts):
    """Bytes per token of tokenizer, and of GPT-2's BPE (None without its files), on texts (a list of str)."""
    size = sum(len(t.encode("utf-8")) for t in texts)
    ours = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    try:
        gpt2 = sum(map(len, tiktoken_gpt2().encode_ordinary_batch(texts)))
    except ValueError:  # no GPT-2 files (offline, without a tiktoken cache)
        gpt2 = None
    return dict(bytes=size, bytes_per_token=round(size / max(ours, 1), 4),
                gpt2_bytes_per_token=round(size / gpt2, 4) if gpt2 else None)


# -----------------------------------------------------------------------------
# loading


def load_pretrained_tokenizer(name_or_path):
    """AutoTokenizer.from_pretrained with a one-line error (used for --tokenizer <id or path>)."""
    name = str(name_or_path)
    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"tokenizer folder {name} not found (--tokenizer)")
    hub = {}
    if not os.path.isdir(os.path.expanduser(name)):
        from .hub import check_hub_name

        hub = check_hub_name(name, "--tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name, **hub)
    except Exception as e:
        where = "folder" if os.path.isdir(name_or_path) else "local folder or reachable Hub id"
        raise ValueError(
            f"tokenizer {name!r} not found or not loadable as a {where} "
            f"({type(e).__name__}); use --tokenizer char, gpt2, a tokenizer folder or a Hub id"
        ) from None

