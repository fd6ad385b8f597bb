"""Slow training checks, left out of the default run (pytest -m slow to run them):
`accelerate launch` with the shipped CPU config, and the loop's overhead over the bare model step.

    python -m pytest tests/test_train_slow.py -m slow -q
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import tiny_args, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_accelerate_launch_with_the_cpu_config(char_data_dir, tmp_path):
    cfg = tiny_cfg(char_data_dir, tmp_path / "out", mixed_precision=None, gradient_accumulation_steps=2)
    run = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs/cpu.yaml"),
                          str(ROOT / "examples/train.py"), *tiny_args(cfg)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "NO: 1 process(es), device cpu, mixed precision no" in run.stdout
    assert (tmp_path / "out/model.safetensors").is_file()


def test_loop_overhead_is_small(char_data_dir):
    """examples/train_overhead.py on a small model: the loop costs at most a few % over the bare step (the
    bound is loose because timings on a shared machine are noisy)."""
    run = subprocess.run([sys.executable, str(ROOT / "examples/train_overhead.py"),
                          str(ROOT / "examples/configs/shakespeare_char_cpu.yaml"), "--iters", "50", "--repeats", "3",
                          "--threads", "1", "--", f"--data_dir={char_data_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    overhead = float(re.search(r"loop overhead: +([+-][\d.]+)% \(medians\)", run.stdout).group(1))
    assert overhead < 10, run.stdout


def test_compile_saves_plain_weight_names(char_data_dir, tmp_path):
    """torch.compile wraps the model (`_orig_mod`): out_dir and the checkpoints must still hold plain names."""
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    from nanogpt_hf.trainer import find_checkpoint, train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path / "out"
    train(tiny_cfg(char_data_dir, out, compile=True, max_iters=4))
    for path in (out / "model.safetensors", find_checkpoint(out / "checkpoints") / "model.safetensors"):
        assert not any(k.startswith("_orig_mod") for k in load_file(path)), path
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
