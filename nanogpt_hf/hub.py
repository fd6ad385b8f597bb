"""Publish a trained out_dir on the Hugging Face Hub, so that others can use it with nothing but transformers.

    python examples/push.py out/shakespeare-char you/nanogpt-shakespeare-char
    from nanogpt_hf.hub import push_dir; push_dir("out/shakespeare-char", "you/nanogpt-shakespeare-char")

    # anywhere, without nanogpt_hf installed:
    model = AutoModelForCausalLM.from_pretrained("you/nanogpt-shakespeare-char", trust_remote_code=True)

What goes up: safetensors weights, config.json (with auto_map) and the two source files it points to,
generation_config.json, the tokenizer, train_config.json, results.json, loss_curve.png and a model card
(README.md, rendered by nanogpt_hf.card). Never uploaded: checkpoints/ and anything else in a subfolder, hidden
files, *.pt optimizer state. A push only reads out_dir; it never writes or deletes anything there.

Failures (no network, bad token, 5xx, timeouts) become a HubError with a one-line message; transient ones
(5xx, 429, timeouts, dropped connections) are retried with exponential backoff first. During training,
BackgroundPusher pushes from a daemon thread and only ever logs its failures.
"""

import fnmatch
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

from .card import CARD_MARKER, HUB_DATA_PREFIX, dataset_card_text, model_card_text, read_json

# Local-only files: optimizer/trainer state and scratch files, not part of the published model.
LOCAL_ONLY = ("*.pt", "*.pth", "*.ckpt", "*.tmp", "*.lock", "*.log")


class HubError(RuntimeError):
    """A push or download failed; str(e) is one line saying what happened and what to do."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# pushing with retries and one-line errors


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network-level errors worth retrying; huggingface_hub 2.x speaks httpx2, 1.x httpx."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError, TimeoutError)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(e: BaseException) -> bool:
    status = _status(e)
    if isinstance(e, HfHubHTTPError) and status is not None:
        return status in (408, 429) or status >= 500
    return isinstance(e, _transient_errors())


def _reason(e: BaseException, endpoint: str) -> str:
    """One line: what went wrong and what to do about it."""
    status = _status(e)
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or set HF_HUB_OFFLINE=0)"
    if status == 401:
        return f"HTTP 401 unauthorized: the Hub did not accept your token; {login} (a token with write access)"
    if status == 403:
        return f"HTTP 403 forbidden: your token may not write there; {login} with a write token for that namespace"
    if isinstance(e, RevisionNotFoundError):
        return "HTTP 404 revision not found: check the branch name given as --revision"
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return "HTTP 404 repository not found: check the repo id (namespace/name) and that your token can see it"
    if status == 429:
        return "HTTP 429 rate limited by the Hub: wait a bit and try again"
    if status is not None and status >= 500:
        return f"HTTP {status} server error from {endpoint}: the Hub is having trouble, try again later"
    if status is not None:
        return f"HTTP {status}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, _transient_errors()):
        kind = "timed out talking to" if "Timeout" in type(e).__name__ else "cannot reach"
        return f"{kind} {endpoint} ({type(e).__name__}: {first}): check your network connection (or HF_ENDPOINT)"
    if isinstance(e, ValueError) and "metadata" in first:  # the Hub's README.md validator said no
        detail = " ".join(line.strip("- ") for line in str(e).splitlines()[1:])
        return f"the Hub rejected the model card metadata: {detail or first}"
    return f"{type(e).__name__}: {first}"


# every Hub call is bounded: each request by connect/read timeouts (s), all attempts of one push or download together
# by a deadline (s), so a server that accepts the connection and never answers can't hang push.py or train's end
HUB_TIMEOUT_ENV, HUB_DEADLINE_ENV = "NANOGPT_HUB_TIMEOUT", "NANOGPT_HUB_DEADLINE"


def hub_limits() -> tuple[float, float]:
    """(per-request timeout, total deadline) in seconds: NANOGPT_HUB_TIMEOUT (default 60) and NANOGPT_HUB_DEADLINE
    (default 1800)."""
    import os

    def seconds(name, default):
        try:
            value = float(os.environ.get(name, default))
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {os.environ[name]!r}") from None
        if not 0 < value < float("inf"):
            raise ValueError(f"{name} must be > 0 seconds, got {value}")
        return value

    return seconds(HUB_TIMEOUT_ENV, 60), seconds(HUB_DEADLINE_ENV, 1800)


def bound_requests():
    """huggingface_hub's default HTTP client waits forever (timeout=None): give it connect/read timeouts. A client
    factory set by the user (huggingface_hub.set_client_factory) is left alone."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    if getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not _http.default_client_factory:
        return
    timeout = hub_limits()[0]

    def bounded_client():
        client = _http.default_client_factory()
        client.timeout = type(client.timeout)(timeout, connect=min(timeout, 10.0))  # httpx's Timeout
        return client

    huggingface_hub.set_client_factory(bounded_client)


def _before(deadline: float, fn: Callable):
    """fn() in a daemon thread, given up at the deadline (time.monotonic()) with a TimeoutError; its result or
    exception otherwise. A thread stuck in a socket can't be killed, but a daemon one doesn't keep the process."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_outcome(fn)), name="nanogpt_hf-hub-call", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not box:
        raise TimeoutError("no answer before the deadline")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _outcome(fn):
    try:
        return True, fn()
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        return False, e


def _with_retries(fn: Callable, what: str, endpoint: str, retries: int, backoff: float, log: Callable):
    """fn() with up to `retries` retries on transient errors (backoff, 2*backoff, ...), all within the total deadline
    (hub_limits); HubError when it gives up."""
    bound_requests()
    total = hub_limits()[1]
    deadline = time.monotonic() + total
    for attempt in range(retries + 1):
        try:
            return _before(deadline, fn)
        except HubError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
            if time.monotonic() >= deadline:
                raise HubError(f"{what} failed: no answer from {endpoint} within {total:g} s (the deadline: set "
                               f"{HUB_DEADLINE_ENV} to wait longer)") from e
            if attempt < retries and _is_transient(e):
                delay = min(backoff * 2**attempt, deadline - time.monotonic())
                log(f"hub: {what}: {_reason(e, endpoint)}; retry {attempt + 1}/{retries} in {delay:.1f}s")
                time.sleep(delay)
                continue
            tries = f" (after {attempt + 1} attempts)" if attempt else ""
            raise HubError(f"{what} failed{tries}: {_reason(e, endpoint)}") from e


def files_to_push(folder, include_subdirs: tuple[str, ...] = ()) -> list[Path]:
    """Files of `folder` that belong on the Hub: top-level files plus the named subfolders, minus hidden files
    and LOCAL_ONLY patterns. checkpoints/ (resumable training state) therefore never goes up."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) > 1 and rel.parts[0] not in include_subdirs:
            continue
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in LOCAL_ONLY):
            continue
        out.append(path)
    return out


def _require_token(token: str | None, what: str) -> str:
    token = token or get_token()
    if not token:
        raise HubError(f"{what} failed: not logged in to the Hub; log in with `hf auth login` or set HF_TOKEN")
    return token


def _push_files(files: dict[str, Path | bytes], repo_id: str, repo_type: str, private: bool, revision: str | None,
                commit_message: str, token, endpoint, retries, backoff, log) -> str:
    """Create the repo (if needed) and the branch (if needed), then commit `files` {path_in_repo: file or bytes}."""
    what = f"push to {repo_id}" + (f"@{revision}" if revision else "")
    token = _require_token(token, what)
    api = HfApi(endpoint=endpoint, token=token, library_name="nanogpt_hf")

    def push() -> str:
        sdk = {"space_sdk": "gradio"} if repo_type == "space" else {}  # the Hub asks a Space for its SDK
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True, **sdk)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        # fresh operations on every attempt: huggingface_hub marks them as used after a commit
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in files.items()]
        info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type=repo_type,
                                 revision=revision)
        return info.oid

    return _with_retries(push, what, api.endpoint, retries, backoff, log)


def push_dir(out_dir, repo_id: str, private: bool = False, revision: str | None = None,
             commit_message: str | None = None, token: str | None = None, *, endpoint: str | None = None,
             retries: int = 3, backoff: float = 2.0, log: Callable[[str], None] = _stderr) -> str:
    """Push a trained out_dir to the model repo `repo_id` (created if needed) and return the commit sha.

    revision: a branch (created from main if new). The model card is rendered fresh from the out_dir's
    results unless out_dir/README.md was edited by hand (its generated-by marker line removed).
    Raises FileNotFoundError for a folder that holds no saved model, HubError (one line) when the Hub fails.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file() or not list(out_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{out_dir} holds no saved model (config.json + *.safetensors): train one first, e.g. "
            f"`python examples/train.py CONFIG --out_dir {out_dir}`"
        )
    files: dict[str, Path | bytes] = {p.relative_to(out_dir).as_posix(): p for p in files_to_push(out_dir)}
    readme = out_dir / "README.md"
    if not readme.is_file() or CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
        files["README.md"] = model_card_text(out_dir, repo_id).encode()  # in memory: out_dir stays untouched
    results = read_json(out_dir / "results.json")
    default_message = f"nanogpt_hf: upload model (iter {results['iter']})" if "iter" in results else \
        "nanogpt_hf: upload model"
    return _push_files(files, repo_id, "model", private, revision, commit_message or default_message, token,
                       endpoint, retries, backoff, log)


def push_gpt2(out_dir, repo_id: str, **push_kwargs) -> str:
    """Push a vanilla GPT2LMHeadModel copy of out_dir's model (learned positions only): no remote code needed."""
    from transformers import AutoTokenizer

    from .modeling_nanogpt import NanoGPTForCausalLM

    model = NanoGPTForCausalLM.from_pretrained(out_dir)
    if model.config.position_embedding != "learned":
        raise ValueError(f"--export_gpt2 needs learned positions; {out_dir} uses {model.config.position_embedding}")
    with tempfile.TemporaryDirectory(prefix="nanogpt_hf_gpt2_") as tmp:
        model.to_gpt2().save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(out_dir).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # no tokenizer in out_dir: push the weights anyway
        for name in ("train_config.json", "results.json", "loss_curve.png"):
            if (Path(out_dir) / name).is_file():
                shutil.copy2(Path(out_dir) / name, tmp)
        return push_dir(tmp, repo_id, **push_kwargs)


# -----------------------------------------------------------------------------
# datasets: a prepared data_dir (meta.json, tokenizer/, *.bin shards) as a Hub dataset repo

def push_data_dir(data_dir, repo_id: str, private: bool = False, revision: str | None = None,
                  commit_message: str | None = None, token: str | None = None, *, endpoint: str | None = None,
                  retries: int = 3, backoff: float = 2.0, log: Callable[[str], None] = _stderr) -> str:
    """Push a prepared data_dir to the dataset repo `repo_id`; train with data_dir=hf://datasets/<repo_id>."""
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} has no meta.json: prepare it first with examples/prepare.py")
    files: dict[str, Path | bytes] = {p.relative_to(data_dir).as_posix(): p
                                      for p in files_to_push(data_dir, include_subdirs=("tokenizer",))}
    if "README.md" not in files:
        files["README.md"] = dataset_card_text(data_dir, repo_id).encode()
    return _push_files(files, repo_id, "dataset", private, revision, commit_message or "nanogpt_hf: upload data",
                       token, endpoint, retries, backoff, log)


def push_space(files: dict[str, str | bytes], space_id: str, private: bool = False, token: str | None = None, *,
               endpoint: str | None = None, retries: int = 3, backoff: float = 2.0,
               log: Callable[[str], None] = _stderr) -> str:
    """Push a Gradio Space's files {path: text or bytes} (examples/demo.py's space_files) to `space_id`."""
    files = {path: text.encode() if isinstance(text, str) else text for path, text in files.items()}
    return _push_files(files, space_id, "space", private, None, "nanogpt_hf: demo app", token, endpoint, retries,
                       backoff, log)


def resolve_data_dir(data_dir, *, endpoint: str | None = None, cache_dir=None, token: str | None = None,
                     retries: int = 3, backoff: float = 2.0, log: Callable[[str], None] = _stderr) -> Path:
    """A local data_dir as is; "hf://datasets/<ns>/<name>[@revision]" downloaded (cached) and its local path."""
    spec = str(data_dir)
    if not spec.startswith(HUB_DATA_PREFIX):
        return Path(data_dir)
    repo_id, _, revision = spec[len(HUB_DATA_PREFIX):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"data_dir {spec!r}: expected hf://datasets/<namespace>/<name>[@revision]")
    from huggingface_hub import snapshot_download

    def download() -> str:
        return snapshot_download(repo_id, repo_type="dataset", revision=revision or None, endpoint=endpoint,
                                 cache_dir=cache_dir, token=token)

    path = Path(_with_retries(download, f"download of {spec}", endpoint or HfApi().endpoint, retries, backoff, log))
    if not (path / "meta.json").is_file():
        raise HubError(f"download of {spec} failed: the repo has no meta.json, so it is not a nanogpt_hf data_dir")
    return path


# -----------------------------------------------------------------------------
# pushing in the background while training goes on


class BackgroundPusher:
    """Push out_dir from a daemon thread so that training never waits for (or dies from) the network.

        pusher = BackgroundPusher(out_dir, "you/name")   # kwargs go to push_dir (private, revision, token, ...)
        pusher.push()               # after each save: snapshot out_dir now, upload in the background
        pusher.wait(timeout=600)    # at the end of training; True if the last push went through

    push() copies the files to a temp folder first, so training may keep writing out_dir during the upload.
    Only the newest snapshot waits in line: a push that finds an older one queued replaces it. A failure is
    logged in one line; the next push() uploads the newer state. Nothing here raises into the training loop.
    """

    def __init__(self, out_dir, repo_id: str, log: Callable[[str], None] = _stderr, **push_kwargs):
        self.out_dir, self.repo_id, self.log = Path(out_dir), repo_id, log
        self.push_kwargs = {"log": log, **push_kwargs}
        self.last_commit: str | None = None
        self.last_error: str | None = None
        self._pending: tuple[Path, str | None] | None = None  # (snapshot folder, commit message)
        self._busy = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanogpt_hf-hub-push", daemon=True)
        self._thread.start()
        if not (push_kwargs.get("token") or get_token()):  # say so now, not hours later at the first push
            log(f"hub: not logged in, so pushes to {repo_id} will fail: log in with `hf auth login` or set HF_TOKEN")

    def push(self, commit_message: str | None = None) -> bool:
        """Snapshot out_dir and queue it; returns at once. False (logged) if the snapshot could not be taken."""
        snapshot = None
        try:
            snapshot = Path(tempfile.mkdtemp(prefix="nanogpt_hf_push_"))
            for path in files_to_push(self.out_dir):
                shutil.copy2(path, snapshot / path.name)
        except Exception as e:  # noqa: BLE001 - e.g. disk full: skip this push, keep training
            self.log(f"hub: could not snapshot {self.out_dir} for pushing ({type(e).__name__}: {e}); skipped")
            if snapshot is not None:
                shutil.rmtree(snapshot, ignore_errors=True)
            return False
        with self._cond:
            if self._pending is not None:  # an older snapshot still waiting: the new one supersedes it
                shutil.rmtree(self._pending[0], ignore_errors=True)
            self._pending = (snapshot, commit_message)
            self._cond.notify_all()
        return True

    def _run(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                (snapshot, message), self._pending = self._pending, None
                self._busy = True
            try:
                self.last_commit = push_dir(snapshot, self.repo_id, commit_message=message, **self.push_kwargs)
                self.last_error = None
                self.log(f"hub: pushed {self.out_dir} to {self.repo_id} (commit {self.last_commit[:8]})")
            except Exception as e:  # noqa: BLE001 - HubError or anything unexpected: log it, never crash
                self.last_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.log(f"hub: {self.last_error} (will retry at the next push)")
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a push is queued or under way."""
        with self._cond:
            return self._busy or self._pending is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until queued pushes are done (at most `timeout` s); True if they are and the last one succeeded."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)
        return done and self.last_error is None and self.last_commit is not None


def push_final(pusher, best_val_loss, it, stop):
    """The final push (if pushing), waited for: a failed push was logged, and the final state is worth one more
    try. Each push ends by hub_limits's deadline however the server behaves; a stop signal ends the wait."""
    message = f"nanogpt_hf: final model (best val loss {best_val_loss:.4f} at iter {it})"
    for attempt in range(2 if pusher is not None else 0):
        pusher.push(message)
        while not pusher.wait(timeout=1.0):
            if stop.requested or not pusher.busy:
                break
        if pusher.wait(timeout=0) or stop.requested:
            return


# -----------------------------------------------------------------------------
# names given as --model / --tokenizer / --init_from: fail fast


def check_hub_name(name, flag, timeout=5.0) -> dict:
    """For a name that is not a local folder: ValueError at once if it can't be a Hub id, else one quick request
    (no retries) to the Hub. A missing repo, or an unreachable Hub when the cache doesn't hold the model, is a
    one-line ValueError; an unreachable Hub with the model cached returns {"local_files_only": True} for
    from_pretrained (no 30-60 s of download retries). {} when the Hub answered, or under HF_HUB_OFFLINE."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"{flag} {name}: not a local folder, and not a valid Hub id (namespace/name)") from None
    if constants.HF_HUB_OFFLINE:
        return {}
    bound_requests()  # the download that follows gets connect/read timeouts too
    endpoint = constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).model_info(name, timeout=timeout)
        return {}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ValueError(f"{flag} {name}: not a local folder, and no such model on {endpoint} (a private or gated "
                         "one needs `hf auth login`)") from None
    except Exception as e:  # noqa: BLE001 - the network, or the Hub in trouble
        if not (_is_transient(e) or isinstance(e, HfHubHTTPError)):
            raise
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            _stderr(f"{flag} {name}: {_reason(e, endpoint)}; using the cached copy")
            return {"local_files_only": True}
        raise ValueError(f"{flag} {name}: {_reason(e, endpoint)}; it is not in the local cache either") from None

