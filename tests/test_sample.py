"""examples/sample.py: nanoGPT's sampling defaults through generate(), a saved char tokenizer, bad input.

One subprocess run checks the real command line; the rest calls main() in-process (each python process
costs seconds of imports)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.evaluation import generate_cropped
from nanogpt_hf.tokenization import build_char_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "sample.py"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
BLOCK = 32
SEP = "---------------"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample_module():
    spec = importlib.util.spec_from_file_location("example_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(path, tokenizer, **kw):
    torch.manual_seed(0)
    config = NanoGPTConfig(vocab_size=len(tokenizer), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, **kw)
    NanoGPTForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model saved with its char tokenizer, like train.py's out_dir. Without the <|endoftext|> token:
    a trained char model never samples it (it is no target in the shards), a random one would."""
    return save_tiny_model(tmp_path_factory.mktemp("sample_model"), build_char_tokenizer(TEXT, eot=None))


def run_main(module, capsys, *argv):
    module.main([*argv, "--device", "cpu"])
    return capsys.readouterr()


def samples(stdout):
    """nanoGPT's output format: each sample followed by a line of dashes."""
    parts = stdout.split(SEP + "\n")
    assert parts[-1] == ""
    return [p.removesuffix("\n") for p in parts[:-1]]


def test_command_line_samples_and_crops_context_once(model_dir):
    """Past block_size (learned positions): generation goes on in chunks and says so once, on stderr."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), "--start", "Speak",
                           "--num_samples", "2", "--max_new_tokens", "70", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = samples(proc.stdout)
    assert len(out) == 2
    for s in out:
        assert s.startswith("Speak") and len(s) == len("Speak") + 70  # one char per token
        assert set(s) <= set(TEXT)
    assert proc.stderr.count("note: prompt") == 1 and "context of 32 tokens" in proc.stderr


def test_same_seed_same_text_and_stream_prints_the_same(sample_module, model_dir, capsys):
    args = ("--model", str(model_dir), "--start", "All:", "--num_samples", "2", "--max_new_tokens", "20")
    a = run_main(sample_module, capsys, *args, "--seed", "7").out
    b = run_main(sample_module, capsys, *args, "--seed", "7").out
    c = run_main(sample_module, capsys, *args, "--seed", "8").out
    streamed = run_main(sample_module, capsys, *args, "--seed", "7", "--stream").out
    assert a == b and a != c
    assert streamed == a
    assert len(samples(a)) == 2 and samples(a)[0] != samples(a)[1]


def test_prompt_from_file_and_greedy(sample_module, model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Before we", encoding="utf-8")
    out = run_main(sample_module, capsys, "--model", str(model_dir), "--start", f"FILE:{prompt}", "--num_samples",
                   "2", "--max_new_tokens", "10", "--temperature", "0").out
    first, second = samples(out)
    assert first == second and first.startswith("Before we")  # temperature 0 = greedy: deterministic


def test_chunked_generation_is_a_per_token_crop_loop(model_dir):
    """generate() past the context, with the KV cache, equals a plain greedy loop that recomputes each token
    from the context the docstring promises: once the text fills the block, the last block_size/2 tokens."""
    model = NanoGPTForCausalLM.from_pretrained(model_dir).eval()
    idx = torch.tensor([[3, 5, 7, 11, 13]])
    out = generate_cropped(model, idx, 60, limit=BLOCK, do_sample=False)
    ref, start = idx, 0  # start: where the current context begins
    with torch.no_grad():
        while ref.size(1) < idx.size(1) + 60:
            if ref.size(1) - start >= BLOCK:
                start = ref.size(1) - BLOCK // 2
            logits = model(ref[:, start:]).logits[:, -1]
            ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ref.tolist()
    unlimited = generate_cropped(model, idx, BLOCK - 5, limit=BLOCK, do_sample=False)
    assert unlimited.tolist() == ref[:, :BLOCK].tolist()  # within the block: plain generate()


def test_rope_model_generates_past_block_size_without_cropping(sample_module, tmp_path, capsys):
    path = save_tiny_model(tmp_path / "rope", build_char_tokenizer(TEXT, eot=None), position_embedding="rope")
    r = run_main(sample_module, capsys, "--model", str(path), "--start", "All", "--num_samples", "1",
                 "--max_new_tokens", "50")
    assert len(samples(r.out)[0]) == 3 + 50 and "note:" not in r.err


def test_pipeline_works_on_the_same_folder(model_dir):
    from transformers import pipeline

    model = NanoGPTForCausalLM.from_pretrained(model_dir).eval()
    generator = pipeline("text-generation", model=str(model_dir), device="cpu")
    text = generator("Speak", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    expected = model.generate(torch.tensor([generator.tokenizer("Speak")["input_ids"]]), max_new_tokens=8,
                              do_sample=False)
    assert text == generator.tokenizer.decode(expected[0])


@pytest.mark.parametrize("argv,message", [
    (["--model", "{tmp}/missing"], "no such folder"),
    (["--start", "FILE:{tmp}/nope.txt"], "--start FILE:"),
    (["--start", "café"], "not in this model's vocabulary: 'é' (U+00E9)"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
])
def test_bad_input_is_one_clear_line(sample_module, model_dir, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    with pytest.raises(SystemExit) as e:
        sample_module.main([*argv, "--device", "cpu"])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_bpe_model_samples_through_its_saved_tokenizer(sample_module, tiktoken_cache, tmp_path, capsys):
    from nanogpt_hf.tokenization import gpt2_tokenizer

    path = save_tiny_model(tmp_path / "bpe", gpt2_tokenizer(), eos_token_id=50256)
    r = run_main(sample_module, capsys, "--model", str(path), "--start", "Hello world", "--num_samples", "2",
                 "--max_new_tokens", "5", "--top_k", "5")
    out = samples(r.out)
    assert len(out) == 2 and all(s.startswith("Hello world") for s in out)


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_static_cache_decoding_gives_the_dynamic_cache_text(sample_module, tmp_path, capsys, position_embedding):
    """--decode static: one fixed-size cache, emptied and reused by every chunk and sample, samples exactly what
    the growing cache samples, past the context too (70 new tokens, block 32)."""
    path = save_tiny_model(tmp_path / "m", build_char_tokenizer(TEXT), position_embedding=position_embedding)
    args = ("--model", str(path), "--start", "All:", "--num_samples", "2", "--max_new_tokens", "70", "--seed", "3")
    dynamic = run_main(sample_module, capsys, *args, "--decode", "dynamic").out
    static = run_main(sample_module, capsys, *args, "--decode", "static").out
    assert static == dynamic and len(samples(static)) == 2
