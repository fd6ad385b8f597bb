"""Exportable graphs: torch.export and ONNX (torch's dynamo exporter, run in onnxruntime) of NanoGPTForCausalLM
with a padding attention_mask, dynamic batch and sequence length, against eager; and the to_gpt2() copy in ONNX."""

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


class Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the graph an inference engine serves (no cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


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
