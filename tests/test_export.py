"""Exportable graphs: torch.export and ONNX (torch's dynamo exporter, run in onnxruntime) of NanoGPTForCausalLM
with a padding attention_mask, dynamic batch and sequence length, against eager; and the to_gpt2() copy in ONNX."""

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.export import Logits

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def tiny(position_embedding="learned"):
    torch.manual_seed(0)
    config = NanoGPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True,
                           position_embedding=position_embedding)
    return Logits(NanoGPTForCausalLM(config).eval())


def batch(B, T, pad, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :pad] = 0  # row 0 left-padded
    return ids, mask


def dynamic():
    b, t = torch.export.Dim("batch", max=16), torch.export.Dim("seq", max=32)
    return {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: t}}


@pytest.mark.parametrize("position_embedding", ["learned", "alibi", "rope"])
def test_torch_export_with_attention_mask_matches_eager(position_embedding):
    model = tiny(position_embedding)
    program = torch.export.export(model, batch(2, 10, 3, 0), dynamic_shapes=dynamic(), strict=False)
    exported = program.module()
    for B, T, pad, seed in ((2, 10, 3, 0), (3, 7, 2, 1), (1, 20, 0, 2), (4, 5, 4, 3)):  # other shapes, other pads
        ids, mask = batch(B, T, pad, seed)
        with torch.no_grad():
            want = model(ids, mask)
        assert (exported(ids, mask) - want).abs().max().item() <= TOL, (B, T, pad)
    # the mask is in the graph, not baked in: masking more keys changes the logits of the padded row
    ids, mask = batch(2, 10, 3, 0)
    more = mask.clone()
    more[0, :6] = 0
    assert (exported(ids, more)[0, -1] - exported(ids, mask)[0, -1]).abs().max() > 1e-4


def run_onnx(tmp_path, module, inputs, name):
    names = ("input_ids", "attention_mask")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / f"{name}.onnx"
    program = torch.onnx.export(module, inputs, dynamic_shapes=dynamic(),
                                input_names=list(names), output_names=["logits"], dynamo=True, verbose=False)
    program.save(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_export_with_attention_mask_runs_in_onnxruntime(tmp_path):
    model = tiny("learned")
    session = run_onnx(tmp_path, model, batch(2, 10, 3, 0), "nanogpt")
    for B, T, pad, seed in ((2, 10, 3, 0), (3, 17, 5, 1)):
        ids, mask = batch(B, T, pad, seed)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model(ids, mask).numpy()
        assert got.shape == want.shape and abs(got - want).max() <= TOL, (B, T)


def test_to_gpt2_onnx_export_matches(tmp_path):
    model = tiny("learned").model
    gpt2 = model.to_gpt2().eval()
    ids, mask = batch(2, 10, 0, 0)

    class GPT2Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, input_ids, attention_mask):
            return self.gpt2(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    session = run_onnx(tmp_path, GPT2Logits(), (ids, mask), "gpt2")
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits.numpy()
    assert abs(got - want).max() <= TOL


# -----------------------------------------------------------------------------
# examples/export.py: folders with the tokenizer, the GPT-2 config llama.cpp's converter reads, one-line refusals

def saved(tmp_path, position_embedding="learned", tokenizer="char"):
    from nanogpt_hf.tokenization import build_char_tokenizer, gpt2_tokenizer

    tok = build_char_tokenizer("Speak, speak.\nAll:\n") if tokenizer == "char" else gpt2_tokenizer()
    torch.manual_seed(0)
    config = NanoGPTConfig(vocab_size=len(tok), block_size=32, n_layer=2, n_head=2, n_embd=16,
                           position_embedding=position_embedding)
    path = tmp_path / f"model-{position_embedding}-{tokenizer}"
    NanoGPTForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_export(*argv):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "export.py"
    return subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, timeout=600)


def test_gpt2_export_writes_the_tokenizer_and_the_context_length(tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = saved(tmp_path)
    proc = run_export(src, "--to", "gpt2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dest = tmp_path / "model-learned-char-gpt2"
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_ctx"] == config["n_positions"] == 32
    tokenizer = AutoTokenizer.from_pretrained(dest)
    text = "Speak, speak.\nAll:"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # spaces and newlines round-trip
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        want = NanoGPTForCausalLM.from_pretrained(src)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(dest)(ids).logits
    assert (got - want).abs().max().item() <= TOL


def test_export_refusals_are_one_line(tmp_path):
    rope = run_export(saved(tmp_path, "rope"), "--to", "gpt2")
    assert rope.returncode != 0 and rope.stderr.startswith("error: ") and "rope positions" in rope.stderr
    assert len(rope.stderr.strip().splitlines()) == 1, rope.stderr
    char = saved(tmp_path)
    no_converter = run_export(char, "--to", "gguf")
    assert no_converter.returncode != 0 and "convert_hf_to_gguf.py" in no_converter.stderr
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text("raise SystemExit('must not run')\n")
    refused = run_export(char, "--to", "gguf", "--converter", fake, "--dest", tmp_path / "gguf")
    assert refused.returncode != 0 and "character-level tokenizer" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "gguf").exists()
    again = run_export(char, "--to", "gpt2", "--dest", tmp_path)  # not empty: never written into
    assert again.returncode != 0 and "not empty" in again.stderr


def test_onnx_export_command_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    src = saved(tmp_path, "alibi")
    proc = run_export(src, "--to", "onnx", "--dest", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = batch(3, 40, 4, 5)  # past block_size 32: ALiBi extrapolates
    ids = ids % 7
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = NanoGPTForCausalLM.from_pretrained(src)(ids, attention_mask=mask).logits.numpy()
    assert abs(got - want).max() <= TOL
