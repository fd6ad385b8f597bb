"""
Evaluate a model: loss/perplexity on a prepared dataset, the field's zero-shot benchmarks through
lm-evaluation-harness (HellaSwag, LAMBADA, WikiText, ARC, PIQA, any of its tasks), and our own WikiText/PTB
sliding-window perplexity and LAMBADA last-word accuracy.

    python examples/eval.py --model out-shakespeare-char --data_dir data/shakespeare_char          # val, 200 batches
    python examples/eval.py --model out-shakespeare-char --data_dir data/shakespeare_char --full   # every token
    python examples/eval.py examples/configs/eval_gpt2.yaml        # nanoGPT's GPT-2 baselines on OpenWebText
    python examples/eval.py --model out --benchmarks standard --data_dir data/openwebtext   # lm-eval's 5 + val loss
    python examples/eval.py --model out --benchmarks hellaswag,arc_easy --limit 100         # any lm-eval tasks
    python examples/eval.py --model gpt2 --benchmarks wikitext2,lambada,ptb --stride 512    # ours
    python examples/eval.py --model out --wikitext2_file wiki.test.raw --lambada_file lambada_test.jsonl  # offline
    accelerate launch examples/eval.py --model gpt2 --data_dir data/openwebtext --full   # sums reduced over ranks

Dataset loss: --eval_iters N is nanoGPT's estimate (N random batches of --batch_size x --block_size, the same
ones every time for a --seed); --full is an exact pass over the split (non-overlapping windows).
Benchmarks (test splits from the Hub through `datasets`, or --<name>_file): wikitext2 / wikitext103 / ptb give
token- and word-level perplexity of the whole text with a sliding window (--max_length tokens, a new window
every --stride tokens); lambada gives last-word accuracy. Every other name is an lm-evaluation-harness task
(`pip install -e ".[eval]"`; `standard` = hellaswag, lambada_openai, wikitext, arc_easy, piqa; local YAML tasks in
--tasks_dir); their results also go into the model card (model-index) when --model is a local folder. A YAML
config may hold any of the flags; flags given on the command line win.
Results: a table, and a JSON file: --out, by default eval_results.json in the --model folder when it is a local
one (what its model card reads; results of earlier runs for other splits, benchmarks and tasks stay in it), else
in the current directory.
"""

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.card import CARD_MARKER, write_model_card
from nanogpt_hf.cli import error_boundary
from nanogpt_hf.data import TokenShards, load_tokenizer
from nanogpt_hf.evaluation import BENCHMARKS, STANDARD_TASKS, autocast_dtype, check_device, describe_chars, \
    evaluate_loss, lambada_accuracy, lm_eval_benchmarks, load_benchmark, max_context, sliding_window_perplexity, \
    unknown_chars
from nanogpt_hf.guards import check_same_tokenizer
from nanogpt_hf.loading import load_model
from nanogpt_hf.train_config import read_yaml

RESULTS = "eval_results.json"  # in a local --model folder: the file its model card reads


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="optional YAML file with any of the flags below (flags win)")
    p.add_argument("--model", help="out_dir, Hub id, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    p.add_argument("--data_dir", help="a prepared dataset (examples/prepare.py) to compute the loss on")
    p.add_argument("--split", default="val", help="split(s) of --data_dir, comma-separated, e.g. train,val")
    p.add_argument("--eval_iters", type=int, help="random batches per split (nanoGPT's estimate; default 200)")
    p.add_argument("--full", action="store_true", help="exact: every token of the split once")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--block_size", type=int, help="tokens per sequence (default: the model's context)")
    p.add_argument("--seed", type=int, default=0, help="which random batches --eval_iters draws")
    p.add_argument("--benchmarks", default="", help=f"comma-separated: ours ({', '.join(BENCHMARKS)}), `standard` "
                   f"({', '.join(STANDARD_TASKS)}) or any lm-evaluation-harness task")
    p.add_argument("--tasks_dir", help="folder of lm-evaluation-harness task YAMLs (local tasks, offline data)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task (a quick look)")
    p.add_argument("--num_fewshot", type=int, help="lm-eval: few-shot examples (default: each task's, mostly 0)")
    p.add_argument("--no_model_card", action="store_true",
                   help=f"don't write into a local --model folder ({RESULTS}, README.md); --out then defaults to "
                        f"./{RESULTS}")
    for name in BENCHMARKS:
        p.add_argument(f"--{name}_file", help=f"local file instead of the Hub's {name} test split (implies it)")
    p.add_argument("--stride", type=int, default=512, help="sliding window: new tokens scored per window")
    p.add_argument("--max_length", type=int, help="sliding window length (default: the model's context)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: what accelerate picks)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow a Hub model's own code")
    p.add_argument("--reference_loss", help="published losses to print next to ours, e.g. train=3.11,val=3.12")
    p.add_argument("--out", help=f"JSON file for the results (default: {RESULTS} in a local --model folder, else in "
                                 "the current directory)")
    return p


def parse_args(argv=None):
    """[config.yaml] [--flag value ...]: the YAML's keys are the flags' names; the command line wins."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.config:
        path = Path(args.config)
        data = read_yaml(path) or {}  # safe, a repeated key refused
        actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected 'key: value' lines")
        for key, value in data.items():
            if key not in actions:
                raise ValueError(f"unknown key {key!r} in {path} (known: {', '.join(actions)})")
            if isinstance(value, list):  # split: [train, val]
                value = ",".join(map(str, value))
            if value is not None and actions[key].type is not None:
                try:
                    value = actions[key].type(value)
                except ValueError:
                    raise ValueError(f"{key} in {path}: expected {actions[key].type.__name__}, got {value!r}") from None
            data[key] = value
        p.set_defaults(**data)
        args = p.parse_args(argv)
    if not args.model:
        raise ValueError("--model is required (on the command line or in the config file)")
    if args.out and Path(args.out).is_dir():  # found before the evaluation, not after it
        raise ValueError(f"--out {args.out} is a folder; give a file, e.g. --out {Path(args.out) / RESULTS}")
    return args


def parse_reference(text):
    if not text:
        return {}
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--reference_loss expects split=loss pairs like train=3.11,val=3.12, got {text!r}") from None


def run(args, accelerator):
    """Everything eval.py computes, as a dict (also what goes into the JSON file)."""
    device = args.device if args.device and accelerator.num_processes == 1 else accelerator.device
    dtype = autocast_dtype(device, args.dtype)
    model, tokenizer = load_model(args.model, device, trust_remote_code=args.trust_remote_code)
    results = dict(model=args.model, num_params=sum(p.numel() for p in model.parameters()), device=str(device),
                   dtype=str(dtype or "float32"), processes=accelerator.num_processes, data={}, benchmarks={})
    show = accelerator.is_main_process
    if args.data_dir:
        block_size = args.block_size or max_context(model)
        eval_iters = None if args.full else (args.eval_iters or 200)
        references = parse_reference(args.reference_loss)
        for split in [s.strip() for s in args.split.split(",") if s.strip()]:
            shards = TokenShards(args.data_dir, split)
            shards.check_vocab(model.config.vocab_size)  # ids the model has no row for: refused, not an IndexError
            check_same_tokenizer(args.model, load_tokenizer(args.data_dir), f"--model {args.model}", args.data_dir)
            r = evaluate_loss(model, shards, args.batch_size, block_size, eval_iters=eval_iters, full=args.full,
                              accelerator=accelerator, seed=args.seed, dtype=dtype, progress=show)
            r.update(dataset=shards.meta.get("dataset"), block_size=block_size, batch_size=args.batch_size,
                     method="full pass" if args.full else f"{eval_iters} random batches (seed {args.seed})")
            if split in references:
                r["reference_loss"] = references[split]
            results["data"][split] = r
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    names = [t for b in names for t in (STANDARD_TASKS if b == "standard" else [b])]
    tasks = [b for b in names if b not in BENCHMARKS]  # lm-evaluation-harness's
    names = [b for b in names if b in BENCHMARKS] + [b for b in BENCHMARKS if getattr(args, f"{b}_file") and b not in names]
    if tasks:
        if accelerator.num_processes > 1:
            raise ValueError("lm-evaluation-harness tasks run in one process here: drop `accelerate launch`")
        results["lm_eval"], raw = lm_eval_benchmarks(model, tokenizer, tasks, tasks_dir=args.tasks_dir,
                                                     batch_size=args.batch_size, limit=args.limit,
                                                     num_fewshot=args.num_fewshot)
        results["lm_eval_version"] = raw.get("lm_eval_version") or version("lm_eval")
    for name in names:
        with accelerator.main_process_first():  # one process downloads, the others read the cache
            data = load_benchmark(name, getattr(args, f"{name}_file"))
        bad = unknown_chars(tokenizer, "".join(data) if isinstance(data, list) else data)
        if bad and show:
            print(f"note: {name} has characters outside the model's vocabulary, encoded as its replacement "
                  f"character: {describe_chars(bad)}")
        if BENCHMARKS[name]["kind"] == "lambada":
            r = lambada_accuracy(model, tokenizer, data, batch_size=args.batch_size, accelerator=accelerator,
                                 dtype=dtype, progress=show)
        else:
            r = sliding_window_perplexity(model, tokenizer, data, stride=args.stride, max_length=args.max_length,
                                          batch_size=args.batch_size, accelerator=accelerator, dtype=dtype,
                                          progress=show)
        r["source"] = getattr(args, f"{name}_file") or "/".join(BENCHMARKS[name]["hub"][:3])
        results["benchmarks"][name] = r
    return results


def format_table(results):
    rows = [("task", "metric", "value", "details")]
    for split, r in results["data"].items():
        ref = f"; reference {r['reference_loss']:.2f}" if "reference_loss" in r else ""
        rows.append((f"{r['dataset']} {split}", "loss", f"{r['loss']:.4f}",
                     f"ppl {r['ppl']:.2f}, {r['tokens']:,} tokens, {r['method']}{ref}"))
    for name, r in results["benchmarks"].items():
        if "accuracy" in r:
            rows.append((name, "accuracy", f"{100 * r['accuracy']:.2f}%",
                         f"{r['correct']:,}/{r['total']:,} last words; target-token ppl {r['ppl']:.2f}"))
        else:
            rows.append((name, "token ppl", f"{r['token_ppl']:.2f}",
                         f"word ppl {r['word_ppl']:.2f}, {r['bits_per_byte']:.3f} bits/byte, {r['n_tokens']:,} "
                         f"tokens, {r['n_words']:,} words, window {r['max_length']} stride {r['stride']}"))
    for task, r in results.get("lm_eval", {}).items():
        for metric, value in r["metrics"].items():
            err = r["stderr"].get(metric)
            rows.append((task, metric, f"{value:.4f}", f"{'± %.4f, ' % err if isinstance(err, float) else ''}"
                         f"{r['n']} examples, {r['num_fewshot'] or 0}-shot, lm-evaluation-harness"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    head = (f"{results['model']} ({results['num_params'] / 1e6:.2f}M params), {results['device']}, "
            f"{results['dtype']}, {results['processes']} process(es)")
    return "\n".join([head] + ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3]
                               for row in rows])


def model_folder(args):
    """The --model folder this run may write its results into (a local model folder, no --no_model_card), or None."""
    folder = Path(args.model).expanduser()
    return folder if (folder / "config.json").is_file() and not args.no_model_card else None


def merged(path, results):
    """results over the earlier ones in path: per data split, benchmark and lm-eval task, this run's win."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    old = old if isinstance(old, dict) else {}
    return {**old, **results, **{k: {**(old.get(k) or {}), **results.get(k, {})} for k in ("data", "benchmarks",
                                                                                         "lm_eval")}}


def write_results(args, results):
    """The JSON file (--out, or the model folder's eval_results.json), and the model card of a local --model."""
    folder = model_folder(args)
    record = folder / RESULTS if folder is not None else None
    out = Path(args.out) if args.out else record or Path(RESULTS)
    out.write_text(json.dumps(merged(out, results) if out == record else results, indent=2) + "\n")
    print(f"results written to {out}" + ("" if args.out or record else " (the current directory)"))
    if record is None or not results.get("lm_eval"):
        return
    if out != record:  # the model card reads the model folder's file
        keep = {k: results[k] for k in ("model", "data", "lm_eval", "lm_eval_version")}
        record.write_text(json.dumps(merged(record, keep), indent=2) + "\n")
        print(f"and to {record}")
    card = folder / "README.md"
    if not card.is_file() or CARD_MARKER in card.read_text(encoding="utf-8", errors="replace"):
        write_model_card(folder)  # (a card edited by hand, its marker line gone, stays as it is)
        print(f"model card: {card}")


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    args = parse_args(argv)
    if args.eval_iters is not None and args.eval_iters < 1 or args.batch_size < 1 or args.stride < 1:
        raise ValueError("--eval_iters, --batch_size and --stride must be >= 1")
    if not args.data_dir and not args.benchmarks and not any(getattr(args, f"{b}_file") for b in BENCHMARKS):
        raise ValueError("nothing to evaluate: pass --data_dir and/or --benchmarks (or a --<benchmark>_file)")
    if args.device:
        check_device(args.device)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    results = run(args, accelerator)
    if accelerator.is_main_process:
        print(format_table(results))
        results["args"] = {k: v for k, v in vars(args).items()}
        write_results(args, results)
    return results


if __name__ == "__main__":
    main()
