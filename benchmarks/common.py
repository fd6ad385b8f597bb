"""What every benchmark shares: the shapes, the models under test built alike, and the timer that makes them take
turns.

Fairness rules (every model gets the same treatment):
- one fixed batch of random tokens (torch.manual_seed), the same torch.optim.AdamW (fused where supported,
  as the HF Trainer's default adamw_torch_fused), the same autocast dtype, the same compile setting;
- the models take turns step by step (the order rotates every step), after a warm-up; we report medians,
  which shrug off the odd slow step on a shared machine;
- nanogpt_hf runs nanoGPT's train.py defaults (bias=False, dropout=0) unless bias=True; GPT2LMHeadModel of
  the same shape (layers, heads, width, block, vocab, dropouts 0) always has biases: the output says so.
"""

import platform
import resource
import sys
import time
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.modeling_nanogpt import fused_adamw_available

from . import reference_nanogpt

PRESETS = {
    # nanoGPT README's CPU ("macbook") run of shakespeare_char
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    # config/train_shakespeare_char.py
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, vocab_size=65),
    # GPT-2 124M as nanoGPT trains it (vocab padded to 50304)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304),
}
OURS, GPT2, REF = "nanogpt_hf", "GPT2LMHeadModel", "plain PyTorch"


@dataclass
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    batch_size: int = 1

    def describe(self):
        return (f"{self.n_layer} layers, {self.n_head} heads, {self.n_embd} emb, block {self.block_size}, "
                f"vocab {self.vocab_size}")


# -----------------------------------------------------------------------------
# the models under test


def build_models(shape, device, bias=False, reference=True, seed=1337, activation="gelu_new", gpt2_activation=None):
    """{name: (model, loss_fn(x, y))} for nanogpt_hf, GPT2LMHeadModel and (optionally) the plain reference.

    Each is called the way its users call it: ours with pre-shifted targets (nanoGPT's (x, y) batches), GPT-2
    with labels=x (shifted inside, one position fewer scored), the reference with (idx, targets).
    activation: "gelu_new" (GPT-2's tanh GELU, both libraries' default) or "gelu" (exact, nanoGPT's model.py),
    for nanogpt_hf, and for GPT2LMHeadModel too unless gpt2_activation says otherwise; the reference always
    uses the exact GELU."""
    models = {}
    torch.manual_seed(seed)
    ours = NanoGPTForCausalLM(NanoGPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                                            block_size=shape.block_size, vocab_size=shape.vocab_size, bias=bias,
                                            dropout=0.0, activation_function=activation)).to(device)
    models[OURS] = (ours, lambda x, y: ours(x, shift_labels=y).loss)
    torch.manual_seed(seed)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                                      n_positions=shape.block_size, vocab_size=shape.vocab_size, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                      activation_function=gpt2_activation or activation)).to(device)
    models[GPT2] = (gpt2, lambda x, y: gpt2(x, labels=x).loss)
    if reference:
        torch.manual_seed(seed)
        ref = reference_nanogpt.GPT(reference_nanogpt.GPTConfig(
            n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, block_size=shape.block_size,
            vocab_size=shape.vocab_size, bias=bias)).to(device)
        models[REF] = (ref, lambda x, y: ref(x, y)[1])
    return models


def make_optimizer(model, device):
    """The same AdamW for every model: nanoGPT's hyper-parameters, fused kernel where the device has one."""
    fused = fused_adamw_available(torch.device(device).type)  # the same rule as configure_optimizers
    return torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             **({"fused": True} if fused else {}))


def sync(device):
    """Wait for the GPU, so that a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def minor_page_faults():
    """Page faults of this process so far that the kernel served without I/O: each one is a fresh page of memory
    the allocator took from the OS (and the kernel zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_alternating(fns, iters, warmup, device, faults=None):
    """{name: fn} -> {name: [seconds per call]}: the fns take turns (rotating order) warmup + iters times.
    A dict passed as `faults` gets {name: [minor page faults per call]} too."""
    names, times = list(fns), {name: [] for name in fns}
    for i in range(warmup + iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync(device)
            f0, t0 = minor_page_faults(), time.perf_counter()
            fns[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                if faults is not None:
                    faults.setdefault(name, []).append(minor_page_faults() - f0)
    return times


def peak_memory_mb(device):
    """CUDA: max allocated since the last reset; CPU: the process's max resident set size (Linux: KB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def describe_machine(device):
    """One line for a results table: the device, threads, torch version."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU's marketing name
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"

