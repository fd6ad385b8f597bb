"""
The same SFT with TRL: trl.SFTTrainer trains NanoGPTForCausalLM on exactly the conversations of our chat data's train
split (examples/sft_recipe.py's) with its assistant-only loss (our chat template's {% generation %} block), from the
same base weights, with the same batch size, steps, learning-rate schedule and AdamW settings as our loop; then both
models' masked loss on the same held-out rows (evaluation.evaluate_loss over the chat data's val split), and their ratio.

    python examples/sft_recipe.py --work_dir sft-demo             # first: the base, the chat data, our SFT
    python examples/trl_sft.py --work_dir sft-demo --steps 1000    # then TRL, and ours again for the same steps

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="sft-demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    work, ex = Path(args.work_dir), Path(__file__).resolve().parent
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from nanogpt_hf.chat import add_chat_tokens
    from nanogpt_hf.evaluation import evaluate_loss
    from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM

    data = work / "data_chat"
    block_size = json.loads((data / "meta.json").read_text())["row_len"] - 1
    warmup, min_lr = 20, args.learning_rate / 10
    # ours: the loop, from the base, for the same number of steps
    run = f"{args.steps}_lr{args.learning_rate:g}_seed{args.seed}"
    ours = work / f"sft_{run}"
    t0 = time.time()
    if not (ours / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(ex / "train.py"), f"--data_dir={data}", f"--out_dir={ours}",
                        f"--init_from={work / 'base'}", "--n_layer=2", "--n_head=4", "--n_embd=64",
                        f"--block_size={block_size}", f"--batch_size={args.batch_size}", "--dropout=0",
                        "--gradient_accumulation_steps=1", "--cpu=true", "--mixed_precision=no", "--eval_iters=5",
                        "--log_interval=100", f"--warmup_iters={warmup}", f"--max_iters={args.steps}",
                        f"--lr_decay_iters={args.steps}", f"--eval_interval={args.steps}", f"--seed={args.seed}",
                        f"--learning_rate={args.learning_rate}", f"--min_lr={min_lr}", "--grad_clip=1.0",
                        "--weight_decay=0.1", "--beta2=0.95"], check=True)
    t_ours = time.time() - t0

    # TRL: the same base weights (grown by the chat tokens: base_chat from sft_recipe.py), the same conversations,
    # AdamW (weight decay on the same tensors: not the LayerNorms and biases), warmup then cosine down to min_lr
    tok = add_chat_tokens(AutoTokenizer.from_pretrained(data / "tokenizer"))  # (today's template, if saved before)
    model = NanoGPTForCausalLM.from_pretrained(work / "base_chat")
    ds = same_conversations(load_dataset("json", data_files=str(work / "chat.jsonl"), split="train"), tok, data)
    cfg = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=block_size + 1,
                    per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.learning_rate, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr": min_lr}, warmup_steps=warmup, weight_decay=0.1,
                    adam_beta2=0.95, max_grad_norm=1.0, logging_steps=100, save_strategy="no", report_to="none",
                    use_cpu=True, seed=args.seed, dataloader_num_workers=0, packing=False)
    t0 = time.time()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    t_trl = time.time() - t0
    trainer.model.save_pretrained(work / f"trl_{run}")

    # both on the same held-out rows: the masked (answer-token) loss, a token mean over the chat data's val split
    from nanogpt_hf.data import TokenShards

    val, losses = TokenShards(data, "val"), {}
    for name, path in (("ours", ours), ("trl", work / f"trl_{run}")):
        m = NanoGPTForCausalLM.from_pretrained(path).eval()
        losses[name] = evaluate_loss(m, val, 64, block_size, full=True, progress=False)["loss"]
    ratio = losses["trl"] / losses["ours"]
    result = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, train_conversations=len(ds),
                  val_loss_ours=round(losses["ours"], 5), val_loss_trl=round(losses["trl"], 5),
                  ratio_trl_to_ours=round(ratio, 4), within_5_percent=abs(ratio - 1) <= 0.05,
                  wall_s_ours=round(t_ours, 1), wall_s_trl=round(t_trl, 1), torch_threads=torch.get_num_threads())
    (work / f"trl_sft_{run}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
