"""Generation: greedy tokens/s with and without the KV cache (nanogpt_hf, GPT2LMHeadModel, and nanoGPT's cache-less
loop on the plain-PyTorch reference); and sample.py's whole job (10 samples x 500 tokens, top_k, temperature)
against nanoGPT's sample.py loop and a bare cached loop over our modules.

    from benchmarks.common import PRESETS, Shape
    from benchmarks.generation import bench_generate, format_generate
    print(format_generate(bench_generate(Shape(**PRESETS["shakespeare_char"]), device="cpu")))
"""

import statistics
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from nanogpt_hf import NanoGPTConfig
from nanogpt_hf.evaluation import autocast, generate_cropped, static_decoding

from .common import GPT2, OURS, REF, Shape, build_models, time_alternating

CACHE_TARGET = 4.0  # generate with the KV cache >= 4x faster than without
GPT2_GEN_TARGET = 1.0  # and not slower than GPT2LMHeadModel.generate with its cache
SAMPLE_TARGET = 10.0  # sample.py's job >= 10x the tokens/s of nanoGPT's sample.py


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

