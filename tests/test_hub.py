"""Publishing on the Hub (nanogpt_hf.hub and .card, examples/push.py) against tests/hub_server.py: a real HTTP
server on 127.0.0.1 that speaks the Hub protocol; huggingface_hub and transformers are not mocked. The published
model is loaded in a fresh interpreter where nanogpt_hf cannot be imported, as a user with only transformers would."""

import hashlib
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.data import TokenShards
from nanogpt_hf.card import CARD_MARKER, model_card_text, write_model_card
from nanogpt_hf.hub import BackgroundPusher, HubError, push_data_dir, push_dir, resolve_data_dir
from nanogpt_hf.tokenization import build_char_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN, READ_TOKEN = "hf_test_write", "hf_test_read"
REPO = "tester/tiny-nanogpt"
SPACE = "tester/nanogpt-demo"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
PROMPT = "hear me"
FAST = dict(token=TOKEN, retries=2, backoff=0.01)  # pushes in this process: quick retries


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), tokens={TOKEN: "write", READ_TOKEN: "read"}) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def online():
    """Pushes from this process go to the loopback server; a suite-wide HF_HUB_OFFLINE=1 must not stop them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield


def hub_env(hub, tmp: Path, pythonpath: str | None) -> dict:
    """Environment of a child process that talks to `hub` with a fresh, empty HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", PYTHONPATH=pythonpath or "")
    return env


def train_tiny(out_dir: Path, model=None, steps=3):
    """A few AdamW steps of a tiny char model, saved as the trainer would; returns (model, probe logits)."""
    tok = build_char_tokenizer(TEXT)
    if model is None:
        torch.manual_seed(0)
        model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=len(tok), block_size=32, n_layer=2, n_head=2, n_embd=32))
    ids = torch.tensor([tok(TEXT).input_ids[:32]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    iters = steps + json.loads((out_dir / "results.json").read_text())["iter"] if (out_dir / "results.json").exists() \
        else steps
    (out_dir / "train_config.json").write_text(json.dumps(
        {"dataset": "tiny_text", "batch_size": 1, "block_size": 32, "learning_rate": 1e-2, "max_iters": iters}))
    (out_dir / "results.json").write_text(json.dumps(
        {"iter": iters, "train_loss": loss.item(), "val_loss": loss.item() + 0.1, "tokens_seen": 32 * iters,
         "wall_time_s": 1.5, "hardware": "cpu (2 cores)", "num_params": model.get_num_params(non_embedding=False),
         "dataset": "tiny_text"}))
    (out_dir / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n placeholder")
    ckpt = out_dir / "checkpoints" / f"step_{iters:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "optimizer.pt").write_bytes(b"local training state, never uploaded")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tok(PROMPT + " speak").input_ids])).logits
    return model, logits


def digest(folder: Path) -> dict:
    """Every file and folder below `folder` with its content hash and mtime: equal digests = untouched."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                                p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """v1 pushed with the CLI (plus its --export_gpt2 copy), then trained on and pushed again as v2."""
    tmp = tmp_path_factory.mktemp("published")
    out = tmp / "out"
    model, logits_v1 = train_tiny(out)
    before = digest(out)
    cli = subprocess.run([sys.executable, "examples/push.py", str(out), REPO, "--export_gpt2", "--space", SPACE],
                         cwd=ROOT,
                         env=hub_env(hub, tmp, str(ROOT)), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    after_cli = digest(out)
    sha1 = hub.history(REPO)[0][0]
    model, logits_v2 = train_tiny(out, model)  # training goes on: new weights, new results
    before_v2 = digest(out)
    sha2 = push_dir(out, REPO, **FAST, endpoint=hub.url)
    torch.save(logits_v1, tmp / "logits_v1.pt")
    torch.save(logits_v2, tmp / "logits_v2.pt")
    return SimpleNamespace(out=out, tmp=tmp, sha1=sha1, sha2=sha2, cli=cli, logits_v1=logits_v1,
                           logits_v2=logits_v2, untouched=[(before, after_cli), (before_v2, digest(out))])


# -----------------------------------------------------------------------------
# pushing


def test_push_uploads_the_model_and_leaves_out_dir_untouched(published, hub):
    files = set(hub.files(REPO))
    assert {"model.safetensors", "config.json", "configuration_nanogpt.py", "modeling_nanogpt.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "train_config.json",
            "results.json", "loss_curve.png", "README.md"} <= files
    assert not [f for f in files if f.startswith("checkpoints/") or f.endswith(".pt")]
    assert "auto_map" in json.loads(hub.read(REPO, "config.json"))
    assert published.sha1 in published.cli.stdout and f"{REPO}-gpt2" in published.cli.stdout
    for before, after in published.untouched:  # not a byte, not an mtime, no README.md, no .cache/
        assert before == after
    card = hub.read(REPO, "README.md").decode()
    assert CARD_MARKER in card and f'from_pretrained("{REPO}", trust_remote_code=True)' in card


def test_push_ships_the_demo_as_a_space(published, hub):
    """--space: a Gradio Space whose app.py is examples/demo.py, pointed at the pushed model."""
    assert {"app.py", "requirements.txt", "README.md"} <= set(hub.files(SPACE, repo_type="space"))
    app = hub.read(SPACE, "app.py", repo_type="space").decode()
    assert f'MODEL = os.environ.get("NANOGPT_DEMO_MODEL", {REPO!r})' in app
    assert app.replace(f", {REPO!r})", ")", 1) == (ROOT / "examples" / "demo.py").read_text()
    readme = hub.read(SPACE, "README.md", repo_type="space").decode()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and f"- {REPO}" in readme
    assert f"spaces/{SPACE}" in published.cli.stdout


def test_second_push_is_a_new_commit_and_old_revisions_stay(published, hub):
    history = hub.history(REPO)
    assert [sha for sha, _ in history[:2]] == [published.sha2, published.sha1] and len(history) == 3
    assert "iter 6" in history[0][1]["summary"]
    assert hub.read(REPO, "model.safetensors", published.sha1) != hub.read(REPO, "model.safetensors")
    # pushing an unchanged out_dir is not an error and adds no empty commit
    assert push_dir(published.out, REPO, **FAST, endpoint=hub.url) == published.sha2
    # a push to a branch leaves main alone
    sha = push_dir(published.out, REPO, revision="experiment", commit_message="try", **FAST, endpoint=hub.url)
    assert hub.history(REPO, "experiment")[0][0] == sha and hub.history(REPO)[0][0] == published.sha2


CHILD = r"""
import importlib.util, json, sys
from importlib.machinery import PathFinder
from pathlib import Path

# nanogpt_hf must come from nowhere but the Hub: drop every way this interpreter could import it (cwd or
# PYTHONPATH entries, an editable install's path entry or meta-path finder), then check that it is gone.
def provides(finder):
    try:
        return finder.find_spec("nanogpt_hf", None) is not None
    except Exception:
        return False
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "nanogpt_hf" / "__init__.py").exists()]
sys.meta_path[:] = [f for f in sys.meta_path if f is PathFinder or not provides(f)]
assert importlib.util.find_spec("nanogpt_hf") is None, "nanogpt_hf is importable in the child"

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

args = json.loads(sys.argv[1])
report = {}
for name, (repo, revision, remote, ids, expected) in args["models"].items():
    model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=remote).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    report[name] = {"class": type(model).__name__, "module": type(model).__module__,
                    "max_abs_diff": (logits - torch.load(expected, weights_only=True)).abs().max().item()}
# plain (answers the remote-code question with "no" since stdin is closed) and as the model card shows it
report["tokenizer_ids"] = AutoTokenizer.from_pretrained(args["repo"])(args["prompt"]).input_ids
tok = AutoTokenizer.from_pretrained(args["repo"], trust_remote_code=True)
report["tokenizer_ids_trusted"] = tok(args["prompt"]).input_ids
generator = pipeline("text-generation", model=args["repo"], trust_remote_code=True)
report["generated"] = generator(args["prompt"], max_new_tokens=8, do_sample=False)[0]["generated_text"]
print("REPORT " + json.dumps(report))
"""


def test_load_without_nanogpt_hf(published, hub, tmp_path):
    tok = build_char_tokenizer(TEXT)
    ids = tok(PROMPT + " speak").input_ids
    v1, v2 = str(published.tmp / "logits_v1.pt"), str(published.tmp / "logits_v2.pt")
    args = {"repo": REPO, "prompt": PROMPT, "models": {
        "main": [REPO, None, True, ids, v2],
        "pinned": [REPO, published.sha1, True, ids, v1],  # revision pinning: the first push, not main
        "gpt2": [f"{REPO}-gpt2", None, False, ids, v1],  # --export_gpt2 copy of v1: no remote code at all
    }}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                           env=hub_env(hub, tmp_path, None), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.split("REPORT ", 1)[1])
    for name in ("main", "pinned", "gpt2"):
        assert report[name]["max_abs_diff"] < 1e-5, (name, report[name])
    assert report["main"]["module"].startswith("transformers_modules.")  # the repo's code, not ours
    assert report["gpt2"]["class"] == "GPT2LMHeadModel"
    assert report["tokenizer_ids"] == report["tokenizer_ids_trusted"] == tok(PROMPT).input_ids
    assert report["generated"].startswith(PROMPT) and len(report["generated"]) == len(PROMPT) + 8


# -----------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("mode", ["status", "close"])
def test_server_failure_gives_one_line_error_and_keeps_out_dir(published, hub, mode):
    repo = f"tester/fail-{mode}"
    before, logs = digest(published.out), []
    hub.inject_fault(f"/api/models/{repo}/commit/", mode=mode, status=500, count=None)
    try:
        with pytest.raises(HubError) as e:
            push_dir(published.out, repo, **FAST, endpoint=hub.url, log=logs.append)
    finally:
        hub.clear_faults()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"push to {repo} failed (after 3 attempts)")
    assert ("HTTP 500 server error" if mode == "status" else "cannot reach") in msg
    assert len(logs) == 2 and all("retry" in line for line in logs)
    assert sum(path.endswith(f"{repo}/commit/main") for _, path, _ in hub.requests) == 3
    assert len(hub.history(repo)) == 1  # only the repo's initial commit: nothing half-pushed
    assert digest(published.out) == before


def test_transient_failure_is_retried(published, hub):
    logs = []
    hub.inject_fault("/api/models/tester/flaky/commit/", status=503, count=1)
    sha = push_dir(published.out, "tester/flaky", **FAST, endpoint=hub.url, log=logs.append)
    assert hub.history("tester/flaky")[0][0] == sha
    assert len(logs) == 1 and "HTTP 503" in logs[0]


def test_timeout_is_retried_then_reported(published, hub):
    """huggingface_hub has no upload timeout by default; with one configured (its public client factory), a Hub
    that stops answering ends in a one-line "timed out" error."""
    httpx2 = pytest.importorskip("httpx2")  # what huggingface_hub 2.x speaks
    from huggingface_hub.utils._http import default_client_factory

    def impatient_client():
        client = default_client_factory()
        client.timeout = httpx2.Timeout(0.3)
        return client

    hub.inject_fault("/api/models/tester/slow/commit/", mode="hang", delay=1.0, count=None)
    huggingface_hub.set_client_factory(impatient_client)
    try:
        with pytest.raises(HubError, match=r"after 2 attempts\): timed out talking to http://127.0.0.1"):
            push_dir(published.out, "tester/slow", token=TOKEN, retries=1, backoff=0.01, endpoint=hub.url,
                     log=lambda _: None)
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
        hub.clear_faults()


def test_auth_errors_say_how_to_log_in(published, hub, tmp_path, monkeypatch):
    with pytest.raises(HubError, match=r"HTTP 401 .*`hf auth login` or set HF_TOKEN"):
        push_dir(published.out, "tester/auth", token="hf_wrong", endpoint=hub.url, retries=0)
    with pytest.raises(HubError, match=r"HTTP 403 .*write token"):
        push_dir(published.out, "tester/auth", token=READ_TOKEN, endpoint=hub.url, retries=0)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(HubError, match=r"not logged in .*`hf auth login` or set HF_TOKEN"):
        push_dir(published.out, "tester/auth", endpoint=hub.url)
    with socket.socket() as s:  # a port where nobody listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubError, match=r"after 3 attempts\): cannot reach http://127.0.0.1"):
        push_dir(published.out, "tester/auth", **FAST, endpoint=dead, log=lambda _: None)


def test_private_repo_is_hidden_without_token(published, hub):
    push_dir(published.out, "tester/secret", private=True, **FAST, endpoint=hub.url)
    url = f"{hub.url}/tester/secret/resolve/main/config.json"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url)
    assert e.value.code == 404 and e.value.headers["X-Error-Code"] == "RepoNotFound"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        assert json.loads(r.read())["model_type"] == "nanogpt"


def test_background_pusher_never_stops_training(published, hub, tmp_path):
    out, repo, logs = tmp_path / "out", "tester/background", []
    shutil.copytree(published.out, out)
    pusher = BackgroundPusher(out, repo, **FAST, endpoint=hub.url, log=logs.append)
    commit_path = f"/api/models/{repo}/commit/"

    hub.inject_fault(commit_path, status=500, count=None)  # the Hub is down ...
    t0 = time.time()
    assert pusher.push("step 6")
    (out / "results.json").write_text(json.dumps({"iter": 7}))  # ... training goes on writing out_dir
    assert time.time() - t0 < 2
    assert pusher.wait(timeout=60) is False
    assert "HTTP 500" in pusher.last_error and "\n" not in pusher.last_error
    assert "will retry at the next push" in logs[-1]
    hub.clear_faults()

    hub.inject_fault(commit_path, mode="hang", delay=1.0, count=1)  # a slow Hub never blocks the caller
    t0 = time.time()
    assert pusher.push("step 7")
    assert pusher.wait(timeout=0.1) is False and time.time() - t0 < 1.0
    assert pusher.wait(timeout=60) is True  # the hung attempt was retried and went through
    head = hub.history(repo)[0][1]
    assert head["summary"] == "step 7" and json.loads(hub.read(repo, "results.json")) == {"iter": 7}
    assert not [f for f in hub.files(repo) if f.startswith("checkpoints/")]


# -----------------------------------------------------------------------------
# model card


def validate(hub, card: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{hub.url}/api/validate-yaml", data=json.dumps({"content": card}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_model_card(published, hub, tmp_path):
    # a full out_dir: numbers from results.json, metadata that the Hub's validator accepts
    card = model_card_text(published.out, REPO)
    results = json.loads((published.out / "results.json").read_text())
    assert f"{results['val_loss']:.4f}" in card and "tiny_text" in card and "cpu (2 cores)" in card
    assert f'export_gpt2("{REPO}", "gpt2-export")' in card and 'pipeline("text-generation"' in card
    assert f"vllm serve {REPO}\n--trust-remote-code" in card  # the engines line names what serves this repo
    assert validate(hub, card) == (200, {"errors": [], "warnings": []})
    data = ModelCard(card).data.to_dict()  # huggingface_hub's own parser round-trips it
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "mit" and {"nanogpt", "nanogpt_hf"} <= set(data["tags"])

    # a bare out_dir: still a valid card, with n/a where numbers are missing
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nanogpt", "n_layer": 2}))
    path = write_model_card(tmp_path)
    assert path == tmp_path / "README.md" and "n/a" in path.read_text()
    assert validate(hub, path.read_text())[0] == 200

    # the validator is real: bad metadata is rejected
    bad = "---\nlicense: 42\npipeline_tag: talking\ntags: {a: 1}\n---\n# bad\n"
    status, answer = validate(hub, bad)
    assert status == 400 and len(answer["errors"]) == 3


# -----------------------------------------------------------------------------
# datasets and the CLI


def test_dataset_repo_push_and_resolve(hub, char_data_dir, tmp_path):
    sha = push_data_dir(char_data_dir, "tester/tiny-data", **FAST, endpoint=hub.url)
    cache = dict(endpoint=hub.url, cache_dir=tmp_path / "cache", retries=0)
    local = resolve_data_dir("hf://datasets/tester/tiny-data", **cache)
    pinned = resolve_data_dir(f"hf://datasets/tester/tiny-data@{sha}", **cache)
    for f in [p.relative_to(char_data_dir) for p in char_data_dir.rglob("*") if p.is_file()]:
        assert (local / f).read_bytes() == (pinned / f).read_bytes() == (char_data_dir / f).read_bytes()
    x, y = TokenShards(local, "train").get_batch(2, 8, step=0)  # the download is a working data_dir
    assert x.shape == y.shape == (2, 8)
    assert resolve_data_dir(char_data_dir) == char_data_dir  # local paths pass through
    with pytest.raises(HubError, match="404 repository not found"):
        resolve_data_dir("hf://datasets/tester/missing", **cache)
    with pytest.raises(HubError, match="404 revision not found"):
        resolve_data_dir("hf://datasets/tester/tiny-data@nope", **cache)
    # a model trained on it: the card reads the data's meta.json for the token counts
    (tmp_path / "train_config.json").write_text(json.dumps({"data_dir": str(local)}))
    meta = json.loads((local / "meta.json").read_text())
    assert f"train {meta['splits']['train']['num_tokens']:,}" in model_card_text(tmp_path, "tester/m")


def test_push_cli_bad_out_dir(tmp_path):
    cli = runpy.run_path(str(ROOT / "examples" / "push.py"))
    with pytest.raises(SystemExit, match=r"error: .* holds no saved model"):
        cli["main"]([str(tmp_path), "tester/x"])
