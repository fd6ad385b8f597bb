"""The contract serving engines rely on (vLLM's Transformers backend): attention goes through transformers'
ALL_ATTENTION_FUNCTIONS with the caller's keywords, and positions come from position_ids, so several sequences
flattened into one row [1, total_tokens] (how vLLM runs a batch) give each sequence its own logits.

The engines themselves are checked by scripts/check_engines.sh (big installs, outside this suite)."""

import ast
import inspect
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_modeling import tiny
from transformers import AttentionInterface, AutoModel

from nanogpt_hf import NanoGPTModel
from nanogpt_hf.modeling_nanogpt import CausalSelfAttention

CALLS = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None,
                     **kwargs):
    """A paged-attention stand-in: it ignores attention_mask, as engine kernels do, and keeps the sequences of a
    flattened row apart by their positions (a new sequence starts where the position goes back to 0)."""
    CALLS.append(dict(layer=module.layer_idx, shape=tuple(query.shape), scaling=scaling, kwargs=kwargs))
    pos = position_ids[0]  # (N,)
    seq = (pos == 0).cumsum(0)  # (N,) sequence number of each token
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])  # same sequence, not in the future
    y = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return y.transpose(1, 2), None  # (1, N, nh, hs)


AttentionInterface.register("test_varlen", varlen_attention)
LENGTHS = (7, 3, 5)


def rows(vocab=67):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]


def padded_logits(model, seqs):
    """Each sequence's logits from a left-padded batch under sdpa, padding removed."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return [logits[i, width - len(s):] for i, s in enumerate(seqs)]


def flat_logits(model, seqs, **kwargs):
    """All sequences in one row with their positions, as vLLM calls the model (no mask, no cache)."""
    ids = torch.cat(seqs)[None]  # (1, N)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]  # (1, N)
    model.set_attn_implementation("test_varlen")
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids, position_ids=pos, use_cache=False, return_dict=False, **kwargs)[0]
        logits = model.lm_head(hidden)[0]  # (N, V)
    return list(logits.split(list(LENGTHS)))


@pytest.mark.parametrize("pe", ["learned", "rope"])
def test_flattened_batch_through_a_registered_attention_gives_the_padded_batch_logits(pe):
    model = tiny(position_embedding=pe, block_size=8)  # 15 flattened tokens > block_size: only positions count
    seqs = rows()
    want = padded_logits(model, seqs)
    CALLS.clear()
    got = flat_logits(model, seqs, marker="passed down")
    # the registered function ran in every layer, with the model's scale and the caller's keywords
    assert [c["layer"] for c in CALLS] == [0, 1]
    assert all(c["shape"] == (1, 2, 15, 16) and c["scaling"] == 16 ** -0.5 for c in CALLS)
    assert all(c["kwargs"] == {"marker": "passed down"} for c in CALLS)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


def test_learned_positions_beyond_the_table_are_refused_from_position_ids():
    model = tiny(block_size=8)
    model.set_attn_implementation("test_varlen")
    ids = torch.randint(0, 67, (1, 10))
    with pytest.raises(ValueError, match="sequence length 10 exceeds block_size 8"):
        model.transformer(input_ids=ids, position_ids=torch.arange(10)[None], use_cache=False)


def test_alibi_refuses_an_implementation_that_drops_its_bias():
    model = tiny(position_embedding="alibi")
    with pytest.raises(ValueError, match="ALiBi.*'test_varlen' would drop it"):
        flat_logits(model, rows())
    config = tiny(position_embedding="alibi").config
    config._attn_implementation = "test_varlen"  # how vLLM builds the model: the config set before __init__
    with pytest.raises(ValueError, match="ALiBi"):
        NanoGPTModel(config)


def test_eager_and_sdpa_take_no_extra_keywords():
    model = tiny()
    x = torch.randint(0, 67, (1, 4))
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with pytest.raises(TypeError, match="unexpected keyword argument 'marker'"):
            model(x, marker=1)


def test_source_makes_one_interface_call_with_a_readable_scale():
    """What vLLM reads from the source (its AttentionFuser): exactly one call of a function looked up in
    ALL_ATTENTION_FUNCTIONS, and `scaling=self.<attribute>`; and transformers' own check for set_attn_implementation."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(CausalSelfAttention.forward)))
    looked_up = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.value) for t in node.targets}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in looked_up]
    assert len(calls) == 1
    scaling = [kw.value for kw in calls[0].keywords if kw.arg == "scaling"]
    assert ast.unparse(scaling[0]) == "self.scaling"
    model = tiny()
    assert type(model)._can_set_attn_implementation() and model._supports_attention_backend
    assert model.transformer.h[0].attn.layer_idx == 0


def test_saved_config_maps_automodel_to_the_base_model(tmp_path):
    tiny(position_embedding="rope").save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_nanogpt.NanoGPTModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_nanogpt.NanoGPTForCausalLM"
    assert type(AutoModel.from_pretrained(tmp_path)) is NanoGPTModel
