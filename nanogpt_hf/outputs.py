"""
What a training run leaves in out_dir besides its checkpoints: the best model so far as a Hugging Face model
dir, the run's files, the model card; and the samples printed at the end.

    out_dir/model.safetensors config.json *.py generation_config.json tokenizer*   save_model_dir (the best model)
    out_dir/train_config.json results.json loss_curve.png                           write_run_files
    out_dir/README.md                                                               card.write_model_card

Everything goes into out_dir/.tmp_best first and is moved in file by file (weights first), so out_dir never
holds half a model: a reader sees the old best model or the new one.
"""

import json
import os
import platform
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import __version__
from .checkpoint import CheckpointWriteError, apply_umask, describe_newest, full_state_dict, quiet_progress, saving
from .evaluation import context_limit, generate_cropped
from .guards import agree
from .card import write_model_card
from .lora import save_model_files

# -----------------------------------------------------------------------------
# the model dir


def generation_config(config):
    """What generate() and pipeline() use from out_dir: nanoGPT's sample.py settings (500 new tokens at
    temperature 0.8 from the top 200). No max_length: together with a caller's max_new_tokens it made every
    generate() warn, and the model's generate() keeps a learned-position model inside its block_size itself."""
    return GenerationConfig(do_sample=True, temperature=0.8, top_k=200, max_new_tokens=500,
                            eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id)


def plot_loss_curve(history, path):
    from matplotlib.figure import Figure  # here: importing matplotlib costs ~1 s, only worth it when plotting

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
    apply_umask(tmp)  # files only: a LoRA run's adapter/ folder must stay traversable
    for path in sorted(tmp.iterdir(), key=lambda p: (p.suffix != ".safetensors", p.name)):
        if path.is_dir():  # a LoRA run's adapter/: os.replace can't overwrite a non-empty folder
            shutil.rmtree(out_dir / path.name, ignore_errors=True)
        os.replace(path, out_dir / path.name)
    tmp.rmdir()
    write_model_card(out_dir)


def save_model_dir(accelerator, model, tokenizer, cfg, results, history):
    """The best model so far -> out_dir, via out_dir/.tmp_best so that out_dir never holds half a model; with
    model None only the run files (results, curve, card). Call on every rank: a failed write (full disk) raises
    CheckpointWriteError on all of them."""
    state_dict = full_state_dict(accelerator, model) if model is not None else None
    errors, tmp = [], Path(cfg.out_dir) / ".tmp_best"
    if accelerator.is_main_process:
        with saving(tmp, errors):
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
                          f"{describe_newest(cfg.out_dir)} after freeing space)")
    agree(accelerator, errors[0] if errors else None, CheckpointWriteError)


# -----------------------------------------------------------------------------
# results.json: the best model's numbers, then the whole run's


def hardware(accelerator):
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{accelerator.num_processes} x {name}"


def best_results(state, losses, accelerator, model, dataset):
    """results.json for a new best model: this evaluation's losses and how far the run (a trainer.RunState) got."""
    return {"iter": state.iter, "train_loss": losses["train"], "val_loss": losses["val"],
            "tokens_seen": state.tokens_seen, "wall_time_s": round(state.wall_time_s, 1),
            "train_time_s": round(state.train_time_s, 1), "hardware": hardware(accelerator),
            "num_params": model.get_num_params(non_embedding=False), "dataset": dataset,
            "world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "nanogpt_hf_version": __version__}


def final_results(state, out_dir):
    """The best model's results plus the whole run's numbers (final_* and total_*), at the end of training; a
    FloatingPointError when no evaluation made a best model."""
    if state.results.get("iter") is None:
        raise FloatingPointError(f"no evaluation beat the untrained model's val loss {state.best_val_loss:.4f} "
                                 f"(iter 0), so {out_dir} has no best model (train longer, or lower --learning_rate)")
    final = state.history[-1] if state.history else {}
    train_time = state.train_time_s
    return {**state.results, "final_iter": state.iter, "final_train_loss": final.get("train_loss"),
            "final_val_loss": final.get("val_loss"), "total_tokens": state.tokens_seen,
            "total_wall_time_s": round(state.wall_time_s, 1), "total_train_time_s": round(train_time, 1),
            "skipped_updates": state.skipped_updates, "ms_per_iter": round(1000 * train_time / max(state.iter, 1), 2),
            "tokens_per_s": round(state.tokens_seen / train_time) if train_time else None}


# -----------------------------------------------------------------------------
# samples


class OnStopSignal(StoppingCriteria):
    """generate() stops at the next token once a stop signal came (StopSignals.requested)."""

    def __init__(self, stop):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.stop.requested, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def print_samples(out_dir, n, accelerator, max_new_tokens=500, temperature=0.8, top_k=200, stop=None):
    """n samples from the saved model, loaded with plain transformers (which proves out_dir loads), with
    sample.py's settings and its context cropping, so samples may be longer than block_size. stop: the run's
    StopSignals; a signal ends the sampling within a token (the run's checkpoint is already written)."""
    halt = StoppingCriteriaList([OnStopSignal(stop)] if stop is not None else [])
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(out_dir).to(accelerator.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    idx = torch.tensor([tokenizer.encode("\n", add_special_tokens=False) or [0]], device=model.device)  # (1, t)
    for _ in range(n):
        if stop is not None and stop.requested:
            return
        with accelerator.autocast():
            out = generate_cropped(model, idx, max_new_tokens, context_limit(model), do_sample=True,
                                   temperature=temperature, top_k=top_k, pad_token_id=model.config.eos_token_id,
                                   stopping_criteria=halt)
        print(tokenizer.decode(out[0].tolist()))
        print("---------------")


__all__ = ["generation_config", "plot_loss_curve", "write_run_files", "move_into", "save_model_dir", "hardware",
           "best_results", "final_results", "print_samples"]
