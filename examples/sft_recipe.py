"""
SFT on CPU in minutes, end to end: a synthetic conversation set whose answers are computable, a tiny base model
pretrained on plain text of the same alphabet, SFT on the conversations (loss on the answers only), and the exact
match of greedy answers on held-out conversations, before and after SFT.

    python examples/sft_recipe.py --work_dir sft-demo              # ~minutes on a laptop CPU; numbers in docs/sft.md
    python examples/sft_recipe.py --work_dir sft-demo --quick      # the small version the test suite runs

The tasks: "reverse: abcd" -> "dcba", "copy: abcd" -> "abcd", "first: abcd" -> "a", "last: abcd" -> "d" (answer in a
fixed format: the letters only, then <|end|>). Held-out conversations are ones whose word never occurs in the training set.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

LETTERS = "abcdefghij"
TASKS = {"reverse": lambda w: w[::-1], "copy": lambda w: w, "first": lambda w: w[0], "last": lambda w: w[-1]}


SYSTEM = "be brief"  # short enough that every conversation fits a row of 33 tokens: none is dropped


def conversation(task, word, system=False):
    messages = [{"role": "user", "content": f"{task}: {word}"}, {"role": "assistant", "content": TASKS[task](word)}]
    return ([{"role": "system", "content": SYSTEM}] if system else []) + messages


def make_sets(n_train, n_test, seed=0, min_len=3, max_len=4):
    """(train conversations, held-out conversations): the held-out words never appear in training."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n_train + n_test:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))))
    words = sorted(words)
    rng.shuffle(words)
    tasks = sorted(TASKS)
    train = [conversation(rng.choice(tasks), w, rng.random() < 0.2) for w in words[:n_train]]
    test = [conversation(rng.choice(tasks), w) for w in words[n_train:]]
    return train, test


def base_text(n_lines, seed=1):
    """Plain text of the same alphabet and words (no conversations, no answers): what the base model knows."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(2, 6))]
        lines.append(rng.choice(sorted(TASKS)) + ": " + " ".join(words))
    return "\n".join(lines) + "\n"


def exact_match(model_dir, conversations):
    """Share of conversations whose greedy answer (up to <|end|>) equals the assistant's, from the saved model and
    tokenizer through the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    end = tok.convert_tokens_to_ids("<|end|>")
    hits = 0
    with torch.no_grad():
        for conv in conversations:
            ids = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=False)
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=end,
                                 pad_token_id=end)
            answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
            hits += answer == conv[-1]["content"]
    return hits / len(conversations)


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="sft-demo")
    p.add_argument("--quick", action="store_true", help="fewer iterations (the test suite's version)")
    p.add_argument("--base_iters", type=int)
    p.add_argument("--sft_iters", type=int)
    p.add_argument("--n_test", type=int, default=200)
    args = p.parse_args(argv)
    t0, work, ex = time.time(), Path(args.work_dir), Path(__file__).resolve().parent
    work.mkdir(parents=True, exist_ok=True)
    base_iters = args.base_iters or (150 if args.quick else 300)
    sft_iters = args.sft_iters or (300 if args.quick else 1000)
    model = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--batch_size=64", "--dropout=0",
             "--gradient_accumulation_steps=1", "--cpu=true", "--mixed_precision=no", "--eval_iters=5", "--log_interval=50", "--warmup_iters=20"]

    # 1) the data: plain text for the base, conversations for SFT (held-out words never trained on)
    train, test = make_sets(2500, args.n_test)
    (work / "base.txt").write_text(base_text(4000))
    with open(work / "chat.jsonl", "w") as f:
        for conv in train:
            f.write(json.dumps({"messages": conv}) + "\n")

    # 2) a base model (reused if there): char level on the plain text
    if not (work / "base" / "model.safetensors").is_file():
        run([str(ex / "prepare.py"), "--dataset=base", f"--input={work / 'base.txt'}", "--tokenizer=char",
             f"--data_dir={work / 'data_base'}", "--overwrite"])
        run([str(ex / "train.py"), f"--data_dir={work / 'data_base'}", f"--out_dir={work / 'base'}", *model,
             f"--max_iters={base_iters}", f"--lr_decay_iters={base_iters}", f"--eval_interval={base_iters}",
             "--learning_rate=3e-3", "--min_lr=3e-4"])

    # 3) SFT: the conversations with the base's tokenizer + chat tokens, init_from the base's out_dir
    run([str(ex / "prepare.py"), "--chat", "--dataset=chat", f"--input={work / 'chat.jsonl'}",
         f"--tokenizer={work / 'base'}", "--block_size=32", f"--data_dir={work / 'data_chat'}", "--overwrite"])
    run([str(ex / "train.py"), f"--data_dir={work / 'data_chat'}", f"--out_dir={work / 'sft'}",
         f"--init_from={work / 'base'}", *model, f"--max_iters={sft_iters}", f"--lr_decay_iters={sft_iters}",
         f"--eval_interval={sft_iters // 2}", "--learning_rate=3e-3", "--min_lr=3e-4"])

    # 4) held-out exact match: the base model (its embeddings grown by the chat tokens) vs the SFT model
    from nanogpt_hf.chat import resize_embeddings
    from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "data_chat" / "tokenizer")
    base = NanoGPTForCausalLM.from_pretrained(work / "base")
    resize_embeddings(base, len(tok))
    base.save_pretrained(work / "base_chat")
    tok.save_pretrained(work / "base_chat")
    before, after = exact_match(work / "base_chat", test), exact_match(work / "sft", test)
    chat = json.loads((work / "data_chat" / "meta.json").read_text())["chat"]  # {conversations, truncated, dropped}
    result = dict(exact_match_before=before, exact_match_after=after, n_test=len(test), base_iters=base_iters,
                  sft_iters=sft_iters, conversations=chat, wall_time_s=round(time.time() - t0, 1))
    (work / "sft_recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out exact match: base {before:.1%}, after SFT {after:.1%} ({len(test)} conversations); "
          f"{result['wall_time_s']} s in all")
    return result


if __name__ == "__main__":
    main()
