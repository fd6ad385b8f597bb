"""
What a training run reports while it runs: the numbers of each log line (Meter: time per iteration, tokens/s, MFU,
clipped updates), the trackers (wandb, tensorboard, ... through Accelerate), and --debug_dump_dir's per-iteration
digests of batches and weights, which tests compare between runs.
"""

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import torch


class Meter:
    """A log line's numbers over the iterations since the last one, evaluation and saving left out: time per
    iteration, tokens/s, nanoGPT's running MFU, and how many updates were clipped (counted on the device)."""

    def __init__(self, device):
        self.t, self.iters, self.tokens, self.mfu = time.time(), 0, 0, -1.0
        self.clipped = torch.zeros((), device=device)

    def exclude(self, seconds):
        self.t += seconds

    def count(self, tokens, norm, grad_clip):
        self.iters, self.tokens = self.iters + 1, self.tokens + tokens
        if norm is not None and grad_clip:
            self.clipped += norm > grad_clip  # no sync

    def report(self, it, loss, lr, norm, model, sequences):
        """(the log line of iteration it, its metrics for the trackers); starts the next window. loss: averaged
        over the ranks; sequences: per iteration and rank (for the MFU)."""
        elapsed = time.time() - self.t
        mfu = model.estimate_mfu(sequences, elapsed / self.iters) if it >= 5 else None  # after warm-up
        if mfu is not None:
            self.mfu = mfu if self.mfu == -1.0 else 0.9 * self.mfu + 0.1 * mfu
        normf, clipped = (norm.item() if norm is not None else float("nan")), int(self.clipped.item())
        mfu_text = f"{self.mfu * 100:.2f}%" if self.mfu >= 0 else "n/a"  # n/a: CPU, unknown GPU
        text = (f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, time {elapsed / self.iters * 1000:.2f}ms, "
                f"{self.tokens / elapsed:,.0f} tok/s, mfu {mfu_text}, grad norm {normf:.3f} "
                f"(clipped {clipped}/{self.iters})")
        metrics = {"train/loss": loss, "lr": lr, "grad_norm": normf, "clipped": clipped,
                   "tokens_per_s": self.tokens / elapsed}
        self.t, self.iters, self.tokens = time.time(), 0, 0
        self.clipped.zero_()
        return text, metrics


def digest(tensors):
    """A short hash of some tensors' values (bit-exact comparisons of weights and batches in tests)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def open_dump(cfg, rank):
    """--debug_dump_dir: this rank's jsonl of per-iteration batch and weight digests (tests compare runs), or None."""
    if not cfg.debug_dump_dir:
        return None
    Path(cfg.debug_dump_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(cfg.debug_dump_dir) / f"rank{rank}.jsonl", "a")


def write_dump(dump, it, loss, batches, model):
    """One line: iteration it's loss, its micro-batches (drawn again: they are a pure function of it) and the
    weights after its update, as digests."""
    dump.write(json.dumps({"iter": it, "loss": loss.item(), "batch": digest(x for x, _ in batches),
                           "weights": digest(model.parameters())}) + "\n")
    dump.flush()


def init_trackers(accelerator, cfg):
    if cfg.report_to == "none":
        return
    if importlib.util.find_spec(cfg.report_to) is None:
        raise ValueError(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed "
                         f"(pip install {cfg.report_to})")
    init_kwargs = {"wandb": {"name": cfg.run_name}} if cfg.run_name and cfg.report_to == "wandb" else {}
    accelerator.init_trackers(cfg.project_name, config=cfg.to_dict(), init_kwargs=init_kwargs)
