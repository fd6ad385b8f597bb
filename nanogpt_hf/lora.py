"""
LoRA finetuning through PEFT: `--lora_r N` (with --lora_alpha, --lora_dropout, --lora_target_modules) trains
low-rank adapters on the attention and MLP projections of a pretrained model and freezes everything else.

    python examples/train.py examples/configs/finetune_shakespeare_lora.yaml    # gpt2-xl, adapters only

What a LoRA run leaves:
    out_dir/            the merged model (W + alpha/r * B @ A): a normal model dir, loadable without PEFT
    out_dir/adapter/    the adapter alone: AutoPeftModelForCausalLM.from_pretrained("out_dir/adapter") loads it
                        on its base (adapter_config.json's base_model_name_or_path: the --init_from model)
    checkpoints/step_N/ the adapter weights, the optimizer (of the adapters only), RNG: no base weights. Resume
                        rebuilds the base from trainer_state.json's lora_base and loads the adapter onto it.

The adapter sits in a subfolder so that out_dir itself stays a plain model dir (transformers would otherwise find
adapter_config.json there and stack the adapter on top of the merged weights). register_with_peft() (the trainer
calls it) registers our model_type's default target modules with PEFT, so that `get_peft_model(model,
LoraConfig(r=8))` needs no target_modules. (This module imports PEFT only when LoRA is used.)
"""

import os
import re

from safetensors.torch import load_file

DEFAULT_TARGET_MODULES = ("c_attn", "c_proj", "c_fc")  # attention qkv + output, MLP in + out (PEFT: suffixes)
ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("--lora_r needs PEFT: pip install peft (or pip install -e \".[lora]\")") from None
    return peft


def register_with_peft():
    """PEFT picks a model's default LoRA targets from this mapping, by model_type (its only hook for it)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    mapping.setdefault("nanogpt", list(DEFAULT_TARGET_MODULES))


def target_modules(cfg):
    return [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()] or list(DEFAULT_TARGET_MODULES)


def check_config(cfg):
    """One-line errors for settings LoRA can't work with (called from TrainConfig)."""
    if cfg.lora_r < 0 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora_r must be >= 0, --lora_alpha > 0 and --lora_dropout in [0, 1); got "
                         f"{cfg.lora_r}, {cfg.lora_alpha}, {cfg.lora_dropout}")
    if not cfg.lora_r:
        return
    if cfg.init_from == "scratch":
        raise ValueError("--lora_r adapts a pretrained model: pass --init_from gpt2* / a model dir / a Hub id")
    if cfg.optimizer != "adamw":
        raise ValueError("--lora_r works with --optimizer adamw only (Muon would orthogonalize the rank-r factors)")
    bad = [m for m in target_modules(cfg) if not re.fullmatch(r"[\w.]+", m)]
    if bad:
        raise ValueError(f"--lora_target_modules: {bad} are not module names (comma-separated, e.g. c_attn,c_fc)")


def base_source(cfg):
    """What the adapters sit on: --init_from, a local path made absolute (the trainer keeps it in every checkpoint,
    and a resumed run takes it from there)."""
    return os.path.abspath(os.path.expanduser(cfg.init_from)) if os.path.exists(os.path.expanduser(cfg.init_from)) \
        else cfg.init_from


def apply_lora(model, cfg, base, resume_dir=None, log=print):
    """model -> PeftModel with fresh adapters (only they train), or the adapters of the checkpoint resume_dir."""
    peft = _peft()
    register_with_peft()
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=target_modules(cfg), bias="none", task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches
        raise ValueError(f"--lora_target_modules {cfg.lora_target_modules}: {str(e).splitlines()[0]}") from None
    model.peft_config["default"].base_model_name_or_path = base  # PEFT takes the model's name_or_path (None here)
    if resume_dir is not None:
        result = peft.set_peft_model_state_dict(model, load_file(resume_dir / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{resume_dir}: adapter weights don't fit (unexpected {result.unexpected_keys})")
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {', '.join(target_modules(cfg))}: {trainable:,} "
        f"trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def is_lora(model):
    return hasattr(model, "peft_config")


def merged_state_dict(state_dict, model):
    """The full state dict of a PeftModel (any rank's gathered copy) -> the plain model's, with every adapter
    folded into its weight: W + lora_alpha / r * B @ A. Pure tensor math, so it works on FSDP/DeepSpeed gathers."""
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    prefix = "base_model.model."
    out = {}
    for name, tensor in state_dict.items():
        if ".lora_" in name:
            continue
        plain = name.removeprefix(prefix).replace(".base_layer.", ".")
        if name.endswith(".base_layer.weight"):
            stem = name.removesuffix(".base_layer.weight")
            a, b = state_dict[f"{stem}.lora_A.default.weight"], state_dict[f"{stem}.lora_B.default.weight"]
            tensor = (tensor.float() + scale * (b.float() @ a.float())).to(tensor.dtype)
        out[plain] = tensor
    return out


def save_model_files(model, state_dict, folder):
    """The model dir's weights and config: model.save_pretrained, or for a LoRA model the merged model (a plain
    model dir) + folder/adapter (PEFT's adapter_config.json + adapter_model.safetensors)."""
    if not is_lora(model):
        model.save_pretrained(folder, state_dict=state_dict)
        return
    model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(state_dict, model))
    model.save_pretrained(folder / ADAPTER_DIR, state_dict=state_dict)  # PEFT keeps the adapter keys only


__all__ = ["apply_lora", "base_source", "merged_state_dict", "save_model_files", "register_with_peft", "is_lora",
           "DEFAULT_TARGET_MODULES", "ADAPTER_DIR"]
