"""
Evaluation: loss/perplexity on prepared token shards, and zero-shot benchmarks on raw text.

    from nanogpt_hf.evaluation import evaluate_loss, sliding_window_perplexity, lambada_accuracy
    model, tokenizer = nanogpt_hf.loading.load_model("out-shakespeare-char")   # or "gpt2", or a Hub id
    evaluate_loss(model, TokenShards(data_dir, "val"), 8, 256, eval_iters=200)   # nanoGPT's estimate (train's too)
    evaluate_loss(model, TokenShards(data_dir, "val"), 8, 256, full=True)        # every token once
    sliding_window_perplexity(model, tokenizer, text, stride=512)     # WikiText / PTB style
    lambada_accuracy(model, tokenizer, texts)                         # LAMBADA last-word accuracy
    lm_eval_benchmarks(model, tokenizer, ["hellaswag", "arc_easy"])   # any lm-evaluation-harness task

Every function takes an optional `accelerator`: each process then works on its share (its rank's windows or
examples) and the sums are reduced across processes, so `accelerate launch examples/eval.py ...` gives the
same numbers as one process. The field's standard zero-shot tasks (HellaSwag, LAMBADA, WikiText, ARC, PIQA) run
through lm-evaluation-harness (`pip install -e ".[eval]"`), on the model already loaded here.
"""

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import StaticCache
from transformers.generation.configuration_utils import CompileConfig

from .guards import first_line
from .modeling_nanogpt import CACHE_NAME
from .tokenization import char_vocab

# the field's standard zero-shot comparison of small GPTs (llm.c, nanoGPT forks): lm-evaluation-harness task names
STANDARD_TASKS = ("hellaswag", "lambada_openai", "wikitext", "arc_easy", "piqa")

# the zero-shot benchmarks: Hub dataset (id, config, split, text column), and how they are scored
BENCHMARKS = {
    "wikitext2": dict(hub=("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"), kind="perplexity"),
    "wikitext103": dict(hub=("Salesforce/wikitext", "wikitext-103-raw-v1", "test", "text"), kind="perplexity"),
    "ptb": dict(hub=("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence"), kind="perplexity"),
    "lambada": dict(hub=("EleutherAI/lambada_openai", "default", "test", "text"), kind="lambada"),
}


# -----------------------------------------------------------------------------
# models, devices, precision


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device, flag="--device"):
    """--device -> a torch.device that exists here; ValueError naming the flag otherwise (cuda without a GPU, a
    GPU index past the last one, a typo), before any model is loaded onto it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {device}: not a device (cpu | cuda | cuda:1 | mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise ValueError(f"{flag} {device}: this machine has {found}; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device}: only cpu, cuda and mps are supported")
    return dev


def autocast_dtype(device, dtype="auto"):
    """--dtype -> the torch dtype to autocast to, or None for plain float32 (nanoGPT: bf16 where supported,
    else fp16, on CUDA; float32 elsewhere)."""
    device_type = torch.device(device).type
    if dtype == "auto":
        if device_type != "cuda":
            return None
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return None if dtype == "float32" else getattr(torch, dtype)


def autocast(device, dtype):
    """Mixed precision context for a dtype from autocast_dtype() (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def unknown_chars(tokenizer, text):
    """Characters of text that a character-level tokenizer has no id for (sorted); [] for other tokenizers."""
    try:
        vocab = char_vocab(tokenizer)
    except ValueError:  # BPE & co. cover any text
        return []
    return sorted(set(text) - set(vocab))


def describe_chars(chars, limit=5):
    """['é'] -> "'é' (U+00E9)": readable even for invisible characters."""
    s = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    return s + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def max_context(model):
    """Longest input the model accepts: its block_size / n_positions."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)


def context_limit(model):
    """The context length generation must respect: max_context for learned positions, None for ALiBi/RoPE."""
    learned = getattr(model.config, "position_embedding", "learned") == "learned"
    return max_context(model) if learned else None


def static_decoding(model, max_len, compile=True):
    """generate() kwargs for a static KV cache of max_len slots, reused by every generate_cropped call (so a
    compiled decoding step is compiled once: same shapes, same buffers), and for compiling that step, which
    transformers does by itself only on GPUs (there with CUDA graphs: mode "reduce-overhead")."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)  # allocated at the first call's batch size
    if not compile:
        return {CACHE_NAME: cache, "disable_compile": True}
    gpu = torch.device(model.device).type == "cuda"
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if gpu else "default")
    config._compile_all_devices = True  # transformers' switch for compiling on CPU too
    return {CACHE_NAME: cache, "compile_config": config}


def generate_cropped(model, idx, max_new_tokens, limit, streamer=None, **gen_kwargs):
    """generate() that may run past the context. idx (1, T) -> (1, T + max_new_tokens) (fewer if EOS).
    limit: the context length to respect (context_limit(model)), or None. nanoGPT crops the context to the last
    block_size tokens before every new token (recomputing everything, no cache). Here, once the text fills the
    block, the context is cropped to its last limit // 2 tokens and the next limit // 2 tokens are generated with
    the KV cache: every token still sees at least limit // 2 tokens, at a fraction of the cost."""
    out, remaining = idx, max_new_tokens
    cache = gen_kwargs.get(CACHE_NAME)  # a static cache from static_decoding(): emptied for each generate()
    while remaining > 0:
        if cache is not None:
            cache.reset()
        context = out if limit is None or out.size(1) < limit else out[:, -(limit // 2):]
        n = remaining if limit is None else min(remaining, limit - context.size(1))
        # max_new_tokens, as out_dir's generation_config has it (max_length too would make generate() warn)
        new = model.generate(context, max_new_tokens=n, streamer=streamer, **gen_kwargs)
        new = new[:, context.size(1):]
        out, remaining = torch.cat([out, new], dim=1), remaining - n
        if new.size(1) < n:  # stopped at EOS
            break
    return out


# -----------------------------------------------------------------------------
# distributed helpers: each process sums over its share, then the sums are added up


def _rank_world(accelerator):
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _reduce_sums(accelerator, values, device):
    """[float, ...] summed over all processes (float64: token counts stay exact)."""
    if accelerator is None or accelerator.num_processes == 1:
        return values
    return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduction="sum").tolist()


def _show_progress(accelerator, progress):
    return progress and (accelerator is None or accelerator.is_main_process)


def _perplexity(nll_sum, count):
    """exp(total NLL / count): count is tokens, or words for word-level perplexity."""
    if count <= 0:
        raise ValueError("perplexity needs a positive number of tokens (or words)")
    loss = nll_sum / count
    return {"perplexity": math.exp(loss) if loss < 700 or math.isnan(loss) else math.inf, "loss": loss}  # no overflow


# -----------------------------------------------------------------------------
# loss on prepared token shards (what train.py trains on)


@torch.no_grad()
def evaluate_loss(model, shards, batch_size, block_size, eval_iters=None, full=False, accelerator=None, seed=0,
                  dtype=None, progress=True, micro_step=0, stop=None):
    """Mean cross-entropy over a split of a TokenShards, two ways; the one loss estimate of train.py and eval.py.

    eval_iters=N: nanoGPT's estimate_loss: N random batches (get_batch with steps 0..N-1, this seed and this
        micro_step stream, so the same windows every time); full=True: every token of the split exactly once
        (non-overlapping windows of block_size, the last partial window dropped; the loss of every window starts
        from an empty context).
    model: a plain model, or one that accelerator.prepare wrapped (the trainer's); dtype: autocast to it (None: as
        the model runs, e.g. under the accelerator's mixed precision). stop: a guards.StopSignals, checked before
        every batch (agreed across ranks): None is returned when a stop signal reached any rank meanwhile.
    Returns dict(loss, ppl, tokens): loss = total NLL / total tokens over all processes.
    """
    if not full and not (isinstance(eval_iters, int) and eval_iters > 0):
        raise ValueError(f"pass eval_iters (a positive number of batches) or full=True, got eval_iters={eval_iters!r}")
    plain = accelerator.unwrap_model(model) if accelerator is not None else model  # DDP hides .config and .device
    shards.check_vocab(plain.config.vocab_size)
    if block_size > max_context(plain) and getattr(plain.config, "position_embedding", "learned") == "learned":
        raise ValueError(f"--block_size {block_size} exceeds the model's context of {max_context(plain)} tokens")
    rank, world = _rank_world(accelerator)
    device = plain.device
    if full:
        batches = shards.iter_sequential(batch_size, block_size, rank=rank, world_size=world, device=device)
        total = math.ceil(len(range(rank, shards.num_windows(block_size), world)) / batch_size)
    else:
        batches = (shards.get_batch(batch_size, block_size, step=k, seed=seed, rank=rank, world_size=world,
                                    micro_step=micro_step, device=device) for k in range(eval_iters))
        total = eval_iters
    was_training = model.training
    model.eval()
    sums, count = [], 0  # each batch's summed NLL stays on the device: no sync per batch
    show = _show_progress(accelerator, progress)
    for x, y in tqdm(batches, total=total, desc=f"eval {shards.split}", disable=not show):
        if stop is not None and stop.agreed(accelerator):
            model.train(was_training)
            return None
        with autocast(device, dtype):
            logits = model(x).logits  # (B, T, V)
        sums.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel() if not getattr(shards, "masked", False) else int((y != -100).sum())  # chat data: the masked targets
    model.train(was_training)
    nll = torch.stack(sums).cpu().double().sum().item() if sums else 0.0  # added up in float64, as .item()s would be
    nll, count = _reduce_sums(accelerator, [nll, count], device)
    if count == 0:
        raise ValueError(f"the {shards.split} split has fewer than {block_size + 1} tokens: nothing to evaluate")
    result = _perplexity(nll, count)
    return dict(loss=result["loss"], ppl=result["perplexity"], tokens=int(count))


# -----------------------------------------------------------------------------
# perplexity of a long text with a sliding window (WikiText, PTB)


def sliding_windows(n_tokens, max_length, stride):
    """The windows that score tokens 1..n-1 of a text exactly once (token 0 has no context).

    Targets go in groups of `stride` tokens: the group [s, e) is scored from the window tokens[max(0, e - L):e],
    so each target sees at least L - stride tokens of context (fewer only near the start). stride is capped at
    L - 1 (a window of L tokens has L - 1 targets). Yields (begin, end, num_targets)."""
    stride = max(1, min(stride, max_length - 1))
    for s in range(1, n_tokens, stride):
        e = min(s + stride, n_tokens)
        yield max(0, e - max_length), e, e - s


@torch.no_grad()
def sliding_window_perplexity(model, tokenizer, text, stride=512, max_length=None, batch_size=1, accelerator=None,
                              dtype=None, progress=True):
    """Token- and word-level perplexity of one long text (Hugging Face's "perplexity of fixed-length models"
    recipe, with exact bookkeeping: every token after the first is scored once, see sliding_windows).

    word_ppl = exp(nll_sum / n_words) with n_words = len(text.split()), the whitespace-separated words of the
    text as given (for raw WikiText that counts punctuation attached to words as part of them, and
    " @-@ " style tokens as words). bits_per_byte = nll_sum / ln 2 / UTF-8 bytes, comparable across tokenizers.
    """
    max_length = max_length or max_context(model)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("the text is too short to evaluate (it needs at least 2 tokens)")
    rank, world = _rank_world(accelerator)
    windows = list(sliding_windows(len(ids), max_length, stride))[rank::world]
    # windows of the same shape (all but the first few and the last) go through the model together
    groups = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and _shape(groups[-1][0]) == _shape(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    device, nll, count = model.device, 0.0, 0
    for group in tqdm(groups, desc="perplexity", disable=not _show_progress(accelerator, progress)):
        x = torch.tensor([ids[b:e] for b, e, _ in group], device=device)  # (B, window)
        k = group[0][2]  # targets: the last k tokens of each window
        with autocast(device, dtype):
            logits = model(x, logits_to_keep=k + 1).logits[:, :-1]  # (B, k, V): positions -k-1..-2 predict the last k
        nll += F.cross_entropy(logits.float().flatten(0, 1), x[:, -k:].flatten(), reduction="sum").item()
        count += x[:, -k:].numel()
    nll, count = _reduce_sums(accelerator, [nll, count], device)
    n_words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    return dict(token_ppl=_perplexity(nll, count)["perplexity"], word_ppl=_perplexity(nll, n_words)["perplexity"],
                bits_per_byte=nll / math.log(2) / n_bytes, nll_sum=nll, n_tokens=int(count), n_words=n_words,
                n_bytes=n_bytes, stride=max(1, min(stride, max_length - 1)), max_length=max_length)


def _shape(window):
    begin, end, k = window
    return end - begin, k


# -----------------------------------------------------------------------------
# LAMBADA: predict the last word of a passage


def split_last_word(text):
    """LAMBADA's convention: the context is everything before the last space; the target is " " + last word."""
    context, sep, word = text.rstrip().rpartition(" ")
    if not sep or not word or not context:
        raise ValueError(f"LAMBADA example has no 'context word' form: {text[:60]!r}")
    return context, " " + word


@torch.no_grad()
def lambada_accuracy(model, tokenizer, texts, batch_size=16, accelerator=None, dtype=None, progress=True):
    """Last-word accuracy: the model's greedy tokens for the last word must equal its tokens exactly.

    One forward pass over context + target per example: the argmax at each target position given the true
    prefix; all of them right is exactly "greedy generation reproduces the word". Also returns ppl, the
    perplexity of the target tokens. Examples are right-padded into batches (a causal model never looks ahead,
    so padding after an example cannot change its logits).
    """
    max_length = max_context(model)
    rank, world = _rank_world(accelerator)
    examples = []
    for text in list(texts)[rank::world]:
        context, target = split_last_word(text)
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = (ctx + tgt)[-max_length:]  # crop the context's start if it is too long
        examples.append((ids, len(tgt)))
    device, nll, n_target = model.device, 0.0, 0
    predictions, references = [], []
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in tqdm(batches, desc="lambada", disable=not _show_progress(accelerator, progress)):
        width = max(len(ids) for ids, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # right-padded with token 0
        for i, (ids, _) in enumerate(batch):
            x[i, :len(ids)] = torch.tensor(ids)
        with autocast(device, dtype):
            logits = model(x).logits.float()  # (B, width, V)
        for i, (ids, k) in enumerate(batch):
            n = len(ids)
            pred_logits, target = logits[i, n - k - 1:n - 1], x[i, n - k:n]  # (k, V), (k,)
            nll += F.cross_entropy(pred_logits, target, reduction="sum").item()
            n_target += k
            predictions.append(pred_logits.argmax(-1).tolist())
            references.append(target.tolist())
    nll, n_target = _reduce_sums(accelerator, [nll, n_target], device)
    if accelerator is not None and accelerator.num_processes > 1:
        predictions, references = gather_object(predictions), gather_object(references)
    if not references:
        raise ValueError("lambada: no examples")
    correct = sum(p == r for p, r in zip(predictions, references))  # every token of the word right
    return dict(accuracy=correct / len(references), correct=correct, total=len(references),
                ppl=_perplexity(nll, n_target)["perplexity"], n_target_tokens=int(n_target))


# -----------------------------------------------------------------------------
# benchmark data: from the Hub through datasets, or a local file (offline)


def load_benchmark(name, file=None):
    """The text of a benchmark: a str for perplexity benchmarks, a list of passages for lambada.

    file: a local alternative. Perplexity benchmarks read it as one UTF-8 text (e.g. wiki.test.raw,
    ptb.test.txt); lambada reads a .jsonl with a "text" field per line (OpenAI's lambada_test.jsonl) or a
    text file with one passage per line.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    kind = BENCHMARKS[name]["kind"]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--{name}_file {file}: no such file")
        text = path.read_text(encoding="utf-8")
        if kind == "perplexity":
            return text
        lines = [line for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            try:
                return [json.loads(line)["text"] for line in lines]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--{name}_file {file}: expected one JSON object with a 'text' field per line "
                                 f"({type(e).__name__})") from None
        return lines
    from .sources import load_hub_dataset  # here: datasets costs ~1 s to import, which training never needs

    hub_id, config, split, column = BENCHMARKS[name]["hub"]
    try:
        rows = load_hub_dataset(hub_id, config, split=split, text_column=column)["text"]
    except ValueError as e:
        msg = str(e).replace("--hf_dataset ", "")  # data.py's wording is for prepare.py's flags
        raise ValueError(f"{name}: {msg}; offline, pass a local copy with --{name}_file FILE") from None
    if kind == "lambada":
        return rows
    # HF's perplexity recipe joins WikiText rows with blank lines; PTB is one sentence per line
    return ("\n\n" if name.startswith("wikitext") else "\n").join(rows)


# -----------------------------------------------------------------------------
# lm-evaluation-harness: HellaSwag, LAMBADA, WikiText, ARC, PIQA, ... on the loaded model


def lm_eval_benchmarks(model, tokenizer, tasks, tasks_dir=None, batch_size=8, limit=None, num_fewshot=None,
                       log_samples=False):
    """lm-evaluation-harness tasks (its names, or YAML tasks in tasks_dir) on this model, through its Hugging Face
    model class (what `lm_eval --model hf` uses), so the numbers are the ones the field reports.

    Returns ({task: {"metrics": {name: value}, "stderr": {name: value}, "n": examples, "dataset": Hub id or a
    builder like "json", "dataset_config", "num_fewshot"}},
    lm-eval's full output). limit: examples per task (for a quick look; not comparable numbers)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install -e \".[eval]\" (or pip install "
                         "lm_eval)") from None
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise FileNotFoundError(f"--tasks_dir {tasks_dir}: no such folder")
    manager = None
    if tasks_dir is not None:  # indexing lm-eval's ~10,000 built-in task files takes 5-15 s: only when needed
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--benchmarks: {unknown} are neither ours ({', '.join(BENCHMARKS)}) nor lm-evaluation-harness "
                         "tasks (lm_eval ls tasks lists them; local YAML tasks go in --tasks_dir)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              max_length=max_context(model))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=1000)
    except OSError as e:  # its tasks' data come from the Hub
        raise ValueError(f"lm-evaluation-harness: {first_line(e)}; its tasks download their data from the Hub "
                         "once (then it is cached): run with network, or give local tasks with --tasks_dir") from None
    results = {}
    for task in tasks:
        raw = out["results"].get(task, {})
        values = {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        config = out.get("configs", {}).get(task, {})
        results[task] = dict(
            metrics={k.split(",")[0]: v for k, v in values.items() if "_stderr" not in k and k != "sample_len"},
            stderr={k.split(",")[0].replace("_stderr", ""): v for k, v in values.items() if "_stderr" in k},
            n=out.get("n-samples", {}).get(task, {}).get("effective"),
            dataset=config.get("dataset_path"), dataset_config=config.get("dataset_name"),
            num_fewshot=out.get("n-shot", {}).get(task))
    return results, out
