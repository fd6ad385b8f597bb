"""The training loop on CPU with a tiny model: loss falls, out_dir is a loadable model, resume is exact (also after
kill -9), incompatible resumes are refused, mixed precision, NaN handling, pushing to a local Hub while training.

    python -m pytest tests/test_trainer.py -q
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.train_config import TrainConfig
from nanogpt_hf.trainer import CHECKPOINT_SLEEP_ENV, build_model, find_checkpoint, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(data_dir, out_dir, **overrides):
    """A 2-layer, 32-wide model on the tiny char dataset: a few iterations take about a second."""
    cfg = dict(data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=32,
               batch_size=4, gradient_accumulation_steps=1, max_iters=8, eval_interval=4, eval_iters=2,
               log_interval=1, learning_rate=3e-3, warmup_iters=2, lr_decay_iters=8, min_lr=3e-4, cpu=True,
               mixed_precision="no")
    cfg.update(overrides)
    return TrainConfig(**cfg)


def tiny_args(cfg):
    """The same config as command-line flags for examples/train.py."""
    return [f"--{k}={v}" for k, v in cfg.to_dict().items() if v is not None]


def read_dump(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def final_weights(out_dir):
    return load_file(find_checkpoint(Path(out_dir) / "checkpoints") / "model.safetensors")



# -----------------------------------------------------------------------------
# a short run: loss falls, and out_dir is a Hugging Face model dir


def test_short_run_learns_and_out_dir_is_a_model(char_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = tiny_cfg(char_data_dir, out, max_iters=40, eval_interval=20, eval_iters=4, lr_decay_iters=40,
                   learning_rate=1e-2, log_interval=10, batch_size=8, batch_size_warmup_iters=10,
                   batch_size_warmup_start=2, keep_checkpoints=1, sample_at_end=1)
    results = train(cfg)
    log = capsys.readouterr().out

    # nanoGPT's startup lines and log lines
    assert "tokens per iteration will be: 256 (1 grad accum steps x 1 processes x 8 batch size x 32 block size)" in log
    assert "number of parameters: 0.03M" in log
    assert "iter 10: loss " in log and "mfu n/a" in log and "tok/s" in log and "grad norm" in log
    history = json.loads((find_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())["history"]
    assert [h["iter"] for h in history] == [0, 20, 40]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.8, history  # 4.1 (uniform over 60) -> ~3
    assert results["val_loss"] == min(h["val_loss"] for h in history[1:])
    assert results["final_iter"] == 40 and results["tokens_seen"] > 0 and results["ms_per_iter"] > 0

    # the best model: loadable with plain transformers (nanogpt_hf imported registers the model type)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    for name in ("model.safetensors", "config.json", "configuration_nanogpt.py", "modeling_nanogpt.py",
                 "generation_config.json", "tokenizer.json", "train_config.json", "results.json", "loss_curve.png",
                 "README.md"):
        assert (out / name).is_file(), name
    assert not (out / ".tmp_best").exists()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert TrainConfig(**json.loads((out / "train_config.json").read_text())) == cfg
    assert f"{results['val_loss']:.4f}" in (out / "README.md").read_text()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, NanoGPTForCausalLM) and model.generation_config.top_k == 200
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = pipeline("text-generation", model=str(out))("KING", max_new_tokens=10)[0]["generated_text"]
    assert text.startswith("KING") and len(text) > len("KING")
    ids = torch.tensor([tokenizer.encode("the king", add_special_tokens=False)])
    assert torch.isfinite(model(ids).logits).all()
    # the samples printed at the end came from it, and only the last checkpoint is kept
    assert log.rstrip().endswith("---------------")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000040"]


# -----------------------------------------------------------------------------
# resume: bit-exact, refused when incompatible


def test_resume_is_bit_exact_and_incompatible_resume_refused(char_data_dir, tmp_path):
    common = dict(dropout=0.1)  # dropout: the RNG state must be restored too
    train(tiny_cfg(char_data_dir, tmp_path / "a", debug_dump_dir=str(tmp_path / "dump_a"), **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_cfg(char_data_dir, tmp_path / "b", max_iters=4, debug_dump_dir=str(tmp_path / "dump_b"), **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_cfg(char_data_dir, tmp_path / "b", init_from="resume", debug_dump_dir=str(tmp_path / "dump_b"),
                   **common))

    a, b = read_dump(tmp_path / "dump_a" / "rank0.jsonl"), read_dump(tmp_path / "dump_b" / "rank0.jsonl")
    assert [r["iter"] for r in b] == list(range(8))
    assert [(r["loss"], r["weights"]) for r in a] == [(r["loss"], r["weights"]) for r in b]  # bit-exact
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"cannot resume from .*step_000008: n_layer 2 \(checkpoint\) vs 3 \(now\); "
                                         r"n_embd 32 \(checkpoint\) vs 48 \(now\)"):
        train(tiny_cfg(char_data_dir, tmp_path / "b", init_from="resume", n_layer=3, n_embd=48, max_iters=12))
    AcceleratorState._reset_state(reset_partial_state=True)
    before = sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir())
    evaluated = train(tiny_cfg(char_data_dir, tmp_path / "b", init_from="resume", eval_only=True))
    assert evaluated["iter"] == 8 and evaluated["val_loss"] == pytest.approx(
        json.loads((tmp_path / "b/results.json").read_text())["final_val_loss"])
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir()) == before  # eval_only writes nothing
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        train(tiny_cfg(char_data_dir, tmp_path / "empty", init_from="resume"))


def kill_9_while_writing_checkpoint(cfg, it):
    """Run examples/train.py with cfg and SIGKILL it while iteration it's checkpoint is half written (its weights
    are written, the rest isn't); returns that checkpoint's .tmp folder."""
    env = dict(os.environ, **{CHECKPOINT_SLEEP_ENV: f"{it}:60"})  # pause mid-write at iteration it
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples/train.py"), *tiny_args(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half_written = Path(cfg.out_dir) / f"checkpoints/step_{it:06d}.tmp"
    try:
        deadline = time.time() + 300
        while not (half_written / "model.safetensors").is_file():
            assert proc.poll() is None and time.time() < deadline, f"the run ended before its iter-{it} checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return half_written


def test_kill_9_during_checkpoint_write_then_resume_is_exact(char_data_dir, tmp_path):
    """A run killed (SIGKILL) while its second checkpoint is half written resumes from the first one and ends
    with the same per-iteration losses and weights as a run that was never interrupted."""
    common = dict(dropout=0.1, max_iters=9, eval_interval=3, lr_decay_iters=9)
    killed = tiny_cfg(char_data_dir, tmp_path / "killed", debug_dump_dir=str(tmp_path / "dump_k"), **common)
    half_written = kill_9_while_writing_checkpoint(killed, 6)
    assert not (half_written / "optimizer.pt").exists()
    assert find_checkpoint(tmp_path / "killed/checkpoints").name == "step_000003"  # the .tmp one doesn't count

    train(tiny_cfg(char_data_dir, tmp_path / "killed", init_from="resume", debug_dump_dir=str(tmp_path / "dump_k"),
                   **common))
    assert not half_written.exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_cfg(char_data_dir, tmp_path / "straight", debug_dump_dir=str(tmp_path / "dump_s"), **common))

    k, s = read_dump(tmp_path / "dump_k/rank0.jsonl"), read_dump(tmp_path / "dump_s/rank0.jsonl")
    k = {r["iter"]: r for r in k}  # iterations 3..5 ran twice (before the kill and after the resume)
    assert sorted(k) == list(range(9))
    for r in s:
        assert abs(k[r["iter"]]["loss"] - r["loss"]) <= 1e-6, (r, k[r["iter"]])
    wk, ws = final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight")
    assert all(torch.allclose(wk[key], ws[key], rtol=0, atol=1e-6) for key in ws)


# -----------------------------------------------------------------------------
# mixed precision, NaN, init_from


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(char_data_dir, tmp_path, mixed_precision):
    out = tmp_path / "out"
    results = train(tiny_cfg(char_data_dir, out, mixed_precision=mixed_precision, max_iters=4,
                             gradient_checkpointing=mixed_precision == "bf16"))
    assert results["mixed_precision"] == mixed_precision and results["val_loss"] < 4.2
    ckpt = find_checkpoint(out / "checkpoints")
    assert (ckpt / "scaler.pt").is_file() == (mixed_precision == "fp16")  # fp16: loss scaling, state saved
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())  # fp32 master weights
    AcceleratorState._reset_state(reset_partial_state=True)
    train(tiny_cfg(char_data_dir, out, mixed_precision=mixed_precision, max_iters=6, init_from="resume"))
    assert find_checkpoint(out / "checkpoints").name == "step_000006"


def nan_at(monkeypatch, bad_call):
    """Make the bad_call-th training forward return a NaN loss (a real divergence can't be had on demand)."""
    forward, calls = NanoGPTForCausalLM.forward, []

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == bad_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(NanoGPTForCausalLM, "forward", patched)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_state(char_data_dir, tmp_path, monkeypatch):
    nan_at(monkeypatch, bad_call=7)  # iteration 6
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"loss is nan at iter 6: stopped before updating the weights"):
        train(tiny_cfg(char_data_dir, out))
    assert find_checkpoint(out / "checkpoints").name == "step_000004"
    best = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in best.values())
    assert json.loads((out / "results.json").read_text())["iter"] == 4


def test_nan_loss_skip_policy_skips_the_update(char_data_dir, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, bad_call=3)
    results = train(tiny_cfg(char_data_dir, tmp_path / "out", nan_policy="skip", max_skipped_share=0.3))
    assert "iter 2: loss nan, update skipped" in capsys.readouterr().out
    assert results["skipped_updates"] == 1 and results["final_iter"] == 8
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "out").values())


def test_init_from_model_dir_gpt2_dir_and_crop(char_data_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from nanogpt_hf.data import TokenShards

    data = TokenShards(char_data_dir, "train")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    model = build_model(tiny_cfg(char_data_dir, tmp_path, init_from=str(tmp_path / "gpt2"), dropout=0.1), data)
    assert (model.config.n_layer, model.config.block_size, model.config.dropout) == (1, 32, 0.1)  # cropped 64 -> 32
    model.save_pretrained(tmp_path / "nano")
    again = build_model(tiny_cfg(char_data_dir, tmp_path, init_from=str(tmp_path / "nano"), block_size=16), data)
    assert again.config.block_size == 16
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    with pytest.raises(ValueError, match="--block_size 64 is larger than the 32 positions"):
        build_model(tiny_cfg(char_data_dir, tmp_path, init_from=str(tmp_path / "nano"), block_size=64), data)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=40)).save_pretrained(
        tmp_path / "small_vocab")
    with pytest.raises(ValueError, match="vocab_size 40 is smaller than"):
        build_model(tiny_cfg(char_data_dir, tmp_path, init_from=str(tmp_path / "small_vocab")), data)


def test_train_step_called_alone_makes_the_loops_updates(char_data_dir, tmp_path):
    """What a benchmark does: its own Accelerator, model (build_model) and optimizer, then train_step over
    micro_batches, gives bit for bit the weights train() has after each iteration (2 accumulation steps)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from nanogpt_hf.data import TokenShards
    from nanogpt_hf.optim import build_optimizer, lr_scales, set_lr
    from nanogpt_hf.trainer import digest, get_lr, micro_batches, train_step

    cfg = tiny_cfg(char_data_dir, tmp_path / "out", max_iters=3, gradient_accumulation_steps=2,
                   debug_dump_dir=str(tmp_path / "dump"))
    train(cfg)
    dumped = read_dump(tmp_path / "dump" / "rank0.jsonl")
    AcceleratorState._reset_state(reset_partial_state=True)

    accelerator = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=2)
    set_seed(cfg.seed, device_specific=True)  # as train() does: the same initial weights
    data = TokenShards(char_data_dir, "train")
    model = build_model(cfg, data, log=lambda *a: None)
    optimizer = build_optimizer(model, cfg, "cpu", verbose=False)
    scales = lr_scales(optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for it in range(3):
        set_lr(optimizer, get_lr(it, cfg), scales)
        step = train_step(model, optimizer, accelerator, micro_batches(data, cfg, it, accelerator), cfg.grad_clip)
        assert step.updated and not step.stopping and step.norm is not None
        assert (step.loss.item(), digest(model.parameters())) == (dumped[it]["loss"], dumped[it]["weights"])


def test_out_dir_generation_config_sets_no_max_length(char_data_dir, tmp_path, caplog):
    """generation_config.json: nanoGPT's sampling settings and max_new_tokens, no max_length (with it, every
    generate(max_new_tokens=...) warned that both were set)."""
    import logging

    from transformers import AutoModelForCausalLM

    from nanogpt_hf.data import TokenShards

    build_model(tiny_cfg(char_data_dir, tmp_path), TokenShards(char_data_dir, "train")).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m/generation_config.json").read_text())
    assert "max_length" not in saved and saved["max_new_tokens"] == 500
    assert (saved["do_sample"], saved["temperature"], saved["top_k"]) == (True, 0.8, 200)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    try:
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    finally:
        logger.removeHandler(caplog.handler)
    assert out.shape == (1, 8) and not [r for r in caplog.records if "max_length" in r.getMessage()]


def test_init_from_a_nanogpt_ckpt_pt_takes_the_runs_dropout(char_data_dir, tmp_path):
    """--init_from ckpt.pt (the original nanoGPT's checkpoint) with the run's dropout: it was a TypeError (dropout
    given twice), a traceback instead of a model."""
    from nanogpt_hf import NanoGPTConfig
    from nanogpt_hf.data import TokenShards

    torch.manual_seed(0)
    nano = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, bias=True))
    args = dict(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, bias=True, dropout=0.0)
    torch.save({"model_args": args, "model": {k: v for k, v in nano.state_dict().items() if k != "lm_head.weight"}},
               tmp_path / "ckpt.pt")
    model = build_model(tiny_cfg(char_data_dir, tmp_path, init_from=str(tmp_path / "ckpt.pt"), dropout=0.1),
                        TokenShards(char_data_dir, "train"))
    assert model.config.dropout == 0.1 and torch.equal(model.transformer.wte.weight, nano.transformer.wte.weight)


def test_report_to_a_missing_tracker_is_a_clear_error(char_data_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ValueError, match=r"--report_to wandb: .*pip install wandb"):
        train(tiny_cfg(char_data_dir, tmp_path / "out", report_to="wandb"))


def test_report_to_tensorboard_writes_the_curves(char_data_dir, tmp_path):
    pytest.importorskip("tensorboard")  # in the test extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    results = train(tiny_cfg(char_data_dir, out, report_to="tensorboard", project_name="tb_run"))
    assert list((out / "tb_run").glob("events.out.tfevents.*")), f"no tensorboard event file in {out / 'tb_run'}"
    acc = EventAccumulator(str(out / "tb_run")).Reload()
    train_loss = acc.Scalars("train/loss")
    assert [e.step for e in train_loss] == list(range(8))  # every iteration (log_interval=1)
    assert train_loss[-1].value < train_loss[0].value
    val = acc.Scalars("val/loss")
    assert [e.step for e in val] == [0, 4, 8]
    assert abs(val[-1].value - results["final_val_loss"]) < 1e-4
    assert {"lr", "grad_norm"} <= set(acc.Tags()["scalars"])


# -----------------------------------------------------------------------------
# push to a Hub while training (a real HTTP server on 127.0.0.1), through examples/train.py; init_from a Hub id


def test_push_to_hub_while_training_then_finetune_from_the_hub(char_data_dir, tmp_path):
    from hub_server import HubServer

    cfg = tiny_cfg(char_data_dir, tmp_path / "out", push_to_hub=True, hub_model_id="tester/tiny-nanogpt",
                   push_interval=4, log_interval=4)
    finetune = tiny_cfg(char_data_dir, tmp_path / "finetuned", init_from="tester/tiny-nanogpt", max_iters=2,
                        eval_interval=2, block_size=16, learning_rate=1e-4, decay_lr=False)
    with HubServer(tmp_path / "hub", tokens={"hf_write": "write"}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HOME=str(tmp_path / "hf_home"))
        for c in (cfg, finetune):
            run = subprocess.run([sys.executable, str(ROOT / "examples/train.py"), *tiny_args(c)], env=env,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
            if c is cfg:
                assert "hub: pushed" in run.stdout + run.stderr
        assert "initializing from weights: tester/tiny-nanogpt" in run.stdout
        assert json.loads((tmp_path / "finetuned/config.json").read_text())["block_size"] == 16  # cropped
        history = hub.history("tester/tiny-nanogpt")
    summaries = [commit["summary"] for _, commit in history]
    assert any("iter 4" in m for m in summaries) and "final model" in summaries[0], summaries
    files = set(history[0][1]["files"])  # the newest commit
    assert {"model.safetensors", "config.json", "modeling_nanogpt.py", "configuration_nanogpt.py", "tokenizer.json",
            "generation_config.json", "README.md", "results.json", "loss_curve.png"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["step_000004", "step_000008"]
