"""mixed_precision: auto — bf16 autocast where the machine has the units for it and the shape pays, fp32
elsewhere — and bf16 training that follows fp32's loss trajectory.

    python -m pytest tests/test_bf16.py -q
"""

import pytest

from nanogpt_hf.train_config import TrainConfig, cpu_bf16_matmul, resolve_mixed_precision
from nanogpt_hf.trainer import train
from test_trainer import read_dump, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
SHAKESPEARE_CHAR = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64)


@pytest.mark.parametrize("units, shape, expected", [
    ("amx", SHAKESPEARE_CHAR, "bf16"),  # measured 4.2x (Xeon)
    ("amx", BABY, "no"),  # measured 0.92x: too small to pay
    ("avx512_bf16", SHAKESPEARE_CHAR, "bf16"),  # measured 2.06x (EPYC, no AMX)
    ("avx512_bf16", BABY, "no"),  # 0.97x
    (None, SHAKESPEARE_CHAR, "no"),  # bf16 emulated in float32 units
])
def test_auto_on_cpu_by_units_and_shape(units, shape, expected):
    cfg = TrainConfig(mixed_precision="auto", cpu=True, data_dir=".", **shape)
    assert resolve_mixed_precision(cfg, cuda=False, cpu_bf16=units) == expected


def test_auto_leaves_explicit_choices_alone_and_reads_this_cpu():
    for value in (None, "no", "fp16", "bf16"):
        assert resolve_mixed_precision(TrainConfig(mixed_precision=value, data_dir=".")) == value
    assert cpu_bf16_matmul() in (None, "amx", "avx512_bf16")
    with pytest.raises(ValueError, match="--mixed_precision must be one of no, fp16, bf16, auto"):
        TrainConfig(mixed_precision="fp8", data_dir=".")


def test_bf16_training_follows_fp32(char_data_dir, tmp_path):
    """The same 12 steps in bf16 autocast and in fp32: every loss within 0.02 (bf16 keeps 8 bits of mantissa:
    ~0.4% per op), and the loss falls in both."""
    args = dict(max_iters=12, eval_interval=12, lr_decay_iters=12, debug_dump_dir=str(tmp_path / "dump"))
    train(tiny_cfg(char_data_dir, tmp_path / "fp32", mixed_precision="no", **args))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    r = train(tiny_cfg(char_data_dir, tmp_path / "bf16", mixed_precision="bf16", **args))
    assert r["mixed_precision"] == "bf16"
    losses = [d["loss"] for d in read_dump(tmp_path / "dump" / "rank0.jsonl")]
    fp32, bf16 = losses[:12], losses[12:]
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.02, (fp32, bf16)
    assert bf16[-1] < bf16[0] - 0.3 and fp32[-1] < fp32[0] - 0.3
