"""The model: config validation, GPT-2 parity both ways, nanoGPT checkpoint import, loss conventions, KV-cached
generate vs a manual loop, padding, attention implementations, ALiBi/RoPE extrapolation, surgery, checkpointing."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from benchmarks.reference_nanogpt import GPT, GPTConfig
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM, NanoGPTModel
from nanogpt_hf.modeling_nanogpt import TanhGELU, _SigmoidTanhGELU, peak_flops, peak_flops_for_name

POSITIONS = ["learned", "alibi", "rope"]


def tiny(**kw):
    args = dict(vocab_size=67, block_size=32, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    torch.manual_seed(0)
    return NanoGPTForCausalLM(NanoGPTConfig(**args)).eval()


# -----------------------------------------------------------------------------
# config

def test_config_fields_and_attribute_map():
    c = NanoGPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=128)
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.max_position_embeddings) == (3, 4, 64, 128)
    assert c.tie_word_embeddings is True and c.model_type == "nanogpt"
    assert isinstance(AutoConfig.for_model("nanogpt"), NanoGPTConfig)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=10, n_head=3), "divisible by n_head"),
    (dict(position_embedding="sinusoidal"), "position_embedding must be one of"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer"),
    (dict(n_layer="x"), "n_layer"),
    (dict(dropout=1.5), "dropout"),
    (dict(bias="yes"), "bias"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(position_embedding="rope", n_embd=6, n_head=2), "even head size"),
])
def test_config_rejects_invalid(kwargs, message):
    with pytest.raises(Exception, match=message):
        NanoGPTConfig(**kwargs)


def test_config_round_trip(tmp_path):
    c = NanoGPTConfig(n_layer=3, n_head=2, n_embd=16, position_embedding="alibi", bias=False)
    c.save_pretrained(tmp_path)
    c2 = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(c2, NanoGPTConfig)
    assert c2.to_diff_dict() | {"_name_or_path": ""} == c.to_diff_dict() | {"_name_or_path": ""}


# -----------------------------------------------------------------------------
# architecture and init

def test_init_matches_nanogpt():
    m = tiny(n_layer=4, n_embd=128, n_head=4, vocab_size=1000)
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert abs(std(m.transformer.wte.weight) - 0.02) < 0.002
    assert abs(std(m.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 4)
    assert abs(std(m.transformer.h[0].attn.c_proj.weight) - scaled) < 0.001
    assert abs(std(m.transformer.h[3].mlp.c_proj.weight) - scaled) < 0.001
    assert torch.all(m.transformer.h[0].attn.c_attn.bias == 0)
    # untrained model: loss ~ ln(vocab)
    x = torch.randint(0, 1000, (4, 32))
    assert abs(m(x, labels=x).loss.item() - math.log(1000)) < 0.1


def test_num_params_and_no_bias():
    m = tiny(bias=False)
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    assert m.get_num_params(non_embedding=False) - m.get_num_params() == 32 * 32  # the wpe table
    assert tiny(position_embedding="rope").get_num_params() == tiny(position_embedding="rope").get_num_params(False)


def test_labels_convention_and_shift_labels():
    m = tiny()
    x = torch.randint(0, 67, (3, 20))
    labels = x.clone()
    labels[0, 5:9] = -100
    out = m(x, labels=labels)
    logits = out.logits
    assert logits.shape == (3, 20, 67)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 67), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    # already-shifted targets (nanoGPT's x, y batches) give the same loss where they overlap
    y = torch.full_like(labels, -100)
    y[:, :-1] = labels[:, 1:]
    torch.testing.assert_close(m(x, shift_labels=y).loss, manual)


def test_logits_to_keep():
    m = tiny()
    x = torch.randint(0, 67, (2, 10))
    full = m(x).logits
    last = m(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, 67)
    torch.testing.assert_close(last, full[:, -1:])


# -----------------------------------------------------------------------------
# GPT-2 interop

@pytest.mark.parametrize("shape", [
    dict(vocab_size=50257, n_positions=40, n_layer=2, n_head=2, n_embd=24),
    dict(vocab_size=101, n_positions=17, n_layer=3, n_head=3, n_embd=48),
    dict(vocab_size=7, n_positions=8, n_layer=1, n_head=1, n_embd=8, activation_function="gelu"),
])
def test_from_gpt2_parity(shape):
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    ours = NanoGPTForCausalLM.from_gpt2(gpt2).eval()
    x = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        diff = (gpt2(x).logits - ours(x).logits).abs().max().item()
    assert diff <= 1e-5
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_tanh_gelu_matches_torch_and_gpt2_gradients():
    # the CPU sigmoid form of GPT-2's tanh GELU: exact autograd, same values and gradients as torch's kernel
    assert torch.autograd.gradcheck(_SigmoidTanhGELU.apply, ((torch.randn(3, 5, 7, dtype=torch.float64) * 4).requires_grad_(),))
    x64 = (torch.randn(4, 64, 96, dtype=torch.float64) * 4).requires_grad_()  # 24,576 elements: the fast path
    x32 = x64.detach().float().requires_grad_()
    y = TanhGELU()(x32)
    assert type(y.grad_fn).__name__ == "_SigmoidTanhGELUBackward"
    ref = F.gelu(x64, approximate="tanh")
    assert (y.double() - ref).abs().max().item() < 1e-5
    g = torch.randn_like(x32)
    y.backward(g)
    ref.backward(g.double())
    assert (x32.grad.double() - x64.grad).abs().max().item() < 1e-5
    # whole-model training gradients equal GPT2LMHeadModel's (MLP activations 4x16x256: the fast path again)
    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_positions=16, n_layer=2, n_head=2, n_embd=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ours = NanoGPTForCausalLM.from_gpt2(gpt2, dropout=0.0)
    idx = torch.randint(0, 61, (4, 16))
    gpt2(idx, labels=idx).loss.backward()
    ours(idx, labels=idx).loss.backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for name, p in gpt2.named_parameters():
        if name in ours_params:
            mine = ours_params[name].grad
            mine = mine.t() if name.endswith(NanoGPTForCausalLM._CONV1D) else mine
            assert (mine - p.grad).abs().max().item() < 1e-5, name
            checked += 1
    assert checked == len(ours_params)


def test_torch_export_uses_torchs_gelu_kernel():
    # under torch.export / torch.compile the model must not hand a Python autograd.Function to the tracer
    model = tiny(n_embd=128, n_head=4, block_size=64).eval()
    x = torch.randint(0, model.config.vocab_size, (4, 64))  # MLP activations of 4x64x512: the eager fast path
    program = torch.export.export(model, (x,), kwargs={"use_cache": False})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.gelu.default" in targets
    with torch.no_grad():
        expected = model(x, use_cache=False).logits
    assert (program.module()(x, use_cache=False).logits - expected).abs().max().item() < 1e-5


def test_from_gpt2_local_dir(tmp_path):
    torch.manual_seed(2)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=16)).eval()
    gpt2.save_pretrained(tmp_path)  # exactly what from_pretrained("gpt2") reads after download
    ours = NanoGPTForCausalLM.from_gpt2(str(tmp_path), dropout=0.0).eval()
    x = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert (gpt2(x).logits - ours(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_to_gpt2_parity(bias):
    ours = tiny(bias=bias, vocab_size=50257)
    gpt2 = ours.to_gpt2().eval()
    assert type(gpt2) is GPT2LMHeadModel
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (gpt2(x).logits - ours(x).logits).abs().max().item() <= 1e-5


def test_to_gpt2_refuses_alibi():
    with pytest.raises(ValueError, match="learned positions"):
        tiny(position_embedding="alibi").to_gpt2()


def test_nanogpt_checkpoint_import(tmp_path):
    torch.manual_seed(3)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, bias=False, vocab_size=53, dropout=0.0)
    ref = GPT(GPTConfig(**model_args)).eval()
    # what nanoGPT's train.py writes; a torch.compile'd run prefixes every key with `_orig_mod.`
    opt = torch.optim.AdamW(ref.parameters())
    ckpt = {"model": {"_orig_mod." + k: v for k, v in ref.state_dict().items()}, "optimizer": opt.state_dict(),
            "model_args": model_args, "iter_num": 100, "best_val_loss": torch.tensor(1.5),
            "config": {"dataset": "shakespeare_char", "compile": True}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    ours = NanoGPTForCausalLM.from_nanogpt_checkpoint(tmp_path / "ckpt.pt").eval()
    x = torch.randint(0, 53, (2, 24))
    with torch.no_grad():
        assert (ref(x)[0] - ours(x).logits).abs().max().item() <= 1e-5
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        NanoGPTForCausalLM.from_nanogpt_checkpoint(tmp_path / "bad.pt")


def test_init_embeddings_from_gpt2():
    torch.manual_seed(4)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=16, n_layer=1, n_head=2, n_embd=32))
    ours = tiny(vocab_size=64)  # padded vocab: the first 60 rows come from GPT-2
    ours.init_embeddings_from(gpt2, freeze=True)
    torch.testing.assert_close(ours.transformer.wte.weight[:60], gpt2.transformer.wte.weight)
    assert not ours.lm_head.weight.requires_grad  # tied head is frozen with it
    opt = ours.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    assert all(p is not ours.transformer.wte.weight for g in opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="n_embd=32"):
        ours.init_embeddings_from(torch.zeros(10, 16))


# -----------------------------------------------------------------------------
# attention implementations and the outputs HF users ask for (cached generation: test_generation.py)

@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls of torch's fused attention kernel from our model (a spy: the real kernel still runs)."""
    from nanogpt_hf import modeling_nanogpt
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(modeling_nanogpt.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("pe", POSITIONS)
def test_sdpa_and_eager_agree(pe, sdpa_calls):
    m = tiny(position_embedding=pe)
    x = torch.randint(0, 67, (2, 32))
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # some padding too
    outs = {}
    for impl in ("sdpa", "eager"):
        m.set_attn_implementation(impl)
        assert m.config._attn_implementation == impl
        before = len(sdpa_calls)
        with torch.no_grad():
            outs[impl] = (m(x).logits, m(x, attention_mask=mask).logits)
        # the implementation really switched: sdpa runs the fused kernel in every layer, eager never
        assert len(sdpa_calls) - before == (2 * 2 if impl == "sdpa" else 0)
    for a, b in zip(outs["sdpa"], outs["eager"]):
        assert (a - b).abs().max().item() < 1e-5


def test_attn_implementation_from_pretrained(tmp_path, sdpa_calls):
    tiny().save_pretrained(tmp_path)
    eager = NanoGPTForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    eager(torch.randint(0, 67, (1, 8)))
    assert not sdpa_calls
    assert NanoGPTForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        NanoGPTForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attentions_and_hidden_states_match_gpt2(impl):
    ours = tiny(vocab_size=50)
    ours.set_attn_implementation(impl)
    gpt2 = ours.to_gpt2().eval()
    gpt2.set_attn_implementation("eager")  # GPT-2 returns attention weights only from its eager path
    x = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        a = ours(x, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        # GPT-2 needs its positions given to number left-padded rows from their first real token, as we do
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        b = gpt2(x, attention_mask=mask, position_ids=pos, output_attentions=True, output_hidden_states=True)
    assert len(a.attentions) == 2 and len(a.hidden_states) == 2 + 1
    assert a.attentions[0].shape == (2, 2, 12, 12)
    for ours_t, gpt2_t in zip(a.attentions + a.hidden_states, b.attentions + b.hidden_states, strict=True):
        # GPT-2's rows of padded queries differ (its mask isn't -inf there); real tokens' rows must agree
        assert (ours_t[1] - gpt2_t[1]).abs().max().item() <= 1e-5
        assert (ours_t[0, ..., 3:, :] - gpt2_t[0, ..., 3:, :]).abs().max().item() <= 1e-5
    with torch.no_grad():  # the base model gives the same
        base = ours.transformer(x, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(base.hidden_states[-1], a.hidden_states[-1])
    assert ours(x).attentions is None and ours(x).hidden_states is None  # off unless asked for


def test_return_dict_false_gives_tuples():
    m = tiny()
    x = torch.randint(0, 67, (2, 8))
    with torch.no_grad():
        ref = m(x, labels=x)
        loss, logits = m(x, labels=x, use_cache=False, return_dict=False)
        assert isinstance(m(x, return_dict=False), tuple)
        torch.testing.assert_close(loss, ref.loss)
        torch.testing.assert_close(logits, ref.logits)
        hidden = m.transformer(x, use_cache=False, return_dict=False)
        assert isinstance(hidden, tuple) and len(hidden) == 1
        m.config.return_dict = False  # the config's default counts too
        assert isinstance(m(x), tuple) and isinstance(m.transformer(x), tuple)


@pytest.mark.parametrize("pe", ["alibi", "rope"])
def test_length_extrapolation(pe):
    # trained with block_size=512, evaluated / generating at 1024 tokens: no learned table limits it
    m = tiny(position_embedding=pe, block_size=512, n_embd=16)
    x = torch.randint(0, 67, (1, 1024))
    with torch.no_grad():
        logits = m(x).logits
    assert logits.shape == (1, 1024, 67) and torch.isfinite(logits).all()
    out = m.generate(x[:, :1000], max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 1024)


def test_learned_positions_refuse_long_input():
    m = tiny(block_size=16)
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        m(torch.randint(0, 67, (1, 17)))


def test_crop_block_size():
    m = tiny(block_size=32)
    x = torch.randint(0, 67, (1, 8))
    before = m(x).logits
    m.crop_block_size(8)
    assert m.config.block_size == 8 and m.transformer.wpe.weight.shape == (8, 32)
    torch.testing.assert_close(m(x).logits, before)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        m(torch.randint(0, 67, (1, 9)))
    with pytest.raises(ValueError, match="crop_block_size"):
        m.crop_block_size(64)


# -----------------------------------------------------------------------------
# training helpers

def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = tiny(dropout=0.0).train()
    x = torch.randint(0, 67, (2, 32))
    m(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # transformers >= 5.24 renamed it (the old name warns); the trainer picks the same way
    new = hasattr(type(m), "activation_checkpointing_enable")
    m.activation_checkpointing_enable() if new else m.gradient_checkpointing_enable()
    assert m.is_activation_checkpointing if new else m.is_gradient_checkpointing
    m(x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_configure_optimizers_groups():
    m = tiny()
    opt = m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu", verbose=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_parameters()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 3e-4


def test_loss_goes_down():
    m = tiny(vocab_size=16).train()
    opt = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu", verbose=False)
    x = torch.arange(33).remainder(16).repeat(4, 1)  # a learnable cyclic sequence
    losses = []
    for _ in range(40):
        loss = m(x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_mfu_and_peak_table():
    assert peak_flops("cpu") is None
    assert tiny().estimate_mfu(12, 0.1) is None  # unknown peak -> None, never a made-up number
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_for_name("Some GPU") is None


# -----------------------------------------------------------------------------
# save / load / Auto classes / remote code / pipeline

def test_save_load_round_trip_auto_classes(tmp_path):
    m = tiny(position_embedding="rope", bias=False)
    m.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_nanogpt.py", "modeling_nanogpt.py"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is NanoGPTForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 67, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits)
    from transformers import AutoModel
    assert type(AutoModel.from_config(m.config)) is NanoGPTModel


REMOTE_CHILD = textwrap.dedent("""
    import importlib.util, sys
    # prove the package is not importable here (editable installs add a finder to sys.meta_path)
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                     and "nanogpt" not in repr(f).lower()]
    # (only the checkout itself: a virtual environment may live inside it or in a folder named after it)
    sys.path = [p for p in sys.path if p and p.rstrip("/") != "{repo}"]
    assert importlib.util.find_spec("nanogpt_hf") is None, "nanogpt_hf should not be importable"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    x = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(x).logits, sys.argv[3])
    # cached generation in the downloaded files is exact too: each step's logits == a no-cache forward
    out = model.generate(x[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (2, 8)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    diff = max((full[:, 2 + i] - step).abs().max().item() for i, step in enumerate(out.logits))
    assert diff <= 1e-4, diff
""")


def test_trust_remote_code_without_package(tmp_path):
    m = tiny(position_embedding="alibi")
    model_dir = tmp_path / "model"
    m.save_pretrained(model_dir)
    x = torch.randint(0, 67, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = tmp_path / "child.py"
    child.write_text(REMOTE_CHILD.replace("{repo}", repo))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh transformers_modules cache
    env["HF_HUB_OFFLINE"] = "1"
    subprocess.run([sys.executable, str(child), str(model_dir), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), m(x).logits)


def test_pipeline_text_generation(tmp_path, tiktoken_cache):
    from transformers import pipeline

    from nanogpt_hf.tokenization import gpt2_tokenizer as make_gpt2_tokenizer
    gpt2_tokenizer = make_gpt2_tokenizer()
    m = tiny(vocab_size=len(gpt2_tokenizer), block_size=64)
    m.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    pipe = pipeline("text-generation", model=str(tmp_path))
    out = pipe("Hello world", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("Hello world") and len(pipe.tokenizer(text)["input_ids"]) == 2 + 5


def test_num_items_in_batch_sums_the_loss():
    # Trainer's exact loss under gradient accumulation: summed over tokens, divided by the whole batch's count
    m = tiny()
    x = torch.randint(0, 67, (2, 12))
    y = torch.randint(0, 67, (2, 12))
    y[0, :5] = -100
    n = int((y != -100).sum())
    mean = m(x, shift_labels=y).loss
    torch.testing.assert_close(m(x, shift_labels=y, num_items_in_batch=3 * n).loss, mean / 3)
    # Trainer.find_labels reads forward's named parameters: "labels" alone, so evaluate() reports eval_loss
    from transformers.utils.generic import find_labels
    assert find_labels(type(m)) == ["labels"]
