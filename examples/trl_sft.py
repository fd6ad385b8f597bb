"""
The same SFT with TRL: trl.SFTTrainer trains NanoGPTForCausalLM on the conversations of examples/sft_recipe.py with
its assistant-only loss (our chat template's {% generation %} block), from the same base weights, with the same
batch size, steps, learning rate schedule and optimizer settings as our loop; then both models' masked loss on the
same held-out rows (evaluation.evaluate_loss over the chat data's val split).

    python examples/sft_recipe.py --work_dir sft-demo          # first: the base, the chat data, our SFT
    python examples/trl_sft.py --work_dir sft-demo --steps 300  # then TRL, and ours again for the same steps

Needs `pip install trl`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="sft-demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    args = p.parse_args(argv)
    work, ex = Path(args.work_dir), Path(__file__).resolve().parent
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from nanogpt_hf.chat import add_chat_tokens
    from nanogpt_hf.data import TokenShards
    from nanogpt_hf.prepare import DEFAULT_SEED
    from nanogpt_hf.evaluation import evaluate_loss
    from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
    from transformers import AutoTokenizer

    # ours: the loop, from the base, for the same number of steps
    ours = work / f"sft_{args.steps}"
    t0 = time.time()
    if not (ours / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(ex / "train.py"), f"--data_dir={work / 'data_chat'}", f"--out_dir={ours}",
                        f"--init_from={work / 'base'}", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32",
                        f"--batch_size={args.batch_size}", "--dropout=0", "--gradient_accumulation_steps=1", "--cpu=true",
                        "--mixed_precision=no", "--eval_iters=5", "--log_interval=50", "--warmup_iters=20",
                        f"--max_iters={args.steps}", f"--lr_decay_iters={args.steps}", f"--eval_interval={args.steps}",
                        f"--learning_rate={args.learning_rate}", f"--min_lr={args.learning_rate / 10}", "--grad_clip=1.0",
                        "--weight_decay=0.1", "--beta2=0.95"], check=True)
    t_ours = time.time() - t0

    # TRL: the same base weights (grown by the chat tokens: base_chat from sft_recipe.py), conversations, schedule
    tok = add_chat_tokens(AutoTokenizer.from_pretrained(work / "data_chat" / "tokenizer"))  # today's template
    model = NanoGPTForCausalLM.from_pretrained(work / "base_chat")
    ds = load_dataset("json", data_files=str(work / "chat.jsonl"), split="train")
    # the conversations of the chat data's train split: prepare_chat's seeded split (no conversation was dropped)
    ds = ds.train_test_split(test_size=0.1, seed=DEFAULT_SEED, shuffle=True)["train"]
    cfg = SFTConfig(output_dir=str(work / "trl"), assistant_only_loss=True, max_length=33,
                    per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.learning_rate, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr": args.learning_rate / 10}, warmup_steps=20, weight_decay=0.1,
                    adam_beta2=0.95, max_grad_norm=1.0, logging_steps=50, save_strategy="no", report_to="none",
                    use_cpu=True, seed=1337, dataloader_num_workers=0, packing=False)
    t0 = time.time()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    t_trl = time.time() - t0
    trainer.model.save_pretrained(work / "trl_model")

    # both on the same held-out rows: the masked (answer-token) loss over the val split of the chat data
    val = TokenShards(work / "data_chat", "val")
    losses = {}
    for name, path in (("ours", ours), ("trl", work / "trl_model")):
        m = NanoGPTForCausalLM.from_pretrained(path).eval()
        losses[name] = evaluate_loss(m, val, 64, 32, full=True, progress=False)["loss"]
    result = dict(steps=args.steps, batch_size=args.batch_size, val_loss_ours=losses["ours"],
                  val_loss_trl=losses["trl"], relative_diff=abs(losses["trl"] - losses["ours"]) / losses["ours"],
                  wall_s_ours=round(t_ours, 1), wall_s_trl=round(t_trl, 1), torch_threads=torch.get_num_threads())
    (work / "trl_sft.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
