"""The GPU check (issue 15), one table at the end. Run through scripts/gpu_check.sh:

    bash scripts/gpu_check.sh                  # on a CUDA machine, inside ~9 minutes
    bash scripts/gpu_check.sh --dry-run        # on a CPU: every step at tiny shapes, in well under a minute

Steps (each one's failure is a row of the table, not the end of the run):
  1. the GPU test subset (pytest -m gpu);
  2. GPT-2 124M train step, bf16 + torch.compile: ms/iter, tokens/s, MFU, peak memory, next to GPT2LMHeadModel;
  3. examples/configs/shakespeare_char.yaml to the end: val loss, wall time (tiny-shakespeare from --text, or
     the offline python_char corpus when no text is given);
  4. one-GPU FSDP2 through `accelerate launch --config_file accelerate_configs/fsdp.yaml`: a run with a sharded
     checkpoint, then --init_from resume from it (dry run: accelerate_configs/cpu.yaml, FSDP needs GPUs);
  5. cached generation tokens/s at 124M, batch 1 and 8: static cache + compiled step vs the dynamic cache.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEST, RESUMED = r"best val loss ([\d.]+)", r"resuming training from .*\(iter (\d+)\)"  # train.py's log lines
sys.path.insert(0, str(ROOT))


def run(cmd, timeout, env=None):
    """(ok, seconds, output) of a command run from the repository root."""
    t = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    return ok, time.time() - t, out


def last(pattern, text, default="?"):
    found = re.findall(pattern, text)
    return found[-1] if found else default


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check that every step runs")
    p.add_argument("--text", help="tiny-shakespeare input.txt for step 3 (default: look in shared/data)")
    p.add_argument("--work_dir", help="where data and runs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    dry = args.dry_run
    py = sys.executable
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    rows = []

    def row(step, ok, seconds, result, out=""):
        rows.append(dict(step=step, ok=ok, seconds=round(seconds, 1), result=result))
        print(f"[{'ok' if ok else 'FAILED'}] {step} ({seconds:.0f} s): {result}", flush=True)
        if not ok:
            print(out[-3000:], flush=True)

    # 1. GPU tests
    if dry:  # on a CPU they would all skip
        row("GPU tests", True, 0, "skipped in the dry run")
    else:
        ok, dt, out = run([py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_compile.py"], 240)
        row("GPU tests", ok, dt, last(r"\d+ passed[^\n]*", out), out)

    # 2. train step at 124M (tiny in the dry run)
    shape = (["--preset", "custom", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
              "--vocab_size", "64", "--batch_size", "2", "--iters", "2", "--warmup", "1", "--dtype", "float32"]
             if dry else ["--preset", "gpt2", "--iters", "20", "--warmup", "5", "--dtype", "bfloat16", "--compile"])
    ok, dt, out = run([py, "examples/bench.py", "--what", "train", "--device", device, "--no_reference",
                       "--json", str(work / "train.json"), *shape], 240)
    result = "?"
    if ok:
        r = json.loads((work / "train.json").read_text())["train"]["models"]
        mfu = {name: "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%" for name, m in r.items()}
        result = " | ".join(f"{name} {m['train_ms']:.1f} ms/iter, {m['tokens_per_s']:,.0f} tok/s, mfu {mfu[name]}, "
                            f"{m['peak_memory_mb']:,.0f} MB" for name, m in r.items())
    row("train step " + ("tiny fp32" if dry else "124M bf16+compile"), ok, dt, result, out)

    # 3. shakespeare_char.yaml to the end
    text = Path(args.text) if args.text else next((c for c in (ROOT / "shared/data/tinyshakespeare/input.txt",
                                                               ROOT.parent / "shared/data/tinyshakespeare/input.txt")
                                                   if c.is_file()), None)
    data = work / "data"
    if dry:
        from nanogpt_hf.prepare import prepare_dataset
        sample = work / "input.txt"
        sample.write_text((Path(__file__).read_text() + "\n") * 20)
        t = time.time()
        prepare_dataset("tiny_char", data_dir=data / "tiny_char", inputs=[str(sample)], tokenizer="char",
                        shard_size=4096)
        data_dir, prep = data / "tiny_char", (True, time.time() - t, "")
    elif text is not None:
        prep = run([py, "examples/prepare.py", "--dataset", "shakespeare_char", "--input", str(text), "--data_dir",
                    str(data / "shakespeare_char")], 120)
        data_dir = data / "shakespeare_char"
    else:
        prep = run([py, "examples/prepare.py", "--dataset", "python_char", "--data_dir", str(data / "python_char")],
                   120)
        data_dir = data / "python_char"
    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
            "--eval_iters", "2", "--cpu", "true", "--compile", "false", "--mixed_precision", "no"] if dry else []
    out_dir = work / "out-shakespeare-char"
    ok, dt, out = run([py, "examples/train.py", "examples/configs/shakespeare_char.yaml", "--data_dir",
                       str(data_dir), "--out_dir", str(out_dir), "--sample_at_end", "0",
                       *(["--max_iters", "6", "--eval_interval", "3", "--lr_decay_iters", "6", "--warmup_iters",
                          "1"] + tiny if dry else [])], 300) if prep[0] else (False, prep[1], prep[2])
    result = f"val loss {last(BEST, out)}, {dt:.0f} s wall" + \
        ("" if dry or text is not None else " (python_char: no tiny-shakespeare text given)")
    row("shakespeare_char.yaml" + (" (tiny)" if dry else ""), ok, dt, result, out)

    # 4. FSDP2 through accelerate launch, sharded checkpoint, resume
    config = "accelerate_configs/cpu.yaml" if dry else "accelerate_configs/fsdp.yaml"
    fsdp_out = work / "out-fsdp"
    common = ["-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
              "examples/train.py", "examples/configs/shakespeare_char.yaml", "--data_dir", str(data_dir), "--out_dir",
              str(fsdp_out), "--sample_at_end", "0", "--eval_iters", "5", "--warmup_iters", "1"] + tiny
    ok1, dt1, out1 = run([py, *common, "--max_iters", "20", "--eval_interval", "10", "--lr_decay_iters", "40"], 240)
    ok2, dt2, out2 = run([py, *common, "--max_iters", "40", "--eval_interval", "10", "--lr_decay_iters", "40",
                          "--init_from", "resume"], 240) if ok1 else (False, 0, "")
    sharded = any((fsdp_out / "checkpoints").glob("step_*/sharded")) if ok1 else False
    ok = ok1 and ok2 and "resuming training from" in out2 and (sharded or dry)
    row(f"{'FSDP2' if not dry else 'cpu.yaml (FSDP needs GPUs)'} save + resume", ok, dt1 + dt2,
        f"sharded checkpoint {'yes' if sharded else 'no'}; resumed at iter {last(RESUMED, out2)}, best val loss "
        f"{last(BEST, out2)}", out1 + out2)

    # 5. cached generation at 124M: static cache + compiled step vs dynamic
    ok, dt, out = run([py, str(Path(__file__).resolve()), "--generate", device, str(work / "gen.json")], 300)
    result = "?"
    if ok:
        g = json.loads((work / "gen.json").read_text())
        result = " | ".join(f"b={b}: dynamic {v['dynamic']:,.0f} tok/s, static+compile {v['compiled']:,.0f} tok/s "
                            f"({v['compiled'] / v['dynamic']:.2f}x)" for b, v in g.items())
    row("generate " + ("tiny" if dry else "124M") + " static+compile vs dynamic", ok, dt, result, out)

    print("\n| step | ok | seconds | result |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {r['result']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def generate(device, out_path):
    """Step 5 in its own process: tokens/s of greedy generate() with each cache kind."""
    import torch
    from transformers import logging as hf_logging

    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
    from nanogpt_hf.evaluation import static_decoding

    hf_logging.set_verbosity_error()
    dry = device == "cpu"
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=64) if dry else \
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    new = 16 if dry else 255
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(**shape, dropout=0.0)).to(device).eval()
    if not dry:
        model = model.to(torch.bfloat16)
    results = {}
    for b in (1, 8):
        idx = torch.zeros(b, 1, dtype=torch.long, device=device)
        kinds = {"dynamic": {}, "compiled": static_decoding(model, 1 + new, compile=not dry)}
        results[b] = {}
        for kind, extra in kinds.items():
            def once():
                cache = extra.get("cache", extra.get("past_key_values"))
                if cache is not None:
                    cache.reset()
                out = model.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                     **extra)
                assert out.shape == (b, 1 + new)
            with torch.no_grad():
                once()  # warm-up (and the compile)
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                once()
                if device == "cuda":
                    torch.cuda.synchronize()
            results[b][kind] = b * new / (time.perf_counter() - t)
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--generate":
        generate(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
