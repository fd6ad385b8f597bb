"""The model's FSDP2 contract, on CPU: torch's `fully_shard` per Block + the root, 2 real processes (torchrun,
gloo), against one plain process. Accelerate enables FSDP only on GPU device types, so this runs the model under
torch's FSDP2 directly (tests/fsdp2_worker.py); the trainer's FSDP path is exercised by scripts/gpu_check.sh.

- 2 sharded processes train like 1 process on the whole batch: losses and final weights within float tolerance;
- the tied embedding stays tied (one tensor under FSDP, one in the gathered state dict);
- the gathered full state dict saves as a normal model folder; from_pretrained gives the sharded model's logits;
- a sharded torch.distributed.checkpoint, loaded by new processes that build the model on the meta device,
  continues with exactly the losses of the uninterrupted run.

    python -m pytest tests/test_fsdp2.py -q
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp2_worker as worker
from nanogpt_hf import NanoGPTForCausalLM
from test_distributed import free_port

HERE = Path(__file__).resolve().parent


def torchrun(mode, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "fsdp2_worker.py"), mode, str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    trained = torchrun("train", out)
    resumed = torchrun("resume", out)
    return out, trained, resumed


def test_fsdp2_trains_like_one_process(runs):
    out, trained, _ = runs
    ref_losses, ref_model = worker.reference()
    assert trained["losses"] == pytest.approx(ref_losses, abs=1e-5)
    loaded = NanoGPTForCausalLM.from_pretrained(out / "model")
    ref = ref_model.state_dict()
    worst = max((loaded.state_dict()[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 5e-5, f"weights after {worker.STEPS} steps differ from 1 process by {worst}"


def test_fsdp2_tied_embedding_and_full_state_dict(runs):
    out, trained, _ = runs
    assert trained["tied"], "lm_head.weight is no longer transformer.wte.weight under fully_shard"
    assert "lm_head.weight" in trained["keys"] and trained["same_storage"]
    loaded = NanoGPTForCausalLM.from_pretrained(out / "model").eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        logits = loaded(worker.probe()).logits
    torch.testing.assert_close(logits, torch.tensor(trained["logits"]), atol=1e-6, rtol=0)


def test_fsdp2_dcp_checkpoint_resumes_identically(runs):
    _, trained, resumed = runs
    assert resumed["tied"]
    assert resumed["losses"] == trained["losses"][worker.SAVE_AT:]  # bit for bit: same shards, same order
    torch.testing.assert_close(torch.tensor(resumed["logits"]), torch.tensor(trained["logits"]), atol=0, rtol=0)
