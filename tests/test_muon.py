"""--optimizer muon: torch.optim.Muon for the blocks' 2-D weights, AdamW for the rest, as one optimizer.

The split (every parameter in exactly one group), both learning rates on the one schedule, a tiny run that
learns, kill -9 + resume reproducing the uninterrupted run, fp16 loss scaling over both optimizers, DDP on CPU.

    python -m pytest tests/test_muon.py -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.optim import CombinedOptimizer, build_optimizer, lr_scales, set_lr, split_params
from nanogpt_hf.trainer import find_checkpoint, get_lr, train
from test_trainer import ROOT, final_weights, kill_9_while_writing_checkpoint, read_dump, tiny_cfg

pytestmark = [pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9"),
              pytest.mark.usefixtures("fresh_accelerate_state")]


def muon_cfg(data_dir, out_dir, **overrides):
    return tiny_cfg(data_dir, out_dir, **{"optimizer": "muon", "muon_learning_rate": 0.03, **overrides})


# -----------------------------------------------------------------------------
# the split and the schedule


@pytest.mark.parametrize("bias", [False, True])
def test_param_groups_split_every_parameter_exactly_once(tmp_path, bias):
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias))
    cfg = muon_cfg(tmp_path, tmp_path, weight_decay=0.1, muon_weight_decay=0.01)
    opt = build_optimizer(model, cfg, "cpu", verbose=False)
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head is listed once, as wte
    groups = lambda o: [sorted(names[id(p)] for p in g["params"]) for g in o.param_groups]  # noqa: E731

    per_block = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert groups(muon) == [sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in per_block)]
    decay, no_decay = groups(adamw)
    assert decay == ["transformer.wpe.weight", "transformer.wte.weight"]  # the embeddings; wte is the tied head
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(".ln_" in n or "ln_f" in n or n.endswith(".bias") for n in no_decay)
    # per block 2 LayerNorm weights (+ their 2 biases + 4 Linear biases), then ln_f's weight (+ bias)
    assert len(no_decay) == (2 * 8 + 2 if bias else 2 * 2 + 1)
    # every trainable parameter in exactly one group, across both optimizers
    everything = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len(set(everything)) and set(everything) == {id(p) for p in model.parameters()}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.03, cfg.learning_rate, cfg.learning_rate]
    assert split_params(model)[0] == muon.param_groups[0]["params"]

    # frozen parameters stay out of both
    model.transformer.wpe.weight.requires_grad_(False)
    assert "transformer.wpe.weight" not in [names[id(p)] for p in sum(split_params(model), [])]
    # adamw: nanoGPT's optimizer, unchanged
    plain = build_optimizer(model, tiny_cfg(tmp_path, tmp_path), "cpu", verbose=False)
    assert type(plain) is torch.optim.AdamW


def test_both_learning_rates_follow_the_one_schedule(tmp_path):
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = muon_cfg(tmp_path, tmp_path, learning_rate=3e-3, min_lr=3e-4, muon_learning_rate=0.02, warmup_iters=10,
                   lr_decay_iters=100, max_iters=100)
    opt = build_optimizer(model, cfg, "cpu", verbose=False)
    scales = lr_scales(opt, cfg)
    assert scales[1:] == [1.0, 1.0]  # AdamW's groups get get_lr's value exactly
    for it in (0, 5, 10, 50, 99, 100):
        set_lr(opt, get_lr(it, cfg), scales)
        muon_lr, adamw_lr, _ = (g["lr"] for g in opt.param_groups)
        assert adamw_lr == get_lr(it, cfg)
        assert muon_lr == pytest.approx(0.02 * get_lr(it, cfg) / 3e-3, rel=1e-12)
    assert muon_lr == pytest.approx(0.002)  # min_lr / learning_rate of Muon's peak


# -----------------------------------------------------------------------------
# training with it


def test_tiny_muon_run_learns_and_saves_both_states(char_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    results = train(muon_cfg(char_data_dir, out, max_iters=30, eval_interval=15, eval_iters=4, lr_decay_iters=30,
                             batch_size=8, keep_checkpoints=1))
    log = capsys.readouterr().out
    assert "num Muon parameter tensors: 8, with 24,576 parameters" in log
    history = json.loads((find_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.8, history  # 4.1 (uniform over 60) -> < 3.3
    assert results["final_iter"] == 30
    state = torch.load(find_checkpoint(out / "checkpoints") / "optimizer.pt", weights_only=True)
    kinds = [set(s) for s in state["state"].values()]
    assert kinds.count({"momentum_buffer"}) == 8  # Muon's, one per matrix
    assert kinds.count({"step", "exp_avg", "exp_avg_sq"}) == len(kinds) - 8  # AdamW's
    assert len(state["param_groups"]) == 3


def test_kill_9_then_resume_with_muon_reproduces_the_uninterrupted_run(char_data_dir, tmp_path):
    """As test_trainer's kill -9 test, with Muon: killed mid-way through writing its second checkpoint, the run
    resumes from the first and then gives the uninterrupted run's losses and weights bit for bit."""
    common = dict(dropout=0.1, max_iters=9, eval_interval=3, lr_decay_iters=9)
    killed = muon_cfg(char_data_dir, tmp_path / "killed", debug_dump_dir=str(tmp_path / "dump_k"), **common)
    kill_9_while_writing_checkpoint(killed, 6)
    assert find_checkpoint(tmp_path / "killed/checkpoints").name == "step_000003"

    train(muon_cfg(char_data_dir, tmp_path / "killed", init_from="resume", debug_dump_dir=str(tmp_path / "dump_k"),
                   **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(muon_cfg(char_data_dir, tmp_path / "straight", debug_dump_dir=str(tmp_path / "dump_s"), **common))

    k = {r["iter"]: r for r in read_dump(tmp_path / "dump_k/rank0.jsonl")}  # iters 3..5 ran twice: the last counts
    s = read_dump(tmp_path / "dump_s/rank0.jsonl")
    assert sorted(k) == [r["iter"] for r in s] == list(range(9))
    assert [(k[r["iter"]]["loss"], k[r["iter"]]["weights"]) for r in s] == [(r["loss"], r["weights"]) for r in s]
    wk, ws = final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight")
    assert all(torch.equal(wk[key], ws[key]) for key in ws)

    # resuming with the other optimizer is refused: its state would not fit
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"optimizer 'muon' \(checkpoint\) vs 'adamw' \(now\)"):
        train(tiny_cfg(char_data_dir, tmp_path / "straight", init_from="resume", max_iters=12))


def test_fp16_loss_scaling_covers_both_optimizers(char_data_dir, tmp_path):
    """One GradScaler for Muon and AdamW: one unscale (before clipping), one inf check and one update of the loss
    scale per iteration. (Two optimizers prepared separately would each call scaler.update(), 12 updates in 6
    iterations, and the second one's gradients would be unscaled twice.) The fp16 run keeps up with the fp32 one."""
    common = dict(max_iters=6, eval_interval=3, lr_decay_iters=6, learning_rate=1e-2)
    fp32 = train(muon_cfg(char_data_dir, tmp_path / "fp32", **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    fp16 = train(muon_cfg(char_data_dir, tmp_path / "fp16", mixed_precision="fp16", **common))
    assert abs(fp16["final_val_loss"] - fp32["final_val_loss"]) < 0.02, (fp16, fp32)
    ckpt = find_checkpoint(tmp_path / "fp16/checkpoints")
    scaler = torch.load(ckpt / "scaler.pt", weights_only=True)
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 6  # 6 updates, none skipped
    w16, w32 = final_weights(tmp_path / "fp16"), final_weights(tmp_path / "fp32")
    moved = {k: (w16[k] - w32[k]).abs().max().item() for k in w32}
    assert max(moved.values()) < 0.02, moved
    AcceleratorState._reset_state(reset_partial_state=True)
    train(muon_cfg(char_data_dir, tmp_path / "fp16", mixed_precision="fp16", init_from="resume",
                   **{**common, "max_iters": 9, "lr_decay_iters": 9}))
    assert find_checkpoint(tmp_path / "fp16/checkpoints").name == "step_000009"


@pytest.mark.usefixtures("one_thread")  # as torchrun's workers (OMP_NUM_THREADS=1): Muon's bf16 steps amplify the
def test_ddp_two_cpu_processes_with_muon(char_data_dir, tmp_path):  # last bits a thread count changes
    """2 processes x 1 accumulation step train like 1 process x 2: Muon sees the all-reduced gradients."""
    from test_distributed import check_data_parallel, ddp_cfg, finish, free_port, torchrun

    reference = tmp_path / "single"
    train(ddp_cfg(char_data_dir, reference, gradient_accumulation_steps=2, optimizer="muon"))
    out = tmp_path / "ddp"
    finish(torchrun(ddp_cfg(char_data_dir, out, optimizer="muon"), "--nproc_per_node", "2",
                    "--master_port", str(free_port())))
    check_data_parallel(out, reference)  # the same checks as for AdamW, to the same tolerances


# -----------------------------------------------------------------------------
# examples/bench.py --what time_to_loss (tiny: the numbers mean nothing here, the plumbing does)


# one thread, as the bench's subprocess (OMP_NUM_THREADS=1): the last bits of the losses depend on the thread count
# (1e-5 apart at iter 8 with 1 vs 2 threads), and Muon's bf16 steps amplify that
@pytest.mark.usefixtures("one_thread")
def test_time_to_loss_bench_trains_as_train_py_does(char_data_dir, tmp_path):
    adamw = tiny_cfg(char_data_dir, tmp_path / "adamw", max_iters=12, lr_decay_iters=12, eval_interval=4)
    muon = muon_cfg(char_data_dir, tmp_path / "muon", max_iters=12, lr_decay_iters=12, eval_interval=4)
    flags = lambda cfg: " ".join(f"--{k}={v}" for k, v in cfg.to_dict().items() if v is not None)  # noqa: E731
    out = tmp_path / "ttl.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples/bench.py"), "--what", "time_to_loss", "--runs",
                           flags(adamw), flags(muon), "--target_loss", "3.7", "--check_every", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time to val loss <= 3.7: nanoGPT's estimate (2 val batches" in proc.stdout
    assert "muon vs adamw: " in proc.stdout and "the wall time (goal <= 0.70x)" in proc.stdout, proc.stdout
    runs = json.loads(out.read_text())["time_to_loss"]["runs"]
    for label in ("adamw", "muon"):
        hit = runs[label]["reached"]
        assert hit["iter"] % 4 == 0 and hit["val_loss"] <= 3.7 and hit["seconds"] > 0 and hit["exact_val_loss"] > 0
        assert all(c["val_loss"] > 3.7 for c in runs[label]["curve"][:-1])  # the first check under the target
    assert runs["muon"]["ratio_iters"] == runs["muon"]["reached"]["iter"] / runs["adamw"]["reached"]["iter"]

    # the benchmark's runs are train.py's runs: the same val losses at the same iterations
    for label, cfg in (("adamw", adamw), ("muon", muon)):
        AcceleratorState._reset_state(reset_partial_state=True)
        train(cfg)
        history = json.loads((find_checkpoint(cfg.out_dir + "/checkpoints") / "trainer_state.json").read_text())
        trained = {h["iter"]: h["val_loss"] for h in history["history"]}
        for c in runs[label]["curve"]:
            assert c["val_loss"] == pytest.approx(trained[c["iter"]], abs=1e-6), (label, c, trained)
