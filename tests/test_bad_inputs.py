"""Bad inputs a new user gives, each answered by one line that names the flag or file, before any real work.

In this process where train() is enough (examples/train.py prints these errors as `error: <message>`), through
the real CLI where the script's own handling or the Hub's network behaviour is what is tested. The damaged-
checkpoint, signal, lock and disk cases are in test_checkpoint.py; config-parsing ones in test_train_config.py.

    python -m pytest tests/test_bad_inputs.py -q
"""

import re
import socket
import time
from pathlib import Path

import pytest

from nanogpt_hf.trainer import train
from test_trainer import nan_at, tiny_cfg

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]



DIVERGE = dict(nan_policy="skip", learning_rate=1e6, min_lr=1e5, max_iters=12, eval_interval=4, lr_decay_iters=12)

# name: (TrainConfig overrides, the exception, a regex its one-line message must match, most seconds before it)
CASES = {
    "max_iters 0": (dict(max_iters=0), ValueError, r"--max_iters 0: nothing to train", 2),
    "block_size beyond the data": (dict(block_size=200_000, batch_size=1), ValueError,
                                   r"train split of .* too few for 1 distinct windows of block_size 200000", 10),
    "batch beyond the val split": (dict(batch_size=4100, block_size=8), ValueError, r"val split .* too few", 10),
    "init_from a typo": (dict(init_from="out-nope"), ValueError, r"--init_from must be .*'out-nope'", 2),
    "init_from a missing dir": (dict(init_from="./out-nope"), ValueError, r"--init_from: \./out-nope not found", 2),
    "init_from an invalid Hub id": (dict(init_from="a/b c"), ValueError, r"--init_from must be", 2),
    "resume without checkpoints": (dict(init_from="resume"), ValueError, r"no complete checkpoint in .*checkpoints", 10),
    "out_dir is a file": ("file", ValueError, r"--out_dir .*: cannot create it \(File exists\)", 10),
    "out_dir under a file": ("under_file", ValueError, r"--out_dir .*: cannot create it \(Not a directory\)", 10),
    "nan_policy skip, diverging": (DIVERGE, FloatingPointError,
                                   r"[34] of 4 updates were skipped .*--max_skipped_share 0.05.*lower --learning_rate", 60),
    "nan_policy skip, allowed, no better than step 0": (
        dict(DIVERGE, max_skipped_share=1.0), FloatingPointError,
        r"no evaluation beat the untrained model's val loss 4\.\d+ \(iter 0\), so .* has no best model", 60),
    "checkpoint_interval negative": (dict(checkpoint_interval=-1), ValueError, r"--checkpoint_interval must be >= 0", 2),
    "max_skipped_share negative": (dict(max_skipped_share=-1), ValueError, r"--max_skipped_share must be >= 0", 2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_train_input_is_one_line(char_data_dir, tmp_path, case):
    overrides, exc, pattern, seconds = CASES[case]
    out = tmp_path / "out"
    if overrides in ("file", "under_file"):
        (tmp_path / "f").write_text("x")
        out, overrides = (tmp_path / "f") if overrides == "file" else (tmp_path / "f" / "out"), {}
    t0 = time.time()
    with pytest.raises(exc) as e:
        train(tiny_cfg(char_data_dir, out, **overrides))
    message = str(e.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert time.time() - t0 < seconds, f"{case}: {time.time() - t0:.1f} s before the error"
    if exc is FloatingPointError:  # what is left is said honestly
        assert out.joinpath("model.safetensors").is_file() is False
        assert "the newest checkpoint is" in message or "no checkpoint has been written" in message


def test_nan_stop_says_what_checkpoint_exists(char_data_dir, tmp_path, monkeypatch):
    nan_at(monkeypatch, bad_call=2)  # iteration 1: before any checkpoint
    with pytest.raises(FloatingPointError, match=r"loss is nan at iter 1: .*no checkpoint has been written to "):
        train(tiny_cfg(char_data_dir, tmp_path / "out"))


# -----------------------------------------------------------------------------
# examples/sample.py's main(), in this process (its errors end it with SystemExit("error: ..."))


@pytest.fixture(scope="module")
def sample_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_sample_bad", ROOT / "examples/sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cli_error(main, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_sample_negative_top_k(tmp_path, sample_main):
    assert "--top_k must be >= 0 (0: all tokens), got -5" in cli_error(sample_main, "--model", str(tmp_path),
                                                                      "--top_k", "-5")


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again when this returns: connection refused


@pytest.fixture
def endpoint():
    """Point this process's huggingface_hub at another endpoint (it reads HF_ENDPOINT once, at import)."""
    import huggingface_hub.constants as constants

    old = constants.ENDPOINT

    def use(url):
        constants.ENDPOINT = url

    yield use
    constants.ENDPOINT = old


def test_unreachable_hub_fails_after_one_quick_attempt(sample_main, endpoint):
    url = closed_port()
    endpoint(url)
    t0 = time.time()
    line = cli_error(sample_main, "--model", "someone/no-such-model", "--device", "cpu")
    assert "--model someone/no-such-model: cannot reach" in line and url in line, line
    assert "not in the local cache" in line
    assert time.time() - t0 < 10, f"{time.time() - t0:.1f} s"  # before: 47-50 s of the Hub client's retries


def test_silent_hub_fails_after_one_timeout(silent_endpoint, endpoint):
    from nanogpt_hf.hub import check_hub_name

    endpoint(silent_endpoint)
    t0 = time.time()
    with pytest.raises(ValueError, match=r"--init_from someone/x: timed out talking to http://127\.0\.0\.1:\d+ "
                                         r"\(ReadTimeout"):
        check_hub_name("someone/x", "--init_from", timeout=2)
    assert time.time() - t0 < 10


def test_missing_model_on_a_real_hub_server(tmp_path, char_data_dir, endpoint):
    from hub_server import HubServer

    from nanogpt_hf.tokenization import load_pretrained_tokenizer

    with HubServer(tmp_path / "hub") as hub:
        endpoint(hub.url)
        with pytest.raises(ValueError, match=r"--tokenizer tester/nope: not a local folder, and no such model"):
            load_pretrained_tokenizer("tester/nope")
        with pytest.raises(ValueError, match=r"--init_from tester/nope: not a local folder, and no such model"):
            train(tiny_cfg(char_data_dir, tmp_path / "out", init_from="tester/nope"))
