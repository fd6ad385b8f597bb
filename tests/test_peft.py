"""LoRA finetuning through PEFT in the training loop (--lora_r): the loss goes down with only the adapters
training, checkpoints hold adapters + optimizer (no base weights), resume is bit-exact, out_dir is the merged
model (plain transformers) and out_dir/adapter loads with AutoPeftModelForCausalLM on the base, equal to it."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from nanogpt_hf.train_config import TrainConfig
from nanogpt_hf.trainer import find_checkpoint, train

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")



@pytest.fixture(scope="module")
def gpt2_base(char_data_dir, tmp_path_factory):
    """The pretrained model the adapters go on (like --init_from gpt2-xl): a tiny model trained briefly on the
    data, exported as a plain GPT2LMHeadModel dir."""
    from nanogpt_hf import NanoGPTForCausalLM

    root = tmp_path_factory.mktemp("gpt2_base")
    train(TrainConfig(data_dir=str(char_data_dir), out_dir=str(root / "pretrained"), n_layer=2, n_head=2, n_embd=32,
                      block_size=32, batch_size=8, gradient_accumulation_steps=1, max_iters=30, eval_interval=30,
                      eval_iters=2, log_interval=10, learning_rate=1e-2, warmup_iters=0, lr_decay_iters=30,
                      min_lr=1e-3, cpu=True, mixed_precision="no"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    NanoGPTForCausalLM.from_pretrained(root / "pretrained").to_gpt2().save_pretrained(root / "gpt2")
    return root / "gpt2"


def lora_cfg(data_dir, out_dir, base, **overrides):
    cfg = dict(data_dir=str(data_dir), out_dir=str(out_dir), init_from=str(base), block_size=32, batch_size=4,
               gradient_accumulation_steps=1, max_iters=8, eval_interval=4, eval_iters=2, log_interval=4,
               learning_rate=2e-2, warmup_iters=0, lr_decay_iters=8, min_lr=2e-3, weight_decay=0.0, cpu=True,
               mixed_precision="no", lora_r=4, lora_alpha=8)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def test_lora_learns_saves_adapter_only_and_merged_equals_base_plus_adapter(char_data_dir, gpt2_base, tmp_path,
                                                                            capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    train(lora_cfg(char_data_dir, out, gpt2_base, max_iters=40, eval_interval=20, lr_decay_iters=40, batch_size=8,
                   learning_rate=1e-2, min_lr=1e-3, lora_alpha=32))
    log = capsys.readouterr().out
    assert "LoRA r=4 alpha=32.0 on c_attn, c_proj, c_fc: 4,096 trainable of 32,544" in log  # r x (in + out)
    ckpt = find_checkpoint(out / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    history = state["history"]
    # the base alone: 3.08; with the adapters only training: 3.06, 3.02
    assert history[-1]["val_loss"] < history[1]["val_loss"] < history[0]["val_loss"] and \
        history[-1]["val_loss"] < history[0]["val_loss"] - 0.04, history

    # the checkpoint: adapter weights and the adapters' optimizer state, no base weights
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "adapter_config.json").is_file()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert len(adapter) == 2 * 4 * 2 and all("lora_" in k for k in adapter)  # A and B, 4 modules, 2 layers
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(adapter)  # the frozen base has no optimizer state
    assert state["lora_base"] == str(gpt2_base)

    # out_dir: the merged model, a plain model dir (no adapter_config.json at its top), and the adapter
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter").stat().st_mode & 0o111 == 0o111  # the folder stays traversable (not given 0644)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "NanoGPTForCausalLM"
    # the model card's lines: GPT2LMHeadModel (the base, from adapter_config.json) + the adapter
    on_base = peft.AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), str(out),
                                           subfolder="adapter").eval()
    assert type(on_base.get_base_model()).__name__ == "GPT2LMHeadModel"
    base = AutoModelForCausalLM.from_pretrained(gpt2_base).eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 32))
    with torch.no_grad():
        want = on_base(input_ids=x).logits
        assert torch.equal(again(input_ids=x).logits, want)
        assert (merged(x).logits - want).abs().max() <= 1e-5
        assert (base(x).logits - want).abs().max() > 1e-3  # the adapter changed the model
        assert merged(x, shift_labels=x).loss.item() < 10  # (a working model, not NaNs)
    card = (out / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "<user>/out", subfolder="adapter")' in card
    assert "**merged** model" in card and "- peft\n- lora" in card
    assert "base_model:" not in card  # the base is a local folder here, not a Hub id


def test_lora_resume_is_bit_exact(char_data_dir, gpt2_base, tmp_path):
    common = dict(lora_dropout=0.1)  # dropout on the adapters: the RNG must be restored too
    train(lora_cfg(char_data_dir, tmp_path / "a", gpt2_base, debug_dump_dir=str(tmp_path / "dump_a"), **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    # 4 iterations don't beat the base's val loss yet: no best model, an error, but the checkpoint is written
    with pytest.raises(FloatingPointError, match="no evaluation beat"):
        train(lora_cfg(char_data_dir, tmp_path / "b", gpt2_base, max_iters=4, debug_dump_dir=str(tmp_path / "dump_b"),
                       **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(lora_cfg(char_data_dir, tmp_path / "b", "resume", debug_dump_dir=str(tmp_path / "dump_b"), **common))

    def dump(name):
        return [json.loads(line) for line in (tmp_path / name / "rank0.jsonl").read_text().splitlines()]

    a, b = dump("dump_a"), dump("dump_b")
    assert [r["iter"] for r in b] == list(range(8))
    assert [(r["loss"], r["weights"]) for r in a] == [(r["loss"], r["weights"]) for r in b]  # bit-exact
    wa = load_file(find_checkpoint(tmp_path / "a" / "checkpoints") / "adapter_model.safetensors")
    wb = load_file(find_checkpoint(tmp_path / "b" / "checkpoints") / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"lora_r 4 \(checkpoint\) vs 8 \(now\)"):
        train(lora_cfg(char_data_dir, tmp_path / "b", "resume", lora_r=8, max_iters=12))


def test_lora_bad_settings_are_one_line_errors(char_data_dir, gpt2_base, tmp_path):
    with pytest.raises(ValueError, match="--lora_r adapts a pretrained model"):
        lora_cfg(char_data_dir, tmp_path, "scratch")
    with pytest.raises(ValueError, match="--lora_r must be >= 0"):
        lora_cfg(char_data_dir, tmp_path, gpt2_base, lora_r=-1)
    with pytest.raises(ValueError, match="--lora_target_modules nope"):
        train(lora_cfg(char_data_dir, tmp_path / "x", gpt2_base, lora_target_modules="nope"))


def test_peft_knows_our_default_target_modules():
    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
    from nanogpt_hf.lora import register_with_peft

    register_with_peft()
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, task_type="CAUSAL_LM"))  # no target_modules given
    assert sorted(Path(n).suffix[1:] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")) == \
        ["c_attn", "c_fc", "c_proj", "c_proj"]
