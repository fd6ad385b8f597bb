"""The engine checks behind scripts/check_engines.sh (see there): each step runs in the venv that has its engine.

    python scripts/check_engines.py build  WORK          # ours: train tiny models, export them, our reference outputs
    python scripts/check_engines.py vllm   WORK NAME     # vLLM venv: serve WORK/NAME, greedy tokens + log-probs, speed
    python scripts/check_engines.py llama  WORK NAME     # llama-cpp-python venv: the GGUF file in WORK/NAME
    python scripts/check_engines.py report WORK          # compare everything against ours; exit 1 on a mismatch

Every engine gets the same prompts (text, through each engine's own tokenizer, whose ids are compared too) and
generates greedily, end-of-text ignored; log-probs are the chosen tokens' log-softmax of the raw logits, fp32.
"""

import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

PROMPTS = ["def main(argv=None):\n", "import os\nimport sys\n", "class Parser(object):\n    "]
NEW_TOKENS = 50
BENCH_PROMPTS, BENCH_TOKENS, REPEATS = 16, 100, 3  # throughput: 16 prompts x 100 new tokens, batched, best of 3
VLLM_TOL, THREADS = 1e-4, 1
# name -> (position kind, tokenizer, block_size, what vLLM loads: the out_dir itself or the to_gpt2() export)
MODELS = {
    "learned": ("learned", "char", 128, "remote code"),
    "rope": ("rope", "char", 128, "remote code"),
    "alibi": ("alibi", "char", 128, "remote code"),
    "learned-gpt2": ("learned", "char", 128, "gpt2 export"),
    "bpe-gpt2": ("learned", "gpt2", 64, "gpt2 export"),
    # speed only, at the size of nanoGPT's shakespeare_char model (6 layers, 384 wide; untrained: the speed is the same)
    "speed-rope": ("rope", "char", 256, "remote code"),
    "speed-gpt2": ("learned", "char", 256, "gpt2 export"),
}


def save_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1))


def corpus():
    """~300 KB of real text every Python installation has: its standard library's source."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "subprocess.py", "inspect.py", "typing.py"]
    return "".join((lib / n).read_text(encoding="utf-8") for n in names)


def train(model, data, steps, block, batch=16, lr=3e-3):
    import torch

    g = torch.Generator().manual_seed(0)
    opt = model.configure_optimizers(0.0, lr, (0.9, 0.95), "cpu", verbose=False)
    model.train()
    for step in range(steps):
        ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + block] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
        loss = model(x, shift_labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"  trained {steps} steps, last loss {loss.item():.3f}", flush=True)
    return model.eval()


def our_greedy(model, tokenizer, prompts, new_tokens):
    """Our generate(), one prompt at a time: ids and the chosen tokens' log-probs."""
    import torch

    out = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        # the mask given: without one, generate() takes every pad_token_id in the prompt for padding
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        new = g.sequences[0, ids.shape[1]:]
        lp = [step[0].float().log_softmax(-1)[t].item() for step, t in zip(g.logits, new)]
        out.append({"prompt_ids": ids[0].tolist(), "ids": new.tolist(), "logprobs": lp})
    return out


def bench_prompts(text):
    step = len(text) // BENCH_PROMPTS
    return [text[i * step:i * step + 20] for i in range(BENCH_PROMPTS)]


def our_bench(folder):
    """A function timing one run of our batched generate() (left padding, KV cache, greedy) on the model in folder,
    loaded as its users load it: AutoModelForCausalLM with the folder's own code (trust_remote_code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # (the char tokenizer's pad token is its <|endoftext|>)
    prompts = json.loads((Path(folder) / "reference.json").read_text())["bench_prompts"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=BENCH_TOKENS, min_new_tokens=BENCH_TOKENS, do_sample=False,
              pad_token_id=tokenizer.pad_token_id)
    model.generate(**enc, **(kw | dict(max_new_tokens=5, min_new_tokens=5)))  # warm-up

    def run():
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        assert out.shape[1] - enc["input_ids"].shape[1] == BENCH_TOKENS
        return time.perf_counter() - t0
    return run


def build(work):
    import torch

    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
    from nanogpt_hf.export import export_gpt2
    from nanogpt_hf.tokenization import build_char_tokenizer, gpt2_tokenizer

    torch.set_num_threads(THREADS)
    work = Path(work)
    text = corpus()
    tokenizers = {"char": build_char_tokenizer(text), "gpt2": gpt2_tokenizer()}
    trained = {}
    for name, (pe, tok_name, block, served) in MODELS.items():
        tokenizer = tokenizers[tok_name]
        key = (pe, tok_name, block)
        if name.startswith("speed"):
            torch.manual_seed(0)
            config = NanoGPTConfig(vocab_size=len(tokenizer), block_size=block, n_layer=6, n_head=6, n_embd=384,
                                   position_embedding=pe, bos_token_id=None, eos_token_id=None)
            trained[key] = NanoGPTForCausalLM(config).eval()
        elif key not in trained:  # learned-gpt2 is the learned model, exported
            print(f"training {name} ({pe} positions, {tok_name} tokens, block {block})", flush=True)
            torch.manual_seed(0)
            # head size 64: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ... (not 16)
            config = NanoGPTConfig(vocab_size=len(tokenizer), block_size=block, n_layer=2, n_head=2, n_embd=128,
                                   position_embedding=pe, bos_token_id=None, eos_token_id=None)
            data = torch.tensor(tokenizer(text)["input_ids"][:400_000])
            trained[key] = train(NanoGPTForCausalLM(config), data, 300 if tok_name == "char" else 150, block,
                                 batch=16 if tok_name == "char" else 8)
        model = trained[key]
        folder = work / name
        if served == "remote code":
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        else:
            export_gpt2(None, folder, model, tokenizer)
            # our own format too: the source of examples/export.py --to gguf, and of our side of the speed runs
            twin = work / {"learned-gpt2": "learned", "bpe-gpt2": "bpe-src", "speed-gpt2": "speed-learned"}[name]
            if not twin.exists():
                model.save_pretrained(twin)
                tokenizer.save_pretrained(twin)
        ref = {"served": served, "position": pe, "tokenizer": tok_name, "bench_prompts": bench_prompts(text)}
        if name.startswith("speed"):  # ours is timed in the vLLM process, taking turns with vLLM
            ref["bench_ours"] = str(folder if served == "remote code" else twin)
            if served != "remote code":
                save_json(twin / "reference.json", ref)  # our_bench reads the prompts there
        else:
            ref |= {"prompts": PROMPTS, "ours": our_greedy(model, tokenizer, PROMPTS, NEW_TOKENS)}
        save_json(folder / "reference.json", ref)
    print(f"built {', '.join(MODELS)} in {work}")


def run_vllm(work, name):
    from vllm import LLM, SamplingParams

    folder = Path(work) / name
    ref = json.loads((folder / "reference.json").read_text())
    result = {}
    try:
        llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", enforce_eager=True, seed=0,
                  enable_prefix_caching=False,  # the speed runs repeat their prompts; ours has no such cache
                  gpu_memory_utilization=float(os.environ.get("VLLM_MEMORY_FRACTION", "0.08")))
    except Exception as e:  # the refusal we expect for ALiBi: keep the root cause, the engine's last line is generic
        result["refused"] = f"{type(e).__name__}: {e}"
        save_json(folder / "vllm.json", result)
        print(f"vllm {name}: refused ({e})")
        return
    if "prompts" in ref:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        outs = []
        for o in llm.generate(ref["prompts"], params):
            ids = list(o.outputs[0].token_ids)
            lp = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, ids)]
            outs.append({"prompt_ids": list(o.prompt_token_ids), "ids": ids, "logprobs": lp})
        result["outputs"] = outs
    if "bench_ours" in ref:
        # the same prompts through vLLM and through our generate(), taking turns in the same minutes: on a shared
        # machine the load drifts, and turns expose both to it alike; the best of REPEATS each
        bench = SamplingParams(temperature=0, max_tokens=BENCH_TOKENS, min_tokens=BENCH_TOKENS, ignore_eos=True)
        llm.generate(ref["bench_prompts"][:2], SamplingParams(temperature=0, max_tokens=5))  # warm-up
        ours = our_bench(ref["bench_ours"])
        times, our_times = [], []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            done = llm.generate(ref["bench_prompts"], bench, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == BENCH_TOKENS for o in done)
            our_times.append(ours())
        n = len(ref["bench_prompts"]) * BENCH_TOKENS
        result["tok_s"], result["ours_tok_s"] = n / min(times), n / min(our_times)
        result["all_tok_s"] = {"vllm": [round(n / t) for t in times], "ours": [round(n / t) for t in our_times]}
    save_json(folder / "vllm.json", result)
    print(f"vllm {name}: done")


def run_llama(work, name):
    import numpy as np
    from llama_cpp import Llama

    folder = Path(work) / name
    ref = json.loads((folder / "reference.json").read_text())
    gguf = next(folder.glob("gguf/*.gguf"))
    llm = Llama(model_path=str(gguf), n_ctx=0, logits_all=True, n_threads=THREADS, verbose=False, seed=0)
    outs = []
    for text in ref["prompts"]:
        prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        llm.reset()
        llm.eval(prompt)
        ids, lps = [], []
        for _ in range(NEW_TOKENS):
            scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            logp = scores - scores.max() - math.log(np.exp(scores - scores.max()).sum())
            tok = int(scores.argmax())
            ids.append(tok)
            lps.append(float(logp[tok]))
            llm.eval([tok])
        outs.append({"prompt_ids": prompt, "ids": ids, "logprobs": lps})
    save_json(folder / "llama.json", {"outputs": outs, "gguf": gguf.name})
    print(f"llama.cpp {name}: done")


def compare(ref, got):
    same_prompt = all(a["prompt_ids"] == b["prompt_ids"] for a, b in zip(ref, got, strict=True))
    # tokens equal up to the first difference (after one, the contexts differ)
    equal = sum(next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), len(a["ids"]))
                for a, b in zip(ref, got))
    total = sum(len(a["ids"]) for a in ref)
    dlp = max(abs(x - y) for a, b in zip(ref, got) if a["ids"] == b["ids"]
              for x, y in zip(a["logprobs"], b["logprobs"])) if equal == total else float("nan")
    return same_prompt, equal, total, dlp


def report(work):
    work, ok, lines = Path(work), True, []
    for name in MODELS:
        folder = work / name
        ref = json.loads((folder / "reference.json").read_text())
        size = "6x384, " if name.startswith("speed") else ""
        what = f"{name:13s} ({size}{ref['served']}, {ref['position']} positions, {ref['tokenizer']} tokens)"
        v = json.loads((folder / "vllm.json").read_text()) if (folder / "vllm.json").is_file() else None
        if v is None:
            lines.append(f"vLLM      {what}: not run")
            ok = False
        elif "refused" in v:
            # the root cause is in the engine worker's log (the exception in this process only says it failed)
            log = (folder / "vllm.log").read_text() if (folder / "vllm.log").is_file() else ""
            cause = next((line.split("ValueError: ", 1)[1] for line in log.splitlines() if "ValueError: " in line),
                         v["refused"])
            clear = ref["position"] == "alibi" and "ALiBi" in cause
            ok &= clear
            lines.append(f"vLLM      {what}: refused{'' if clear else ' (UNEXPECTED)'}: {cause[:200]}")
        else:
            if "ours" in ref:
                same_prompt, equal, total, dlp = compare(ref["ours"], v["outputs"])
                good = same_prompt and equal == total and dlp <= VLLM_TOL and ref["position"] != "alibi"
                ok &= good
                lines.append(f"vLLM      {what}: prompt ids {'equal' if same_prompt else 'DIFFER'}, "
                             f"greedy {equal}/{total}, max |dlogprob| {dlp:.1e}{'' if good else '  <-- FAIL'}")
            if "tok_s" in v:
                lines.append(f"vLLM      {what}: {BENCH_PROMPTS} prompts x {BENCH_TOKENS} tokens, {THREADS} thread: "
                             f"vLLM {v['tok_s']:.0f} tok/s, ours {v['ours_tok_s']:.0f} tok/s, "
                             f"ratio {v['tok_s'] / v['ours_tok_s']:.2f}x (runs: {v['all_tok_s']})")
        if (folder / "llama.json").is_file():
            lj = json.loads((folder / "llama.json").read_text())
            same_prompt, equal, total, dlp = compare(ref["ours"], lj["outputs"])
            good = same_prompt and equal == total
            ok &= good
            lines.append(f"llama.cpp {what}: {lj['gguf']}, prompt ids {'equal' if same_prompt else 'DIFFER'}, "
                         f"greedy {equal}/{total}, max |dlogprob| {dlp:.1e}{'' if good else '  <-- FAIL'}")
    refusal = work / "char-gguf-refusal.txt"
    if refusal.is_file():
        text = refusal.read_text().strip()
        good = len(text.splitlines()) == 1 and text.startswith("error:") and "character-level" in text
        ok &= good
        lines.append(f"llama.cpp char-level export: refused in one line{'' if good else ' (UNEXPECTED)'}: {text[:150]}")
    print("\n".join(lines))
    print("ALL ENGINE CHECKS PASSED" if ok else "ENGINE CHECKS FAILED")
    return ok


if __name__ == "__main__":
    step, work = sys.argv[1], sys.argv[2]
    if step == "build":
        build(work)
    elif step == "vllm":
        run_vllm(work, sys.argv[3])
    elif step == "llama":
        run_llama(work, sys.argv[3])
    elif step == "report":
        sys.exit(0 if report(work) else 1)
    else:
        sys.exit(f"error: unknown step {step!r} (build, vllm, llama, report)")
