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
"""

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from . import __version__
from . import checkpoint as ckpt
from .checkpoint import CHECKPOINT_SLEEP_ENV, find_checkpoint, full_state_dict, quiet_progress  # noqa: F401 (API)
from .configuration_nanogpt import NanoGPTConfig
from .data import TokenShards
from .lora import base_source, save_model_files
from .modeling_nanogpt import NanoGPTForCausalLM
from .optim import build_optimizer, lr_scales, set_lr
from .train_config import ARCHITECTURE, TrainConfig, resolve_mixed_precision

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


# -----------------------------------------------------------------------------
# model


def build_model(cfg, data, resume_dir=None, log=print):
    """The model for cfg.init_from: a new one sized by cfg and the data's vocab, a pretrained one, or the
    weights of a checkpoint (on the model config saved with it)."""
    dropout = dict(dropout=cfg.dropout)  # the one architecture setting a run may change on a loaded model
    if resume_dir is not None:
        model = NanoGPTForCausalLM(NanoGPTConfig.from_pretrained(resume_dir, **dropout))
        missing, unexpected = model.load_state_dict(load_file(resume_dir / "model.safetensors"), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte and saved once
            raise ValueError(f"{resume_dir}: weights don't fit the model (missing {missing}, unexpected {unexpected})")
        model.tie_weights()
    elif cfg.init_from == "scratch":
        vocab_size = -(-data.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # round up
        log(f"found vocab_size = {data.vocab_size} (inside {data.data_dir / 'meta.json'})"
              + (f", model vocab_size {vocab_size}" if vocab_size != data.vocab_size else ""))
        model = NanoGPTForCausalLM(NanoGPTConfig(
            vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, position_embedding=cfg.position_embedding,
            activation_function=cfg.activation_function,
            eos_token_id=data.eot_token_id))
    elif cfg.init_from.endswith(".pt"):  # a checkpoint of the original nanoGPT
        model = NanoGPTForCausalLM.from_nanogpt_checkpoint(os.path.expanduser(cfg.init_from), **dropout)
    else:  # gpt2*, a model dir or a Hub id: GPT-2 weights are converted, nanogpt_hf models load as they are
        log(f"initializing from weights: {cfg.init_from}")
        from .hub import check_hub_name

        hub = {} if os.path.isdir(os.path.expanduser(cfg.init_from)) else check_hub_name(cfg.init_from, "--init_from")
        try:
            model_type = AutoConfig.from_pretrained(cfg.init_from, **hub).model_type
            if model_type == "nanogpt":
                model = NanoGPTForCausalLM.from_pretrained(cfg.init_from, **dropout, **hub)
            elif model_type == "gpt2":
                from transformers import GPT2LMHeadModel

                model = NanoGPTForCausalLM.from_gpt2(GPT2LMHeadModel.from_pretrained(cfg.init_from, **hub), **dropout)
            else:
                raise ValueError(f"--init_from {cfg.init_from} is a {model_type!r} model; nanogpt or gpt2 expected")
        except OSError as e:
            raise ValueError(f"--init_from {cfg.init_from}: could not load it ({str(e).splitlines()[0]})") from None
    if cfg.block_size < model.config.block_size:  # model surgery, e.g. GPT-2's 1024 down to 256
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size and model.config.position_embedding == "learned":
        raise ValueError(f"--block_size {cfg.block_size} is larger than the {model.config.block_size} positions "
                         f"of the model from --init_from {cfg.init_from}")
    data.check_vocab(model.config.vocab_size)
    return model


def check_resumable(state, cfg, data, ckpt_dir, tokenizer_hash=None):
    """Refuse to resume into a different model: the architecture, the optimizer and the data's vocab (its size and,
    where both are known, its tokenizer's hash) must match."""
    saved = state["config"]
    saved = {k: saved.get(k, getattr(TrainConfig, k)) for k in ARCHITECTURE}  # keys newer than the checkpoint: default
    diffs = [f"{k} {saved[k]!r} (checkpoint) vs {getattr(cfg, k)!r} (now)" for k in ARCHITECTURE
             if saved[k] != getattr(cfg, k)]
    # a checkpoint's optimizer state loads only into the same optimizer (checkpoints from before Muon: AdamW)
    if state["config"].get("optimizer", "adamw") != cfg.optimizer:
        diffs.append(f"optimizer {state['config'].get('optimizer', 'adamw')!r} (checkpoint) vs {cfg.optimizer!r} (now)")
    if state["data_vocab_size"] != data.vocab_size:
        diffs.append(f"the data's vocab_size {state['data_vocab_size']} (checkpoint) vs {data.vocab_size} "
                     f"(now, {cfg.data_dir})")
    elif None not in (state.get("tokenizer_hash"), tokenizer_hash) and state["tokenizer_hash"] != tokenizer_hash:
        diffs.append(f"the tokenizer: vocab hash {state['tokenizer_hash']} (checkpoint) vs {tokenizer_hash} (now, "
                     f"{cfg.data_dir}): same size, different tokens")
    if diffs:
        raise ValueError(f"cannot resume from {ckpt_dir}: " + "; ".join(diffs) + ". Resume with the "
                         "checkpoint's settings, or start a new run in another --out_dir")


def check_skipped(skipped, it, cfg, out_dir):
    """--nan_policy skip: stop when more than max_skipped_share of the updates so far were skipped."""
    if it and skipped > cfg.max_skipped_share * it:
        raise FloatingPointError(f"{skipped} of {it} updates were skipped for a non-finite loss (--nan_policy skip "
                                 f"allows --max_skipped_share {cfg.max_skipped_share}): the training diverges (lower "
                                 f"--learning_rate); {ckpt.describe_newest(out_dir)}")


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def estimate_loss(model, splits, cfg, accelerator, stop=None):
    """Mean loss over eval_iters batches per split on every rank, averaged over the ranks. The batches are
    the same at every evaluation, so successive val losses compare the model and not the sample.
    None when a stop signal (checkpoint.StopSignals) reached any rank meanwhile."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(cfg.eval_iters, device=accelerator.device)
        for k in range(cfg.eval_iters):
            if stop is not None and stop.agreed(accelerator):
                model.train()
                return None
            x, y = data.get_batch(cfg.batch_size, cfg.block_size, k, seed=cfg.seed, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, micro_step=EVAL_MICRO_STEP,
                                  device=accelerator.device)
            losses[k] = model(x, shift_labels=y).loss
        out[name] = accelerator.reduce(losses.mean(), reduction="mean").item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# saving: the best model as a Hugging Face model dir, resumable checkpoints


def plot_loss_curve(history, path):
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend switch

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for split in ("train", "val"):
        ax.plot([h["iter"] for h in history], [h[f"{split}_loss"] for h in history], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def write_run_files(folder, cfg, results, history):
    """train_config.json, results.json and loss_curve.png into folder."""
    (folder / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if history:
        plot_loss_curve(history, folder / "loss_curve.png")


def move_into(tmp, out_dir):
    """tmp's files -> out_dir with os.replace (atomic per file; weights first), with the umask's mode (safetensors
    creates 0600 files), then the model card, which is rendered from what out_dir now holds."""
    ckpt.apply_umask(tmp)  # files only: a LoRA run's adapter/ folder must stay traversable
    for path in sorted(tmp.iterdir(), key=lambda p: (p.suffix != ".safetensors", p.name)):
        if path.is_dir():  # a LoRA run's adapter/: os.replace can't overwrite a non-empty folder
            shutil.rmtree(out_dir / path.name, ignore_errors=True)
        os.replace(path, out_dir / path.name)
    tmp.rmdir()
    from .card import write_model_card

    write_model_card(out_dir)


def save_model_dir(accelerator, model, tokenizer, cfg, results, history):
    """The best model so far -> out_dir, via out_dir/.tmp_best so that out_dir never holds half a model; with
    model None only the run files (results, curve, card). Call on every rank: a failed write (full disk) raises
    CheckpointWriteError on all of them."""
    state_dict = full_state_dict(accelerator, model) if model is not None else None
    errors, tmp = [], Path(cfg.out_dir) / ".tmp_best"
    if accelerator.is_main_process:
        with ckpt.saving(tmp, errors):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if model is not None:
                with quiet_progress():  # a LoRA run: the merged model + adapter/ (lora.py)
                    save_model_files(accelerator.unwrap_model(model, keep_torch_compile=False), state_dict, tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            write_run_files(tmp, cfg, results, history)
            move_into(tmp, Path(cfg.out_dir))
        if errors:
            errors[0] += (f" (the best model in {cfg.out_dir} stays as it was; "
                          f"{ckpt.describe_newest(cfg.out_dir)} after freeing space)")
    ckpt.agree(accelerator, errors[0] if errors else None, ckpt.CheckpointWriteError)


# -----------------------------------------------------------------------------
# the rest of the run's bookkeeping


def hardware(accelerator):
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{accelerator.num_processes} x {name}"


def digest(tensors):
    """A short hash of some tensors' values (bit-exact comparisons of weights and batches in tests)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def print_samples(out_dir, n, accelerator, max_new_tokens=500, temperature=0.8, top_k=200):
    """n samples from the saved model, loaded with plain transformers (which proves out_dir loads), with
    sample.py's settings and its context cropping, so samples may be longer than block_size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import context_limit, generate_cropped

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(out_dir).to(accelerator.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    idx = torch.tensor([tokenizer.encode("\n", add_special_tokens=False) or [0]], device=model.device)  # (1, t)
    for _ in range(n):
        with accelerator.autocast():
            out = generate_cropped(model, idx, max_new_tokens, context_limit(model), do_sample=True,
                                   temperature=temperature, top_k=top_k, pad_token_id=model.config.eos_token_id)
        print(tokenizer.decode(out[0].tolist()))
        print("---------------")


def init_trackers(accelerator, cfg):
    if cfg.report_to == "none":
        return
    import importlib.util

    if importlib.util.find_spec(cfg.report_to) is None:
        raise ValueError(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed "
                         f"(pip install {cfg.report_to})")
    init_kwargs = {"wandb": {"name": cfg.run_name}} if cfg.run_name and cfg.report_to == "wandb" else {}
    accelerator.init_trackers(cfg.project_name, config=cfg.to_dict(), init_kwargs=init_kwargs)


# -----------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says; returns the results (also in out_dir/results.json). Raises checkpoint.Interrupted
    (exit_code 128 + signal) after the checkpoint that a SIGINT, SIGTERM or SIGUSR1 asked for."""
    with ckpt.StopSignals() as stop, ckpt.OutDirLock(cfg.out_dir) as lock:
        return _train(cfg, stop, lock)


def _train(cfg, stop, lock):
    t_start = time.time()
    # -------------------------------------------------------------------------
    # setup: accelerator, seeds
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
    master = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # what `accelerate launch --config_file` asked for (it exports these to every process)
    wants = next((kind for kind in ("FSDP", "DEEPSPEED")
                  if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() in ("1", "true")), None)
    if launched != world or (wants and accelerator.distributed_type.name != wants):
        # e.g. `accelerate launch --config_file accelerate_configs/fsdp.yaml` without GPUs: accelerate >= 1.13 sets
        # each of the N processes up alone (all N would train the same thing and write the same out_dir); older
        # ones run plain CPU DDP, silently without FSDP
        raise ValueError(f"launched as {launched} processes{' with ' + wants if wants else ''} but Accelerate set up "
                         f"{world} ({accelerator.distributed_type.value}): FSDP, DeepSpeed and multi-GPU configs need "
                         "GPUs; on CPU use --config_file accelerate_configs/cpu.yaml or torchrun")
    print0 = tqdm.write if master else (lambda *a, **k: None)
    out_dir, accum = Path(cfg.out_dir), cfg.gradient_accumulation_steps
    set_seed(cfg.seed, device_specific=True)  # seed + rank: each rank its own dropout (DDP broadcasts rank 0's weights)
    if cfg.push_to_hub:  # on every rank: an error on one rank alone would leave the others waiting for it
        from huggingface_hub import get_token

        if not get_token():
            raise ValueError("--push_to_hub: not logged in to the Hub; run `hf auth login` or set HF_TOKEN")
    print0(f"{accelerator.distributed_type.value}: {world} process(es), device {accelerator.device}, "
           f"mixed precision {accelerator.mixed_precision}")

    # -------------------------------------------------------------------------
    # data
    with accelerator.main_process_first():  # hf://datasets/... downloads once, the other ranks use the cache
        from .hub import resolve_data_dir

        data_dir = resolve_data_dir(cfg.data_dir)
    train_data, val_data = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    tokenizer = None
    try:
        from .data import load_tokenizer

        tokenizer = load_tokenizer(data_dir)
        tokenizer.model_max_length = cfg.block_size
    except (OSError, ValueError) as e:
        print0(f"warning: {e}; {out_dir} will have no tokenizer")
    tokenizer_hash = ckpt.tokenizer_hash(tokenizer)
    for data, n in ((train_data, accum * world), (val_data, world)):  # too little data for these sizes: fail now
        data.sample_starts(cfg.batch_size, cfg.block_size, 0, world_size=n)
    tokens_per_iter = accum * world * cfg.batch_size * cfg.block_size
    print0(f"tokens per iteration will be: {tokens_per_iter:,} ({accum} grad accum steps x {world} processes x "
           f"{cfg.batch_size} batch size x {cfg.block_size} block size)")

    # -------------------------------------------------------------------------
    # model: new, pretrained, or resumed from the newest checkpoint
    error = None
    if master:  # one run per out_dir; then what a killed run left half-written goes
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = f"--out_dir {out_dir}: cannot create it ({ckpt.write_error(e)})"
        error = error or lock.acquire()
        if error is None:
            ckpt.remove_unfinished_writes(out_dir)
    ckpt.agree(accelerator, error)
    ckpt_dir = state = None
    if cfg.init_from == "resume":  # the newest checkpoint whose files match its manifest
        ckpt_dir, state = ckpt.load_latest(out_dir / "checkpoints", log=print0)
        if ckpt_dir is None:
            raise ValueError(f"--init_from resume: no complete checkpoint in {out_dir / 'checkpoints'}; start the run "
                             "with --init_from scratch (or a pretrained model)")
        check_resumable(state, cfg, train_data, ckpt_dir, tokenizer_hash)
        print0(f"resuming training from {ckpt_dir} (iter {state['iter']})")
    lora_base = base_source(cfg, state) if cfg.lora_r else None  # LoRA checkpoints hold adapters, not the base
    if lora_base is not None:
        model = build_model(dataclasses.replace(cfg, init_from=lora_base), train_data, log=print0)
    else:
        model = build_model(cfg, train_data, resume_dir=ckpt_dir, log=print0)
    if ckpt_dir is None and cfg.init_from != "scratch":
        ckpt.check_same_tokenizer(cfg.init_from, tokenizer, f"--init_from {cfg.init_from}", data_dir)
    # what generate() and pipeline() use from out_dir: nanoGPT's sample.py settings; with learned positions a
    # sequence can't outgrow block_size, so generation stops there
    length = dict(max_length=model.config.block_size) if model.config.position_embedding == "learned" else \
        dict(max_new_tokens=500)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.8, top_k=200, **length,
                                               eos_token_id=model.config.eos_token_id,
                                               pad_token_id=model.config.eos_token_id)
    if cfg.gradient_checkpointing:  # the new name (transformers >= 5.x) or the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.lora_r:  # PEFT adapters on the projections; only they train (nanogpt_hf/lora.py)
        from .lora import apply_lora

        model = apply_lora(model, cfg, lora_base, resume_dir=ckpt_dir, verbose=master)
    raw_model = model
    print0(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    ckpt.agree(accelerator, ckpt.check_room(out_dir, model.get_num_params(non_embedding=False)) if master else None)

    # -------------------------------------------------------------------------
    # optimizer, and everything through accelerator.prepare (DDP / FSDP / DeepSpeed wrapping, device, autocast)
    if cfg.optimizer == "muon" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("--optimizer muon does not work with DeepSpeed, whose ZeRO hands the optimizer flat 1-D "
                         "partitions instead of the weight matrices that Muon orthogonalizes: use DDP (multi_gpu.yaml)")
    optimizer = build_optimizer(model, cfg, accelerator.device.type, verbose=master)
    scales = lr_scales(optimizer, cfg)  # each param group's peak lr / learning_rate, from this run's config
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants a micro-batch size; we have no DataLoader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    init_trackers(accelerator, cfg)

    it, best_val, history, tokens_seen, train_time, wall_before = 0, float("inf"), [], 0, 0.0, 0.0
    results, skipped = {}, 0
    if state is not None:
        ckpt.load(accelerator, optimizer, ckpt_dir)  # optimizer, grad scaler, RNG: after model init
        it, best_val, history = state["iter"], state["best_val_loss"], state["history"]
        tokens_seen, train_time, wall_before = state["tokens_seen"], state["train_time_s"], state["wall_time_s"]
        results, skipped = state.get("results", {}), state.get("skipped_updates", 0)
    saved_at, saved_time = (it if state is not None else None), time.time()  # the newest checkpoint's iter
    pusher = last_push = None
    if cfg.push_to_hub and master:
        from .hub import BackgroundPusher

        pusher, last_push = BackgroundPusher(out_dir, cfg.hub_model_id, private=cfg.hub_private), it
    dump = None
    if cfg.debug_dump_dir:
        Path(cfg.debug_dump_dir).mkdir(parents=True, exist_ok=True)
        dump = open(Path(cfg.debug_dump_dir) / f"rank{rank}.jsonl", "a")

    def run_state():
        return {"iter": it, "best_val_loss": best_val, "history": history, "tokens_seen": tokens_seen,
                "train_time_s": train_time, "wall_time_s": wall_before + time.time() - t_start,
                "config": cfg.to_dict(), "data_vocab_size": train_data.vocab_size, "world_size": world,
                "results": results, "skipped_updates": skipped, "tokenizer_hash": tokenizer_hash,
                "lora_base": lora_base}

    # -------------------------------------------------------------------------
    # the loop
    model.train()
    bar = tqdm(total=cfg.max_iters, initial=it, desc="training", dynamic_ncols=True,
               disable=None if master else True)  # None: only on a terminal, not in log files
    loss_mean = norm = None
    clipped = torch.zeros((), device=accelerator.device)  # clip events since the last log line (no sync)
    log_t, log_iters, log_tokens, running_mfu = time.time(), 0, 0, -1.0
    stopping = time_due = False  # a stop signal reached a rank / checkpoint_minutes passed (agreed by all ranks)
    while True:
        # evaluate the loss on train/val, save the best model if val improved, write a checkpoint whatever val did
        # (every eval_interval and at the end; not again at an iteration whose evaluation a checkpoint holds)
        evaluated = bool(history) and history[-1]["iter"] == it
        evaluate = (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (not evaluated or cfg.eval_only) \
            and not stopping
        if evaluate:
            t_eval = time.time()
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, cfg, accelerator, stop)
            stopping = losses is None  # a stop signal came during the evaluation
        if evaluate and not stopping:
            print0(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            accelerator.log({"train/eval_loss": losses["train"], "val/loss": losses["val"]}, step=it)
            if cfg.eval_only:
                bar.close()
                accelerator.end_training()
                return {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
            if not math.isfinite(losses["val"]):
                raise FloatingPointError(f"the val loss is {losses['val']} at iter {it}: the weights are broken; "
                                         f"{ckpt.describe_newest(out_dir)}")
            history.append({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]})
            improved = losses["val"] < best_val
            if it == 0:  # the untrained model: the val loss a best model must beat
                best_val = losses["val"]
            elif improved:
                best_val = losses["val"]
                results = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                           "tokens_seen": tokens_seen, "wall_time_s": round(wall_before + time.time() - t_start, 1),
                           "train_time_s": round(train_time, 1), "hardware": hardware(accelerator),
                           "num_params": raw_model.get_num_params(non_embedding=False),
                           "dataset": train_data.meta.get("dataset"), "world_size": world,
                           "mixed_precision": accelerator.mixed_precision, "nanogpt_hf_version": __version__}
                save_model_dir(accelerator, model, tokenizer, cfg, results, history)
                print0(f"saved the best model so far (val loss {best_val:.4f}) to {out_dir}")
            check_skipped(skipped, it, cfg, out_dir)
            if it > 0 and saved_at != it:
                path = ckpt.save(accelerator, model, optimizer, out_dir, run_state(), keep=cfg.keep_checkpoints)
                saved_at, saved_time = it, time.time()
                print0(f"saved checkpoint {path}")
            if pusher is not None and improved and it and cfg.push_interval and it - last_push >= cfg.push_interval:
                pusher.push(f"nanogpt_hf: iter {it}, val loss {best_val:.4f}")
                last_push = it
            log_t += time.time() - t_eval  # evaluation and saving don't count in the iteration times
        # the latest resumable state between evaluations (checkpoint_interval, checkpoint_minutes), and on a stop
        # signal, after which the run ends
        interval_due = cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0
        if it > 0 and saved_at != it and (stopping or time_due or interval_due):
            t_save = time.time()
            path = ckpt.save(accelerator, model, optimizer, out_dir, run_state(), keep=cfg.keep_checkpoints)
            saved_at, saved_time, time_due = it, time.time(), False
            print0(f"saved checkpoint {path}")
            log_t += time.time() - t_save
        if stopping:
            bar.close()
            raise stop.interrupted(find_checkpoint(out_dir / "checkpoints"), it)
        if it >= cfg.max_iters:
            break

        # one iteration: forward/backward over the micro-steps (gradients synced on the last), one update
        t0 = time.time()
        lr = get_lr(it, cfg)
        set_lr(optimizer, lr, scales)  # every param group on the one schedule, scaled to its own peak
        B = get_batch_size(it, cfg)
        loss_sum, batches = torch.zeros((), device=accelerator.device), []
        for micro_step in range(accum):
            # the iteration's global batch is one draw of accum * world * B windows keyed by (seed, it); this
            # rank's micro-step takes slice number micro_step * world + rank: different data on every rank,
            # and the same global batch however it is split into processes and micro-steps
            x, y = train_data.get_batch(B, cfg.block_size, it, seed=cfg.seed, rank=micro_step * world + rank,
                                        world_size=accum * world, device=accelerator.device)
            if cfg.compile and cfg.batch_size_warmup_iters:  # the ramp changes B: one graph, dynamic in B
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(y, 0)
            with accelerator.accumulate(model):  # no gradient all-reduce until the last micro-step
                loss = model(x, shift_labels=y).loss
                accelerator.backward(loss)  # scaled by 1/accum (and by the fp16 loss scale)
            loss_sum += loss.detach()
            if dump is not None:
                batches.append(x)
        loss_mean = loss_sum / accum  # the true mean over the micro-steps
        # clip (unscaling fp16 gradients first); grad_clip 0 still measures the norm
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if norm is not None and cfg.grad_clip:
            clipped += norm > cfg.grad_clip
        # the one sync per iteration: before the update we must know whether the loss is finite; with it, whether
        # a stop signal reached any rank or checkpoint_minutes passed, so that every rank stops/saves at this one
        finite = torch.isfinite(loss_mean)
        if norm is not None and accelerator.scaler is None:  # with fp16, inf gradients are the scaler's business
            finite &= torch.isfinite(torch.as_tensor(norm))
        time_due = bool(cfg.checkpoint_minutes) and time.time() - saved_time >= 60 * cfg.checkpoint_minutes
        if world > 1:
            stopping, bad, time_due = stop.agreed(accelerator, ~finite, time_due)
            finite = torch.tensor(not bad)
        else:
            stopping = stop.requested
        if not finite.item():
            if cfg.nan_policy == "stop":
                raise FloatingPointError(
                    f"loss is {loss_mean.item()} at iter {it}: stopped before updating the weights (lower "
                    f"--learning_rate, or pass --nan_policy skip); {ckpt.describe_newest(out_dir)}")
            skipped += 1
            print0(f"iter {it}: loss {loss_mean.item()}, update skipped (--nan_policy skip, {skipped} so far)")
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # lowers the fp16 loss scale; also resets the scaler for the next step
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dump is not None:  # tests: which data this rank saw and what its weights are now
            dump.write(json.dumps({"iter": it, "loss": loss_mean.item(), "batch": digest(batches),
                                   "weights": digest(raw_model.parameters())}) + "\n")
            dump.flush()
        it += 1
        iter_tokens = B * cfg.block_size * accum * world
        tokens_seen, log_iters, log_tokens = tokens_seen + iter_tokens, log_iters + 1, log_tokens + iter_tokens
        bar.update(1)

        # logging: .item() only here, it waits for the device (a sync point)
        if (it - 1) % cfg.log_interval == 0 or it == cfg.max_iters:
            elapsed = time.time() - log_t  # since the last log line, evaluation time left out
            lossf = accelerator.reduce(loss_mean, reduction="mean").item()
            mfu = raw_model.estimate_mfu(B * accum, elapsed / log_iters) if it > 5 else None  # after warm-up
            if mfu is not None:
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            normf, nclipped = (norm.item() if norm is not None else float("nan")), int(clipped.item())
            mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"  # n/a: CPU, unknown GPU
            print0(f"iter {it - 1}: loss {lossf:.4f}, lr {lr:.2e}, time {elapsed / log_iters * 1000:.2f}ms, "
                   f"{log_tokens / elapsed:,.0f} tok/s, mfu {mfu_text}, grad norm {normf:.3f} "
                   f"(clipped {nclipped}/{log_iters})")
            accelerator.log({"train/loss": lossf, "lr": lr, "grad_norm": normf, "clipped": nclipped,
                             "tokens_per_s": log_tokens / elapsed}, step=it - 1)
            bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
            log_t, log_iters, log_tokens = time.time(), 0, 0
            clipped.zero_()
        train_time += time.time() - t0  # training and logging; evaluation and saving don't count
    bar.close()

    # -------------------------------------------------------------------------
    # the end: final numbers into out_dir, the last push, samples
    final = history[-1] if history else {}
    results.update(final_iter=it, final_train_loss=final.get("train_loss"), final_val_loss=final.get("val_loss"),
                   total_tokens=tokens_seen, total_wall_time_s=round(wall_before + time.time() - t_start, 1),
                   total_train_time_s=round(train_time, 1), skipped_updates=skipped,
                   ms_per_iter=round(1000 * train_time / max(it, 1), 2),
                   tokens_per_s=round(tokens_seen / train_time) if train_time else None)
    if results.get("iter") is None:
        raise FloatingPointError(f"no evaluation beat the untrained model's val loss {best_val:.4f} (iter 0), so "
                                 f"{out_dir} has no best model (train longer, or lower --learning_rate); "
                                 f"{ckpt.describe_newest(out_dir)}")
    save_model_dir(accelerator, None, None, cfg, results, history)  # results, curve, card; the weights stay the best
    if master:
        print0(f"best val loss {best_val:.4f} at iter {results['iter']}; {results['ms_per_iter']:.2f} ms/iter, "
               f"{results['tokens_per_s'] or 0:,} tokens/s (evaluation excluded); {out_dir} is ready")
    if dump is not None:
        dump.close()
    if pusher is not None:
        for attempt in range(2):  # a failed push was logged; try the final state once more
            pusher.push(f"nanogpt_hf: final model (best val loss {best_val:.4f} at iter {results.get('iter')})")
            if pusher.wait(timeout=600):
                break
    if master and cfg.sample_at_end:
        print_samples(out_dir, cfg.sample_at_end, accelerator)
    accelerator.wait_for_everyone()
    # the DDP wrapper goes first: its Reducer holds the process group, and freed only after end_training had
    # destroyed the group, its gloo destructor deadlocked at exit (seen in a 2-process CPU run, accelerate 1.6)
    del model
    accelerator.free_memory()
    accelerator.end_training()  # trackers closed; in a distributed run, the process group too
    return results


__all__ = ["train", "get_lr", "get_batch_size", "estimate_loss", "build_model", "find_checkpoint"]
