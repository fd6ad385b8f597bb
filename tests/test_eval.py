"""Evaluation: every number checked against an independent plain-torch computation on a tiny random model.

The model is tiny (2 layers, 32 emb, block 32) and the texts small, so the whole file runs in seconds; one
test launches eval.py under torchrun with 2 CPU ranks to check the cross-process reduction.
"""

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.data import TokenShards, load_tokenizer
from nanogpt_hf.evaluation import _perplexity, evaluate_loss, lambada_accuracy, \
    sliding_window_perplexity, sliding_windows
from nanogpt_hf.tokenization import build_char_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(vocab_size, seed=0, block_size=BLOCK, **kw):
    torch.manual_seed(seed)
    config = NanoGPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw)
    return NanoGPTForCausalLM(config).eval()


@torch.no_grad()
def direct_nll(model, ids):
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1 from one plain forward pass: the definition, nothing else."""
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    logp = torch.log_softmax(model(x).logits[0].double(), -1)  # (T-1, V)
    return -logp.gather(1, y[:, None]).sum().item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def char_model_dir(char_data_dir, tmp_path_factory):
    """A random tiny model saved with the char dataset's tokenizer (what train.py's out_dir looks like)."""
    path = tmp_path_factory.mktemp("eval_model")
    tokenizer = load_tokenizer(char_data_dir)
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -----------------------------------------------------------------------------
# loss on token shards


def read_split(data_dir, split):
    """The split's tokens straight from meta.json + the .bin files (independent of TokenShards)."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    return np.concatenate([np.fromfile(Path(data_dir) / s["file"], dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]]).astype(np.int64)


def test_evaluate_loss_full_pass_matches_direct_computation(char_data_dir, char_model_dir):
    model = NanoGPTForCausalLM.from_pretrained(char_model_dir).eval()
    tokens = torch.from_numpy(read_split(char_data_dir, "val"))
    n = (len(tokens) - 1) // BLOCK  # non-overlapping windows, the last partial one dropped
    x = tokens[:n * BLOCK].view(n, BLOCK)
    y = tokens[1:n * BLOCK + 1].view(n, BLOCK)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.double(), -1)  # (n, BLOCK, V)
    nll = -logp.gather(2, y[..., None]).sum().item()
    r = evaluate_loss(model, TokenShards(char_data_dir, "val"), batch_size=5, block_size=BLOCK, full=True,
                      progress=False)
    assert r["tokens"] == n * BLOCK
    assert r["loss"] == pytest.approx(nll / (n * BLOCK), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / (n * BLOCK)), rel=1e-5)


def test_evaluate_loss_random_batches_is_nanogpts_estimate(char_data_dir, char_model_dir):
    model = NanoGPTForCausalLM.from_pretrained(char_model_dir).eval()
    shards = TokenShards(char_data_dir, "val")
    losses = []
    with torch.no_grad():
        for k in range(3):  # nanoGPT: mean over eval_iters of each batch's mean loss
            x, y = shards.get_batch(4, BLOCK, step=k, seed=5)
            losses.append(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item())
    r = evaluate_loss(model, shards, 4, BLOCK, eval_iters=3, seed=5, progress=False)
    assert r["tokens"] == 3 * 4 * BLOCK
    assert r["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert evaluate_loss(model, shards, 4, BLOCK, eval_iters=3, seed=5, progress=False) == r  # same windows
    with pytest.raises(ValueError, match="eval_iters"):
        evaluate_loss(model, shards, 4, BLOCK, progress=False)
    with pytest.raises(ValueError, match="block_size"):
        evaluate_loss(model, shards, 4, BLOCK * 2, eval_iters=1, progress=False)


# -----------------------------------------------------------------------------
# sliding-window perplexity


@pytest.fixture(scope="module")
def tok_and_model():
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    return tokenizer, tiny_model(len(tokenizer), seed=1)


TEXT = ("the quick brown fox jumps over the lazy dog.\nit was the best of times, it was the worst of times, "
        "it was the age of wisdom, it was the age of foolishness.\n")


@pytest.mark.parametrize("stride", [1, 7, 100])
def test_sliding_window_within_one_context_is_the_full_forward(tok_and_model, stride):
    tokenizer, model = tok_and_model
    text = TEXT[:BLOCK - 2]
    ids = tokenizer(text)["input_ids"]
    r = sliding_window_perplexity(model, tokenizer, text, stride=stride, progress=False)
    nll = direct_nll(model, ids)
    assert r["n_tokens"] == len(ids) - 1 and r["n_words"] == len(text.split())
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["token_ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert r["word_ppl"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)


@pytest.mark.parametrize("stride,batch_size", [(8, 1), (8, 4), (64, 3)])
def test_sliding_window_long_text_matches_per_token_loop(tok_and_model, stride, batch_size):
    """Each token t >= 1 is scored once, from the window ending at its stride group's end (sliding_windows'
    docstring); computed here one token at a time with a forward pass over exactly that context."""
    tokenizer, model = tok_and_model
    ids = tokenizer(TEXT)["input_ids"]
    s = min(stride, BLOCK - 1)
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            end = min(1 + ((t - 1) // s + 1) * s, len(ids))  # end of the group that holds target t
            context = ids[max(0, end - BLOCK):t]
            logp = torch.log_softmax(model(torch.tensor([context])).logits[0, -1].double(), -1)
            nll -= logp[ids[t]].item()
    r = sliding_window_perplexity(model, tokenizer, TEXT, stride=stride, batch_size=batch_size, progress=False)
    assert r["n_tokens"] == len(ids) - 1 and r["stride"] == s
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["token_ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_sliding_windows_cover_every_target_once():
    for n, L, stride in [(2, 4, 1), (100, 16, 5), (100, 16, 15), (100, 16, 50), (17, 16, 16)]:
        covered = []
        for begin, end, k in sliding_windows(n, L, stride):
            assert end - begin <= L and k <= end - begin - 1  # every target has at least one token of context
            covered += range(end - k, end)
        assert covered == list(range(1, n))


def test_sliding_window_works_for_gpt2lmheadmodel(tok_and_model):
    """Any causal LM, not just ours: the converted GPT2LMHeadModel gives the same numbers."""
    tokenizer, model = tok_and_model
    ours = sliding_window_perplexity(model, tokenizer, TEXT, stride=8, progress=False)
    gpt2 = sliding_window_perplexity(model.to_gpt2().eval(), tokenizer, TEXT, stride=8, progress=False)
    assert gpt2["nll_sum"] == pytest.approx(ours["nll_sum"], rel=1e-4)


# -----------------------------------------------------------------------------
# LAMBADA


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model trained for a moment on two sentences, so that some last words come out right."""
    text = "the cat sat on the mat. a dog ran in the fog. " * 40
    tokenizer = build_char_tokenizer(text + "xyz")
    model = tiny_model(len(tokenizer), seed=0)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        ix = torch.randint(len(ids) - BLOCK - 1, (16,), generator=g)
        x = torch.stack([ids[i:i + BLOCK] for i in ix])
        y = torch.stack([ids[i + 1:i + BLOCK + 1] for i in ix])
        model(x, shift_labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return tokenizer, model.eval()


LAMBADA = ["the cat sat on the mat. a dog ran in the fog", "a dog ran in the fog. the cat sat on the mat.",
           "the cat sat on the dog", "a dog ran in the xyz", "the cat sat on the mat. a dog ran",
           "a dog ran in the fog. the cat sat on the mat. a dog ran in the fog. the cat sat on the mat. a dog"]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lambada_accuracy_matches_greedy_generation(trained_model, batch_size):
    tokenizer, model = trained_model
    correct, nll, n = 0, 0.0, 0
    for text in LAMBADA:  # the definition: greedy generate() of the last word's length reproduces it
        context, word = text.rsplit(" ", 1)
        ctx = tokenizer(context)["input_ids"]
        tgt = tokenizer(" " + word)["input_ids"]
        ids = (ctx + tgt)[-BLOCK:]
        ctx = ids[:len(ids) - len(tgt)]
        out = model.generate(torch.tensor([ctx]), max_new_tokens=len(tgt), min_new_tokens=len(tgt), do_sample=False)
        correct += out[0, len(ctx):].tolist() == tgt
        nll += direct_nll(model, ids) - direct_nll(model, ctx)
        n += len(tgt)
    r = lambada_accuracy(model, tokenizer, LAMBADA, batch_size=batch_size, progress=False)
    assert 0 < correct < len(LAMBADA)  # the check means something: some right, some wrong
    assert r["correct"] == correct and r["total"] == len(LAMBADA)
    assert r["accuracy"] == pytest.approx(correct / len(LAMBADA))
    assert r["n_target_tokens"] == n and r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_lambada_rejects_text_without_last_word(trained_model):
    tokenizer, model = trained_model
    with pytest.raises(ValueError, match="no 'context word' form"):
        lambada_accuracy(model, tokenizer, ["nospace"], progress=False)


# -----------------------------------------------------------------------------
# perplexity from summed NLL (plain math: the `evaluate` modules that did this are retired)


def test_perplexity_from_summed_nll():
    assert _perplexity(7.5, 5) == {"perplexity": pytest.approx(math.exp(1.5)), "loss": 1.5}
    with pytest.raises(ValueError, match="positive"):
        _perplexity(1.0, 0)


# -----------------------------------------------------------------------------
# examples/eval.py


@pytest.fixture(scope="module")
def bench_files(char_data_dir, tmp_path_factory):
    """Local stand-ins for wikitext / ptb (plain text) and lambada (jsonl), in the dataset's characters."""
    text = (char_data_dir.parent / "input.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("bench_files")
    (d / "wiki.txt").write_text(text[:1500], encoding="utf-8")
    (d / "ptb.txt").write_text(text[2000:2800], encoding="utf-8")
    lines = [" ".join(line.split()) for line in text[3000:6000].splitlines() if line.count(" ") >= 2][:12]
    (d / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return d


def eval_argv(model_dir, data_dir, files, out):
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--split", "val", "--full",
            "--batch_size", "4", "--wikitext2_file", str(files / "wiki.txt"), "--ptb_file", str(files / "ptb.txt"),
            "--lambada_file", str(files / "lambada.jsonl"), "--stride", "16", "--device", "cpu", "--out", str(out)]


def test_eval_script_writes_table_and_json(char_data_dir, char_model_dir, bench_files, tmp_path, capsys):
    out = tmp_path / "results.json"
    load_script("eval").main(eval_argv(char_model_dir, char_data_dir, bench_files, out))
    table = capsys.readouterr().out
    for row in ("tiny_char val", "wikitext2", "ptb", "lambada", "token ppl", "accuracy"):
        assert row in table
    results = json.loads(out.read_text())
    assert set(results["data"]) == {"val"} and set(results["benchmarks"]) == {"wikitext2", "ptb", "lambada"}
    model = NanoGPTForCausalLM.from_pretrained(char_model_dir).eval()
    tokenizer = load_tokenizer(char_model_dir)
    wiki = sliding_window_perplexity(model, tokenizer, (bench_files / "wiki.txt").read_text(encoding="utf-8"),
                                     stride=16, batch_size=4, progress=False)
    assert results["benchmarks"]["wikitext2"]["token_ppl"] == pytest.approx(wiki["token_ppl"], rel=1e-6)


def test_eval_script_bad_input(char_model_dir, tmp_path):
    main = load_script("eval").main
    cases = [(["--model", str(tmp_path / "missing"), "--benchmarks", "wikitext2"], "no such folder"),
             (["--model", str(char_model_dir), "--ptb_file", str(tmp_path / "nope.txt")], "--ptb_file"),
             (["--model", str(char_model_dir), "--benchmarks", "nosuchtask"], "nosuchtask"),
             (["--model", str(char_model_dir)], "nothing to evaluate")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--device", "cpu"])
        assert str(e.value).startswith("error: ") and message in str(e.value)


def test_eval_results_go_into_the_model_folder_and_a_typo_is_no_such_folder(char_data_dir, char_model_dir, tmp_path,
                                                                           monkeypatch, capsys):
    """Without --out the results go to <model>/eval_results.json (runs on other splits add to it), not into the
    current directory; with --no_model_card into the current directory; a mistyped folder is "no such folder"
    at once (not a trip to the Hub), naming the folder it is close to."""
    main = load_script("eval").main
    model = tmp_path / "out-shakespeare-char"
    shutil.copytree(char_model_dir, model)
    monkeypatch.chdir(tmp_path)
    common = ["--data_dir", str(char_data_dir), "--eval_iters", "2", "--batch_size", "2", "--device", "cpu"]
    main(["--model", str(model), *common])
    main(["--model", str(model), *common, "--split", "train"])
    assert f"results written to {model / 'eval_results.json'}" in capsys.readouterr().out
    saved = json.loads((model / "eval_results.json").read_text())
    assert set(saved["data"]) == {"val", "train"} and not (tmp_path / "eval_results.json").exists()
    main(["--model", str(model), *common, "--no_model_card"])
    assert "results written to eval_results.json (the current directory)" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "eval_results.json").read_text())["data"]) == {"val"}
    for script, flag in (("eval", "--data_dir"), ("sample", "--num_samples")):
        with pytest.raises(SystemExit) as e:
            load_script(script).main(["--model", "out-shakspeare", flag, str(char_data_dir) if script == "eval"
                                      else "1", "--device", "cpu"])
        assert str(e.value).startswith("error: --model out-shakspeare: no such folder") and "\n" not in str(e.value)
        assert "did you mean out-shakespeare-char?" in str(e.value)


def test_eval_configs_reproduce_nanogpt_baselines():
    parse_args = load_script("eval").parse_args
    expected = {"gpt2": "train=3.11,val=3.12", "gpt2-medium": "train=2.85,val=2.84",
                "gpt2-large": "train=2.66,val=2.67", "gpt2-xl": "train=2.56,val=2.54"}
    for name, reference in expected.items():
        args = parse_args([str(ROOT / "examples" / "configs" / f"eval_{name.replace('-', '_')}.yaml")])
        assert (args.model, args.reference_loss, args.split) == (name, reference, "train,val")
        assert (args.eval_iters, args.batch_size, args.block_size) == (500, 8, 1024)
    args = parse_args([str(ROOT / "examples" / "configs" / "eval_gpt2.yaml"), "--eval_iters", "5"])
    assert args.eval_iters == 5  # the command line wins over the YAML


def test_eval_config_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: gpt2\nevel_iters: 5\n")
    with pytest.raises(ValueError, match="unknown key 'evel_iters'"):
        load_script("eval").parse_args([str(path)])


def test_eval_under_torchrun_two_ranks_matches_one_process(char_data_dir, char_model_dir, bench_files, tmp_path):
    """2 CPU ranks (gloo) split the windows and examples; the reduced sums give one process's numbers."""
    single = load_script("eval").main(eval_argv(char_model_dir, char_data_dir, bench_files, tmp_path / "one.json"))
    out = tmp_path / "two.json"
    with socket.socket() as sock:  # a free port (torchrun's --master_port 0 hung here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "examples" / "eval.py"), *eval_argv(char_model_dir, char_data_dir, bench_files, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    assert two["data"]["val"]["tokens"] == single["data"]["val"]["tokens"]
    assert two["data"]["val"]["loss"] == pytest.approx(single["data"]["val"]["loss"], rel=1e-6)
    for name in ("wikitext2", "ptb"):
        assert two["benchmarks"][name]["n_tokens"] == single["benchmarks"][name]["n_tokens"]
        assert two["benchmarks"][name]["token_ppl"] == pytest.approx(single["benchmarks"][name]["token_ppl"], rel=1e-6)
    assert two["benchmarks"]["lambada"]["correct"] == single["benchmarks"]["lambada"]["correct"]
    assert two["benchmarks"]["lambada"]["total"] == single["benchmarks"]["lambada"]["total"]


def test_gpt2_bpe_tokenizer_paths(tiktoken_cache):
    """The same functions through GPT-2's BPE (a text longer than model_max_length is fine: we window it)."""
    from nanogpt_hf.tokenization import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    model = tiny_model(50257, seed=2, block_size=128)
    text = TEXT * 2
    ids = tokenizer(text)["input_ids"]
    assert 64 < len(ids) < 128  # longer than the stride, one window
    r = sliding_window_perplexity(model, tokenizer, text, stride=16, progress=False)
    assert r["n_tokens"] == len(ids) - 1
    assert r["nll_sum"] == pytest.approx(direct_nll(model.to_gpt2().eval(), ids), rel=1e-4)
    r = lambada_accuracy(model, tokenizer, ["it was the best of times, it was the worst of times"], progress=False)
    assert r["total"] == 1 and r["n_target_tokens"] == len(tokenizer(" times")["input_ids"])
