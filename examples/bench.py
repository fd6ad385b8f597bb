"""
Benchmarks (nanoGPT's bench.py, plus the comparisons of docs/performance.md); the code is in benchmarks/:

    python examples/bench.py                               # all three at nanoGPT's CPU "baby" shape
    python examples/bench.py --what train --iters 100      # nanogpt_hf vs GPT2LMHeadModel vs plain PyTorch
    python examples/bench.py --what generate               # tokens/s with/without KV cache, shakespeare_char shape
    python examples/bench.py --what generate --gen_shape gpt2 --gen_tokens 255   # at 124M (slow on CPU)
    python examples/bench.py --what generate --sample_num 2   # + sample.py's job vs nanoGPT's sample.py loop
    python examples/bench.py --what bf16                   # train step fp32 vs bf16 autocast, baby + shakespeare_char
    python examples/bench.py --what data --data_dir data/shakespeare_char
    python examples/bench.py --what prepare --text data/shakespeare/input.txt               # 100 MB, vs bare tiktoken
    python examples/bench.py --preset gpt2 --device cuda --dtype bfloat16 --compile --profile prof/
    python examples/bench.py --what time_to_loss            # AdamW vs Muon to val loss 1.88, shakespeare_char CPU run
    python examples/bench.py --what time_to_loss --runs examples/configs/shakespeare_char_cpu.yaml \
        "examples/configs/shakespeare_char_cpu_muon.yaml --muon_learning_rate 0.05"   # any configs, any overrides

--what train: one training step (forward, backward, AdamW) of each model, alternating, median ms/iter,
tokens/s, MFU (against the device's bf16 peak; n/a on CPU), peak memory and minor page faults per step (fresh
memory from the OS). --what generate: greedy
generation of --gen_tokens tokens from a 1-token prompt at batch 1 and 8. --what data: the cost of sampling a
batch (TokenShards.get_batch) as a share of a train step; without --data_dir a small char dataset is prepared
in a temp folder from --text or from Python's standard library. --what time_to_loss: trains each of --runs
(a train.py config and its flags, one quoted string per run) with the trainer's recipe, on the same data and
seed, their iterations alternating in one process, and prints the iterations and seconds (training steps only)
each took to bring nanoGPT's val loss estimate (train.py's "val loss") to --target_loss, the exact loss over the
whole val split there, and the ratios to the first run. --what prepare: examples/prepare.py's tokens/s (end to end)
next to the bare tokenizer's batch encode of the same text on all cores (tiktoken encode_ordinary_batch; HF
tokenizers encode_batch) writing one uint16 array, alternating, median of --prepare_repeats. Timings on a busy
machine are noisy: use --iters, and compare only numbers from the same run.
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ (and nanogpt_hf/ when not installed)

import torch
import transformers

from benchmarks.common import PRESETS, Shape, describe_machine
from benchmarks.data_loader import bench_data, format_data, prepare_bench_data
from benchmarks.generation import bench_generate, bench_sample, format_generate, format_sample
from benchmarks.prepare import bench_prepare, bench_text, format_prepare
from benchmarks.time_to_loss import TARGET_LOSS, TIME_TO_LOSS_GOAL, bench_time_to_loss, format_time_to_loss
from benchmarks.train_step import bench_bf16, bench_train, format_bf16, format_train
from nanogpt_hf.evaluation import autocast_dtype, check_device, default_device
from nanogpt_hf.train_config import parse_config
from nanogpt_hf.cli import error_boundary

WHAT = ("train", "generate", "data", "time_to_loss", "prepare", "bf16")
ROOT = Path(__file__).resolve().parent.parent
RUNS = [str(ROOT / "examples/configs" / name)  # --what time_to_loss: AdamW (the baseline), then Muon
        for name in ("shakespeare_char_cpu.yaml", "shakespeare_char_cpu_muon.yaml")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="train,generate,data",
                   help="comma-separated: train, generate, data, time_to_loss, bf16 (the last two take minutes), "
                        "prepare (GPT-2 BPE over --text); the last three are not in the default")
    p.add_argument("--preset", default="baby", choices=[*PRESETS, "custom"], help="shape of the train benchmark")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size"):
        p.add_argument(f"--{name}", type=int, help="override the preset's value (required with --preset custom)")
    p.add_argument("--bias", action="store_true", help="give nanogpt_hf biases too (default: nanoGPT's bias=False)")
    # the default is what the README's headline row measures: both models with GPT-2's own activation
    p.add_argument("--activation", default="gelu_new", choices=("gelu_new", "gelu"),
                   help="MLP activation of nanogpt_hf and GPT2LMHeadModel alike: gelu_new (GPT-2's tanh GELU, "
                        "GPT2LMHeadModel's default) or gelu (exact, as nanoGPT's model.py; train.py's default for "
                        "new models)")
    p.add_argument("--gpt2_activation", choices=("gelu_new", "gelu", "gelu_pytorch_tanh"),
                   help="a different activation for GPT2LMHeadModel (default: --activation); gelu_pytorch_tanh: "
                        "the same tanh GELU as gelu_new in torch's one kernel instead of Python ops")
    p.add_argument("--iters", type=int, default=50, help="timed train steps per model")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per model first")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of nanogpt_hf's step to DIR")
    p.add_argument("--no_reference", action="store_true", help="leave out the plain-PyTorch reference model")
    p.add_argument("--gen_shape", default="shakespeare_char", choices=[*PRESETS, "custom"],
                   help="shape of the generate benchmark (custom: the train shape)")
    p.add_argument("--gen_batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--gen_tokens", type=int, default=255, help="new tokens per generate call")
    p.add_argument("--gen_repeats", type=int, default=3, help="timed generate calls with the cache (median)")
    p.add_argument("--gen_nocache_repeats", type=int, default=1,
                   help="timed calls without the cache (slow: batch 8 at 255 tokens takes minutes on a CPU)")
    p.add_argument("--sample_num", type=int, default=10, help="--what generate: sample.py's job, this many samples")
    p.add_argument("--sample_tokens", type=int, default=500, help="--what generate: ... of this many tokens each")
    p.add_argument("--no_compile_decode", action="store_true",
                   help="--what generate: the static-cache run without torch.compile (no compile wait)")
    p.add_argument("--bf16_shapes", default="baby,shakespeare_char",
                   help="--what bf16: presets whose train step is timed in float32 and in bf16 autocast")
    p.add_argument("--data_dir", help="a prepared dataset for --what data (default: a temporary char dataset) and "
                                      "for every run of --what time_to_loss (default: the configs' data_dir)")
    p.add_argument("--text", help="text file for the temporary dataset (default: Python's standard library)")
    p.add_argument("--data_iters", type=int, default=1000, help="get_batch calls to average")
    p.add_argument("--prepare_mb", type=float, default=100, help="--what prepare: MB of text (--text or Python's "
                                                                "standard library, repeated or cut to this size)")
    p.add_argument("--prepare_repeats", type=int, default=3, help="--what prepare: runs of each (median)")
    p.add_argument("--prepare_tokenizers", default="gpt2,hf",
                   help="--what prepare: gpt2 (tiktoken) and/or hf (the same BPE as a tokenizers folder)")
    p.add_argument("--num_proc", type=int, help="--what prepare: tokenizer processes (default: all cores)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; on a busy machine fewer threads than "
                                               "cores avoids thrashing)")
    p.add_argument("--runs", nargs="+", default=RUNS, metavar="'CONFIG.yaml [--key value ...]'",
                   help="--what time_to_loss: the runs to compare, the first is the baseline (default: "
                        "shakespeare_char_cpu.yaml, AdamW, and shakespeare_char_cpu_muon.yaml)")
    p.add_argument("--target_loss", type=float, default=TARGET_LOSS, help="--what time_to_loss: the val loss to reach")
    p.add_argument("--check_every", type=int, default=25, help="--what time_to_loss: estimate the val loss every "
                                                               "this many iterations")
    p.add_argument("--no_full_eval", action="store_true",
                   help="--what time_to_loss: skip the exact val loss (a pass over the whole split) at the target")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    return p.parse_args(argv)


def make_shape(preset, args):
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size")
                   if (v := getattr(args, k)) is not None})
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size") if k not in values]
    if missing:
        raise ValueError(f"--preset custom needs --{' --'.join(missing)}")
    if values["n_embd"] % values["n_head"]:
        raise ValueError(f"--n_embd {values['n_embd']} must be divisible by --n_head {values['n_head']}")
    return Shape(**values)


def time_to_loss_runs(args):
    """--runs -> {label: TrainConfig}: each string is parsed as train.py's arguments; labels are the optimizers'
    names (numbered when they repeat)."""
    if args.check_every < 1:
        raise ValueError("--check_every must be >= 1")
    runs = {}
    for spec in args.runs:
        argv = shlex.split(spec) + (["--data_dir", args.data_dir] if args.data_dir else [])
        cfg = parse_config(argv)
        same = sum(c.optimizer == cfg.optimizer for c in runs.values())
        label = cfg.optimizer if not same else f"{cfg.optimizer}_{same + 1}"
        print(f"run {label}: {spec}")
        runs[label] = cfg
    return runs


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    args = parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not what or set(what) - set(WHAT):
        raise ValueError(f"--what takes a comma-separated list of {', '.join(WHAT)}, got {args.what!r}")
    if min(args.iters, args.gen_repeats, args.gen_nocache_repeats, args.data_iters) < 1 or args.warmup < 0:
        raise ValueError("--iters, --gen_repeats, --gen_nocache_repeats and --data_iters must be >= 1, "
                         "--warmup >= 0")
    device = str(check_device(args.device)) if args.device else default_device()
    dtype = autocast_dtype(device, args.dtype)
    shape = make_shape(args.preset, args)
    gen_shape = shape if args.gen_shape == "custom" else Shape(**PRESETS[args.gen_shape])
    batch_sizes = [int(b) for b in args.gen_batch_sizes.split(",")]
    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text {args.text}: no such file")
    runs = time_to_loss_runs(args) if "time_to_loss" in what else None
    bf16_shapes = [name.strip() for name in args.bf16_shapes.split(",") if name.strip()]
    if set(bf16_shapes) - set(PRESETS):
        raise ValueError(f"--bf16_shapes takes presets of {', '.join(PRESETS)}, got {args.bf16_shapes!r}")

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # GPT2LMHeadModel's config chatter is noise here
    print(f"machine: {describe_machine(device)}")
    results = dict(machine=describe_machine(device), argv=sys.argv[1:] if argv is None else list(argv))
    step_ms = None
    if "train" in what or "data" in what:
        r = bench_train(shape, device, iters=args.iters, warmup=args.warmup, dtype=dtype, compile=args.compile,
                        bias=args.bias, reference=not args.no_reference, seed=args.seed, profile_dir=args.profile,
                        activation=args.activation, gpt2_activation=args.gpt2_activation)
        step_ms = r["models"]["nanogpt_hf"]["train_ms"]
        results["train"] = r
        print(format_train(r))
        if args.profile:
            print(r.pop("profile"))
            print(f"  trace written to {args.profile}/ (open it in https://ui.perfetto.dev or chrome://tracing)")
    if "generate" in what:
        r = bench_generate(gen_shape, device, batch_sizes=batch_sizes, new_tokens=args.gen_tokens,
                           repeats=args.gen_repeats, nocache_repeats=args.gen_nocache_repeats, bias=args.bias,
                           reference=not args.no_reference, dtype=dtype, seed=args.seed, activation=args.activation,
                           gpt2_activation=args.gpt2_activation)
        results["generate"] = r
        print(format_generate(r))
        r = bench_sample(gen_shape, device, num_samples=args.sample_num, new_tokens=args.sample_tokens, dtype=dtype,
                         seed=args.seed, compile=not args.no_compile_decode, reference=not args.no_reference)
        results["sample"] = r
        print(format_sample(r))
    if "bf16" in what:
        r = bench_bf16([Shape(**PRESETS[name]) for name in bf16_shapes], device, iters=args.iters,
                       warmup=args.warmup, seed=args.seed)
        results["bf16"] = r
        print(format_bf16(r))
    if "data" in what:
        with tempfile.TemporaryDirectory(prefix="nanogpt_bench_") as tmp:
            data_dir = args.data_dir or prepare_bench_data(args.text, tmp)
            r = bench_data(data_dir, shape.batch_size, shape.block_size, step_ms, n=args.data_iters)
        results["data"] = r
        print(format_data(r))
    if "prepare" in what:
        with tempfile.TemporaryDirectory(prefix="nanogpt_bench_prepare_") as tmp:
            text = bench_text(args.text, tmp, args.prepare_mb)
            r = bench_prepare(text, tmp, num_proc=args.num_proc, repeats=args.prepare_repeats,
                              tokenizers=[t for t in args.prepare_tokenizers.split(",") if t])
        results["prepare"] = r
        print(format_prepare(r))
    if "time_to_loss" in what:
        ttl_device = args.device or ("cpu" if any(cfg.cpu for cfg in runs.values()) else device)
        r = bench_time_to_loss(runs, target=args.target_loss, check_every=args.check_every, device=ttl_device,
                               full_eval=not args.no_full_eval,
                               log=lambda line: print(line, flush=True))
        results["time_to_loss"] = r
        adamw_baseline = next(iter(runs.values())).optimizer == "adamw"
        print(format_time_to_loss(r, goal=TIME_TO_LOSS_GOAL if adamw_baseline else None))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
