"""lm-evaluation-harness on our models, offline, with small local tasks (YAML + JSONL) in lm-eval's formats:
multiple_choice (loglikelihood), loglikelihood_rolling (WikiText's kind, which starts from the bos/prefix token)
and generate_until, on a char-level and a GPT-2 BPE model; its numbers equal our own computation. Also
`examples/eval.py --benchmarks` (table, JSON, eval_results.json, a model card whose model-index the Hub's
own parser reads back), and the `lm_eval` command with trust_remote_code=True where nanogpt_hf cannot be imported."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.data import load_tokenizer
from nanogpt_hf.tokenization import build_char_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TEXT = "the king hath spoken, and thou art the queen.\nspeak, sweet night!\n"

MC = [{"context": "the king", "choices": ["hath", "queen"], "label": 0},
      {"context": "thou art the", "choices": ["queen.", "night"], "label": 0},
      {"context": "speak,", "choices": ["sweet", "king"], "label": 1}]
GEN = [{"prompt": "the king ", "answer": "hath"}, {"prompt": "speak, ", "answer": "sweet"}]
ROLLING = [{"text": "the king hath spoken."}, {"text": "speak, sweet night!"}]
TASKS = {
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="{{context}}", doc_to_choice="{{choices}}",
                    doc_to_target="{{label}}", metric_list=[{"metric": "acc"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
                     generation_kwargs={"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
    "tiny_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]),
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    import yaml

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("tiny_mc", MC), ("tiny_gen", GEN), ("tiny_rolling", ROLLING)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        task = dict(task=name, dataset_path="json", dataset_kwargs={"data_files": {"test": str(d / f"{name}.jsonl")}},
                    test_split="test", **TASKS[name])
        (d / f"{name}.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def save_model(path, tokenizer, vocab_size):
    torch.manual_seed(0)
    NanoGPTForCausalLM(NanoGPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)) \
        .save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    tok = build_char_tokenizer(TEXT)
    return save_model(tmp_path_factory.mktemp("char_model"), tok, len(tok))


def our_logprob(model, ids, target_from):
    """sum of log p(ids[t] | ids[:t]) for t >= target_from."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(target_from, len(ids)))


def arguments(sample):
    """A sample's requests as tuples: in memory they are tuples, in --log_samples files {"arg_0": ..., ...}."""
    args = sample["arguments"]
    return [tuple(a.values()) for a in args.values()] if isinstance(args, dict) else args


def check_against_ours(model_dir, samples):
    model = NanoGPTForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    for s in samples["tiny_mc"]:  # loglikelihood(context, " " + choice)
        for (context, continuation), resp in zip(arguments(s), s["resps"]):
            ctx, cont = tok.encode(context), tok.encode(continuation)
            assert float(resp[0][0]) == pytest.approx(our_logprob(model, ctx + cont, len(ctx)), abs=1e-4)
    for s in samples["tiny_rolling"]:  # the whole text after the prefix (bos) token
        ids = tok.encode(s["doc"]["text"])
        ours = our_logprob(model, [tok.bos_token_id] + ids, 1)
        assert float(s["resps"][0][0]) == pytest.approx(ours, abs=1e-4)
    for s in samples["tiny_gen"]:  # greedy, cut at the first stop string
        prompt = tok.encode(arguments(s)[0][0])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, len(prompt):])
        for stop in ("\n", ".", tok.eos_token):
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text


def test_char_model_all_three_request_kinds_match_our_numbers(char_model, tasks_dir):
    from nanogpt_hf.evaluation import lm_eval_benchmarks

    model = NanoGPTForCausalLM.from_pretrained(char_model).eval()
    results, raw = lm_eval_benchmarks(model, load_tokenizer(char_model), list(TASKS), tasks_dir=tasks_dir,
                                      batch_size=2, log_samples=True)
    assert set(results) == set(TASKS)
    assert 0 <= results["tiny_mc"]["metrics"]["acc"] <= 1 and results["tiny_mc"]["n"] == 3
    assert results["tiny_rolling"]["metrics"]["word_perplexity"] > 1
    check_against_ours(char_model, raw["samples"])


def test_eval_script_benchmarks_bpe_model_table_json_and_model_card(tiktoken_cache, tasks_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from nanogpt_hf.card import write_model_card
    from nanogpt_hf.tokenization import gpt2_tokenizer

    tok = gpt2_tokenizer()
    model_dir = save_model(tmp_path / "bpe", tok, len(tok))
    write_model_card(model_dir)
    spec = importlib.util.spec_from_file_location("example_eval", ROOT / "examples" / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "results.json"
    script.main(["--model", str(model_dir), "--benchmarks", "tiny_mc,tiny_rolling", "--tasks_dir", str(tasks_dir),
                 "--batch_size", "2", "--device", "cpu", "--out", str(out)])
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc" in table and "word_perplexity" in table and "lm-evaluation-harness" in table
    results = json.loads(out.read_text())
    assert set(results["lm_eval"]) == {"tiny_mc", "tiny_rolling"} and results["lm_eval_version"]
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert saved["lm_eval"] == results["lm_eval"]
    # the model card: an Evaluation table and a model-index that huggingface_hub's parser (the Hub's format) reads
    card = ModelCard.load(model_dir / "README.md")
    assert "## Evaluation" in card.text and "| tiny_mc | acc |" in card.text
    parsed = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert parsed[("tiny_mc", "acc")] == pytest.approx(results["lm_eval"]["tiny_mc"]["metrics"]["acc"])
    assert ("tiny_rolling", "word_perplexity") in parsed
    assert card.data.to_dict()["model-index"][0]["results"][0]["task"]["type"] == "text-generation"
    assert "lm_eval --model hf --model_args pretrained=<user>/bpe,trust_remote_code=True" in card.text


CHILD = textwrap.dedent("""
    import importlib.util, sys
    # nanogpt_hf must not be importable here (editable installs add a finder to sys.meta_path)
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                     and "nanogpt" not in repr(f).lower()]
    sys.path = [p for p in sys.path if p and p.rstrip("/") != "{repo}"]
    assert importlib.util.find_spec("nanogpt_hf") is None, "nanogpt_hf should not be importable"
    # (test speed only: index the --include_path tasks, not lm-eval's ~10,000 built-in task files, 5-15 s)
    from lm_eval.tasks import TaskManager  # (lm_eval.tasks.manager.TaskManager since 0.4.11)
    init = TaskManager.__init__
    TaskManager.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False})
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + sys.argv[1:]
    cli_evaluate()
    assert "nanogpt_hf" not in sys.modules
""")


def test_lm_eval_command_with_trust_remote_code_without_our_package(char_model, tasks_dir, tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD.replace("{repo}", str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")  # a fresh transformers_modules cache
    proc = subprocess.run([sys.executable, str(child), "--model", "hf", "--model_args",
                           f"pretrained={char_model},trust_remote_code=True", "--tasks", ",".join(TASKS),
                           "--include_path", str(tasks_dir), "--batch_size", "2", "--device", "cpu",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    assert set(json.loads(results_file.read_text())["results"]) == set(TASKS)
    samples = {task: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
                      .read_text().splitlines()] for task in TASKS}
    check_against_ours(char_model, samples)
