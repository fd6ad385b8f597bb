"""
How much does the training loop cost on top of the bare model step? Runs, interleaved in one process:

  bare   the same model and optimizer, batches fetched in advance, and nothing but
         forward + backward + clip + optimizer step + zero_grad, timed over the same number of iterations
  loop   nanogpt_hf.trainer.train() on the same config: data, Accelerate, the loss-finite check, logging,
         tqdm, ... (per-iteration times from its log lines; the mean from its results, which exclude only
         evaluation and saving)

and prints ms/iteration, tokens/s and the loop's overhead in %. Alternating the two (A B A B ...) keeps slow
drifts of a shared machine out of the comparison, and medians of per-iteration times ignore its spikes.

    python examples/train_overhead.py examples/configs/shakespeare_char_cpu.yaml
    python examples/train_overhead.py examples/configs/shakespeare_char_cpu.yaml --threads 1 --repeats 20
    python examples/train_overhead.py examples/configs/python_char_cpu.yaml --iters 50 --batch_size=4
"""

import argparse
import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

from nanogpt_hf.data import TokenShards
from nanogpt_hf.loading import new_model
from nanogpt_hf.train_config import parse_config


def bare_step_ms(cfg, iters):
    """ms of each iteration of the bare model step on cfg's model, optimizer and (pre-fetched) batches."""
    data = TokenShards(cfg.data_dir, "train")
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data, log=lambda *a: None)  # the model train() builds for init_from scratch
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    batches = [data.get_batch(cfg.batch_size, cfg.block_size, it, seed=cfg.seed) for it in range(iters)]
    model.train()
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            loss = model(x, shift_labels=y).loss / cfg.gradient_accumulation_steps
            loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def loop_ms(cfg, iters):
    """ms of each iteration of train() itself (from its log lines, log_interval 1), and its mean ms/iteration
    over everything but evaluation and saving (from its results)."""
    from accelerate.state import AcceleratorState, GradientState

    from nanogpt_hf.trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as out_dir:
        run = parse_config(["--" + k + "=" + str(v) for k, v in cfg.to_dict().items() if v is not None] + [
            f"--out_dir={out_dir}", f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=1",
            "--log_interval=1", "--sample_at_end=0", "--push_to_hub=false",
            f"--lr_decay_iters={max(iters, cfg.warmup_iters)}"])
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(open(os.devnull, "w")):
            results = train(run)
    times = [float(t) for t in re.findall(r"^iter \d+: .*?time ([\d.]+)ms", log.getvalue(), re.M)]
    return times, 1000 * results["total_train_time_s"] / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a training YAML config; any --key=value after it overrides the config")
    # many short rounds rather than a few long ones: the speed of a shared CPU drifts by several % over tens of
    # seconds, and finer interleaving keeps that drift out of the comparison
    p.add_argument("--iters", type=int, default=30, help="iterations per measurement")
    p.add_argument("--repeats", type=int, default=16, help="measurements of each kind, interleaved")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args, overrides = p.parse_known_args()  # the rest: --key=value overrides of the training config
    try:
        cfg = parse_config([args.config, *(o for o in overrides if o != "--")])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    print(f"{args.config}: {tokens:,} tokens/iteration, {args.repeats} x {args.iters} iterations each, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bare, loop, loop_means = [], [], []
    for r in range(args.repeats):  # interleaved: bare, loop, bare, loop, ...
        bare += bare_step_ms(cfg, args.iters)
        times, mean = loop_ms(cfg, args.iters)
        loop, loop_means = loop + times, loop_means + [mean]
        print(f"  round {r + 1}: bare {statistics.median(bare[-args.iters:]):.2f} ms/iter, "
              f"loop {statistics.median(times):.2f} ms/iter (medians)")
    b, lp = statistics.median(bare), statistics.median(loop)
    print(f"bare model step: {b:.2f} ms/iter median, {statistics.mean(bare):.2f} mean "
          f"({tokens / b * 1000:,.0f} tokens/s)")
    print(f"training loop:   {lp:.2f} ms/iter median, {statistics.mean(loop_means):.2f} mean incl. logging "
          f"({tokens / lp * 1000:,.0f} tokens/s)")
    print(f"loop overhead:   {100 * (lp / b - 1):+.1f}% (medians), "
          f"{100 * (statistics.mean(loop_means) / statistics.mean(bare) - 1):+.1f}% (means)")


if __name__ == "__main__":
    main()
