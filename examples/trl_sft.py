"""
The same SFT with TRL: trl.SFTTrainer trains NanoGPTForCausalLM on exactly the conversations of our chat data's train
split (examples/sft_recipe.py's) with its assistant-only loss (our chat template's {% generation %} block), from the
same base weights, with the same batch size, steps, learning-rate schedule and AdamW settings as our loop; then both
models' masked loss on the same held-out rows (evaluation.evaluate_loss over the chat data's val split), and their
ratio.

    python examples/sft_recipe.py --work_dir sft-demo             # first: the base, the chat data, our SFT
    python examples/trl_sft.py --work_dir sft-demo                 # then TRL and ours: 300 steps, 3 seeds each

"The same conversations" is checked, not assumed: TRL's training set is the JSONL rows whose chat-template rendering
is a row of our train shards, and there must be as many as the train split holds. (Splitting the JSONL again with
prepare's seed is not the same: prepare splits what is left after dropping conversations longer than a row, and a
different split puts most of our val conversations into TRL's training set.) Needs `pip install trl`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def shard_rows(data_dir, split):
    """{conversation's token ids up to its last target: count} of a chat data split (the padding cut off)."""
    import numpy as np

    from nanogpt_hf.data import TokenShards

    data, rows = TokenShards(data_dir, split), {}
    for ids, mask in zip(data.shards, data.masks):
        ids, mask = np.asarray(ids).reshape(-1, data.row_len), np.asarray(mask).reshape(-1, data.row_len)
        for r, m in zip(ids, mask):
            key = tuple(r[:np.flatnonzero(m).max() + 1].tolist())  # up to the last assistant <|end|>
            rows[key] = rows.get(key, 0) + 1
    return rows


def same_conversations(ds, tok, data_dir):
    """The rows of ds (a `messages` dataset) that make up data_dir's train split, each once; an error if they don't
    cover it."""
    import numpy as np

    row_len = json.loads((Path(data_dir) / "meta.json").read_text())["row_len"]
    want = shard_rows(data_dir, "train")
    keep = []
    for i, messages in enumerate(ds["messages"]):
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"][:row_len], out["assistant_masks"][:row_len]
        if not any(mask):
            continue  # cut before its answer: prepare dropped it
        key = tuple(ids[:int(np.flatnonzero(mask).max()) + 1])
        if want.get(key, 0) > 0:
            want[key] -= 1
            keep.append(i)
    if sum(want.values()):
        raise SystemExit(f"error: {sum(want.values())} train rows of {data_dir} are not in the JSONL")
    return ds.select(keep)


def train_ours(work, run, args, block_size, warmup):
    """Our loop (examples/train.py) from the base out_dir; reused if already there."""
    ours = work / f"sft_{run}"
    if not (ours / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "train.py"),
                        f"--data_dir={work / 'data_chat'}", f"--out_dir={ours}", f"--init_from={work / 'base'}",
                        "--n_layer=2", "--n_head=4", "--n_embd=64", f"--block_size={block_size}",
                        f"--batch_size={args.batch_size}", "--dropout=0", "--gradient_accumulation_steps=1",
                        "--cpu=true", "--mixed_precision=no", "--eval_iters=5", "--log_interval=100",
                        f"--warmup_iters={warmup}", f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}",
                        f"--eval_interval={args.steps}", f"--seed={run.rsplit('seed', 1)[1]}",
                        f"--learning_rate={args.learning_rate}", f"--min_lr={args.learning_rate / 10}",
                        "--grad_clip=1.0", "--weight_decay=0.1", "--beta2=0.95"], check=True)
    return ours


def train_trl(work, run, args, seed, block_size, warmup, tok, ds):
    """trl.SFTTrainer from the same base weights (grown by the chat tokens: base_chat from sft_recipe.py), on the
    same conversations: AdamW (weight decay on the same tensors: not the LayerNorms and biases), warmup then cosine
    down to min_lr, gradient clipping at 1; reused if already there."""
    from trl import SFTConfig, SFTTrainer

    from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM

    out = work / f"trl_{run}"
    if not (out / "model.safetensors").is_file():
        cfg = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=block_size + 1,
                        per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                        learning_rate=args.learning_rate, lr_scheduler_type="cosine_with_min_lr",
                        lr_scheduler_kwargs={"min_lr": args.learning_rate / 10}, warmup_steps=warmup,
                        weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=100, save_strategy="no",
                        report_to="none", use_cpu=True, seed=seed, dataloader_num_workers=0, packing=False)
        model = NanoGPTForCausalLM.from_pretrained(work / "base_chat")
        SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok).train()
        model.save_pretrained(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="sft-demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seeds", default="1337,1,2", help="one run each side per seed; the 5 %% criterion is on the "
                                                      "mean over the seeds (single runs differ by seed, docs/sft.md)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from nanogpt_hf.chat import add_chat_tokens
    from nanogpt_hf.data import TokenShards
    from nanogpt_hf.evaluation import evaluate_loss
    from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM

    data = work / "data_chat"
    block_size, warmup = json.loads((data / "meta.json").read_text())["row_len"] - 1, 20
    tok = add_chat_tokens(AutoTokenizer.from_pretrained(data / "tokenizer"))  # (today's template, if saved before)
    ds = same_conversations(load_dataset("json", data_files=str(work / "chat.jsonl"), split="train"), tok, data)
    val, runs = TokenShards(data, "val"), []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run, t0 = f"{args.steps}_lr{args.learning_rate:g}_seed{seed}", time.time()
        ours = train_ours(work, run, args, block_size, warmup)
        t1 = time.time()
        trl = train_trl(work, run, args, seed, block_size, warmup, tok, ds)
        # both on the same held-out rows: the masked (answer-token) loss, a token mean over the val split
        losses = {name: evaluate_loss(NanoGPTForCausalLM.from_pretrained(path).eval(), val, 64, block_size, full=True,
                                      progress=False)["loss"] for name, path in (("ours", ours), ("trl", trl))}
        runs.append(dict(seed=seed, val_loss_ours=round(losses["ours"], 5), val_loss_trl=round(losses["trl"], 5),
                         ratio=round(losses["trl"] / losses["ours"], 4), wall_s_ours=round(t1 - t0, 1),
                         wall_s_trl=round(time.time() - t1, 1)))
        print(json.dumps(runs[-1]), flush=True)
    mean_ours = sum(r["val_loss_ours"] for r in runs) / len(runs)
    mean_trl = sum(r["val_loss_trl"] for r in runs) / len(runs)
    result = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                  train_conversations=len(ds), val_conversations=val.num_windows(block_size),
                  mean_val_loss_ours=round(mean_ours, 5), mean_val_loss_trl=round(mean_trl, 5),
                  ratio_trl_to_ours=round(mean_trl / mean_ours, 4),
                  within_5_percent=abs(mean_trl / mean_ours - 1) <= 0.05,
                  runs=runs, torch_threads=torch.get_num_threads())
    (work / f"trl_sft_{args.steps}_lr{args.learning_rate:g}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
