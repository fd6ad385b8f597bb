"""
Benchmarks behind examples/bench.py (nanoGPT's bench.py, plus comparisons): importable, so tests and notebooks
can run them too.

    from nanogpt_hf.benchmark import PRESETS, Shape, bench_train, bench_generate, bench_data
    res = bench_train(Shape(**PRESETS["baby"]), device="cpu", iters=50)     # nanogpt_hf vs GPT2LMHeadModel
    print(format_train(res))
    res = bench_time_to_loss({"adamw": cfg_a, "muon": cfg_b})               # TrainConfigs, side by side

Fairness rules (every model gets the same treatment):
- one fixed batch of random tokens (torch.manual_seed), the same torch.optim.AdamW (fused where supported,
  as the HF Trainer's default adamw_torch_fused), the same autocast dtype, the same compile setting;
- the models take turns step by step (the order rotates every step), after a warm-up; we report medians,
  which shrug off the odd slow step on a shared machine;
- nanogpt_hf runs nanoGPT's train.py defaults (bias=False, dropout=0) unless bias=True; GPT2LMHeadModel of
  the same shape (layers, heads, width, block, vocab, dropouts 0) always has biases: the output says so.
- time to loss: each config trains with the trainer's own recipe (build_model, build_optimizer, get_lr, the
  batches of TokenShards) on the same data and seed; the runs' iterations alternate in one process and only
  the training steps are timed.
"""

import importlib.util
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import GPT2Config, GPT2LMHeadModel

from .configuration_nanogpt import NanoGPTConfig
from .data import TokenShards
from .evaluation import autocast, evaluate_loss
from .modeling_nanogpt import NanoGPTForCausalLM, fused_adamw_available
from .optim import build_optimizer, lr_scales, set_lr
from .trainer import build_model, estimate_loss, get_batch_size, get_lr

PRESETS = {
    # nanoGPT README's CPU ("macbook") run of shakespeare_char
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    # config/train_shakespeare_char.py
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, vocab_size=65),
    # GPT-2 124M as nanoGPT trains it (vocab padded to 50304)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304),
}
TRAIN_TARGET = 1.30  # nanogpt_hf step must be >= 1.3x faster than GPT2LMHeadModel's at the baby shape (issue 1/5)
CACHE_TARGET = 4.0  # generate with the KV cache >= 4x faster than without
GPT2_GEN_TARGET = 1.0  # and not slower than GPT2LMHeadModel.generate with its cache
SAMPLE_TARGET = 10.0  # sample.py's job >= 10x the tokens/s of nanoGPT's sample.py (issue 15)
DATA_TARGET = 0.02  # get_batch < 2% of a train step
PREPARE_TARGET = 0.9  # prepare's tokens/s >= 0.9x the bare tokenizer's batch encode on the same text (issue 14)
TARGET_LOSS = 1.88  # time_to_loss: nanoGPT's val loss of its CPU baby run
TIME_TO_LOSS_GOAL = 0.70  # Muon reaches TARGET_LOSS in <= 0.7x the wall time of our tuned AdamW (issue 18)
REFERENCE_PATH = Path(__file__).resolve().parent.parent / "tests" / "reference_nanogpt.py"
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


def load_reference():
    """tests/reference_nanogpt.py (a plain-PyTorch nanoGPT) as a module, or None outside a source checkout."""
    if not REFERENCE_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("reference_nanogpt", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    ref_module = load_reference() if reference else None
    if ref_module is not None:
        torch.manual_seed(seed)
        ref = ref_module.GPT(ref_module.GPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                                                  block_size=shape.block_size, vocab_size=shape.vocab_size,
                                                  bias=bias)).to(device)
        models[REF] = (ref, lambda x, y: ref(x, y)[1])
    return models


def make_optimizer(model, device):
    """The same AdamW for every model: nanoGPT's hyper-parameters, fused kernel where the device has one."""
    fused = fused_adamw_available(torch.device(device).type)  # the same rule as configure_optimizers
    return torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             **({"fused": True} if fused else {}))


def _sync(device):
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
            _sync(device)
            f0, t0 = minor_page_faults(), time.perf_counter()
            fns[name]()
            _sync(device)
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


# -----------------------------------------------------------------------------
# training step


def bench_train(shape, device="cpu", iters=50, warmup=10, dtype=None, compile=False, bias=False, reference=True,
                seed=1337, profile_dir=None, activation="gelu_new", gpt2_activation=None):
    """Median ms of a full training step (forward, backward, AdamW) and of forward+backward only, per model."""
    models = build_models(shape, device, bias=bias, reference=reference, seed=seed, activation=activation,
                          gpt2_activation=gpt2_activation)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(shape.vocab_size, (shape.batch_size, shape.block_size + 1), generator=g)
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)  # (B, T) each

    def step_fn(model, loss_fn, opt):
        def step():
            with autocast(device, dtype):
                loss = loss_fn(x, y)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
        return step

    params, train_fns, fwdbwd_fns = {}, {}, {}
    for name, (model, loss_fn) in models.items():
        model.train()
        params[name] = sum(p.numel() for p in model.parameters())
        if compile:
            loss_fn = torch.compile(loss_fn)
        train_fns[name] = step_fn(model, loss_fn, make_optimizer(model, device))
        fwdbwd_fns[name] = step_fn(model, loss_fn, None)

    faults = {}
    train = time_alternating(train_fns, iters, warmup, device, faults=faults)
    fwdbwd = time_alternating(fwdbwd_fns, iters, max(1, warmup // 2), device)
    memory = {}
    for name, fn in train_fns.items():  # peak memory of each model alone (CUDA); CPU has only the process's
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        memory[name] = peak_memory_mb(device)

    ours = models[OURS][0]
    result = dict(shape=asdict(shape), device=str(device), dtype=str(dtype or torch.float32), compile=compile,
                  bias=bias, activation=activation, gpt2_activation=gpt2_activation or activation, iters=iters,
                  warmup=warmup, params=params, models={},
                  memory_kind="max allocated" if torch.device(device).type == "cuda" else "process max RSS")
    tokens = shape.batch_size * shape.block_size
    for name in models:
        dt = statistics.median(train[name])
        mfu = ours.estimate_mfu(shape.batch_size, dt)  # same shape -> same FLOPs for every model
        result["models"][name] = dict(train_ms=dt * 1e3, fwdbwd_ms=statistics.median(fwdbwd[name]) * 1e3,
                                      tokens_per_s=tokens / dt, mfu=mfu, peak_memory_mb=memory[name],
                                      train_ms_min=min(train[name]) * 1e3,
                                      page_faults=statistics.median(faults[name]))
    m = result["models"]
    result["ratio_train"] = m[GPT2]["train_ms"] / m[OURS]["train_ms"]
    result["ratio_fwdbwd"] = m[GPT2]["fwdbwd_ms"] / m[OURS]["fwdbwd_ms"]
    if profile_dir is not None:
        result["profile"] = profile_step(train_fns[OURS], device, profile_dir)
    return result


def bench_bf16(shapes, device="cpu", iters=10, warmup=2, seed=1337):
    """Our train step (forward, backward, AdamW) in float32 and under bf16 autocast, alternating, per shape:
    what `mixed_precision: auto` decides from (see train_config.resolve_mixed_precision)."""
    from .train_config import cpu_bf16_matmul

    result = dict(device=str(device), cpu_bf16=cpu_bf16_matmul(), iters=iters, warmup=warmup, shapes=[])
    for shape in shapes:
        torch.manual_seed(seed)
        model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                                                 block_size=shape.block_size, vocab_size=shape.vocab_size,
                                                 bias=False, dropout=0.0)).to(device).train()
        opt = make_optimizer(model, device)
        data = torch.randint(shape.vocab_size, (shape.batch_size, shape.block_size + 1),
                             generator=torch.Generator().manual_seed(seed)).to(device)
        x, y = data[:, :-1], data[:, 1:]

        def step(dtype):
            def run():
                with autocast(device, dtype):
                    loss = model(x, shift_labels=y).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        times = time_alternating({"float32": step(None), "bf16": step(torch.bfloat16)}, iters, warmup, device)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        result["shapes"].append(dict(shape=asdict(shape), ms=ms, speedup=ms["float32"] / ms["bf16"]))
    return result


def format_bf16(r):
    out = [f"bf16 autocast vs float32, train step of {OURS}; device {r['device']}; CPU bf16 matrix units: "
           f"{r['cpu_bf16'] or 'none'}; median of {r['iters']}"]
    for s in r["shapes"]:
        shape = Shape(**s["shape"])
        out.append(f"bf16 {shape.describe()}, batch {shape.batch_size}: float32 {s['ms']['float32']:,.1f} ms | "
                   f"bf16 {s['ms']['bf16']:,.1f} ms | speedup {s['speedup']:.2f}x")
    return "\n".join(out)


def profile_step(step, device, out_dir, active=5):
    """torch.profiler trace of a few steps -> out_dir (open in Perfetto / chrome://tracing); returns its table."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active),
                 on_trace_ready=tensorboard_trace_handler(str(out_dir)), record_shapes=True) as prof:
        for _ in range(2 + active):
            step()
            prof.step()
    sort = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def format_train(r):
    m = r["models"]
    has_ref = REF in m
    shape = Shape(**r["shape"])

    def line(label, key, target=None):
        parts = [f"{OURS} {m[OURS][key]:.1f} ms", f"{GPT2} {m[GPT2][key]:.1f} ms"]
        if has_ref:
            parts.append(f"{REF} {m[REF][key]:.1f} ms")
        ratio = m[GPT2][key] / m[OURS][key]
        tail = f" (target >= {target:.2f}x)" if target else ""
        return f"{label:11s} " + " | ".join(parts) + f" | ratio {ratio:.2f}x{tail}"

    out = [f"training step: {shape.describe()}, batch {shape.batch_size}; device {r['device']}, dtype {r['dtype']}, "
           f"compile {r['compile']}; median of {r['iters']} alternating steps after {r['warmup']} warm-up",
           "  params: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in r["params"].items()),
           f"  note: {OURS} bias={r['bias']}, dropout 0 (nanoGPT train.py defaults); {GPT2} of the same shape always "
           f"has biases; activation {OURS} {r['activation']}, {GPT2} {r['gpt2_activation']}, {REF} gelu (exact); "
           "all use the same torch.optim.AdamW (fused where supported)",
           line("train step", "train_ms", TRAIN_TARGET),
           line("fwd+bwd", "fwdbwd_ms")]
    out.append(f"  {'model':16s} {'ms/iter':>8s} {'tokens/s':>10s} {'MFU':>6s} {'peak mem':>10s} {'faults':>7s}")
    for name, v in m.items():
        mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
        out.append(f"  {name:16s} {v['train_ms']:8.1f} {v['tokens_per_s']:10,.0f} {mfu:>6s} "
                   f"{v['peak_memory_mb']:7.0f} MB {v['page_faults']:7.0f}")
    out.append(f"  (ratio = {GPT2} ms / {OURS} ms; peak mem = {r['memory_kind']}; MFU against the device's "
               "bf16 peak, n/a where unknown, e.g. CPU; faults = median minor page faults per step: fresh pages "
               "from the OS, which glibc's malloc takes again and again when it trims its heap, see README)")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def greedy_loop(model, idx, new_tokens):
    """nanoGPT's generate without a cache (re-run the whole sequence for every token), greedy."""
    for _ in range(new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def bench_generate(shape, device="cpu", batch_sizes=(1, 8), new_tokens=255, repeats=3, nocache_repeats=1, bias=False,
                   reference=True, dtype=None, seed=1337, activation="gelu_new", gpt2_activation=None):
    """tokens/s of greedy generation of new_tokens from a 1-token prompt (min_new_tokens forces the length),
    with and without the KV cache, for nanogpt_hf and GPT2LMHeadModel (+ the plain no-cache loop).
    Cached runs are repeated `repeats` times (median); the slow cache-less ones `nocache_repeats` times."""
    if new_tokens + 1 > shape.block_size:
        raise ValueError(f"--gen_tokens {new_tokens} + 1 prompt token exceed block_size {shape.block_size}")
    models = build_models(shape, device, bias=bias, reference=reference, seed=seed, activation=activation,
                          gpt2_activation=gpt2_activation)
    for model, _ in models.values():
        model.eval()
    result = dict(shape=asdict(shape), device=str(device), new_tokens=new_tokens, repeats=repeats,
                  nocache_repeats=nocache_repeats, bias=bias, batches={})
    for b in batch_sizes:
        idx = torch.zeros(b, 1, dtype=torch.long, device=device)

        def hf(model, use_cache, n=new_tokens):
            def run():
                with autocast(device, dtype):
                    out = model.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         use_cache=use_cache)
                assert out.shape == (b, 1 + n)
            return run

        def loop():
            with autocast(device, dtype):
                greedy_loop(models[REF][0], idx, new_tokens)

        for name in (OURS, GPT2):  # warm-up: a few tokens each
            hf(models[name][0], True, 4)()
            hf(models[name][0], False, 4)()
        cached = {f"{name} cache": hf(models[name][0], True) for name in (OURS, GPT2)}
        uncached = {f"{name} no cache": hf(models[name][0], False) for name in (OURS, GPT2)}
        if REF in models:
            uncached[f"{REF} loop, no cache"] = loop
        times = time_alternating(cached, repeats, 0, device)
        times.update(time_alternating(uncached, nocache_repeats, 0, device))
        result["batches"][b] = {name: b * new_tokens / statistics.median(t) for name, t in times.items()}
    return result


def _top_k_sample(logits, temperature, top_k):
    """One token per row from the last position's logits, as nanoGPT samples: scale, keep the top k, draw."""
    logits = logits / temperature
    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
    return torch.multinomial(F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1), 1)


@torch.no_grad()
def nanogpt_sample_loop(model, idx, new_tokens, block_size, temperature=0.8, top_k=200):
    """What nanoGPT's sample.py runs (its model.generate): no cache; before every token the context is cut to
    its last block_size tokens and run through the whole model again."""
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -block_size:])
        idx = torch.cat([idx, _top_k_sample(logits[:, -1], temperature, top_k)], dim=1)
    return idx


@torch.no_grad()
def bare_cached_loop(model, idx, new_tokens, limit, temperature=0.8, top_k=200):
    """The least a cached sampler can do in Python: our modules and a DynamicCache, nothing of generate()
    around them; the context cropped the way generate_cropped crops it (to limit // 2 when it is full)."""
    from transformers.cache_utils import DynamicCache

    out, feed, cache = idx, idx, None
    for _ in range(new_tokens):
        if cache is None or cache.get_seq_length() >= limit:
            feed = out if out.size(1) < limit else out[:, -(limit // 2):]
            cache = DynamicCache(config=model.config)
        logits = model(feed, cache=cache, use_cache=True, logits_to_keep=1).logits
        feed = _top_k_sample(logits[:, -1], temperature, top_k)
        out = torch.cat([out, feed], dim=1)
    return out


def bench_sample(shape, device="cpu", num_samples=10, new_tokens=500, temperature=0.8, top_k=200, repeats=1,
                 dtype=None, seed=1337, compile=True, reference=True):
    """sample.py's job (num_samples x new_tokens from a 1-token prompt, top_k, temperature) in tokens/s, side by
    side: our generate() (generate_cropped, dynamic cache), the same with a static cache (+ compiled decoding
    step), the bare eager loop over our modules, and nanoGPT's sample.py loop (no cache) on the reference."""
    from .evaluation import generate_cropped, static_decoding

    models = build_models(shape, device, bias=False, reference=reference, seed=seed,
                          activation=NanoGPTConfig().activation_function)  # the default of new models
    ours = models[OURS][0].eval()
    limit = shape.block_size
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    gen = dict(do_sample=True, temperature=temperature, top_k=top_k, pad_token_id=0)
    static = static_decoding(ours, limit, compile=compile)
    compile_s = time.perf_counter()
    with torch.no_grad(), autocast(device, dtype):  # warm-up; with compile, the step is compiled here
        generate_cropped(ours, idx, min(new_tokens, limit), limit, **gen, **static)
    compile_s = time.perf_counter() - compile_s

    def job(fn):
        def run():
            with torch.no_grad(), autocast(device, dtype):
                for _ in range(num_samples):
                    out = fn()
                    assert out.shape == (1, 1 + new_tokens)
        return run

    fns = {f"{OURS} generate()": job(lambda: generate_cropped(ours, idx, new_tokens, limit, **gen)),
           f"{OURS} generate(), static cache" + (" + compile" if compile else ""):
               job(lambda: generate_cropped(ours, idx, new_tokens, limit, **gen, **static)),
           "bare eager loop": job(lambda: bare_cached_loop(ours, idx, new_tokens, limit, temperature, top_k))}
    if REF in models:
        ref = models[REF][0].eval()
        fns["nanoGPT sample.py loop"] = job(lambda: nanogpt_sample_loop(ref, idx, new_tokens, limit, temperature,
                                                                         top_k))
    times = time_alternating(fns, repeats, 0, device)
    return dict(shape=asdict(shape), device=str(device), num_samples=num_samples, new_tokens=new_tokens,
                top_k=top_k, temperature=temperature, repeats=repeats, compile=compile,
                warmup_s=round(compile_s, 1),
                tokens_per_s={name: num_samples * new_tokens / statistics.median(t) for name, t in times.items()})


def format_sample(r):
    shape, tps = Shape(**r["shape"]), r["tokens_per_s"]
    out = [f"sample.py job: {shape.describe()}; {r['num_samples']} x {r['new_tokens']} tokens, top_k {r['top_k']}, "
           f"T {r['temperature']}; device {r['device']}; median of {r['repeats']} (first call incl. compile: "
           f"{r['warmup_s']} s)"]
    out += [f"sample {name:<44} {v:8,.0f} tok/s" for name, v in tps.items()]
    fast = max(v for name, v in tps.items() if name.startswith(OURS))
    if "nanoGPT sample.py loop" in tps:
        out.append(f"sample ratio: {OURS} (best) vs nanoGPT sample.py loop {fast / tps['nanoGPT sample.py loop']:.1f}x "
                   f"(target >= {SAMPLE_TARGET:.0f}x)")
    out.append(f"sample ratio: {OURS} generate() vs bare eager loop {tps[f'{OURS} generate()'] / tps['bare eager loop']:.2f}x"
               f" (target >= 1.0x); best {fast / tps['bare eager loop']:.2f}x")
    return "\n".join(out)


def format_generate(r):
    shape = Shape(**r["shape"])
    out = [f"generation: {shape.describe()}; {r['new_tokens']} new tokens from a 1-token prompt, greedy; "
           f"device {r['device']}; tokens/s = batch x new tokens / median of {r['repeats']} runs (no cache: "
           f"{r['nocache_repeats']})"]
    for b, v in r["batches"].items():
        ours, gpt2 = v[f"{OURS} cache"], v[f"{GPT2} cache"]
        out.append(f"generate b={b:<2d} {OURS} cache {ours:,.0f} tok/s | no cache {v[f'{OURS} no cache']:,.0f} tok/s "
                   f"| cache speedup {ours / v[f'{OURS} no cache']:.1f}x (target >= {CACHE_TARGET:.0f}x)")
        out.append(f"generate b={b:<2d} {GPT2} cache {gpt2:,.0f} tok/s | no cache {v[f'{GPT2} no cache']:,.0f} tok/s "
                   f"| cache speedup {gpt2 / v[f'{GPT2} no cache']:.1f}x")
        if f"{REF} loop, no cache" in v:
            out.append(f"generate b={b:<2d} {REF} loop, no cache {v[f'{REF} loop, no cache']:,.0f} tok/s")
        out.append(f"generate b={b:<2d} {OURS} cache vs {GPT2} cache: ratio {ours / gpt2:.2f}x "
                   f"(target >= {GPT2_GEN_TARGET:.1f}x)")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# data loading


def prepare_bench_data(text_file, root):
    """A small char-level data_dir under root: from text_file, or (offline, None) Python's standard library."""
    from .prepare import prepare_dataset

    root = Path(root)
    if text_file is not None:
        prepare_dataset("bench_char", data_dir=root / "bench_char", inputs=[str(text_file)], tokenizer="char")
        return root / "bench_char"
    prepare_dataset("python_char", data_dir=root / "python_char", max_bytes=2_000_000)
    return root / "python_char"


def bench_data(data_dir, batch_size, block_size, step_ms, n=1000):
    """Cost of TokenShards.get_batch (nanogpt_hf.data.benchmark_get_batch) relative to one train step."""
    from .data import benchmark_get_batch

    seconds = benchmark_get_batch(data_dir, batch_size, block_size, n=n)
    return dict(data_dir=str(data_dir), batch_size=batch_size, block_size=block_size, batch_ms=seconds * 1e3,
                step_ms=step_ms, fraction=seconds * 1e3 / step_ms)


def format_data(r):
    return (f"data        get_batch({r['batch_size']}, {r['block_size']}) {r['batch_ms']:.3f} ms | train step "
            f"{r['step_ms']:.1f} ms | {100 * r['fraction']:.2f}% of a step (target < {100 * DATA_TARGET:.0f}%)")


# -----------------------------------------------------------------------------
# prepare: tokens/s of examples/prepare.py against the bare tokenizer on the same text


def bench_text(text_file, root, mb):
    """The text to prepare: text_file, or (offline) Python's standard library source, repeated up to mb MB."""
    from .sources import stdlib_files

    root = Path(root)
    text = Path(text_file).read_text(encoding="utf-8") if text_file else "\n".join(stdlib_files(10**9)[1])
    if mb:
        text = (text * (int(mb * 1e6) // len(text.encode("utf-8")) + 1))[:int(mb * 1e6)]
    path = root / "prepare_bench.txt"
    path.write_text(text, encoding="utf-8")
    return path


def bare_encode(text_file, out_file, encode_batch):
    """The baseline: read the whole file, cut it in prepare's rows, encode them in one batch call of the
    tokenizer on all cores, write the tokens as one uint16 array. Tokens/s."""
    import numpy as np

    from .sources import chunk_text

    t0 = time.perf_counter()
    ids = encode_batch(chunk_text(Path(text_file).read_text(encoding="utf-8")))
    tokens = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids])
    tokens.tofile(out_file)
    return len(tokens) / (time.perf_counter() - t0)


def bench_prepare(text_file, root, num_proc=None, repeats=3, tokenizers=("gpt2", "hf")):
    """examples/prepare.py (prepare_dataset, end to end: read, tokenize, write shards + meta.json) against
    bare_encode, alternating, median tokens/s of each; for GPT-2 through tiktoken and through a Hugging
    Face tokenizers folder (the same BPE, batch-encoded in Rust)."""
    import contextlib
    import io

    from .prepare import default_num_proc, prepare_dataset
    from .tokenization import gpt2_tokenizer, tiktoken_gpt2

    num_proc = num_proc or default_num_proc()
    root = Path(root)
    enc = tiktoken_gpt2()
    hf_dir = root / "hf_gpt2"
    gpt2_tokenizer().save_pretrained(hf_dir)
    backend = gpt2_tokenizer().backend_tokenizer
    bare = {"gpt2": lambda rows: enc.encode_ordinary_batch(rows, num_threads=num_proc),
            "hf": lambda rows: [e.ids for e in getattr(backend, "encode_batch_fast", backend.encode_batch)(
                rows, add_special_tokens=False)]}
    out = dict(text=str(text_file), mb=Path(text_file).stat().st_size / 1e6, num_proc=num_proc, tokenizers={})
    for name in tokenizers:
        spec = "gpt2" if name == "gpt2" else str(hf_dir)
        ours, base = [], []
        for i in range(repeats):
            base.append(bare_encode(text_file, root / "bare.bin", bare[name]))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                meta = prepare_dataset("prepare_bench", data_dir=root / f"out_{name}", inputs=[str(text_file)],
                                       tokenizer=spec, num_proc=num_proc, overwrite=True)
            n = sum(sp["num_tokens"] for sp in meta["splits"].values())
            ours.append(n / (time.perf_counter() - t0))
        out["tokenizers"][name] = dict(tokens=n, ours=statistics.median(ours), bare=statistics.median(base),
                                       ratio=statistics.median(ours) / statistics.median(base),
                                       ours_all=ours, bare_all=base)
    return out


def format_prepare(r):
    lines = []
    for name, v in r["tokenizers"].items():
        bare = "tiktoken encode_ordinary_batch" if name == "gpt2" else "tokenizers encode_batch(_fast)"
        label = "GPT-2 tiktoken" if name == "gpt2" else "GPT-2 HF tokenizers"
        lines.append(f"prepare     {label}, {r['mb']:.0f} MB, {v['tokens']:,} tokens, {r['num_proc']} process(es): "
                     f"prepare.py {v['ours'] / 1e6:.2f} M tok/s | bare {bare} {v['bare'] / 1e6:.2f} M tok/s | "
                     f"ratio {v['ratio']:.2f}x (target >= {PREPARE_TARGET:.1f}x)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# time to a target val loss: optimizers (or any two configs) side by side


class TimedRun:
    """One training run of the trainer's recipe (its batches, schedule, optimizer and clipping) on one process,
    stepped from outside, so that several can take turns in one process."""

    def __init__(self, label, cfg, device):
        self.label, self.cfg, self.device = label, cfg, device
        self.train_data, self.val_data = TokenShards(cfg.data_dir, "train"), TokenShards(cfg.data_dir, "val")
        set_seed(cfg.seed)  # as train() does: the same seed gives the same initial weights
        self.model = build_model(cfg, self.train_data, log=lambda *a: None).to(device).train()
        self.optimizer = build_optimizer(self.model, cfg, torch.device(device).type, verbose=False)
        self.scales = lr_scales(self.optimizer, cfg)
        self.it, self.seconds, self.step_ms, self.curve, self.reached = 0, 0.0, [], [], None

    def step(self):
        """One iteration as in train(): lr, forward/backward over the micro-steps, clip, update. Timed."""
        cfg, it, accum = self.cfg, self.it, self.cfg.gradient_accumulation_steps
        _sync(self.device)
        t0 = time.perf_counter()
        set_lr(self.optimizer, get_lr(it, cfg), self.scales)
        for micro_step in range(accum):
            x, y = self.train_data.get_batch(get_batch_size(it, cfg), cfg.block_size, it, seed=cfg.seed,
                                             rank=micro_step, world_size=accum, device=self.device)
            (self.model(x, shift_labels=y).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.it, self.seconds = it + 1, self.seconds + dt
        self.step_ms.append(dt * 1e3)

    def check(self, accelerator, target, full_eval):
        """train.py's val loss estimate (cfg.eval_iters batches, the same every time); at the first one <= target,
        record where and when, and (full_eval) the exact loss over every val token."""
        val = estimate_loss(self.model, {"val": self.val_data}, self.cfg, accelerator)["val"]
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
    if len({(c.data_dir, c.seed) for c in cfgs}) > 1:
        raise ValueError("the runs must share data_dir and seed, so that they differ only in what is compared")
    accelerator = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no")  # for estimate_loss
    runs = [TimedRun(label, cfg, device) for label, cfg in configs.items()]
    for run in runs:
        run.check(accelerator, target, full_eval)
    rounds = 0
    while any(r.reached is None and r.it < r.cfg.max_iters for r in runs):
        for run in runs[rounds % len(runs):] + runs[:rounds % len(runs)]:
            if run.it < run.cfg.max_iters:
                run.step()
                if run.reached is None and (run.it % check_every == 0 or run.it == run.cfg.max_iters):
                    run.check(accelerator, target, full_eval)
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


def describe_machine(device):
    """One line for the README's Performance table: the device, threads, torch version."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU's marketing name
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


__all__ = ["PRESETS", "Shape", "bench_train", "bench_generate", "bench_data", "prepare_bench_data", "format_train",
           "format_generate", "format_data", "describe_machine", "build_models", "time_alternating",
           "bench_time_to_loss", "format_time_to_loss", "TimedRun"]
