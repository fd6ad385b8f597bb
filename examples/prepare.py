"""
Turn text into the token shards training reads: data_dir/{train,val}_000.bin + meta.json + tokenizer/.

    python examples/prepare.py --dataset shakespeare_char            # char level, downloads tiny-shakespeare
    python examples/prepare.py --dataset shakespeare                 # same text, GPT-2 BPE (tiktoken)
    python examples/prepare.py --dataset python_char                 # offline: the Python stdlib's source
    python examples/prepare.py --dataset openwebtext                 # GPT-2 BPE over OpenWebText from the Hub
    python examples/prepare.py --dataset fineweb_edu10B              # FineWeb-Edu sample-10BT, streamed (~10B tokens)
    python examples/prepare.py --dataset fineweb10B --format llmc    # FineWeb sample-10BT as llm.c shards
    python examples/prepare.py --dataset mytext --input a.txt b/*.txt --tokenizer char
    python examples/prepare.py --dataset wiki --hf_dataset ID --hf_config C --text_column text --tokenizer gpt2
    python examples/prepare.py --dataset mytext --input a.txt --tokenizer bpe --vocab_size 8192   # train a BPE
    python examples/prepare.py --dataset more --input b.txt --tokenizer_from data/mytext          # and reuse it

    python examples/prepare.py --chat --dataset mychat --input chats.jsonl --tokenizer out-base --block_size 128
        # conversations ({"messages": [{"role", "content"}, ...]} per line, or --hf_dataset ID/folder) for SFT:
        # chat template + loss mask on the assistant's tokens (docs/sft.md)

No network? Pass the file yourself: --input path/to/input.txt (e.g. for shakespeare_char).
Killed or interrupted? Run the same command again: it continues after the last complete shard.
Memory stays bounded (a few hundred MB over the Python process) whatever the size of the input.
Tokenization is a datasets .map on --num_proc processes, cached: the same command again reads the tokens back.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.cli import error_boundary
from nanogpt_hf.prepare import DEFAULT_SEED, DEFAULT_SHARD_SIZE, prepare_dataset
from nanogpt_hf.sources import BUILTIN, DEFAULT_MAX_BYTES, DEFAULT_VAL_TOKENS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help=f"a built-in ({', '.join(BUILTIN)}) or any name for --input / --hf_dataset text")
    p.add_argument("--input", nargs="+", help="text files, globs or http(s) URLs (one file: split by characters; "
                                              "several: each file is a document, split by documents)")
    p.add_argument("--data_dir", help="output folder (default: data/<dataset>)")
    p.add_argument("--tokenizer", help="char | gpt2 | bpe (train one, --vocab_size) | a Hugging Face tokenizer id or "
                                       "folder (default: the dataset's, gpt2 for your own text)")
    p.add_argument("--vocab_size", type=int, help="--tokenizer bpe: train a byte-level BPE of this many tokens on the "
                                                  "train split (256 bytes + <|endoftext|> + merges)")
    p.add_argument("--tokenizer_from", help="reuse the BPE of an earlier --tokenizer bpe run (its data_dir or "
                                            "tokenizer folder)")
    p.add_argument("--hf_dataset", help="a Hub dataset id or local dataset folder (split by documents)")
    p.add_argument("--hf_config", help="its configuration name")
    p.add_argument("--hf_split", default="train", help="which split of it to read (default: train)")
    p.add_argument("--hf_revision", help="its revision (branch, tag or commit)")
    p.add_argument("--text_column", default="text", help="the column holding the text (default: text)")
    p.add_argument("--streaming", action="store_true", help="stream --hf_dataset instead of downloading it first "
                                                            "(the fineweb recipes always stream)")
    p.add_argument("--val_tokens", type=int, help="streamed datasets: the first documents, up to this many tokens, "
                                                  f"are val (default {DEFAULT_VAL_TOKENS:,}, llm.c's first shard)")
    p.add_argument("--format", default="nanogpt", choices=("nanogpt", "llmc"),
                   help="shard files: nanogpt (train_000.bin: raw tokens, EOT after each document) or llmc "
                        "(NAME_train_000000.bin: llm.c's 1 KB header, EOT before each document)")
    p.add_argument("--num_proc", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--val_fraction", type=float, help="share of the text for validation (default: the dataset's, "
                                                      "0.1; openwebtext 0.0005)")
    p.add_argument("--shard_size", type=int, help=f"max tokens per .bin file (default {DEFAULT_SHARD_SIZE:,})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the document train/val split")
    p.add_argument("--max_bytes", type=int, default=DEFAULT_MAX_BYTES, help="python_char: bytes of source to read")
    p.add_argument("--chat", action="store_true", help="conversations (a 'messages' column of {role, content}) for "
                                                       "SFT: chat tokens + template, a loss mask on the answers")
    p.add_argument("--block_size", type=int, help="--chat: the training block_size; each conversation is one row "
                                                  "of block_size + 1 tokens (default 256)")
    p.add_argument("--pack", action="store_true", help="--chat: several whole conversations per train row while "
                                                       "they fit (less padding); val keeps one per row")
    p.add_argument("--overwrite", action="store_true", help="replace a data_dir prepared with another tokenizer")
    return p.parse_args(argv)


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    args = parse_args(argv)
    if args.chat:
        from nanogpt_hf.chat_data import DEFAULT_BLOCK_SIZE, prepare_chat

        prepare_chat(args.dataset, data_dir=args.data_dir, inputs=args.input, tokenizer=args.tokenizer or "gpt2",
                     hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                     hf_revision=args.hf_revision,
                     column=args.text_column if args.text_column != "text" else "messages",
                     block_size=args.block_size or DEFAULT_BLOCK_SIZE, val_fraction=args.val_fraction or 0.1,
                     seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite, num_proc=args.num_proc,
                     pack=args.pack)
        return
    prepare_dataset(args.dataset, data_dir=args.data_dir, inputs=args.input, tokenizer=args.tokenizer,
                    hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                    hf_revision=args.hf_revision, text_column=args.text_column, val_fraction=args.val_fraction,
                    shard_size=args.shard_size, num_proc=args.num_proc, seed=args.seed,
                    max_bytes=args.max_bytes, overwrite=args.overwrite, streaming=args.streaming or None,
                    val_tokens=args.val_tokens, format=args.format, vocab_size=args.vocab_size,
                    tokenizer_from=args.tokenizer_from)


if __name__ == "__main__":
    main()
