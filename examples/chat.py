"""
Chat with a trained out_dir in the terminal (an SFT model: its tokenizer has the chat template, docs/sft.md).

    python examples/chat.py --model out-sft                 # type a message, Enter; /reset forgets the history
    python examples/chat.py --model out-sft --temperature 0 # greedy answers

The answer streams as it is generated (transformers' TextStreamer). The history is kept within the model's
block_size: the oldest turns are dropped when the conversation no longer fits. Ctrl-C stops the answer being
generated, not the program; Ctrl-D (end of input) or /quit ends it.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.cli import error_boundary  # noqa: E402  (imports nothing heavy)


def fit(tokenizer, history, budget):
    """The chat prompt (ids) of history, its oldest turns dropped until it fits in budget tokens, and the history
    kept (the last user message always stays; None if even it alone does not fit)."""
    while history:
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_dict=False)
        if len(ids) <= budget:
            return ids, history
        if len(history) == 1:
            return None, history
        history = history[2:] if history[0]["role"] != "system" else history[:1] + history[3:]
    return None, history


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an out_dir (or any folder/Hub id with a chat template)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--system", help="a system message at the start of the conversation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    if not math.isfinite(args.temperature) or args.temperature < 0:  # nan > 0 is False: it would go greedy, silently
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 1 or args.top_k < 0:
        raise ValueError(f"--max_new_tokens must be >= 1 and --top_k >= 0, got {args.max_new_tokens}, {args.top_k}")

    import signal

    import torch
    from transformers import TextStreamer

    from nanogpt_hf.chat import turn_token_in
    from nanogpt_hf.loading import load_model

    model, tok = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    if args.system and turn_token_in(args.system):
        raise ValueError(f"--system holds the chat token {turn_token_in(args.system)}, which would end the system turn")
    if not tok.chat_template:
        raise ValueError(f"--model {args.model}: its tokenizer has no chat template; train it on conversations "
                         "(examples/prepare.py --chat, docs/sft.md)")
    end = tok.convert_tokens_to_ids("<|end|>") if "<|end|>" in tok.get_vocab() else tok.eos_token_id
    context = getattr(model.config, "block_size", None) or getattr(model.config, "n_positions", 1024)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    sample = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k) if args.temperature > 0 \
        else dict(do_sample=False)
    # Ctrl-C must raise KeyboardInterrupt (stop the answer): Python installs that handler only where SIGINT was not
    # ignored at start, and a parent may ignore it (a shell's `&` job, CI runners); install it ourselves
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("chat with", args.model, "(/reset clears the history, /quit or Ctrl-D ends)", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt line
            print()
            continue
        line = line.strip()
        if line == "/quit":
            break
        if line == "/reset":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        if turn_token_in(line):  # the tokenizer would read it as a turn boundary: the model would see a fake turn
            print(f"(the message holds the chat token {turn_token_in(line)} and was not sent)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        budget = context - min(args.max_new_tokens, context // 2)  # leave room for the answer
        ids, history = fit(tok, history, budget)
        if ids is None:
            print(f"(the message is too long for the model's {context} tokens)", flush=True)
            history = history[:-1]
            continue
        new = []
        try:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids], device=model.device), streamer=streamer,
                                     max_new_tokens=min(args.max_new_tokens, context - len(ids)),
                                     eos_token_id=end, pad_token_id=end, **sample)
            new = out[0, len(ids):].tolist()
        except KeyboardInterrupt:  # Ctrl-C while generating: the answer stops, the chat goes on
            print("\n(stopped)", flush=True)
            history.pop()  # the unanswered question goes too
            continue
        answer = tok.decode(new, skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer or " "})
        sys.stdout.flush()


if __name__ == "__main__":
    main()
