"""Data-parallel training for real, on CPU: torchrun starts the processes, Accelerate sees MULTI_CPU over gloo.

- 2 processes on one machine (torchrun --nproc_per_node 2), and 2 "nodes" on one machine (two torchrun
  launchers with --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1);
- the ranks see different data; their weights are identical after every step;
- the effective batch is the single-process one: 2 processes x 1 accumulation step train like 1 process x 2.

    python -m pytest tests/test_distributed.py -q
"""

import json
import os
import re
import socket
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from nanogpt_hf.trainer import train
from test_trainer import final_weights, read_dump, tiny_args, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
ITERS = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_cfg(data_dir, out_dir, **overrides):
    return tiny_cfg(data_dir, out_dir, max_iters=ITERS, eval_interval=ITERS, lr_decay_iters=ITERS,
                    debug_dump_dir=str(Path(out_dir) / "dump"), **overrides)


def torchrun(cfg, *launcher_args):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(ROOT / "examples/train.py"),
           *tiny_args(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 cores: one thread per process
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a process group: finish() kills a hung run with its workers


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers (which hold the output pipe too)
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def single_process_reference(char_data_dir, tmp_path_factory):
    """1 process with 2 accumulation steps: the run that 2 processes with 1 step each must reproduce."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("single")
    train(ddp_cfg(char_data_dir, out, gradient_accumulation_steps=2))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def check_data_parallel(out, reference):
    """Ranks: different batches, identical weights after each step; together: the single-process run."""
    rank0, rank1 = read_dump(out / "dump/rank0.jsonl"), read_dump(out / "dump/rank1.jsonl")
    single = read_dump(reference / "dump/rank0.jsonl")
    assert [r["iter"] for r in rank0] == [r["iter"] for r in rank1] == list(range(ITERS))
    for r0, r1, s in zip(rank0, rank1, single):
        assert r0["batch"] != r1["batch"]  # different data on each rank
        assert r0["weights"] == r1["weights"]  # bit-identical weights after every step
        assert abs((r0["loss"] + r1["loss"]) / 2 - s["loss"]) < 1e-5, (r0, r1, s)  # same global batch
    w, ref = final_weights(out), final_weights(reference)
    assert all(torch.allclose(w[k], ref[k], rtol=0, atol=1e-5) for k in ref)
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
    ckpt = out / f"checkpoints/step_{ITERS:06d}"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()  # each rank's dropout RNG


def test_ddp_two_cpu_processes(char_data_dir, tmp_path, single_process_reference):
    out = tmp_path / "ddp"
    log = finish(torchrun(ddp_cfg(char_data_dir, out), "--nproc_per_node", "2", "--master_port", str(free_port())))
    assert "MULTI_CPU: 2 process(es)" in log
    assert "tokens per iteration will be: 256 (1 grad accum steps x 2 processes x 4 batch size x 32 block size)" in log
    check_data_parallel(out, single_process_reference)


def test_two_nodes_on_loopback(char_data_dir, tmp_path, single_process_reference):
    out, port = tmp_path / "two_nodes", str(free_port())
    cfg = ddp_cfg(char_data_dir, out)
    nodes = [torchrun(cfg, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                      "--master_addr", "127.0.0.1", "--master_port", port) for rank in (0, 1)]
    logs = [finish(node) for node in nodes]
    assert "MULTI_CPU: 2 process(es)" in logs[0]
    check_data_parallel(out, single_process_reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback of a GPU config")
def test_gpu_config_without_gpus_is_refused(char_data_dir, tmp_path):
    # without GPUs, accelerate starts the 2 processes of fsdp.yaml but sets each up as a lone process: they would
    # both train and write out_dir; the trainer must refuse instead (with --cpu true they run as MULTI_CPU DDP)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), str(ROOT / "examples/train.py"),
           *tiny_args(ddp_cfg(char_data_dir, tmp_path / "out", cpu=False))]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    # accelerate >= 1.13 sets each process up alone; older releases run CPU DDP without FSDP: refused alike
    assert re.search(r"error: launched as 2 processes with FSDP but Accelerate set up (1 \(NO\)|2 \(MULTI_CPU\))",
                     proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()
