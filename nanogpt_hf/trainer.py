"""
The training loop: nanoGPT's train.py on Accelerate, as one function you can read top to bottom.

    python examples/train.py examples/configs/shakespeare_char_cpu.yaml                 # one process (CPU or GPU)
    accelerate launch examples/train.py examples/configs/shakespeare_char.yaml          # GPU
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/train.py examples/configs/train_gpt2.yaml
    torchrun --nproc_per_node 2 examples/train.py examples/configs/shakespeare_char_cpu.yaml   # DDP on CPU (gloo)
    python examples/train.py examples/configs/shakespeare_char_cpu_muon.yaml            # Muon + AdamW, see optim.py

    from nanogpt_hf.train_config import TrainConfig
    from nanogpt_hf.trainer import train
    results = train(TrainConfig(data_dir="data/shakespeare_char", out_dir="out-shakespeare-char", ...))

What ends up in out_dir:
    model.safetensors config.json *.py generation_config.json tokenizer*   the best model so far (lowest val loss):
        AutoModelForCausalLM.from_pretrained(out_dir) and pipeline("text-generation", model=out_dir) work
    train_config.json results.json loss_curve.png README.md                 the run, and a model card
    checkpoints/step_XXXXXX/   resumable state (weights, optimizer, grad scaler, each rank's RNG, trainer_state.json),
        written to a .tmp folder and renamed, so a checkpoint folder that exists is complete; the last
        keep_checkpoints are kept. --init_from resume continues from the newest one.

Batches are a pure function of (seed, iteration): resuming needs only the iteration counter, and a run gives
the same updates on 1 process with 2 accumulation steps as on 2 processes with 1.

Reading order: train() at the bottom is the script (setup, data, model, optimizer, the loop, the end). Above it
are the pieces it calls: the schedules, micro_batches and train_step() (one update: the micro-steps, clipping, the
finite check, the optimizer step), which a benchmark calls too. Elsewhere: run_state.py (RunState: what a
checkpoint saves and a resume restores, as one object), loading.py (the model), evaluation.py (the loss estimate),
checkpoint.py, guards.py (lock, stop signals, disk room, resumability), monitor.py (the log line's numbers,
trackers) and outputs.py (what goes into out_dir).
"""

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import guards, outputs
from .checkpoint import CHECKPOINT_SLEEP_ENV, find_checkpoint, resume_hint  # noqa: F401 (API)
from .data import TokenizerMismatch, TokenShards, load_tokenizer
from .evaluation import evaluate_loss
from .hub import BackgroundPusher, push_final, resolve_data_dir
from .loading import build_model
from .monitor import Meter, digest, init_trackers, open_dump, write_dump  # noqa: F401 (digest: API)
from .optim import build_optimizer, lr_scales, set_lr
from .run_state import RunState, load_run_state  # noqa: F401 (RunState: API)
from .train_config import TrainConfig, resolve_mixed_precision

EVAL_MICRO_STEP = 1  # training draws its batches with micro_step 0, evaluation from this separate stream

# -----------------------------------------------------------------------------
# schedules: pure functions of the iteration


def get_lr(it, cfg):
    """nanoGPT's learning rate schedule."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    # 1) linear warmup for warmup_iters steps
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    # 2) after lr_decay_iters, return min learning rate
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def get_batch_size(it, cfg):
    """Micro-batch size at iteration it: a linear ramp from batch_size_warmup_start (GPT-3's batch size warmup)."""
    if it >= cfg.batch_size_warmup_iters:
        return cfg.batch_size
    start = cfg.batch_size_warmup_start
    return start + (cfg.batch_size - start) * it // cfg.batch_size_warmup_iters


def micro_batches(data, cfg, it, accelerator):
    """This rank's micro-batches of iteration it, one per accumulation step: (x, y), both (B, block_size) token
    ids, y shifted by one. The iteration's global batch is one draw of accum * world * B windows keyed by
    (seed, it); micro-step m of rank r takes slice number m * world + r: different data on every rank, and the
    same global batch however it is split into processes and micro-steps."""
    accum, world, rank = cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    B = get_batch_size(it, cfg)
    for micro_step in range(accum):
        x, y = data.get_batch(B, cfg.block_size, it, seed=cfg.seed, rank=micro_step * world + rank,
                              world_size=accum * world, device=accelerator.device)
        if cfg.compile and cfg.batch_size_warmup_iters:  # the ramp changes B: one graph, dynamic in B
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(y, 0)
        yield x, y


# -----------------------------------------------------------------------------
# one update


def _mean_losses(model, accelerator, batches):
    """Forward and backward over the micro-batches, each loss the mean over its B*T targets; yields the losses."""
    for x, y in batches:
        with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
            loss = model(x, shift_labels=y).loss
            accelerator.backward(loss)  # scaled by 1/accum (and by the fp16 loss scale)
        yield loss


def token_mean_losses(model, accelerator, batches):
    """Forward and backward over the micro-batches with the token-normalised loss: every micro-step's summed token
    loss is divided by the number of targets (y != -100) of the whole iteration, all micro-steps and ranks (one
    all-reduce of the count first). With masked rows of different lengths the mean of per-batch means would weigh a
    token of a short batch more; this gives the same gradient however the batch is split into micro-steps and ranks.
    Yields each micro-step's loss times the number of micro-steps and processes: their mean over the micro-steps,
    then over the ranks, is the iteration's loss."""
    batches = list(batches)  # the count comes before the first backward
    count = sum((y != -100).sum() for _, y in batches).float()
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    count = count.clamp(min=1)  # an iteration without targets: zero loss, zero gradients
    # accelerator.backward divides by the accumulation steps and DDP averages over ranks: undo both
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = model(x, shift_labels=y, num_items_in_batch=count).loss  # sum over targets / count
            accelerator.backward(loss * scale)
        yield loss * (len(batches) * accelerator.num_processes)


@dataclass
class Step:
    """What train_step did. loss: this rank's mean over the micro-steps (a 0-d tensor on the device: reading it is
    a sync); norm: the gradient norm before clipping (None where DeepSpeed clips inside its own step); updated:
    False when a non-finite loss skipped the update; stopping, checkpoint_due: agreed by all ranks."""
    loss: torch.Tensor
    norm: torch.Tensor | None
    updated: bool
    stopping: bool = False
    checkpoint_due: bool = False


def train_step(model, optimizer, accelerator, batches, grad_clip=0.0, nan_policy="stop", it=0, stop=None,
               checkpoint_at=math.inf, token_mean=False):
    """One optimizer update, as the training loop makes it: forward and backward over the micro-batches (the
    gradients all-reduced across ranks on the last one only), clipping, a finite check, the update.

        accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        set_lr(optimizer, get_lr(it, cfg), scales)                # the learning rate is the caller's
        step = train_step(model, optimizer, accelerator, micro_batches(data, cfg, it, accelerator), cfg.grad_clip)

    batches: the iteration's micro-batches, (x, y) token ids (B, T) each, accelerator.gradient_accumulation_steps
        of them; grad_clip: the largest gradient norm (0: no clipping; the norm is measured all the same);
    nan_policy: what a non-finite loss (or gradient norm) does: "stop" raises FloatingPointError naming iteration
        `it`, with the weights as they were; "skip" skips this update (Step.updated is False);
    stop, checkpoint_at: a guards.StopSignals, and a time.time() from which on a checkpoint is due: whether any
        rank got a signal or reached that time goes into the all-reduce of the finite check (Step.stopping,
        Step.checkpoint_due), so that the loop has one sync per iteration and all ranks stop or save at one.
    token_mean: y holds -100 on the targets to ignore (SFT's loss mask): the loss is the sum of the token losses of
        all micro-steps and ranks / their number of targets (token_mean_losses), not a mean of per-batch means.
    """
    if token_mean:
        losses = token_mean_losses(model, accelerator, batches)
    else:  # full blocks: every micro-batch has B*T targets, and the mean of the means is the token mean
        losses = _mean_losses(model, accelerator, batches)
    loss_sum, n = torch.zeros((), device=accelerator.device), 0
    for loss in losses:
        loss_sum, n = loss_sum + loss.detach(), n + 1
    loss_mean = loss_sum / n  # the true mean over the micro-steps (token_mean: this rank's share of the mean)
    # clip (unscaling fp16 gradients first); grad_clip 0 still measures the norm
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    # the one sync: before the update we must know whether the loss is finite on every rank
    finite = torch.isfinite(loss_mean)
    if norm is not None and accelerator.scaler is None:  # with fp16, inf gradients are the scaler's business
        finite &= torch.isfinite(torch.as_tensor(norm))
    stop = stop or guards.StopSignals()  # (one never entered never gets a signal)
    checkpoint_due = time.time() >= checkpoint_at
    if accelerator.num_processes > 1:
        stopping, bad, checkpoint_due = stop.agreed(accelerator, ~finite, checkpoint_due)
        finite = not bad
    else:
        stopping, finite = stop.requested, bool(finite.item())
    if finite:
        optimizer.step()
    elif nan_policy == "stop":
        raise FloatingPointError(f"loss is {loss_mean.item()} at iter {it}: stopped before updating the weights "
                                 "(lower --learning_rate, or pass --nan_policy skip)")
    elif accelerator.scaler is not None:
        accelerator.scaler.update()  # lowers the fp16 loss scale; also resets the scaler for the next step
    optimizer.zero_grad(set_to_none=True)
    return Step(loss_mean, norm, finite, stopping, checkpoint_due)


# -----------------------------------------------------------------------------
# setup, data, logging


def make_accelerator(cfg):
    """The Accelerator for cfg (precision, accumulation, trackers, compile), checked against how it was launched."""
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg),  # None: whatever `accelerate launch` / its config says
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.out_dir,
        cpu=cfg.cpu,
        # compile: inductor, or the dynamo backend that `accelerate launch`'s config names (ACCELERATE_DYNAMO_BACKEND)
        **({"dynamo_backend": "inductor"} if cfg.compile and os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
           == "NO" else {}),
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        # Accelerate leaves fp16 off on CPU, but torch has it there (autocast + GradScaler): switch it on, so
        # that the fp16 loss-scaling path runs (and is tested) on any machine
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants a micro-batch size; we have no DataLoader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    guards.check_launch(accelerator, cfg)
    return accelerator


def load_data(cfg, accelerator, log=print):
    """(train split, val split, tokenizer or None) of cfg.data_dir (hf://datasets/... downloaded once), checked
    to hold enough distinct windows for this run's batches."""
    with accelerator.main_process_first():  # hf://datasets/... downloads once, the other ranks use the cache
        data_dir = resolve_data_dir(cfg.data_dir)
    train_data, val_data = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    tokenizer = None
    try:
        tokenizer = load_tokenizer(data_dir)
        tokenizer.model_max_length = cfg.block_size
    except TokenizerMismatch:  # not a missing tokenizer: the wrong one, and the samples would be other text
        raise
    except (OSError, ValueError) as e:
        log(f"warning: {e}; {cfg.out_dir} will have no tokenizer")
    world = accelerator.num_processes
    for data, n in ((train_data, cfg.gradient_accumulation_steps * world), (val_data, world)):  # too little: fail now
        data.sample_starts(cfg.batch_size, cfg.block_size, 0, world_size=n)
    return train_data, val_data, tokenizer


@torch.no_grad()
def estimate_loss(model, splits, cfg, accelerator, stop=None):
    """nanoGPT's estimate_loss: {split: mean loss over cfg.eval_iters batches} (evaluation.evaluate_loss, on
    every rank, reduced), the same batches at every evaluation, so successive val losses compare the model and
    not the sample. None when a stop signal reached any rank meanwhile."""
    out = {}
    for name, data in splits.items():
        r = evaluate_loss(model, data, cfg.batch_size, cfg.block_size, eval_iters=cfg.eval_iters, seed=cfg.seed,
                          micro_step=EVAL_MICRO_STEP, accelerator=accelerator, progress=False, stop=stop)
        if r is None:
            return None
        out[name] = r["loss"]
    return out


# -----------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says; returns the results (also in out_dir/results.json). Raises guards.Interrupted
    (exit_code 128 + signal) after the checkpoint that a SIGINT, SIGTERM or SIGUSR1 asked for."""
    t_start = time.time()
    with guards.StopSignals() as stop, guards.OutDirLock(cfg.out_dir) as lock, resume_hint(cfg.out_dir):
        # ---------------------------------------------------------------------
        # setup: accelerator, seeds
        accelerator = make_accelerator(cfg)
        master, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
        print0 = tqdm.write if master else (lambda *a, **k: None)
        out_dir, accum = Path(cfg.out_dir), cfg.gradient_accumulation_steps
        set_seed(cfg.seed, device_specific=True)  # seed + rank: each rank its own dropout (DDP broadcasts rank 0's)
        guards.check_push(cfg)
        print0(f"{accelerator.distributed_type.value}: {world} process(es), device {accelerator.device}, "
               f"mixed precision {accelerator.mixed_precision}")

        # ---------------------------------------------------------------------
        # data
        train_data, val_data, tokenizer = load_data(cfg, accelerator, log=print0)
        print0(f"tokens per iteration will be: {accum * world * cfg.batch_size * cfg.block_size:,} ({accum} grad "
               f"accum steps x {world} processes x {cfg.batch_size} batch size x {cfg.block_size} block size)")

        # ---------------------------------------------------------------------
        # out_dir (one run at a time; what a killed run left half-written goes), and the state to resume from
        guards.agree(accelerator, guards.claim_out_dir(out_dir, lock, cfg) if master else None)
        state, ckpt_dir = load_run_state(cfg, accelerator, train_data, tokenizer, log=print0)
        t_start -= state.wall_time_s  # wall time counts all sessions of the run

        # ---------------------------------------------------------------------
        # model: new, pretrained, or the checkpoint's weights (loading.py)
        model = build_model(cfg, train_data, resume_dir=ckpt_dir, lora_base=state.lora_base, tokenizer=tokenizer,
                            log=print0)
        raw_model = model
        print0(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
        room = guards.check_room(out_dir, model.get_num_params(non_embedding=False)) if master else None
        guards.agree(accelerator, room)

        # ---------------------------------------------------------------------
        # optimizer, and everything through accelerator.prepare (DDP / FSDP / DeepSpeed wrapping, device, autocast)
        optimizer = build_optimizer(model, cfg, accelerator.device.type, verbose=master)
        scales = lr_scales(optimizer, cfg)  # each param group's peak lr / learning_rate, from this run's config
        model, optimizer = accelerator.prepare(model, optimizer)
        init_trackers(accelerator, cfg)
        if ckpt_dir is not None:
            ckpt.load(accelerator, optimizer, ckpt_dir)  # optimizer, grad scaler, RNG: after model init
        pusher = BackgroundPusher(out_dir, cfg.hub_model_id, private=cfg.hub_private) if cfg.push_to_hub and master \
            else None
        dump = open_dump(cfg, rank)

        # ---------------------------------------------------------------------
        # the loop
        model.train()
        bar = tqdm(total=cfg.max_iters, initial=state.iter, desc="training", dynamic_ncols=True,
                   disable=None if master else True)  # None: only on a terminal, not in log files
        meter = Meter(accelerator.device)
        saved_at, last_push = (state.iter if ckpt_dir else None), state.iter
        checkpoint_at = time.time() + 60 * (cfg.checkpoint_minutes or math.inf)  # when checkpoint_minutes are up
        stopping = checkpoint_due = False  # a stop signal reached a rank / checkpoint_minutes passed (agreed)
        while True:
            it, t_pause, losses, improved = state.iter, time.time(), None, False
            # evaluate the loss on train/val, save the best model if val improved, write a checkpoint whatever val
            # did (every eval_interval and at the end; not again at an iteration whose evaluation a checkpoint holds)
            held = bool(state.history) and state.history[-1]["iter"] == it
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (not held or cfg.eval_only) and not stopping:
                losses = estimate_loss(model, {"train": train_data, "val": val_data}, cfg, accelerator, stop)
                stopping = losses is None  # a stop signal came during the evaluation
            if losses is not None:
                print0(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                accelerator.log({"train/eval_loss": losses["train"], "val/loss": losses["val"]}, step=it)
                if cfg.eval_only:
                    bar.close()
                    accelerator.end_training()
                    return {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
                if not math.isfinite(losses["val"]):
                    raise FloatingPointError(f"the val loss is {losses['val']} at iter {it}: the weights are broken")
                improved = state.add_evaluation(losses)
                if improved:
                    state.wall_time_s = time.time() - t_start
                    state.results = outputs.best_results(state, losses, accelerator, raw_model,
                                                         train_data.meta.get("dataset"))
                    outputs.save_model_dir(accelerator, model, tokenizer, cfg, state.results, state.history)
                    print0(f"saved the best model so far (val loss {state.best_val_loss:.4f}) to {out_dir}")
                guards.check_skipped(state.skipped_updates, it, cfg)
            # a checkpoint: at every evaluation, every checkpoint_interval, after checkpoint_minutes, on a stop signal
            interval_due = cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0
            if it > 0 and saved_at != it and (losses is not None or stopping or checkpoint_due or interval_due):
                state.wall_time_s = time.time() - t_start
                path = ckpt.save(accelerator, model, optimizer, out_dir, state.to_dict(), keep=cfg.keep_checkpoints)
                saved_at, checkpoint_at = it, time.time() + 60 * (cfg.checkpoint_minutes or math.inf)
                print0(f"saved checkpoint {path}")
            if pusher is not None and improved and cfg.push_interval and it - last_push >= cfg.push_interval:
                pusher.push(f"nanogpt_hf: iter {it}, val loss {state.best_val_loss:.4f}")
                last_push = it
            meter.exclude(time.time() - t_pause)  # evaluation and saving don't count in the iteration times
            if stopping:
                bar.close()
                raise stop.interrupted(find_checkpoint(out_dir / "checkpoints"), it)
            if it >= cfg.max_iters:
                break

            # one iteration: forward/backward over the micro-steps (gradients synced on the last), one update
            t0, lr = time.time(), get_lr(it, cfg)
            set_lr(optimizer, lr, scales)  # every param group on the one schedule, scaled to its own peak
            step = train_step(model, optimizer, accelerator, micro_batches(train_data, cfg, it, accelerator),
                              cfg.grad_clip, cfg.nan_policy, it=it, stop=stop, checkpoint_at=checkpoint_at,
                              token_mean=train_data.masked)
            stopping, checkpoint_due = step.stopping, step.checkpoint_due
            if not step.updated:  # --nan_policy skip
                state.skipped_updates += 1
                print0(f"iter {it}: loss {step.loss.item()}, update skipped (--nan_policy skip, "
                       f"{state.skipped_updates} so far)")
            if dump is not None:  # tests: which data this rank saw and what its weights are now
                write_dump(dump, it, step.loss, micro_batches(train_data, cfg, it, accelerator), raw_model)
            B = get_batch_size(it, cfg)
            tokens = B * cfg.block_size * accum * world
            state.iter, state.tokens_seen = it + 1, state.tokens_seen + tokens
            meter.count(tokens, step.norm, cfg.grad_clip)
            bar.update(1)

            # logging: .item() only here, it waits for the device (a sync point)
            if it % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                lossf = accelerator.reduce(step.loss, reduction="mean").item()
                line, metrics = meter.report(it, lossf, lr, step.norm, raw_model, B * accum)
                print0(line)
                accelerator.log(metrics, step=it)
                bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
            state.train_time_s += time.time() - t0  # training and logging; evaluation and saving don't count
        bar.close()

        # ---------------------------------------------------------------------
        # the end: final numbers into out_dir, the last push, samples
        state.wall_time_s = time.time() - t_start
        results = outputs.final_results(state, out_dir)
        outputs.save_model_dir(accelerator, None, None, cfg, results, state.history)  # the weights stay the best
        print0(f"best val loss {state.best_val_loss:.4f} at iter {results['iter']}; {results['ms_per_iter']:.2f} "
               f"ms/iter, {results['tokens_per_s'] or 0:,} tokens/s (evaluation excluded); {out_dir} is ready")
        if dump is not None:
            dump.close()
        push_final(pusher, state.best_val_loss, results["iter"], stop)
        if master and cfg.sample_at_end:
            outputs.print_samples(out_dir, cfg.sample_at_end, accelerator, stop=stop)
        if stop.requested:  # during the final push or the samples: the run is complete and checkpointed; stop now
            raise stop.interrupted(find_checkpoint(out_dir / "checkpoints"), state.iter)
        accelerator.wait_for_everyone()
        # the DDP wrapper goes first: its Reducer holds the process group, and freed only after end_training had
        # destroyed the group, its gloo destructor deadlocked at exit (seen in a 2-process CPU run, accelerate 1.6)
        del model
        accelerator.free_memory()
        accelerator.end_training()  # trackers closed; in a distributed run, the process group too
        return results


__all__ = ["train", "train_step", "token_mean_losses", "micro_batches", "RunState", "Step", "get_lr", "get_batch_size", "estimate_loss",
           "build_model", "find_checkpoint", "EVAL_MICRO_STEP"]
