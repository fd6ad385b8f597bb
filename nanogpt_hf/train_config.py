"""
TrainConfig: every knob of a training run, as one typed dataclass (nanoGPT's names and defaults).

Precedence: the defaults below < an optional YAML file < command-line flags. No exec, no globals:

    python examples/train.py examples/configs/shakespeare_char_cpu.yaml --max_iters=500 --compile false

    from nanogpt_hf.train_config import TrainConfig, parse_config
    cfg = parse_config(["examples/configs/shakespeare_char_cpu.yaml", "--batch_size", "8"])
    cfg = TrainConfig(data_dir="data/shakespeare_char", n_layer=4)

Unknown keys and values of the wrong type are errors that name the key and where it came from.
The defaults are nanoGPT's train.py: GPT-2 small (124M) on OpenWebText, ~0.5M tokens per iteration.
"""

import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .configuration_nanogpt import POSITION_EMBEDDINGS
from .lora import check_config as check_lora_config

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
CHOICES = {
    "mixed_precision": (None, "no", "fp16", "bf16", "auto"),
    "report_to": ("none", "tensorboard", "wandb"),
    "nan_policy": ("stop", "skip"),
    "position_embedding": POSITION_EMBEDDINGS,
    "activation_function": ("gelu_new", "gelu"),
    "optimizer": ("adamw", "muon"),
}
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "position_embedding", "activation_function",
                "vocab_multiple", "lora_r", "lora_alpha", "lora_target_modules")


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # the best model (a Hugging Face model dir) and checkpoints/ go here
    data_dir: str = "data/openwebtext"  # a dataset made by examples/prepare.py, or hf://datasets/<user>/<name>
    init_from: str = "scratch"  # 'scratch' | 'resume' | 'gpt2'...'gpt2-xl' | a model dir or Hub id | nanoGPT ckpt.pt
    eval_interval: int = 2000  # evaluate, save the best model and checkpoint every this many iterations
    log_interval: int = 1  # print a log line every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # nanoGPT's; no effect: a checkpoint is written at every eval whatever val did
    keep_checkpoints: int = 2  # how many resumable checkpoints to keep in out_dir/checkpoints
    checkpoint_interval: int = 0  # also checkpoint every this many iterations between evals (0: only at evals)
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
    # data
    batch_size: int = 12  # micro-batch size, per process
    gradient_accumulation_steps: int = 40  # micro-steps per iteration, per process (nanoGPT: 5 * 8 GPUs)
    block_size: int = 1024  # context length in tokens
    batch_size_warmup_iters: int = 0  # ramp the micro-batch linearly up to batch_size over this many iterations
    batch_size_warmup_start: int = 1  # the micro-batch size at iteration 0 of that ramp
    # model (ignored, except block_size and dropout, when init_from loads a model)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
    bias: bool = False  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    position_embedding: str = "learned"  # 'learned' (GPT-2) | 'alibi' | 'rope'
    activation_function: str = "gelu"  # nanoGPT's exact GELU (faster on CPU) | 'gelu_new': GPT-2's tanh one
    vocab_multiple: int = 1  # round the model's vocab_size up to a multiple of this (64: GPT-2's 50257 -> 50304)
    # optimizer
    optimizer: str = "adamw"  # 'adamw' (nanoGPT) | 'muon': torch.optim.Muon for the blocks' matrices, AdamW the rest
    learning_rate: float = 6e-4  # max learning rate (AdamW's; with --optimizer muon, of the embeddings, norms, biases)
    max_iters: int = 600000  # total number of training iterations
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip gradients at this norm, or 0 for no clipping
    muon_learning_rate: float = 0.02  # --optimizer muon: Muon's max lr, on learning_rate's schedule scaled to it
    muon_momentum: float = 0.95  # --optimizer muon: Muon's (Nesterov) momentum
    muon_weight_decay: float = 0.0  # --optimizer muon: Muon's decoupled weight decay (the speedrun's: 0)
    # LoRA (PEFT): train low-rank adapters only, on a pretrained --init_from; see nanogpt_hf/lora.py
    lora_r: int = 0  # adapter rank; 0: no LoRA, train every weight
    lora_alpha: float = 16.0  # adapter scale alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target_modules: str = "c_attn,c_proj,c_fc"  # comma-separated module names: attention and MLP projections
    # learning rate schedule
    decay_lr: bool = True  # warmup + cosine decay; False: constant learning_rate
    warmup_iters: int = 2000  # how many steps to warm up for
    lr_decay_iters: int = 600000  # should be ~= max_iters per Chinchilla
    min_lr: float = 6e-5  # should be ~= learning_rate/10 per Chinchilla
    # system
    seed: int = 1337  # seeds the weights, dropout and the batches
    mixed_precision: str | None = None  # 'no' | 'fp16' (with loss scaling) | 'bf16' | 'auto' (resolve_mixed_precision);
    # unset: the accelerate config's
    compile: bool = False  # torch.compile the model (nanoGPT's default is True; it gains nothing on CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    cpu: bool = False  # train on the CPU even when a GPU is there
    nan_policy: str = "stop"  # non-finite loss: 'stop' (the last good checkpoint stays) | 'skip' that update
    max_skipped_share: float = 0.05  # --nan_policy skip: stop when more than this share of the updates was skipped
    # logging
    report_to: str = "none"  # 'none' | 'tensorboard' | 'wandb' (Accelerate trackers)
    project_name: str = "nanogpt_hf"  # the wandb project / tensorboard folder (under out_dir)
    run_name: str | None = None  # the wandb run name
    sample_at_end: int = 0  # print this many samples from the trained model at the end
    # Hugging Face Hub
    push_to_hub: bool = False  # upload out_dir at the end (and every push_interval), in the background
    hub_model_id: str | None = None  # 'user/name' of the model repo
    hub_private: bool = False  # create the repo as private
    push_interval: int = 0  # also push at the first eval after every this many iterations; 0: only at the end
    # testing
    debug_dump_dir: str | None = None  # each rank writes per-iteration batch and weight hashes here (jsonl)
    overwrite: bool = False  # start a new run in an out_dir that holds another run's checkpoints (they are deleted)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # types (TrainConfig(n_layer="4") is fine, n_layer="x" is not)
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), f.name))
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"--{key} must be one of {', '.join(str(c) for c in choices if c)}, "
                                 f"got {getattr(self, key)!r}")
        for key in ("eval_interval", "log_interval", "eval_iters", "keep_checkpoints", "batch_size",
                    "gradient_accumulation_steps", "block_size", "batch_size_warmup_start", "n_layer", "n_head",
                    "n_embd", "vocab_multiple"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "batch_size_warmup_iters", "push_interval",
                    "sample_at_end", "weight_decay", "grad_clip", "min_lr", "muon_weight_decay", "checkpoint_interval",
                    "checkpoint_minutes", "max_skipped_share"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be >= 0, got {getattr(self, key)}")
        if not self.out_dir.strip() or not self.data_dir.strip():
            raise ValueError("--out_dir and --data_dir must name a folder (an empty one would mean the current "
                             "directory)")
        if self.max_iters == 0 and not self.eval_only:
            raise ValueError("--max_iters 0: nothing to train (an out_dir needs at least one iteration); to evaluate "
                             "a model use --eval_only with --init_from")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd ({self.n_embd}) must be divisible by --n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.muon_momentum < 1):
            raise ValueError(f"--beta1, --beta2 and --muon_momentum must be in [0, 1), got {self.beta1}, "
                             f"{self.beta2} and {self.muon_momentum}")
        for key in ("learning_rate", "muon_learning_rate"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be > 0, got {getattr(self, key)}")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ValueError(f"--warmup_iters ({self.warmup_iters}) must be <= --lr_decay_iters "
                             f"({self.lr_decay_iters})")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ValueError(f"--min_lr ({self.min_lr}) must be <= --learning_rate ({self.learning_rate})")
        if self.batch_size_warmup_start > self.batch_size:
            raise ValueError(f"--batch_size_warmup_start ({self.batch_size_warmup_start}) must be <= "
                             f"--batch_size ({self.batch_size})")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id you/nanogpt-shakespeare")
        if self.hub_model_id is not None and not re.fullmatch(r"([\w.-]+/)?[\w.-]+", self.hub_model_id):
            raise ValueError(f"--hub_model_id must look like 'user/name', got {self.hub_model_id!r}")
        check_init_from(self.init_from)
        check_lora_config(self)

    def to_dict(self):
        return dataclasses.asdict(self)


def cpu_bf16_matmul() -> str | None:
    """The CPU's native bf16 matrix instructions, from /proc/cpuinfo (Linux): "amx" (Intel AMX tiles, the big win),
    "avx512_bf16" (bf16 dot products in AVX-512), or None (bf16 is then emulated: slower than float32)."""
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return None
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


# bf16 autocast on a CPU pays only with native bf16 matrix units and matmuls big enough to keep them busy:
# measured train steps, bf16 vs float32 (docs/fast-paths.md): at the shakespeare_char shape (384 wide, 64 x 256
# tokens) 4.2x on an AMX Xeon, 2.06x on an AMD EPYC with avx512_bf16; at the baby shape (128 wide, 12 x 64 tokens)
# 0.92x and 0.97x
BF16_CPU_MIN_WIDTH, BF16_CPU_MIN_TOKENS = 256, 4096
BF16_CPU_UNITS = ("amx", "avx512_bf16")


def resolve_mixed_precision(cfg, cuda=None, cpu_bf16="detect"):
    """cfg.mixed_precision, with 'auto' decided: on a GPU bf16 where supported, else fp16 (nanoGPT's rule); on a
    CPU bf16 only with native bf16 matrix units (BF16_CPU_UNITS) at a shape where it measured faster, else 'no'.
    cuda / cpu_bf16 (a cpu_bf16_matmul() answer): the machine's capabilities (default: this one's)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if cuda is None:
        cuda = torch.cuda.is_available() and not cfg.cpu
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    units = cpu_bf16_matmul() if cpu_bf16 == "detect" else cpu_bf16
    big = cfg.n_embd >= BF16_CPU_MIN_WIDTH and cfg.batch_size * cfg.block_size >= BF16_CPU_MIN_TOKENS
    return "bf16" if units in BF16_CPU_UNITS and big else "no"


def looks_like_path(name):
    """Whether a model name can only be a local path (a Hub id is owner/name): it starts with / . or ~, names a
    nanoGPT ckpt.pt, or has more than one /."""
    return name.startswith(("/", ".", "~")) or name.endswith(".pt") or name.count("/") > 1


def near_folder(name):
    """'; did you mean X?' for the folder next to name whose name is closest to it (a typo), else ''."""
    path = Path(os.path.expanduser(name))
    parent = path.parent if path.parent.is_dir() else None
    near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1) if parent \
        else []
    return f"; did you mean {path.parent / near[0] if str(path.parent) != '.' else near[0]}?" if near else ""


def check_init_from(value):
    if value in ("scratch", "resume") or value in GPT2_MODELS or os.path.exists(os.path.expanduser(value)):
        return
    if looks_like_path(value):
        raise ValueError(f"--init_from: {value} not found (no such folder or nanoGPT ckpt.pt{near_folder(value)})")
    if not HUB_ID.fullmatch(value):  # anything else must be a Hub id; whether it exists shows when it loads
        raise ValueError(f"--init_from must be 'scratch', 'resume', one of {', '.join(GPT2_MODELS)}, a model dir, "
                         f"a Hub id (user/name) or a nanoGPT ckpt.pt; got {value!r} (no such folder"
                         f"{near_folder(value)})")


# -----------------------------------------------------------------------------
# parsing: types, YAML, command line

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(key, value, where):
    """value (from YAML, the command line or Python) -> the field's type; ValueError naming `where`."""
    typ = TYPES[key]
    optional = isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ)
    base = next(t for t in typing.get_args(typ) if t is not type(None)) if optional else typ
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{where}: expected {base.__name__}, got None")
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE and not isinstance(value, float):
            return str(value).lower() in TRUE
    elif base is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            try:
                number = float(value)  # "1e3", YAML's 2.0
                if number.is_integer():
                    return int(number)
            except (TypeError, ValueError):
                pass
    elif base is float and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads 6e-4 (no dot) as a string
        except (TypeError, ValueError):
            number = None
        if number is not None and not math.isfinite(number):  # nan passes every `< 0` check and switches guards off
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return _type_error(where, base, value)


def _type_error(where, base, value):
    expected = "true or false" if base is bool else base.__name__
    hint = " (YAML reads unquoted no/yes/off/on as booleans: quote it, e.g. \"no\")" if isinstance(value, bool) else ""
    raise ValueError(f"{where}: expected {expected}, got {value!r}{hint}")


def _unknown(key, where):
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown key {key!r} in {where}{hint}" if where else f"unknown flag --{key}{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (the first would be "
                                                        "ignored)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """A YAML config file -> its data: safe loading only (no code, no tags), a repeated key refused; errors are
    one line naming the file and the line."""
    path = Path(path)
    if path.is_dir():  # e.g. an out_dir given where the YAML goes
        raise ValueError(f"config file {path} is a folder; give a YAML file (examples/configs/*.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None


def load_yaml(path):
    """A YAML config file -> {key: typed value} (read_yaml)."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected 'key: value' lines, got a {type(data).__name__}")
    values = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise _unknown(str(key), path)
        values[key] = coerce(key, value, f"{key} in {path}")
    return values


def parse_config(argv=None) -> TrainConfig:
    """[config.yaml] [--key value | --key=value ...] -> TrainConfig (defaults < YAML < command line).
    A bare --flag means true for booleans."""
    argv = list(argv if argv is not None else sys.argv[1:])
    values = {}
    if argv and not argv[0].startswith("-"):
        values.update(load_yaml(argv.pop(0)))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: flags look like --key=value, and a YAML config "
                             "file may only come first")
        key, has_value, value = arg[2:].partition("=")
        if key not in FIELDS:
            raise _unknown(key, None)
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, value = i + 1, argv[i + 1]
            elif TYPES[key] is bool:
                value = "true"
            else:
                raise ValueError(f"--{key}: missing value")
        values[key] = coerce(key, value, f"--{key}")
        i += 1
    return TrainConfig(**values)


def config_help():
    """--help text: every field with its default and the comment next to it in the source above."""
    comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    lines = ["usage: train.py [config.yaml] [--key value | --key=value ...]   (defaults < YAML < flags)", ""]
    for name, f in FIELDS.items():
        lines.append(f"  --{name:<28} {f.default!r:<20} {comments.get(name, '')}".rstrip())
    return "\n".join(lines)


__all__ = ["TrainConfig", "parse_config", "load_yaml", "read_yaml", "coerce", "config_help", "ARCHITECTURE"]
