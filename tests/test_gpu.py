"""The GPU fast path (issue 6/6): bf16 autocast, SDPA flash vs eager in bf16, fused AdamW, torch.compile of the
training forward without graph breaks, KV-cached generation on CUDA. Skipped without a CUDA device.

    python -m pytest tests/test_gpu.py -q -m gpu
"""

import pytest
import torch

from test_modeling import tiny  # tests/ is on sys.path under pytest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def model(**kw):
    return tiny(**dict(dict(vocab_size=256, block_size=128, n_head=4, n_embd=128), **kw)).cuda()


def test_bf16_sdpa_matches_eager():
    m = model().eval()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        m.set_attn_implementation("sdpa")
        fast = m(x).logits.float()
        m.set_attn_implementation("eager")
        slow = m(x).logits.float()
    assert (fast - slow).abs().max().item() < 5e-2  # bf16 has ~3 significant digits


def test_fused_adamw_and_bf16_training_step_lowers_loss():
    m = model().train()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda", verbose=False)
    assert opt.defaults.get("fused") is True
    x = torch.arange(129, device="cuda").remainder(256).repeat(8, 1)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_compiled_training_forward_has_no_graph_breaks():
    import torch._dynamo

    m = model().train()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    explanation = torch._dynamo.explain(lambda a, b: m(a, shift_labels=b).loss)(x[:, :-1], x[:, 1:])
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_cached_generation_on_cuda_equals_manual_greedy_loop():
    m = model().eval()
    prompt = torch.randint(0, 256, (2, 5), device="cuda")
    out = m.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, m(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
