"""TrainConfig and its parsing (defaults < YAML < command line, errors that name the key), the schedules, the
shipped YAML configs and accelerate configs, and examples/train.py's one-line errors.

    python -m pytest tests/test_train_config.py -q
"""

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest

from nanogpt_hf.train_config import TrainConfig, config_help, load_yaml, parse_config
from nanogpt_hf.trainer import get_batch_size, get_lr

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples/configs").glob("*.yaml"))
TRAIN_CONFIGS = ["shakespeare_char", "shakespeare_char_cpu", "finetune_shakespeare", "train_gpt2", "python_char_cpu"]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -----------------------------------------------------------------------------
# defaults, precedence, types


def test_defaults_are_nanogpts():
    cfg = TrainConfig()
    assert (cfg.bias, cfg.dropout, cfg.learning_rate, cfg.max_iters, cfg.weight_decay) == \
        (False, 0.0, 6e-4, 600000, 0.1)
    assert (cfg.beta1, cfg.beta2, cfg.grad_clip, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) == \
        (0.9, 0.95, 1.0, 2000, 600000, 6e-5)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.log_interval, cfg.batch_size, cfg.block_size) == \
        (2000, 200, 1, 12, 1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.init_from, cfg.seed) == (12, 12, 768, "scratch", 1337)


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "n_layer: 4\nbatch_size: 8\nlearning_rate: 1e-3\ncompile: true\nout_dir: from-yaml\n")
    cfg = parse_config([path, "--batch_size", "16", "--out_dir=from-cli", "--bias", "--dropout=0.1",
                        "--compile", "false"])
    assert cfg.n_layer == 4 and cfg.learning_rate == 1e-3  # YAML over defaults (YAML reads 1e-3 as a string)
    assert cfg.batch_size == 16 and cfg.out_dir == "from-cli"  # CLI over YAML, both spellings
    assert cfg.bias is True and cfg.compile is False and cfg.dropout == 0.1  # a bare --flag is true
    assert cfg.n_head == 12  # untouched default
    assert parse_config([]) == TrainConfig()


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("False", False), ("0", False)])
def test_booleans(text, value):
    assert parse_config([f"--decay_lr={text}"]).decay_lr is value


def test_numbers_and_none():
    cfg = parse_config(["--max_iters=1e3", "--min_lr", "1e-5", "--hub_model_id", "none", "--run_name=42"])
    assert cfg.max_iters == 1000 and cfg.min_lr == 1e-5 and cfg.hub_model_id is None and cfg.run_name == "42"
    assert TrainConfig(n_layer="4", learning_rate="6e-4").n_layer == 4  # Python callers get the same coercion


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "x"], "--n_layer: expected int, got 'x'"),
    (["--n_layer=2.5"], "--n_layer: expected int, got '2.5'"),
    (["--learning_rate=fast"], "--learning_rate: expected float, got 'fast'"),
    (["--bias=maybe"], "--bias: expected true or false, got 'maybe'"),
    (["--lr=1e-3"], "unknown flag --lr"),
    (["--learning_rat=1e-3"], "unknown flag --learning_rat (did you mean 'learning_rate'?)"),
    (["--n_layer"], "--n_layer: missing value"),
    (["--n_layer", "4", "extra"], "unexpected argument 'extra'"),
    (["--mixed_precision=fp8"], "--mixed_precision must be one of no, fp16, bf16, auto, got 'fp8'"),
    (["--warmup_iters=100", "--lr_decay_iters=50"], "--warmup_iters (100) must be <= --lr_decay_iters (50)"),
    (["--n_embd=100", "--n_head=3"], "--n_embd (100) must be divisible by --n_head (3)"),
    (["--batch_size=0"], "--batch_size must be >= 1, got 0"),
    (["--dropout=1.5"], "--dropout must be in [0, 1)"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--init_from=./no/such/dir"], "--init_from: ./no/such/dir not found"),
    (["--init_from=not a model"], "--init_from must be 'scratch', 'resume'"),
    (["--report_to=mlflow"], "--report_to must be one of none, tensorboard, wandb"),
    (["--activation_function=relu"], "--activation_function must be one of gelu_new, gelu"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ValueError) as e:
        parse_config(argv)
    assert message in str(e.value)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'lr' in .*run\.yaml"):
        parse_config([write(tmp_path, "lr: 0.1\n")])
    with pytest.raises(ValueError, match=r"n_layer in .*run\.yaml: expected int, got 'four'"):
        parse_config([write(tmp_path, "n_layer: four\n")])
    with pytest.raises(ValueError, match=r"bias in .*run\.yaml: expected true or false, got 3"):
        parse_config([write(tmp_path, "bias: 3\n")])
    with pytest.raises(ValueError, match=r"mixed_precision in .*run\.yaml: expected str, got False \(YAML reads "):
        parse_config([write(tmp_path, "mixed_precision: no\n")])
    with pytest.raises(ValueError, match=r"run\.yaml: not valid YAML at line 2"):
        parse_config([write(tmp_path, "n_layer: 4\n  bad: [\n")])
    with pytest.raises(ValueError, match=r"run\.yaml: expected 'key: value' lines"):
        parse_config([write(tmp_path, "- a\n- b\n")])
    with pytest.raises(FileNotFoundError, match="config file nope.yaml not found"):
        parse_config(["nope.yaml"])
    with pytest.raises(ValueError, match="is a folder; give a YAML file"):  # e.g. an out_dir in the YAML's place
        parse_config([str(tmp_path)])
    with pytest.raises(ValueError, match="could not determine a constructor"):  # safe_load: no Python objects
        parse_config([write(tmp_path, "out_dir: !!python/object/apply:os.system ['true']\n")])
    assert parse_config([write(tmp_path, "# only a comment\n")]) == TrainConfig()


def test_every_field_has_a_help_line():
    text = config_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in text
    assert "clip gradients at this norm" in text


# -----------------------------------------------------------------------------
# schedules


def test_get_lr_warmup_cosine_floor():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)
    assert get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)  # the peak
    assert get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the cosine
    assert get_lr(110, cfg) == get_lr(10**6, cfg) == 1e-4
    lrs = [get_lr(it, cfg) for it in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert get_lr(5, TrainConfig(learning_rate=3e-5, decay_lr=False)) == 3e-5
    same = TrainConfig(warmup_iters=100, lr_decay_iters=100, min_lr=1e-5)
    assert math.isfinite(get_lr(100, same)) and get_lr(100, same) == 1e-5


def test_batch_size_warmup():
    cfg = TrainConfig(batch_size=12, batch_size_warmup_iters=100, batch_size_warmup_start=2)
    sizes = [get_batch_size(it, cfg) for it in range(120)]
    assert sizes[0] == 2 and sizes[50] == 7 and sizes[100:] == [12] * 20
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert get_batch_size(0, TrainConfig(batch_size=12)) == 12


# -----------------------------------------------------------------------------
# shipped configs and the script


def test_shipped_configs_parse():
    assert sorted(p.stem for p in CONFIGS if p.stem in TRAIN_CONFIGS) == sorted(TRAIN_CONFIGS)
    for path in CONFIGS:
        if path.stem in TRAIN_CONFIGS:
            assert path.read_text().startswith("#"), f"{path} should start with a comment saying how to run it"
            parse_config([str(path)])
    cpu = load_yaml(ROOT / "examples/configs/shakespeare_char_cpu.yaml")  # nanoGPT's README "macbook" command
    assert {k: cpu[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                                "lr_decay_iters", "dropout", "eval_iters", "compile")} == \
        dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr_decay_iters=2000,
             dropout=0.0, eval_iters=20, compile=False)
    gpt2 = parse_config([str(ROOT / "examples/configs/train_gpt2.yaml")])
    assert gpt2.batch_size * gpt2.block_size * gpt2.gradient_accumulation_steps * 8 == 491_520  # ~0.5M tokens
    ft = parse_config([str(ROOT / "examples/configs/finetune_shakespeare.yaml")])
    assert ft.init_from == "gpt2-xl" and ft.learning_rate == 3e-5 and not ft.decay_lr


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu": ("NO", 1), "single_gpu": ("NO", 1), "multi_gpu": ("MULTI_GPU", 8),
                "multi_node": ("MULTI_GPU", 16), "fsdp": ("FSDP", 8), "deepspeed_zero2": ("DEEPSPEED", 8)}
    for name, (kind, processes) in expected.items():
        path = ROOT / "accelerate_configs" / f"{name}.yaml"
        assert path.read_text().startswith("#"), f"{path} should start with a comment saying when to use it"
        config = load_config_from_file(str(path))
        assert (config.distributed_type.value, config.num_processes) == (kind, processes), name
    fsdp = load_config_from_file(str(ROOT / "accelerate_configs/fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    assert "EDIT" in (ROOT / "accelerate_configs/multi_node.yaml").read_text()
    ds = load_config_from_file(str(ROOT / "accelerate_configs/deepspeed_zero2.yaml")).deepspeed_config
    assert (ROOT / ds["deepspeed_config_file"]).is_file()


def load_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "examples/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_errors_are_one_line(tmp_path, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as e:
        script.main(["--n_layer", "x"])
    assert e.value.code == "error: --n_layer: expected int, got 'x'"
    with pytest.raises(SystemExit) as e:
        script.main([write(tmp_path, "lr: 1\n")])
    assert str(e.value.code).startswith("error: unknown key 'lr' in ")
    from accelerate.state import AcceleratorState

    with pytest.raises(SystemExit) as e:  # a missing dataset, reported by the data reader
        try:
            script.main(["--data_dir", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "out"), "--cpu",
                         "--max_iters=1", "--mixed_precision=no"])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)  # train() got as far as making an Accelerator
    assert str(e.value.code).startswith("error: ") and "meta.json" in str(e.value.code)
    assert not (tmp_path / "out").exists()  # a run that can't start leaves nothing behind
    script.main(["--help"])
    assert "--gradient_accumulation_steps" in capsys.readouterr().out
