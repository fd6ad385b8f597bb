"""examples/demo.py: the Gradio app launched as a real process, answered through gradio_client (gradio is an optional
dependency: `pip install nanogpt_hf[demo]`; that test is skipped without it). Its error boundary (a bad --model or
flag is one `error:` line, before gradio is imported) and its Space app.py without nanogpt_hf run without gradio.
The headless-browser screenshot is a documented manual check (docs/serving.md)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.tokenization import build_char_tokenizer


ROOT = Path(__file__).resolve().parent.parent
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = build_char_tokenizer(TEXT, eot=None)
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=len(tokenizer), block_size=32, n_layer=2, n_head=2,
                                             n_embd=32)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"iter": 250, "val_loss": 1.2345, "dataset": "tiny"}))
    return tmp_path


def test_demo_streams_what_generate_gives_and_shows_the_run(model_dir):
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py"), "--model", str(model_dir),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        client, deadline = None, time.monotonic() + 300  # a generous bound: imports take long on a loaded machine
        while client is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                client = gradio_client.Client(url, verbose=False)
            except Exception:
                assert time.monotonic() < deadline, "the demo did not come up"
                time.sleep(1)
        # temperature 0: greedy, so the app's text is exactly our generate()'s, here past block_size (40 > 32)
        got = client.predict("Before", 0, 0, 40, api_name="/generate")
        model = NanoGPTForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = build_char_tokenizer(TEXT, eot=None)
        ids = torch.tensor([tokenizer("Before")["input_ids"]])
        want = tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)[0])
        assert got == want and len(got) == len("Before") + 40
        # the page carries the run's facts (gradio's /config holds the components' values)
        with urllib.request.urlopen(url + "config", timeout=60) as response:
            page = response.read().decode()
        assert "1.2345" in page and "block_size" in page
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_space_files_make_this_demo_the_app(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    files = demo.space_files("someone/tiny-shakespeare")
    assert set(files) == {"app.py", "requirements.txt", "README.md"}
    assert 'os.environ.get("NANOGPT_DEMO_MODEL", \'someone/tiny-shakespeare\')' in files["app.py"]
    assert "sdk: gradio" in files["README.md"] and "gradio" not in files["requirements.txt"]  # the Space has it
    compile(files["app.py"], "app.py", "exec")


def demo_module():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return demo


@pytest.mark.parametrize("attack", ["truncated weights", "no such folder", "port"])
def test_bad_model_or_flag_is_one_line(model_dir, attack):
    argv = ["--model", str(model_dir)]
    if attack == "truncated weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif attack == "no such folder":
        argv = ["--model", str(model_dir / "nope")]
    else:
        argv += ["--port", "70000"]
    with pytest.raises(SystemExit) as e:
        demo_module().main(argv)
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    assert ("--port 70000" if attack == "port" else str(model_dir)) in line


def test_the_space_app_runs_without_nanogpt_hf(tmp_path):
    """A Space installs torch, transformers and huggingface_hub, not nanogpt_hf: its app.py still starts."""
    app = tmp_path / "app.py"
    app.write_text(demo_module().space_files("someone/tiny")["app.py"])
    blocked = "import sys, runpy; sys.modules['nanogpt_hf'] = None; sys.argv = ['app.py', '--help']; " \
              f"runpy.run_path({str(app)!r}, run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "--model" in r.stdout, r.stderr[-2000:]
