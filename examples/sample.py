"""
Sample from a trained model: nanoGPT's sample.py, through transformers' generate() with the KV cache.

    python examples/sample.py --model out-shakespeare-char
    python examples/sample.py --model gpt2 --start "What is the answer to life?" --num_samples 3 --max_new_tokens 100
    python examples/sample.py --model out-shakespeare-char --start FILE:prompt.txt --stream --seed 7

--model: a train.py out_dir (any save_pretrained folder with its tokenizer), a Hub id, or gpt2 | gpt2-medium |
gpt2-large | gpt2-xl (OpenAI's weights, needs the network once). The same folder works without this script:
    pipeline("text-generation", model="out-shakespeare-char")("ROMEO:", max_new_tokens=100)

Longer than the context: a model with learned positions cannot see more than block_size tokens, so the context
is cropped (nanogpt_hf.evaluation.generate_cropped: chunks of block_size/2 new tokens with the KV cache, each
token seeing at least block_size/2 tokens). ALiBi/RoPE models generate straight through.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
from transformers import TextStreamer, set_seed

from nanogpt_hf.cli import error_boundary
from nanogpt_hf.evaluation import autocast, autocast_dtype, check_device, context_limit, default_device, \
    describe_chars, generate_cropped, static_decoding, unknown_chars
from nanogpt_hf.loading import load_model


MAX_NEW_TOKENS = 1_000_000  # per sample: a bound, so a typo'd 1000000000 is an error and not a day of generating


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="out_dir, Hub id, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    p.add_argument("--start", default="\n", help='the prompt, or FILE:path to read it from a file (default "\\n")')
    p.add_argument("--num_samples", type=int, default=10, help="number of samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="1.0 = as trained, < 1 less random, 0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens only (0: all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 | mps (default: the best available)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast; auto: bf16 on "
                                                   "CUDA where supported, else float32)")
    p.add_argument("--decode", default="auto", choices=("auto", "dynamic", "static", "compiled"),
                   help="KV cache: dynamic (grows), static (fixed block_size slots, reused by every sample), compiled "
                        "(static + the decoding step through torch.compile; CUDA graphs on GPU). auto: compiled on "
                        "CUDA, dynamic elsewhere (on CPU the compile costs ~40 s and the step gains ~1.2x)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow a Hub model's own modeling code (not needed for nanogpt_hf models)")
    return p.parse_args(argv)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"--start FILE:{path}: {what}")
        return path.read_text(encoding="utf-8")
    return start


def encode_prompt(tokenizer, text, device):
    bad = unknown_chars(tokenizer, text)
    if bad:
        raise ValueError(f"prompt contains characters not in this model's vocabulary: {describe_chars(bad)}; "
                         "change --start")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:  # generate needs something to continue from
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("--start is empty and the tokenizer has no BOS/EOS token to start from; give a prompt")
        ids = [start]
    return torch.tensor([ids], device=device)  # (1, T)


class PlainStreamer(TextStreamer):
    """TextStreamer that does not end each generate() call with a newline (we may call it once per chunk)."""

    def on_finalized_text(self, text, stream_end=False):
        print(text, end="", flush=True)


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise ValueError("--num_samples and --max_new_tokens must be >= 1")
    if args.temperature < 0 or not 0 < (args.top_p or 1) <= 1:
        raise ValueError("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0: all tokens), got {args.top_k}")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: at most {MAX_NEW_TOKENS:,} (a sample that "
                         "long takes hours on a GPU); generate in several runs")
    if not math.isfinite(args.temperature) or (args.top_p is not None and not math.isfinite(args.top_p)):
        raise ValueError("--temperature and --top_p must be finite numbers")
    device = str(check_device(args.device)) if args.device else default_device()
    dtype = autocast_dtype(device, args.dtype)
    prompt = read_prompt(args.start)
    model, tokenizer = load_model(args.model, device, trust_remote_code=args.trust_remote_code)
    idx = encode_prompt(tokenizer, prompt, device)

    limit = context_limit(model)
    if limit is not None and idx.size(1) + args.max_new_tokens > limit:
        print(f"note: prompt ({idx.size(1)} tokens) + --max_new_tokens {args.max_new_tokens} exceeds the model's "
              f"context of {limit} tokens (learned positions): generating in chunks, the context cropped to its "
              f"last {limit // 2} tokens each time", file=sys.stderr)
    gen_kwargs = dict(do_sample=args.temperature > 0)
    if args.temperature > 0:
        gen_kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if tokenizer.eos_token_id is not None:  # stop at EOS like any HF model; pad with it (silences a warning)
        gen_kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    streamer = PlainStreamer(tokenizer, skip_prompt=True) if args.stream else None
    decode = args.decode if args.decode != "auto" else "compiled" if torch.device(device).type == "cuda" else "dynamic"
    if decode != "dynamic" and getattr(model, "_can_compile_fullgraph", False):  # nanogpt_hf and HF's static models
        gen_kwargs.update(static_decoding(model, limit or idx.size(1) + args.max_new_tokens,
                                          compile=decode == "compiled"))

    set_seed(args.seed)
    with torch.no_grad(), autocast(device, dtype):
        for _ in range(args.num_samples):
            if streamer is not None:
                print(tokenizer.decode(idx[0]), end="", flush=True)
                generate_cropped(model, idx, args.max_new_tokens, limit, streamer=streamer, **gen_kwargs)
                print()
            else:
                y = generate_cropped(model, idx, args.max_new_tokens, limit, **gen_kwargs)
                print(tokenizer.decode(y[0]))
            print("---------------")


if __name__ == "__main__":
    main()
