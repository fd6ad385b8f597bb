"""examples/prepare.py: downloads, one-line errors for bad input, and atomicity under SIGKILL.

    python -m pytest tests/test_prepare_cli.py -q
"""

import functools
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanogpt_hf.data import SLEEP_ENV, TokenShards, prepare_dataset, read_meta

PREPARE = Path(__file__).resolve().parent.parent / "examples" / "prepare.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_error(*argv):
    """Run prepare.py's main in-process; return its error line (it must exit with one)."""
    with pytest.raises(SystemExit) as exc:
        load_cli().main([str(a) for a in argv])
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder: (folder, base URL)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_cli_prepares_from_url_and_caches_the_download(tmp_path, tiny_text, http_root):
    root, url = http_root
    (root / "input.txt").write_text(tiny_text.read_text(encoding="utf-8"), encoding="utf-8")
    d = tmp_path / "sc"
    load_cli().main(["--dataset", "shakespeare_char", "--input", f"{url}/input.txt", "--data_dir", str(d)])
    assert (d / "input.txt").read_bytes() == tiny_text.read_bytes()  # cached next to the shards, like nanoGPT
    meta = read_meta(d)
    assert meta["tokenizer"] == "char" and meta["source"] == f"{url}/input.txt"
    (root / "input.txt").unlink()  # a re-run reads the cached copy
    load_cli().main(["--dataset", "shakespeare_char", "--input", f"{url}/input.txt", "--data_dir", str(d)])
    assert read_meta(d) == meta
    assert "could not download" in cli_error("--dataset", "x", "--input", f"{url}/missing.txt",
                                             "--data_dir", tmp_path / "x")


def test_bad_input_gives_one_clear_line(tmp_path, tiny_text):
    d = tmp_path / "d"
    assert "input file" in cli_error("--dataset", "x", "--input", tmp_path / "nope.txt", "--data_dir", d)
    assert "matches no file" in cli_error("--dataset", "x", "--input", tmp_path / "*.nothing", "--data_dir", d)
    (tmp_path / "empty.txt").write_text(" \n")
    assert "is empty" in cli_error("--dataset", "x", "--input", tmp_path / "empty.txt", "--data_dir", d)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in cli_error(
        "--dataset", "x", "--input", tmp_path / "latin1.txt", "--data_dir", d)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = cli_error("--dataset", "shakespeare_char", "--input", f"http://127.0.0.1:{port}/input.txt",
                    "--data_dir", d)
    assert "could not download" in msg and "--input FILE" in msg
    assert "unknown dataset 'nope'" in cli_error("--dataset", "nope")
    assert "--tokenizer" in cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer", tmp_path / "no_tok",
                                      "--data_dir", d)
    for bad in ("0", "1", "-0.5", "1.5"):
        assert "--val_fraction" in cli_error("--dataset", "x", "--input", tiny_text, "--val_fraction", bad,
                                             "--data_dir", d)
    (tmp_path / "short.txt").write_text("a")
    assert "too short" in cli_error("--dataset", "x", "--input", tmp_path / "short.txt", "--data_dir", d)
    assert not d.exists() or not (d / "meta.json").exists()
    assert not list(tmp_path.glob(".d.tmp-*"))  # failed runs clean up after themselves


def test_refuses_a_data_dir_prepared_with_another_tokenizer(tmp_path, tiny_text, tiktoken_cache):
    d = tmp_path / "d"
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char")
    before = json.loads((d / "meta.json").read_text())
    msg = cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer", "gpt2", "--data_dir", d)
    assert "prepared with tokenizer 'char'" in msg and "--overwrite" in msg
    assert json.loads((d / "meta.json").read_text()) == before  # untouched
    load_cli().main(["--dataset", "x", "--input", str(tiny_text), "--tokenizer", "gpt2", "--data_dir", str(d),
                     "--overwrite"])
    assert read_meta(d)["tokenizer"] == "gpt2"


def all_files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def kill_prepare_after_shard(d, argv, shard):
    """Run prepare.py into d as a real process, SIGKILL it once `shard` is complete in .d.partial/."""
    cmd = [sys.executable, str(PREPARE), "--data_dir", str(d), *map(str, argv)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{SLEEP_ENV: "0.3"}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = d.parent / f".{d.name}.partial"
    try:
        deadline = time.time() + 120
        while not (work / shard).exists():  # the writer is between shards
            assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return work


def test_sigkill_mid_prepare_resumes_to_the_same_bytes(tmp_path, tiny_text, capsys):
    """A real prepare process, killed with SIGKILL between two shards, leaves nothing that is accepted; the
    same command again continues after the last complete shard and gives the bytes of an uninterrupted run."""
    args = ["--dataset", "x", "--input", tiny_text, "--tokenizer", "char", "--shard_size", "400"]
    load_cli().main([*map(str, args), "--data_dir", str(tmp_path / "ref")])  # uninterrupted
    d = tmp_path / "d"
    work = kill_prepare_after_shard(d, args, "train_003.bin")
    assert (work / "train_000.bin").exists() and not (work / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards(d)
    kept = {f: (work / f).stat().st_ino for f in ("train_000.bin", "train_003.bin")}
    capsys.readouterr()
    load_cli().main([*map(str, args), "--data_dir", str(d)])
    assert "resuming the prepare" in capsys.readouterr().out
    assert {f: (d / f).stat().st_ino for f in kept} == kept  # the shards done before the kill were kept
    assert all_files(d) == all_files(tmp_path / "ref") and not work.exists()


@pytest.mark.parametrize("kill_after", ["train_002.bin", "meta.json"])  # mid-prep; at the swap
def test_sigkill_mid_overwrite_keeps_the_old_dataset_trainable(tmp_path, tiny_text, kill_after):
    """prepare --overwrite into an existing data_dir, killed mid-prep or just before the new dataset takes
    its place: the old dataset is untouched, loads and trains; the re-run then replaces it."""
    d = tmp_path / "d"
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char")
    old = all_files(d)
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text(encoding="utf-8").upper(), encoding="utf-8")
    args = ["--dataset", "y", "--input", other, "--tokenizer", "char", "--shard_size", "300", "--overwrite"]
    (d / "notes.txt").write_text("mine")
    kill_prepare_after_shard(d, args, kill_after)
    assert {k: v for k, v in all_files(d).items() if k != "notes.txt"} == old
    assert TokenShards(d).num_tokens == read_meta(d)["splits"]["train"]["num_tokens"]
    if kill_after == "meta.json":
        check_trains(d, tmp_path / "out")
    load_cli().main([*map(str, args), "--data_dir", str(d)])
    assert read_meta(d)["dataset"] == "y" and TokenShards(d).vocab_size == len(set(other.read_text()))
    assert (d / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".d.*"))


def check_trains(d, out):
    """examples/train.py trains a tiny model on data_dir d for 2 iterations and evaluates it."""
    train = Path(__file__).resolve().parent.parent / "examples" / "train.py"
    run = subprocess.run([sys.executable, str(train), f"--data_dir={d}", f"--out_dir={out}",
                          "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
                          "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--cpu=true",
                          "--mixed_precision=no", "--compile=false"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "val loss" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    return run.stdout


def test_interrupted_rerun_keeps_the_old_dataset(tmp_path, tiny_text, monkeypatch):
    """Between two shards of a re-run, data_dir still holds the complete old dataset, and after the
    interruption too."""
    import nanogpt_hf.data as data

    d = tmp_path / "d"
    prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char")
    old = {p.name: p.read_bytes() for p in d.glob("*") if p.is_file()}
    calls = []

    def between_shards(seconds):
        calls.append(seconds)
        assert {p.name: p.read_bytes() for p in d.glob("*") if p.is_file()} == old
        assert TokenShards(d).num_tokens == read_meta(d)["splits"]["train"]["num_tokens"]
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setenv(SLEEP_ENV, "0.001")
    monkeypatch.setattr(data.time, "sleep", between_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("x", data_dir=d, inputs=[str(tiny_text)], tokenizer="char", shard_size=400)
    assert len(calls) == 3 and {p.name: p.read_bytes() for p in d.glob("*") if p.is_file()} == old
