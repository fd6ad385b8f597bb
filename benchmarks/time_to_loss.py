"""Time to a target val loss: two (or more) training configs, e.g. AdamW vs Muon, side by side.

Each config trains with the trainer's own code (build_model, build_optimizer, get_lr, and train_step over the
loop's micro_batches) on the same data and seed; the runs' iterations alternate in one process and only the
training steps are timed.

    from benchmarks.time_to_loss import bench_time_to_loss, format_time_to_loss
    print(format_time_to_loss(bench_time_to_loss({"adamw": cfg_a, "muon": cfg_b})))   # TrainConfigs
"""

import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from nanogpt_hf.data import TokenShards
from nanogpt_hf.evaluation import evaluate_loss
from nanogpt_hf.optim import build_optimizer, lr_scales, set_lr
from nanogpt_hf.loading import build_model
from nanogpt_hf.trainer import estimate_loss, get_lr, micro_batches, train_step

from .common import sync

TARGET_LOSS = 1.88  # nanoGPT's val loss of its CPU baby run of shakespeare_char
TIME_TO_LOSS_GOAL = 0.70  # Muon reaches TARGET_LOSS in <= 0.7x the wall time of our tuned AdamW


class TimedRun:
    """One training run of train()'s iterations on one process, stepped from outside, so that several can take
    turns in one process (sharing one Accelerator: same gradient_accumulation_steps)."""

    def __init__(self, label, cfg, accelerator):
        self.label, self.cfg, self.accelerator, self.device = label, cfg, accelerator, accelerator.device
        self.train_data, self.val_data = TokenShards(cfg.data_dir, "train"), TokenShards(cfg.data_dir, "val")
        set_seed(cfg.seed)  # as train() does: the same seed gives the same initial weights
        model = build_model(cfg, self.train_data, log=lambda *a: None)
        optimizer = build_optimizer(model, cfg, self.device.type, verbose=False)
        self.scales = lr_scales(optimizer, cfg)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()
        self.it, self.seconds, self.step_ms, self.curve, self.reached = 0, 0.0, [], [], None

    def step(self):
        """One iteration of train(): its learning rate, then train_step over its micro-batches. Timed."""
        cfg, it = self.cfg, self.it
        sync(self.device)
        t0 = time.perf_counter()
        set_lr(self.optimizer, get_lr(it, cfg), self.scales)
        batches = micro_batches(self.train_data, cfg, it, self.accelerator)  # drawn as train() draws them
        train_step(self.model, self.optimizer, self.accelerator, batches, cfg.grad_clip, cfg.nan_policy, it=it)
        sync(self.device)
        dt = time.perf_counter() - t0
        self.it, self.seconds = it + 1, self.seconds + dt
        self.step_ms.append(dt * 1e3)

    def check(self, target, full_eval):
        """train.py's val loss estimate (cfg.eval_iters batches, the same every time); at the first one <= target,
        record where and when, and (full_eval) the exact loss over every val token."""
        val = estimate_loss(self.model, {"val": self.val_data}, self.cfg, self.accelerator)["val"]
        self.curve.append(dict(iter=self.it, val_loss=val, seconds=self.seconds))
        if val <= target and self.reached is None:
            exact = evaluate_loss(self.model, self.val_data, self.cfg.batch_size, self.cfg.block_size, full=True,
                                  progress=False)["loss"] if full_eval else None
            self.reached = dict(iter=self.it, seconds_sum=self.seconds, val_loss=val, exact_val_loss=exact)


def bench_time_to_loss(configs, target=TARGET_LOSS, check_every=25, device="cpu", full_eval=True, log=None):
    """{label: TrainConfig} -> iterations and seconds of training steps until the val loss estimate first reaches
    target, for each config, the first being the baseline of the ratios. log(line) is told when one gets there.

    Fair by construction: one process, the runs' iterations take turns (the order rotating, as in
    time_alternating), every run on the same data and seed; only the training steps are timed (evaluation every
    check_every iterations is not). A run that reached the target keeps training (those steps don't count) until
    the last one reaches it or its max_iters, so that the load stays the same for the runs still going, and the
    step times are compared over the rounds that all runs took part in."""
    cfgs = list(configs.values())
    if len({(c.data_dir, c.seed, c.gradient_accumulation_steps) for c in cfgs}) > 1:
        raise ValueError("the runs must share data_dir, seed and gradient_accumulation_steps, so that they differ "
                         "only in what is compared")
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no",
                              gradient_accumulation_steps=cfgs[0].gradient_accumulation_steps)
    runs = [TimedRun(label, cfg, accelerator) for label, cfg in configs.items()]
    for run in runs:
        run.check(target, full_eval)
    rounds = 0
    while any(r.reached is None and r.it < r.cfg.max_iters for r in runs):
        for run in runs[rounds % len(runs):] + runs[:rounds % len(runs)]:
            if run.it < run.cfg.max_iters:
                run.step()
                if run.reached is None and (run.it % check_every == 0 or run.it == run.cfg.max_iters):
                    run.check(target, full_eval)
                    if run.reached is not None and log is not None:
                        log(f"{run.label}: val loss {run.reached['val_loss']:.4f} at iter {run.it}")
        rounds += 1
    # seconds to the target = iterations x the median step time over the rounds in which every run took a step:
    # the same stretch of time for all, so bursts of load from other processes can't favour one run (the plain
    # sums of the step times, which such bursts inflate, are kept too)
    common = min(len(r.step_ms) for r in runs)
    for run in runs:
        if run.reached is not None:
            ms = statistics.median(run.step_ms[:common])
            run.reached.update(ms_per_iter=ms, seconds=run.reached["iter"] * ms / 1e3)
    base = runs[0].reached
    result = dict(target=target, check_every=check_every, device=str(device), eval_iters=cfgs[0].eval_iters,
                  data_dir=str(cfgs[0].data_dir), seed=cfgs[0].seed, runs={})
    for run in runs:
        r = dict(config=run.cfg.to_dict(), reached=run.reached, curve=run.curve, iters_run=run.it,
                 best_val_loss=min(c["val_loss"] for c in run.curve))
        if base is not None and run.reached is not None:
            r["ratio_iters"] = run.reached["iter"] / base["iter"]
            r["ratio_seconds"] = run.reached["seconds"] / base["seconds"]
            r["ratio_seconds_sum"] = run.reached["seconds_sum"] / base["seconds_sum"]
        result["runs"][run.label] = r
    return result


def format_time_to_loss(r, goal=None):
    """The table; goal: the wall-time ratio Muon runs should reach against an AdamW baseline."""
    runs = r["runs"]
    cfg = next(iter(runs.values()))["config"]
    out = [f"time to val loss <= {r['target']}: nanoGPT's estimate ({r['eval_iters']} val batches of "
           f"{cfg['batch_size']} x {cfg['block_size']}, the same every time: train.py's 'val loss'), checked every "
           f"{r['check_every']} iterations; the runs' steps alternate in one process; data {r['data_dir']}, seed "
           f"{r['seed']}, device {r['device']}",
           f"  {'run':10s} {'optimizer':9s} {'lr':>7s} {'muon lr':>7s} {'iters':>6s} {'ms/iter':>8s} {'seconds':>8s} "
           f"{'(sum)':>7s}  val loss there (estimate / exact)"]
    for label, v in runs.items():
        c, hit = v["config"], v["reached"]
        muon_lr = f"{c['muon_learning_rate']:.3g}" if c["optimizer"] == "muon" else "-"
        head = f"  {label:10s} {c['optimizer']:9s} {c['learning_rate']:7.3g} {muon_lr:>7s}"
        if hit is None:
            out.append(f"{head} not reached in {v['iters_run']} iterations (best val loss {v['best_val_loss']:.4f})")
            continue
        exact = f"{hit['exact_val_loss']:.4f}" if hit["exact_val_loss"] is not None else "-"
        out.append(f"{head} {hit['iter']:6d} {hit['ms_per_iter']:8.1f} {hit['seconds']:8.1f} {hit['seconds_sum']:7.1f}"
                   f"  {hit['val_loss']:.4f} / {exact}")
    base_label, base = next(iter(runs.items()))
    for label, v in list(runs.items())[1:]:
        if "ratio_seconds" in v:
            tail = f" (goal <= {goal:.2f}x)" if goal and v["config"]["optimizer"] == "muon" else ""
            out.append(f"  {label} vs {base_label}: {v['ratio_iters']:.2f}x the iterations, {v['ratio_seconds']:.2f}x "
                       f"the wall time{tail} (sums of the step times: {v['ratio_seconds_sum']:.2f}x)")
    out.append("  (seconds = iterations x ms/iter, the median training step over the rounds all runs took part in, "
               "evaluation excluded; (sum) = the plain sum of the step times, which bursts of load from other "
               "processes inflate; exact = the loss over every val token at that iteration)")
    return "\n".join(out)

