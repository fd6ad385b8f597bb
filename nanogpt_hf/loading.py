"""
One model loader, by nanoGPT's init_from names, for train.py (--init_from), eval.py and sample.py (--model).

    model = load_pretrained("gpt2")                    # OpenAI's GPT-2 (gpt2 ... gpt2-xl), as a NanoGPTForCausalLM
    model = load_pretrained("out-shakespeare-char")    # a save_pretrained folder: train.py's out_dir
    model = load_pretrained("you/nanogpt-shakespeare") # a Hub id (owner/name)
    model = load_pretrained("ckpt.pt")                 # a checkpoint of the original nanoGPT
    model, tokenizer = load_model("out-shakespeare-char", device="cuda")   # eval.py / sample.py: + the tokenizer
    model = build_model(cfg, data)                     # train.py: init_from scratch | resume | any of the above

A name that can only be a path (it starts with / . ~, or isn't owner/name nor a GPT-2 size) and is not a folder
is "no such folder" at once, without a trip to the Hub; a Hub id gets one quick request first (hub.check_hub_name),
not a minute of download retries.
"""

import contextlib
import os
import pickle
import sys
import types

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from .chat import CHAT_TOKENS, end_token_id, has_chat_tokens, resize_embeddings
from .configuration_nanogpt import NanoGPTConfig
from .data_format import check_tokenizer_hash
from .guards import check_same_tokenizer, first_line, tokenizer_hash
from .hub import check_hub_name
from .lora import apply_lora
from .modeling_nanogpt import NanoGPTForCausalLM
from .outputs import generation_config
from .tokenization import gpt2_tokenizer
from .train_config import GPT2_MODELS, HUB_ID, looks_like_path, near_folder

# -----------------------------------------------------------------------------
# pretrained models: gpt2*, a folder, a Hub id, a nanoGPT ckpt.pt


def no_such_folder(name, flag):
    """The one-line error for a model folder that isn't there (with the closest folder's name, if one is close)."""
    hub = f"; a Hub id is owner/name, OpenAI's GPT-2 one of {', '.join(GPT2_MODELS)}" if "/" not in name else ""
    return (f"{flag} {name}: no such folder (expected a save_pretrained folder, e.g. a train.py out_dir)"
            f"{near_folder(name)}{hub}")


def _source(name, flag):
    """name -> (what from_pretrained takes, its Hub kwargs): a folder as is; a Hub id (or gpt2*) after one quick
    request, {"local_files_only": True} when the Hub is unreachable but the cache has it."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path, {}
    if name not in GPT2_MODELS and (looks_like_path(name) or not HUB_ID.fullmatch(name)):
        raise FileNotFoundError(no_such_folder(name, flag))
    return name, check_hub_name(name, flag)


# what reading a damaged, truncated, pickled or mismatched weights file raises (RuntimeError: load_state_dict's
# size mismatches; EOFError / UnpicklingError: a truncated or refused pickle, weights_only=True)
# StrictDataclassError: a config.json value NanoGPTConfig's validators refuse (a negative size, a string);
# KeyError: torch.load on a file that is no checkpoint at all (a text file read as a legacy pickle), or a ckpt.pt
# without nanoGPT's keys
WEIGHT_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError,
                 StrictDataclassError)


@contextlib.contextmanager
def reading_weights(name, flag, source=None):
    """Every model file is read inside this: what a bad file raises becomes one ValueError naming the flag and the
    path (and what was wrong), instead of a library's traceback."""
    try:
        yield
    except WEIGHT_ERRORS as e:
        raise _cannot_load(str(name), flag, source or str(name), e) from None


def check_model_config(config, where):
    """A model config's sizes: whole numbers >= 1 (a hand-edited config.json with a negative size fails here, in
    one line, not in torch), and weights that fit in this machine's memory (a million layers are refused before
    allocating them)."""
    sizes = {k: getattr(config, k, None) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size",
                                                    "num_hidden_layers", "hidden_size", "num_attention_heads")}
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    layers = sizes["n_layer"] or sizes["num_hidden_layers"] or 0
    width = sizes["n_embd"] or sizes["hidden_size"] or 0
    params = 12 * layers * width ** 2 + (sizes["vocab_size"] or 0) * width  # GPT-2's count, embeddings included
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and params * 4 > memory:
        raise ValueError(f"{where}: {layers} layers of width {width} are ~{params / 1e9:.1f}B parameters, "
                         f"{params * 4 / 2**30:.0f} GiB in float32: more than this machine's {memory / 2**30:.0f} GiB "
                         "of memory")


def _load(name, flag, nanogpt, trust_remote_code, config):
    """(model, source, hub kwargs); see load_pretrained."""
    name = str(name)
    if name.endswith(".pt"):  # a checkpoint of the original nanoGPT (weights_only: no pickled code runs)
        if not os.path.isfile(os.path.expanduser(name)):
            raise FileNotFoundError(f"{flag} {name}: no such file (expected a nanoGPT ckpt.pt)")
        with reading_weights(name, flag):
            return NanoGPTForCausalLM.from_nanogpt_checkpoint(os.path.expanduser(name), **config), name, {}
    source, hub = _source(name, flag)
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, TypeError, StrictDataclassError) as e:  # a config.json that isn't one
        raise _cannot_load(name, flag, source, e) from None
    model_type = model_config.model_type
    if nanogpt and model_type not in ("nanogpt", "gpt2"):
        raise ValueError(f"{flag} {name} is a {model_type!r} model; nanogpt or gpt2 expected")
    check_model_config(model_config, f"{flag} {name}")
    with reading_weights(name, flag, source):
        if name in GPT2_MODELS or (nanogpt and model_type == "gpt2"):  # GPT-2 weights converted, as nanoGPT does
            model = NanoGPTForCausalLM.from_gpt2(GPT2LMHeadModel.from_pretrained(source, **hub), **config)
        else:  # our model type loads with our code (registered with the Auto classes), others as they are
            model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **config, **hub)
    return model, source, hub


def _cannot_load(name, flag, source, e):
    if name in GPT2_MODELS:
        return ValueError(f"{flag} {name}: cannot download OpenAI's GPT-2 weights ({first_line(e)}); this needs the "
                          "network once, or a Hugging Face cache that holds them")
    if os.path.isfile(os.path.join(source, "meta.json")) and not os.path.isfile(os.path.join(source, "config.json")):
        return ValueError(f"{flag} {name} is a prepared dataset (a data_dir: meta.json, shards), not a model; "
                          "pass a train.py out_dir")
    hint = " (pass --trust_remote_code if you trust its code)" if "trust_remote_code" in str(e) else ""
    where = "folder" if os.path.isdir(source) else "file" if os.path.isfile(source) else "Hub model"
    return ValueError(f"{flag} {name}: could not load it as a {where} ({first_line(e)}){hint}")


def load_pretrained(name, flag="--init_from", nanogpt=True, trust_remote_code=False, **config):
    """A pretrained model by name: one of OpenAI's GPT-2 sizes (gpt2 ... gpt2-xl: its weights converted to
    NanoGPTForCausalLM, as nanoGPT's init_from='gpt2*'), a save_pretrained folder, a Hub id, or a nanoGPT ckpt.pt.

    nanogpt=True (training): the result is a NanoGPTForCausalLM; other GPT-2 models are converted too, any other
    model type is refused. nanogpt=False (eval, sample): other causal LMs load as they are. config: overrides of the
    model config (dropout). Errors are one line naming flag."""
    return _load(name, flag, nanogpt, trust_remote_code, config)[0]


def load_model(name, device="cpu", trust_remote_code=False, flag="--model"):
    """eval.py's and sample.py's --model -> (model in eval mode on device, its tokenizer)."""
    name = str(name)
    if name.endswith(".pt"):
        raise ValueError(f"{flag} {name}: a nanoGPT ckpt.pt has no tokenizer; make it a model folder first "
                         f"(examples/train.py --init_from {name} on data prepared with its tokenizer)")
    model, source, hub = _load(name, flag, False, trust_remote_code, {})
    if name in GPT2_MODELS:
        tokenizer = gpt2_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {name}: no usable tokenizer saved with the model ({first_line(e)}); "
                             "save one next to it with tokenizer.save_pretrained") from None
    # train.py records the hash of the tokenizer it trained with in config.json
    recorded = getattr(model.config, "tokenizer_hash", None)
    check_tokenizer_hash(tokenizer, recorded, f"{flag} {name}: the tokenizer in {source} is not the one the model "
                         "was trained with", f"{source}/config.json", "restore its tokenizer files")
    if recorded is None and os.path.isfile(os.path.join(source, "train_config.json")):  # a train.py out_dir
        print(f"note: {flag} {name} records no tokenizer hash (trained before it was recorded); its tokenizer is "
              "not checked", file=sys.stderr)
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------
# the model train() trains


def new_model(cfg, data, log=print):
    """init_from scratch: a model of cfg's shape, its vocab the data's (rounded up to cfg.vocab_multiple)."""
    vocab_size = -(-data.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple  # round up
    check_model_config(types.SimpleNamespace(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size),
                       "--n_layer/--n_embd")
    log(f"found vocab_size = {data.vocab_size} (inside {data.data_dir / 'meta.json'})"
        + (f", model vocab_size {vocab_size}" if vocab_size != data.vocab_size else ""))
    return NanoGPTForCausalLM(NanoGPTConfig(
        vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        dropout=cfg.dropout, bias=cfg.bias, position_embedding=cfg.position_embedding,
        activation_function=cfg.activation_function, eos_token_id=data.eot_token_id))


def checkpoint_model(ckpt_dir, **config):
    """The weights of one of our checkpoints (checkpoint.py), on the model config saved with them."""
    with reading_weights(ckpt_dir / "model.safetensors", "--init_from resume"):
        model_config = NanoGPTConfig.from_pretrained(ckpt_dir, **config)
        check_model_config(model_config, f"checkpoint {ckpt_dir}")
        model = NanoGPTForCausalLM(model_config)
        missing, unexpected = model.load_state_dict(load_file(ckpt_dir / "model.safetensors"), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte and saved once
        raise ValueError(f"{ckpt_dir}: weights don't fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model


def build_model(cfg, data, resume_dir=None, lora_base=None, tokenizer=None, log=print):
    """The model train() trains, as cfg.init_from says: a new one (scratch), the weights of the checkpoint
    resume_dir (resume), or a pretrained one (load_pretrained), cropped to cfg.block_size (nanoGPT's model
    surgery), with cfg.dropout, out_dir's generation settings, gradient checkpointing and LoRA adapters as cfg asks.

    data: the TokenShards it trains on (the vocab must fit); tokenizer: the data's, which a pretrained model folder's
    must equal; lora_base: where a LoRA run's base model comes from (its checkpoints hold only the adapters)."""
    dropout = dict(dropout=cfg.dropout)  # the one architecture setting a run may change on a loaded model
    init_from = lora_base or cfg.init_from
    if resume_dir is not None and lora_base is None:
        model = checkpoint_model(resume_dir, **dropout)
    elif init_from == "scratch":
        model = new_model(cfg, data, log)
    else:
        log(f"initializing from weights: {init_from}")
        model = load_pretrained(init_from, "--init_from", **dropout)
    if cfg.block_size < model.config.block_size:  # model surgery, e.g. GPT-2's 1024 down to 256
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size and model.config.position_embedding == "learned":
        raise ValueError(f"--block_size {cfg.block_size} is larger than the {model.config.block_size} positions "
                         f"of the model from --init_from {init_from}")
    grow = data.vocab_size - model.config.vocab_size
    if (resume_dir is None or lora_base) and init_from != "scratch" and data.masked and 0 < grow <= len(CHAT_TOKENS):
        # SFT data adds the chat tokens to the base model's tokenizer: new embedding rows (the mean embedding; a
        # LoRA resume grows its base the same way again)
        log(f"added {resize_embeddings(model, data.vocab_size)} token embeddings for the data's new tokens")
    data.check_vocab(model.config.vocab_size)
    if resume_dir is None and cfg.init_from != "scratch":
        check_same_tokenizer(init_from, tokenizer, f"--init_from {cfg.init_from}", data.data_dir)
    if tokenizer is not None:  # saved in config.json: sample/eval/chat refuse other tokenizer files (load_model)
        model.config.tokenizer_hash = tokenizer_hash(tokenizer)
    if tokenizer is not None and has_chat_tokens(tokenizer):  # a chat model's answer ends at <|end|>
        model.config.eos_token_id = end_token_id(tokenizer)
    model.generation_config = generation_config(model.config)  # on the base model: a LoRA run saves it merged
    if cfg.gradient_checkpointing:  # the new name (transformers >= 5.x) or the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.lora_r:  # PEFT adapters on the projections; only they train (lora.py)
        model = apply_lora(model, cfg, lora_base, resume_dir=resume_dir, log=log)
    return model


__all__ = ["load_pretrained", "reading_weights", "check_model_config", "load_model", "build_model", "new_model",
           "checkpoint_model", "no_such_folder"]
