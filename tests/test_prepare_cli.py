"""examples/prepare.py: downloads, one-line errors for bad input, and atomicity when interrupted (under SIGKILL:
tests/test_data_scale.py).

    python -m pytest tests/test_prepare_cli.py -q
"""

import functools
import http.server
import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest

from nanogpt_hf.data import TokenShards, read_meta
from nanogpt_hf.prepare import SLEEP_ENV, prepare_dataset

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
    assert not list(tmp_path.glob(".d.*"))  # failed runs clean up after themselves


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


def test_interrupted_rerun_keeps_the_old_dataset(tmp_path, tiny_text, monkeypatch):
    """Between two shards of a re-run, data_dir still holds the complete old dataset, and after the
    interruption too."""
    import nanogpt_hf.prepare as data

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
