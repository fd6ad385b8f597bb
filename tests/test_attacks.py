"""
The attack table (docs/reliability.md): what a new user, a damaged disk or a hostile file can hand us, and what must
come back. Every case asserts the one outcome allowed: one `error: ...` line naming the flag or file (no
traceback), a refusal before any work, a stop within a bound, or nothing of someone else's touched.

Grouped by what is attacked: configs, data, models, devices and resources, the network, signals, out_dir ownership,
resume. Most cases run in this process (the CLIs' main(), TokenShards, load_pretrained); the few that need a real
process (signals, the --debug traceback, train's final push) start one short run each.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from nanogpt_hf import checkpoint as ckpt
from nanogpt_hf.data import TokenShards, load_tokenizer
from nanogpt_hf.train_config import parse_config
from nanogpt_hf.trainer import train
from test_trainer import tiny_args, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def reset():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


_SCRIPTS = {}


def script(name):
    """examples/<name>.py as a module (its main() runs in this process)."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"attack_{name}", ROOT / f"examples/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


def cli_error(name, *argv):
    """Run examples/<name>.py's main in this process; it must end with exactly one `error: ...` line."""
    try:
        with pytest.raises(SystemExit) as e:
            script(name).main([str(a) for a in argv])
    finally:
        reset()
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def run(args, env=None, timeout=240):
    """A real process (stdout + stderr together)."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


# -----------------------------------------------------------------------------
# configs: every number finite and in range, named; a YAML key given twice refused


@pytest.mark.parametrize("flag,value", [
    ("grad_clip", "nan"), ("weight_decay", "nan"), ("min_lr", "nan"), ("max_skipped_share", "nan"),
    ("learning_rate", "nan"), ("checkpoint_minutes", "nan"), ("muon_weight_decay", "nan"),
    ("muon_learning_rate", "nan"), ("grad_clip", "inf"), ("learning_rate", "inf"), ("checkpoint_minutes", "inf"),
    ("max_skipped_share", "inf"), ("weight_decay", "inf"), ("lora_alpha", "nan"),
])
def test_non_finite_flag_is_refused_naming_it(flag, value):
    with pytest.raises(ValueError, match=rf"--{flag}: must be a finite number"):
        parse_config([f"--{flag}", value])


@pytest.mark.parametrize("text,key", [("grad_clip: .nan\n", "grad_clip"), ("learning_rate: .inf\n", "learning_rate")])
def test_non_finite_yaml_value_is_refused(tmp_path, text, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=rf"{key} in .*c.yaml: must be a finite number"):
        parse_config([str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("text", ["n_layer: 2\nn_embd: 32\nn_layer: 4\n", "out_dir: a\nbatch_size: 4\nout_dir: b\n"])
def test_yaml_key_given_twice_is_refused(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"c.yaml: not valid YAML at line 3 \(key '\w+' given twice"):
        parse_config([str(tmp_path / "c.yaml")])


def test_eval_yaml_key_given_twice_is_refused(tmp_path):
    (tmp_path / "e.yaml").write_text("model: gpt2\nbatch_size: 2\nbatch_size: 8\n")
    assert "key 'batch_size' given twice" in cli_error("eval", str(tmp_path / "e.yaml"))


@pytest.mark.parametrize("flag", ["out_dir", "data_dir"])
def test_empty_folder_flag_is_refused(flag):
    assert "must name a folder" in cli_error("train", f"--{flag}=")


# -----------------------------------------------------------------------------
# data: meta.json against its schema, token ids against the vocab, the tokenizer against its recorded hash


@pytest.fixture
def data_copy(char_data_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(char_data_dir, dst)
    return dst


def edit_meta(data_dir, change):
    meta = json.loads((data_dir / "meta.json").read_text())
    change(meta)
    (data_dir / "meta.json").write_text(json.dumps(meta))


def _set(path, value):
    def change(meta):
        *keys, last = path
        d = meta
        for k in keys:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return change


META_ATTACKS = {
    "vocab_size_string": (_set(["vocab_size"], "65"), "vocab_size '65'"),
    "vocab_size_float": (_set(["vocab_size"], 65.0), "vocab_size 65.0"),
    "vocab_size_bool": (_set(["vocab_size"], True), "vocab_size True"),
    "split_without_shards": (_set(["splits", "train", "shards"], KeyError), "split 'train' has no list of 'shards'"),
    "shards_not_a_list": (_set(["splits", "val", "shards"], {"file": "val_000.bin"}), "split 'val' has no list"),
    "splits_a_list": (_set(["splits"], ["train", "val"]), "'splits' is not a mapping"),
    "num_tokens_string": (_set(["splits", "val", "shards", 0, "num_tokens"], "4096"), "needs a 'file' name and a whole"),
    "max_token_id_beyond_vocab": (_set(["splits", "train", "shards", 0, "max_token_id"], 10**6), "max_token_id 1000000"),
    "eot_beyond_vocab": (_set(["eot_token_id"], 10**6), "eot_token_id 1000000"),
    "tokenizer_hash_not_a_string": (_set(["tokenizer_hash"], 123), "tokenizer_hash 123"),
}


@pytest.mark.parametrize("attack", META_ATTACKS)
def test_meta_json_schema(data_copy, attack):
    change, expected = META_ATTACKS[attack]
    edit_meta(data_copy, change)
    with pytest.raises(ValueError) as e:
        TokenShards(data_copy, "train")
        TokenShards(data_copy, "val")
    assert "meta.json" in str(e.value) and expected in str(e.value), str(e.value)


def test_shard_outside_the_data_dir_is_refused(data_copy):
    shutil.copy(data_copy / "val_000.bin", data_copy.parent / "elsewhere.bin")
    edit_meta(data_copy, _set(["splits", "val", "shards", 0, "file"], "../elsewhere.bin"))
    with pytest.raises(ValueError, match=r"'\.\./elsewhere\.bin' is not a plain file name inside the data_dir"):
        TokenShards(data_copy, "val")


def test_shard_of_random_bytes_is_refused_at_open(data_copy):
    shard = data_copy / "train_001.bin"
    shard.write_bytes(np.random.default_rng(0).integers(0, 2**16, shard.stat().st_size // 2, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"shard .*train_001.bin holds token id \d+, beyond meta.json's vocab_size"):
        TokenShards(data_copy, "train")


def test_bad_ids_between_the_sampled_ones_fail_in_get_batch_naming_the_shard(tmp_path):
    """A shard bigger than the open-time sample, bad everywhere but at the sampled positions: get_batch's bound
    check names it instead of an IndexError in the embedding."""
    n, vocab = 200_000, 50
    ids = np.full(n, 60_000, dtype=np.uint16)
    ids[np.linspace(0, n - 1, 4096).astype(np.int64)] = 7  # what the open-time check reads is fine
    ids.tofile(tmp_path / "train_000.bin")
    np.full(1000, 3, dtype=np.uint16).tofile(tmp_path / "val_000.bin")
    split = lambda f, k: dict(num_tokens=k, shards=[dict(file=f, num_tokens=k, bytes=2 * k)])  # noqa: E731
    (tmp_path / "meta.json").write_text(json.dumps(dict(format_version=1, dtype="uint16", vocab_size=vocab, splits=dict(
        train=split("train_000.bin", n), val=split("val_000.bin", 1000)))))
    data = TokenShards(tmp_path, "train")
    with pytest.raises(ValueError, match=r"shard .*train_000.bin holds token id 60000, beyond meta.json's vocab_size"):
        data.get_batch(4, 32, step=0)


def swap_two_tokens(data_dir):
    """data_dir/tokenizer with the ids of two characters exchanged: the same size, other text."""
    path = data_dir / "tokenizer/tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[3:5]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


def test_swapped_tokenizer_in_the_data_dir_is_refused(data_copy):
    swap_two_tokens(data_copy)
    with pytest.raises(ValueError, match=r"tokenizer is not the tokenizer .*'s shards were made with"):
        load_tokenizer(data_copy)


def test_training_on_a_data_dir_with_a_swapped_tokenizer_is_refused(data_copy, tmp_path):
    swap_two_tokens(data_copy)
    line = cli_error("train", *tiny_args(tiny_cfg(data_copy, tmp_path / "out")))
    assert "shards were made with" in line and not (tmp_path / "out/checkpoints").exists()


@pytest.fixture(scope="module")
def trained(char_data_dir, tmp_path_factory):
    """A tiny trained out_dir (best model + tokenizer + checkpoints) to attack."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train(tiny_cfg(char_data_dir, out))
    reset()
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Data made with another character tokenizer of the same size."""
    from nanogpt_hf.prepare import prepare_dataset

    from conftest import make_text

    root = tmp_path_factory.mktemp("other")
    (root / "input.txt").write_text(make_text(40_000, seed=1).replace("q", "@"), encoding="utf-8")
    prepare_dataset("other", data_dir=root / "d", inputs=[str(root / "input.txt")], tokenizer="char",
                    shard_size=4096)
    return root / "d"


def test_eval_on_data_of_another_tokenizer_is_refused(trained, other_data):
    line = cli_error("eval", "--model", trained, "--data_dir", other_data, "--device", "cpu", "--eval_iters", "1",
                     "--batch_size", "2")
    assert "tokenizer" in line and str(other_data) in line


# -----------------------------------------------------------------------------
# models: every weights file through one reader; a bad config refused before any allocation


@pytest.fixture
def model_copy(trained, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("checkpoints", ".lock", ".nanogpt_hf_run.json"))
    return dst


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p):
    p.write_bytes(os.urandom(4096))


def _empty(p):
    p.write_bytes(b"")


def _pickle_instead(p):
    p.unlink()
    torch.save({"x": Boom()}, p.parent / "pytorch_model.bin")  # weights_only refuses it


def _truncated_bin(p):
    p.unlink()
    b = p.parent / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(100, 32)}, b)
    b.write_bytes(b.read_bytes()[:200])


def _config(**change):
    def attack(p):
        path = p.parent / "config.json"
        config = json.loads(path.read_text())
        config.update(change)
        path.write_text(json.dumps(config))
    return attack


def _shapes(p):
    _config(n_embd=64, n_head=2)(p)  # the weights are 32 wide


MODEL_ATTACKS = {
    "truncated_safetensors": (_truncate, "model"),
    "garbage_safetensors": (_garbage, "model"),
    "empty_safetensors": (_empty, "model"),
    "pickled_pytorch_model_bin": (_pickle_instead, "model"),
    "truncated_pytorch_model_bin": (_truncated_bin, "model"),
    "negative_n_layer": (_config(n_layer=-2), "n_layer must be a positive integer, got -2"),
    "zero_vocab_size": (_config(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    "string_n_embd": (_config(n_embd="wide"), "n_embd"),
    "weights_too_big_for_memory": (_config(n_layer=1, n_embd=10**7, n_head=1), "more than this machine's"),
    "weights_of_another_shape": (_shapes, "model"),
}


@pytest.mark.parametrize("attack", MODEL_ATTACKS)
@pytest.mark.parametrize("cli", ["sample", "eval"])
def test_damaged_model_folder_is_one_line_naming_it(model_copy, char_data_dir, attack, cli):
    damage, expected = MODEL_ATTACKS[attack]
    damage(model_copy / "model.safetensors")
    extra = ["--max_new_tokens", "2", "--num_samples", "1"] if cli == "sample" else \
        ["--data_dir", char_data_dir, "--eval_iters", "1", "--batch_size", "2"]
    line = cli_error(cli, "--model", model_copy, "--device", "cpu", *extra)
    assert str(model_copy) in line and expected in line, line


def test_init_from_a_damaged_model_folder(model_copy, char_data_dir, tmp_path):
    _truncate(model_copy / "model.safetensors")
    line = cli_error("train", *tiny_args(tiny_cfg(char_data_dir, tmp_path / "out", init_from=str(model_copy))))
    assert "--init_from" in line and str(model_copy) in line


@pytest.mark.parametrize("content", [b"just some text, not a checkpoint\n", b"", "zip_with_code"])
def test_init_from_a_bad_ckpt_pt(char_data_dir, tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "zip_with_code":
        torch.save({"model": Boom(), "model_args": {}}, path)
    else:
        path.write_bytes(content)
    line = cli_error("train", *tiny_args(tiny_cfg(char_data_dir, tmp_path / "out", init_from=str(path))))
    assert f"--init_from {path}" in line


# -----------------------------------------------------------------------------
# devices and resources: checked before the work


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("cli,device", [("sample", "cuda"), ("sample", "cuda:3"), ("sample", "tpu"),
                                        ("eval", "cuda"), ("bench", "cuda")])
def test_missing_device_is_one_line(trained, char_data_dir, cli, device):
    extra = {"sample": ["--model", trained], "eval": ["--model", trained, "--data_dir", char_data_dir],
             "bench": ["--what", "train"]}[cli]
    assert f"--device {device}" in cli_error(cli, *extra, "--device", device)


def test_huge_generation_is_refused_before_starting(trained):
    assert "--max_new_tokens 1000000000: at most" in cli_error("sample", "--model", trained, "--device", "cpu",
                                                               "--max_new_tokens", "1000000000")


def test_nan_temperature_is_refused(trained):
    assert "--temperature" in cli_error("sample", "--model", trained, "--device", "cpu", "--temperature", "nan")


def test_a_million_layers_are_refused_before_allocating(char_data_dir, tmp_path):
    line = cli_error("train", *tiny_args(tiny_cfg(char_data_dir, tmp_path / "out", n_layer=1_000_000, n_embd=1024,
                                                  n_head=8)))
    assert "1000000 layers" in line and "more than this machine's" in line


def test_num_proc_is_capped_at_the_cores(tmp_path, tiny_text, capsys):
    script("prepare").main(["--dataset", "x", "--input", str(tiny_text), "--tokenizer", "char",
                            "--data_dir", str(tmp_path / "d"), "--num_proc", "1000"])
    assert "note: --num_proc 1000 is more than the" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["text", "stream"])
def test_text_without_whitespace_is_cut_at_a_bound(how):
    from nanogpt_hf import sources

    text = "x" * (sources.MAX_ROW_CHARS * 2 + 123)
    rows = sources.chunk_text(text) if how == "text" else \
        list(sources.chunk_stream(text[i:i + (1 << 20)] for i in range(0, len(text), 1 << 20)))
    assert "".join(rows) == text and max(map(len, rows)) <= sources.MAX_ROW_CHARS


# -----------------------------------------------------------------------------
# the CLI boundary: --debug / NANOGPT_DEBUG show the traceback; without them, one line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_lets_the_error_through_with_its_traceback(monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("NANOGPT_DEBUG", "1")
    with pytest.raises(ValueError, match="--grad_clip: must be a finite number"):
        script("train").main(["--grad_clip", "nan"] + (["--debug"] if how == "flag" else []))


@pytest.mark.parametrize("name, argv, match", [
    ("prepare", ["--dataset", "x", "--input", "no/such.txt"], "input file no/such.txt not found"),
    ("sample", ["--model", "m", "--num_samples", "0"], "--num_samples and --max_new_tokens must be >= 1"),
    ("eval", ["--model", "m", "--batch_size", "0"], "--batch_size and --stride must be >= 1"),
    ("push", ["no/such/folder", "you/repo"], "no/such/folder"),
    ("bench", ["--what", "nothing"], "--what takes a comma-separated list"),
    ("chat", ["--model", "m", "--temperature", "nan"], "--temperature must be a finite number"),
])
def test_every_script_lets_the_error_through_with_debug(name, argv, match, tmp_path, monkeypatch):
    """The boundary is the scripts' only error handler: an error caught inside main() and printed there would hide
    its traceback from --debug (prepare, sample, eval, push and bench did that)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, OSError), match=re.escape(match)):
        script(name).main(argv + ["--debug"])
    assert cli_error(name, *argv).startswith("error: ")  # without it: one line


def test_a_bug_is_still_a_traceback(monkeypatch):
    from nanogpt_hf.cli import error_boundary

    @error_boundary
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main([])


# -----------------------------------------------------------------------------
# the network: a Hub that accepts the connection and never answers ends within the deadline


def finishes(fn, within=90):
    """fn() in a thread: its exception, or None; fails the test (instead of hanging it) if it doesn't end."""
    box = []

    def target():
        try:
            fn()
            box.append(None)
        except Exception as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(within)
    assert box, f"still waiting after {within} s"
    return box[0]


@pytest.mark.parametrize("what", ["push", "download"])
def test_silent_hub_ends_at_the_deadline(trained, silent_endpoint, monkeypatch, what):
    from nanogpt_hf import hub

    monkeypatch.setenv(hub.HUB_DEADLINE_ENV, "2")
    if what == "push":
        call = lambda: hub.push_dir(trained, "me/model", token="hf_x", endpoint=silent_endpoint, retries=1,  # noqa
                                    backoff=0.01, log=lambda _: None)
    else:
        call = lambda: hub.resolve_data_dir("hf://datasets/me/data", endpoint=silent_endpoint, retries=1,  # noqa
                                            backoff=0.01, log=lambda _: None)
    error = finishes(call)
    assert isinstance(error, hub.HubError) and "within 2 s" in str(error), error


def test_hub_requests_get_timeouts(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import _http

    from nanogpt_hf import hub

    monkeypatch.setenv(hub.HUB_TIMEOUT_ENV, "7")
    huggingface_hub.set_client_factory(_http.default_client_factory)
    try:
        hub.bound_requests()
        assert _http.get_session().timeout.read == 7
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)


def test_train_ends_after_its_final_push_to_a_silent_hub(char_data_dir, tmp_path, silent_endpoint):
    cfg = tiny_cfg(char_data_dir, tmp_path / "out", max_iters=2, eval_interval=2, push_to_hub=True,
                   hub_model_id="me/model")
    proc = run([ROOT / "examples/train.py", *tiny_args(cfg)], timeout=200,
               env={"HF_ENDPOINT": silent_endpoint, "HF_TOKEN": "hf_x", "NANOGPT_HUB_DEADLINE": "3"})
    assert proc.returncode == 0 and "no answer from" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "out/model.safetensors").is_file()


# -----------------------------------------------------------------------------
# signals: SIGHUP and SIGUSR2 save like SIGTERM; a signal during the end-of-run samples ends the run


def start(cfg, **kw):
    return subprocess.Popen([sys.executable, ROOT / "examples/train.py", *tiny_args(cfg)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR2], ids=["SIGHUP", "SIGUSR2"])
def test_sighup_and_sigusr2_save_a_checkpoint(char_data_dir, tmp_path, sig):
    out = tmp_path / "out"
    proc = start(tiny_cfg(char_data_dir, out, max_iters=100_000, eval_interval=100_000, lr_decay_iters=100,
                          debug_dump_dir=str(tmp_path / "dump")))
    wait_for(lambda: (tmp_path / "dump/rank0.jsonl").is_file() and
             len((tmp_path / "dump/rank0.jsonl").read_text().splitlines()) >= 2, proc)
    os.kill(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in output, output[-3000:]
    newest = ckpt.find_checkpoint(out / "checkpoints")
    assert newest is not None and ckpt.verify(newest) is None and f"stopped by {sig.name}" in output


def test_signal_during_the_end_of_run_samples_ends_the_run(char_data_dir, tmp_path):
    out = tmp_path / "out"
    proc = start(tiny_cfg(char_data_dir, out, sample_at_end=10_000))
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    wait_for(lambda: sum(line.startswith("-----") for line in lines) >= 1, proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(0.2)
    assert proc.returncode == 143 and sum(line.startswith("-----") for line in lines) < 100
    assert ckpt.verify(ckpt.find_checkpoint(out / "checkpoints")) is None


# -----------------------------------------------------------------------------
# out_dir: empty, or our own run; never another's checkpoints, never the user's files


def test_out_dir_with_the_users_files_is_refused(char_data_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    line = cli_error("train", *tiny_args(tiny_cfg(char_data_dir, out)))
    assert "not empty and holds no nanogpt_hf run" in line
    assert (out / "README.md").read_text() == "my notes" and (out / "config.json").read_text() == "{}"


def test_new_run_into_another_runs_checkpoints_is_refused(trained, char_data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    line = cli_error("train", *tiny_args(tiny_cfg(char_data_dir, out, max_iters=12, lr_decay_iters=12)))
    assert "holds another run's checkpoints" in line and "--overwrite" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_overwrite_replaces_the_old_run(trained, char_data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    old_id = json.loads((out / ".nanogpt_hf_run.json").read_text())["run_id"]
    train(tiny_cfg(char_data_dir, out, max_iters=4, eval_interval=2, lr_decay_iters=4, overwrite=True))
    reset()
    new_id = json.loads((out / ".nanogpt_hf_run.json").read_text())["run_id"]
    assert new_id != old_id and ckpt.find_checkpoint(out / "checkpoints").name == "step_000004"
    assert {ckpt.run_of(p) for p in ckpt.checkpoints(out / "checkpoints")} == {new_id}


def test_pruning_keeps_another_runs_checkpoint(trained, char_data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    foreign = out / "checkpoints/step_000001"
    shutil.copytree(out / "checkpoints/step_000004", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps(dict(state, run_id="someone-else")))
    train(tiny_cfg(char_data_dir, out, init_from="resume", max_iters=16, lr_decay_iters=16))
    reset()
    assert foreign.is_dir()


def test_resume_of_a_run_from_before_markers_adopts_it(trained, char_data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / ".nanogpt_hf_run.json").unlink()
    train(tiny_cfg(char_data_dir, out, init_from="resume", max_iters=12, lr_decay_iters=12))
    reset()
    assert (out / ".nanogpt_hf_run.json").is_file() and ckpt.find_checkpoint(out / "checkpoints").name == "step_000012"


# -----------------------------------------------------------------------------
# resume: what changed is printed and recorded


@pytest.mark.parametrize("change", [dict(batch_size=8), dict(gradient_accumulation_steps=2), dict(seed=7),
                                    dict(lr_decay_iters=100, min_lr=1e-4)], ids=lambda c: ",".join(c))
def test_resume_changes_are_printed_and_recorded(trained, char_data_dir, tmp_path, capsys, change):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    train(tiny_cfg(char_data_dir, out, init_from="resume", max_iters=10, **change))
    reset()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume changes: ")]
    old = tiny_cfg(char_data_dir, out).to_dict()
    assert len(printed) == 1 and all(f"{k} {old[k]!r} -> {v!r}" in printed[0] for k, v in change.items()), printed
    state = json.loads((ckpt.find_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    change = dict(change, max_iters=10)
    assert state["resumes"] == [{"iter": 8, "changes": {k: [old[k], v] for k, v in change.items()}}]


# -----------------------------------------------------------------------------
# round 3: every row bounded on its way to the tokenizer, whatever the source

WHOLE_DOCS_RSS_CHILD = """
import sys
from nanogpt_hf import sources
sources.MAX_ROW_CHARS = 1 << 18  # the bound at test scale (the mechanism reads it at each call)
from nanogpt_hf.prepare import prepare_dataset

def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

tokenizer = sys.argv[1]
for folder in sys.argv[2:]:
    prepare_dataset("rss", data_dir=folder + ".d", inputs=[folder + "/*.txt"], tokenizer=tokenizer, shard_size=1 << 20,
                    val_fraction=0.5)
    print(folder, peak_mb(), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_whole_documents_without_whitespace_keep_memory_bounded(tmp_path):
    """Documents taken whole (a tokenizer that is not cut-safe: one row per document) without any whitespace: one
    child prepares 2 x 2 MB, then 2 x 12 MB; its peak RSS after the second is within 1.3x of the first (whole
    rows: the tokenizer's per-byte alignments alone grew it by ~16x the document)."""
    from test_prepare_map import word_level_tokenizer

    word_level_tokenizer().save_pretrained(tmp_path / "tok")
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    for name, mb in (("small", 2), ("large", 12)):
        (tmp_path / name).mkdir()
        for i in range(2):
            ids = np.random.default_rng(i).integers(0, 26, mb << 20)
            (tmp_path / name / f"doc{i}.txt").write_bytes(letters[ids].tobytes())
    run = subprocess.run([sys.executable, "-c", WHOLE_DOCS_RSS_CHILD, str(tmp_path / "tok"), str(tmp_path / "small"),
                          str(tmp_path / "large")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    peaks = dict(line.split() for line in run.stdout.splitlines() if line.startswith(str(tmp_path)))
    small, large = float(peaks[str(tmp_path / "small")]), float(peaks[str(tmp_path / "large")])
    assert large <= 1.3 * small, f"peak RSS {small:.0f} MB for 2 x 2 MB, {large:.0f} MB for 2 x 12 MB"


class Recorder:
    """A tokenizer (prepare's "hf" kind without a Rust backend) that records the length of every text it is given;
    its ids: one per character, so the ids of pieces put back together are the whole row's."""

    def __init__(self):
        self.lengths = []

    def __call__(self, texts, add_special_tokens=False):
        self.lengths += map(len, texts)
        return {"input_ids": [[ord(c) % 97 for c in t] for t in texts]}


@pytest.mark.parametrize("how", ["map", "stream"])
def test_a_huge_hub_row_reaches_the_tokenizer_in_bounded_pieces(monkeypatch, how):
    """A Hub dataset's rows (map-style or streamed) go through the same bound as local text."""
    import datasets

    from nanogpt_hf import prepare, sources

    monkeypatch.setattr(sources, "MAX_ROW_CHARS", 1 << 18)
    rows = ["short row", "y" * (600_000) + " tail", "z" * (1 << 18)]
    ds = datasets.Dataset.from_dict({"text": rows})
    ds = ds.to_iterable_dataset() if how == "stream" else ds
    recorder = Recorder()
    encoder = dict(kind="hf", table=recorder, eot=0, before=False, dtype="uint16")
    ids = [x for batch, _ in prepare._token_batches(prepare.tokenize(ds, encoder, "recorder", 1))
           for x in batch.to_pylist()]
    assert max(recorder.lengths) <= 1 << 18
    assert ids == [[ord(c) % 97 for c in t] + [0] for t in rows]  # pieces put back together: the rows' ids


# -----------------------------------------------------------------------------
# round 3: a write the disk refuses during prepare is one line naming the file, and leaves nothing behind

from test_checkpoint import fill, tmpfs  # noqa: E402,F401  (a real small tmpfs; skipped where none can be mounted)

FSIZE_CHILD = """
import resource, runpy, signal, sys
import nanogpt_hf.prepare  # noqa: imported before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG from the kernel, not a kill
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["prepare.py"] + sys.argv[2:]
runpy.run_path(%r, run_name="__main__")
"""


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("before", ["complete", "none"])
def test_file_too_large_during_prepare_is_one_line_and_leaves_nothing(tmp_path, tiny_text, before):
    """RLIMIT_FSIZE in a child: the kernel's EFBIG on the first shard (the datasets cache is filled by a first
    prepare, so the shards are what is written). A complete data_dir stays as it was; nothing else is left."""
    args = ["--dataset", "x", "--input", tiny_text, "--tokenizer", "char", "--shard_size", "4096"]
    data = tmp_path / "d"
    script("prepare").main([str(a) for a in args + ["--data_dir", tmp_path / "first"]])  # the cache, filled
    if before == "complete":
        script("prepare").main([str(a) for a in args + ["--data_dir", data]])
    old = snapshot(data) if data.exists() else None
    child = FSIZE_CHILD % str(ROOT / "examples/prepare.py")
    r = run(["-c", child, 4096, *args, "--data_dir", data], timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(f"error: could not write {tmp_path}/.d.partial/train_000.bin.part: File too large")
    assert not (tmp_path / ".d.partial").exists()
    assert (snapshot(data) == old) if old is not None else not data.exists()


def test_full_disk_during_prepare_is_one_line_and_keeps_the_old_data(tmpfs, tiny_text):
    """A real ENOSPC (a full tmpfs) while a complete data_dir is prepared again."""
    args = ["--dataset", "x", "--input", tiny_text, "--tokenizer", "char", "--shard_size", "4096",
            "--data_dir", tmpfs / "d"]
    script("prepare").main([str(a) for a in args])
    old = snapshot(tmpfs / "d")
    fill(tmpfs)
    line = cli_error("prepare", *args)
    assert line.startswith(f"error: could not write {tmpfs}/.d.partial/") and "No space left on device" in line
    assert not (tmpfs / ".d.partial").exists() and snapshot(tmpfs / "d") == old


# -----------------------------------------------------------------------------
# round 3: a model folder carries the hash of the tokenizer it trained with; sample, eval and chat check it


@pytest.fixture
def model_folder(trained, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_trained_model_folder_records_its_tokenizer_hash(trained, char_data_dir):
    from nanogpt_hf.guards import tokenizer_hash

    config = json.loads((trained / "config.json").read_text())
    assert config["tokenizer_hash"] == tokenizer_hash(load_tokenizer(char_data_dir))


@pytest.mark.parametrize("cli", ["sample", "eval", "chat"])
def test_model_folder_with_swapped_tokenizer_files_is_refused(model_folder, char_data_dir, cli):
    path = model_folder / "tokenizer.json"  # two characters' ids exchanged: the same size, other text
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[3:5]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    extra = {"sample": ["--max_new_tokens", 2], "chat": [],
             "eval": ["--data_dir", char_data_dir, "--eval_iters", 1, "--batch_size", 2]}[cli]
    line = cli_error(cli, "--model", model_folder, "--device", "cpu", *extra)
    assert "is not the one the model was trained with" in line and f"{model_folder}/config.json records" in line


def test_model_folder_without_a_recorded_hash_still_samples_with_a_note(model_folder, capsys):
    config = json.loads((model_folder / "config.json").read_text())
    del config["tokenizer_hash"]
    (model_folder / "config.json").write_text(json.dumps(config))
    script("sample").main(["--model", str(model_folder), "--device", "cpu", "--max_new_tokens", "4",
                           "--num_samples", "1"])
    assert "records no tokenizer hash" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# round 3: a new user's attack pass (prepare's inputs and folders, chat data, flags of chat/eval/sample, push)


def prepare_error(tmp_path, *argv, data_dir=None):
    return cli_error("prepare", "--dataset", "x", "--tokenizer", "char", "--data_dir", data_dir or tmp_path / "d",
                     *argv)


def test_a_utf8_bom_is_not_a_character(tmp_path, tiny_text):
    """A BOM (Windows editors write one) is dropped like any UTF-8 reader does, not made a token."""
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + tiny_text.read_bytes())
    for name, path in (("bom", bom), ("plain", tiny_text)):
        script("prepare").main(["--dataset", "x", "--input", str(path), "--tokenizer", "char",
                                "--data_dir", str(tmp_path / name)])
    assert "\ufeff" not in load_tokenizer(tmp_path / "bom").get_vocab()
    assert [f.read_bytes() for f in sorted((tmp_path / "bom").glob("*.bin"))] == \
        [f.read_bytes() for f in sorted((tmp_path / "plain").glob("*.bin"))]


def test_input_that_is_not_a_file_says_what_it_is(tmp_path):
    (tmp_path / "texts").mkdir()
    assert "is a folder; pass its files, e.g. --input" in prepare_error(tmp_path, "--input", tmp_path / "texts")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert "is a symlink to nothing (or to itself)" in prepare_error(tmp_path, "--input", tmp_path / "loop")


def test_a_glob_that_also_matches_a_folder_takes_the_files(tmp_path, tiny_text):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i in range(2):
        shutil.copy(tiny_text, tmp_path / "in" / f"{i}.txt")
    script("prepare").main(["--dataset", "x", "--input", str(tmp_path / "in") + "/*", "--tokenizer", "char",
                            "--data_dir", str(tmp_path / "d"), "--val_fraction", "0.5"])
    assert json.loads((tmp_path / "d/meta.json").read_text())["splits"]["train"]["num_documents"] == 1


@pytest.mark.parametrize("chat", [False, True], ids=["prepare", "prepare --chat"])
@pytest.mark.parametrize("where", ["data_dir", "a folder above it"])
def test_data_dir_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_text, where, chat):
    mine = tmp_path / "mine"
    mine.write_text("my file")
    data_dir = mine if where == "data_dir" else mine / "d"
    if chat:
        conversations = tmp_path / "c.jsonl"
        conversations.write_text("\n".join(json.dumps(CHAT_ROW) for _ in range(3)) + "\n")
        line = cli_error("prepare", "--chat", "--dataset", "c", "--input", conversations, "--tokenizer", "char",
                         "--data_dir", data_dir, "--block_size", 64)
    else:
        line = prepare_error(tmp_path, "--input", tiny_text, data_dir=data_dir)
    assert f"{mine} is a file, not a folder" in line
    assert mine.read_text() == "my file" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mine", "tiny.txt"] + (["c.jsonl"] if chat else []))


def test_a_huge_bpe_vocab_is_refused_before_training(tmp_path, tiny_text):
    """--vocab_size 1000000000: the BPE trainer allocated 70 GB up front and the process aborted in Rust."""
    line = cli_error("prepare", "--dataset", "x", "--input", tiny_text, "--tokenizer", "bpe", "--vocab_size",
                     1_000_000_000, "--data_dir", tmp_path / "d")
    assert "--vocab_size 1000000000: at most" in line and not (tmp_path / "d").exists()


CHAT_ROW = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]}


@pytest.mark.parametrize("attack,expect", [
    # (datasets 4.0's Arrow JSON reader refuses the mixed types itself: "... content) changed from string to number
    # in row 1"; newer ones read the row and check_messages refuses it)
    ("content a number", ("message 0 (user) has empty or missing 'content'", "changed from string to number")),
    ("a broken JSON line", ("JSON parse error",)),
    ("an empty file", ("holds no JSON lines",)),
])
def test_odd_chat_rows_are_one_line(tmp_path, attack, expect):
    path = tmp_path / "c.jsonl"
    good = json.dumps(CHAT_ROW)
    bad = {"content a number": json.dumps({"messages": [{"role": "user", "content": 5},
                                                         {"role": "assistant", "content": "y"}]}),
           "a broken JSON line": "{oops", "an empty file": None}[attack]
    path.write_text("" if bad is None else "\n".join([good, bad, good]) + "\n")
    line = cli_error("prepare", "--chat", "--dataset", "c", "--input", path, "--tokenizer", "char",
                     "--data_dir", tmp_path / "d", "--block_size", 64)
    assert any(e in line for e in expect) and not (tmp_path / "d").exists(), line


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "-1"),
                                        ("--max_new_tokens", "-1"), ("--top_k", "-3")])
def test_chat_flags_are_checked(trained, flag, value):
    """chat.py: nan went greedy silently (nan > 0 is False); a negative length reached generate() as a traceback."""
    assert flag in cli_error("chat", "--model", trained, flag, value)


def test_a_data_dir_given_as_the_model_says_so(char_data_dir):
    line = cli_error("sample", "--model", char_data_dir, "--device", "cpu")
    assert "is a prepared dataset (a data_dir: meta.json, shards), not a model" in line


def test_sample_start_file_that_is_a_folder(trained, tmp_path):
    assert "a folder, not a file" in cli_error("sample", "--model", trained, "--start", f"FILE:{tmp_path}")


def test_eval_out_that_is_a_folder_is_refused_before_evaluating(trained, char_data_dir, tmp_path, capsys):
    line = cli_error("eval", "--model", trained, "--data_dir", char_data_dir, "--device", "cpu", "--out", tmp_path)
    assert f"--out {tmp_path} is a folder" in line and "val" not in capsys.readouterr().out


def test_push_to_a_malformed_repo_id_says_so_before_asking_for_a_token(trained, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "'not a valid id' is not a Hub repo id" in cli_error("push", trained, "not a valid id")
