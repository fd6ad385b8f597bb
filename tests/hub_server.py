"""A small Hugging Face Hub look-alike: the HTTP endpoints that huggingface_hub and transformers call to push
and load models, served over a real socket on 127.0.0.1. Tests point HF_ENDPOINT (or HfApi(endpoint=...)) at it.

    with HubServer(tmp_path / "hub", tokens={"hf_write": "write"}) as hub:   # http://127.0.0.1:<free port>
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write"}
        hub.inject_fault("/commit/", status=500, count=2)   # the next 2 commits answer 500 ...
        hub.inject_fault("/commit/", mode="close")           # ... or drop the connection without an answer

    python tests/hub_server.py --root /tmp/hub --port 8088   # standalone, e.g. to try examples/push.py
    curl -X POST localhost:8088/_admin/faults -d '{"path": "/commit/", "status": 503}'   # faults from outside

Endpoints (ROUTES below): whoami-v2, repos/create (409 if it exists), validate-yaml (really checks the README's
YAML metadata), model/dataset info with siblings, preupload, commit (ndjson: base64 files, deletions), branch,
refs, commits, tree, paths-info, and HEAD/GET resolve with X-Repo-Commit / ETag / X-Error-Code on 404.

Storage is a plain directory with real commit history, easy to inspect from a test:
    <root>/blobs/<git blob sha1>                    file contents, content-addressed (git's blob hash)
    <root>/<models|datasets>/<ns>/<name>/repo.json  {"private": bool, "refs": {"main": <commit sha>, ...}}
                                         commits/<sha>.json  {"parent", "summary", "date", "files": {path: blob oid}}
Every commit gets a new 40-hex sha; `main` (or any branch) points at its latest commit; a revision is a branch
name or a full commit sha. Not a full Hub: no LFS/Xet (preupload always answers "regular", so file contents
travel base64 inside the commit), no pull requests, no pagination.
"""

import argparse
import base64
import hashlib
import json
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# What the Hub's metadata validator knows; a short but real subset of its lists.
LICENSES = {
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
    "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "openrail",
    "bigscience-openrail-m", "creativeml-openrail-m", "llama2", "llama3", "gemma", "unlicense", "other", "unknown",
}
PIPELINE_TAGS = {
    "text-generation", "text2text-generation", "fill-mask", "text-classification", "token-classification",
    "question-answering", "summarization", "translation", "feature-extraction", "sentence-similarity",
    "zero-shot-classification", "image-classification", "automatic-speech-recognition", "text-to-image",
}
LIST_OF_STRINGS = ("tags", "datasets", "language", "metrics", "base_model")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """git's object id of a file; huggingface_hub compares it (preupload "oid") to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the YAML front matter of a README.md, like the Hub's /api/validate-yaml."""
    if not content.startswith("---"):
        return [], ["Empty metadata: the README has no YAML front matter"]
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    if match is None:
        return ["YAML front matter is not closed by a '---' line"], []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"Invalid YAML: {str(e).splitlines()[0]}"], []
    if meta is None:
        return [], ["Empty metadata"]
    if not isinstance(meta, dict):
        return [f"metadata must be a YAML mapping, got {type(meta).__name__}"], []
    errors = []
    if "license" in meta and (not isinstance(meta["license"], str) or meta["license"] not in LICENSES):
        errors.append(f"\"license\" must be one of the Hub's license ids, got {meta['license']!r}")
    if "library_name" in meta and not (
        isinstance(meta["library_name"], str) and re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", meta["library_name"])
    ):
        errors.append(f"\"library_name\" must be a lowercase library id, got {meta['library_name']!r}")
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f"\"pipeline_tag\" must be a known task, got {meta['pipeline_tag']!r}")
    for key in LIST_OF_STRINGS:
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f"\"{key}\" must be a string or a list of strings, got {value!r}")
    if "model-index" in meta and not (
        isinstance(meta["model-index"], list)
        and all(isinstance(m, dict) and "name" in m and isinstance(m.get("results"), list) for m in meta["model-index"])
    ):
        errors.append("\"model-index\" must be a list of {name, results: [...]} entries")
    return errors, []


class ApiError(Exception):
    """An HTTP error answer: status, X-Error-Code header, message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# -----------------------------------------------------------------------------
# Storage: repos, commits and blobs in a directory


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one writer at a time; reads of immutable commits/blobs need no lock
        self.counter = 0  # makes commit shas unique even for identical content within one second

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def repo(self, repo_type: str, repo_id: str) -> dict:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.exists():
            raise ApiError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def save_repo(self, repo_type: str, repo_id: str, repo: dict):
        (self.repo_dir(repo_type, repo_id) / "repo.json").write_text(json.dumps(repo, indent=1))

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Branch name or full commit sha -> commit sha."""
        repo = self.repo(repo_type, repo_id)
        if revision in repo["refs"]:
            return repo["refs"][revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and self.commit_path(repo_type, repo_id, revision).exists():
            return revision
        raise ApiError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit_path(self, repo_type: str, repo_id: str, sha: str) -> Path:
        return self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json"

    def commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads(self.commit_path(repo_type, repo_id, sha).read_text())

    def files(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, dict]:
        sha = self.resolve(repo_type, repo_id, revision)
        return sha, self.commit(repo_type, repo_id, sha)["files"]

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """False if it exists already. A new repo starts with one commit holding .gitattributes, like the Hub."""
        with self.lock:
            if (self.repo_dir(repo_type, repo_id) / "repo.json").exists():
                return False
            (self.repo_dir(repo_type, repo_id) / "commits").mkdir(parents=True)
            self.save_repo(repo_type, repo_id, {"private": private, "refs": {}})
            self._write_commit(repo_type, repo_id, "main", None, "initial commit", {".gitattributes": GITATTRIBUTES})
            return True

    def add_commit(self, repo_type, repo_id, branch, summary, added: dict, deleted: list, parent_commit=None) -> str:
        with self.lock:
            head = self.repo(repo_type, repo_id)["refs"].get(branch)
            if head is None:
                raise ApiError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            if parent_commit is not None and parent_commit != head:
                raise ApiError(412, f"A commit has happened since {parent_commit}; head is {head}")
            return self._write_commit(repo_type, repo_id, branch, head, summary, added, deleted)

    def _write_commit(self, repo_type, repo_id, branch, parent, summary, added, deleted=()) -> str:
        files = dict(self.commit(repo_type, repo_id, parent)["files"]) if parent else {}
        for path in deleted:  # a path ending in "/" deletes a folder
            gone = [p for p in files if p == path or (path.endswith("/") and p.startswith(path))]
            if not gone:
                raise ApiError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in gone:
                del files[p]
        files.update({path: self.put_blob(data) for path, data in added.items()})
        self.counter += 1
        record = {"parent": parent, "summary": summary, "date": time.time(), "files": dict(sorted(files.items()))}
        sha = hashlib.sha1(json.dumps([record, self.counter, repo_id]).encode()).hexdigest()
        self.commit_path(repo_type, repo_id, sha).write_text(json.dumps(record, indent=1))
        repo = self.repo(repo_type, repo_id)
        repo["refs"][branch] = sha
        self.save_repo(repo_type, repo_id, repo)
        return sha

    def history(self, repo_type: str, repo_id: str, revision: str = "main") -> list[tuple[str, dict]]:
        """[(sha, commit), ...], newest first."""
        sha, out = self.resolve(repo_type, repo_id, revision), []
        while sha:
            out.append((sha, self.commit(repo_type, repo_id, sha)))
            sha = out[-1][1]["parent"]
        return out


# -----------------------------------------------------------------------------
# HTTP: routes -> handler methods

REPO_API = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, regex on the still-quoted path, handler name)
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),  # huggingface_hub's user-agent builder asks once a day
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", REPO_API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", REPO_API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", REPO_API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", REPO_API + r"/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", REPO_API + r"/refs", "refs"),
    ("GET", REPO_API + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ("GET", REPO_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", REPO_API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET HEAD", r"/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
     "resolve"),
]
WRITE_ROUTES = {"create_repo", "preupload", "commit", "create_branch"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer carries Content-Length
    server: "_Server"

    def log_message(self, *args):  # quiet; the test reads hub.requests instead
        pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    # --- plumbing ---

    def dispatch(self, method: str):
        hub: HubServer = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.read_body()
        if url.path == "/_admin/faults":  # fault injection over HTTP, for a server in another process
            if method == "POST":
                hub.inject_fault(**json.loads(self.body))
            else:
                hub.clear_faults()
            return self.send_json(200, {"faults": len(hub.faults)})
        fault = hub.take_fault(method, url.path)
        if fault is not None:
            hub.requests.append((method, url.path, fault["mode"]))
            if hub.verbose:
                print(f"{method} {self.path} -> injected fault: {fault['mode']} {fault['status']}", flush=True)
            if fault["mode"] == "hang":
                time.sleep(fault["delay"])
            if fault["mode"] in ("close", "hang"):
                self.close_connection = True  # no answer at all: the client sees the connection drop
                return
            return self.send_json(fault["status"], {"error": f"injected fault {fault['status']}"})
        try:
            for methods, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and method in methods.split():
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "repo" in args:
                        args["type"] = args.get("type", "models")[:-1]  # "models" -> "model"
                    self.check_auth(name, args)
                    status = getattr(self, name)(**args)
                    break
            else:
                raise ApiError(404, f"no such endpoint: {method} {url.path}")
        except ApiError as e:
            status = e.status
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self.send_json(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug in this server: answer 500 and show it, rather than drop the connection
            traceback.print_exc()
            status = self.send_json(500, {"error": f"test server bug: {e!r}"})
        hub.requests.append((method, url.path, status))
        if hub.verbose:
            print(f"{method} {self.path} -> {status}", flush=True)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, status: int, obj, headers: dict | None = None) -> int:
        headers = {"Content-Type": "application/json", **(headers or {})}
        return self.send_bytes(status, json.dumps(obj).encode(), headers)

    def send_bytes(self, status: int, data: bytes, headers: dict | None = None) -> int:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the headers of a GET, never a body (even for errors)
            self.wfile.write(data)
        return status

    def token_role(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        tokens = self.server.hub.tokens
        return "write" if tokens is None else tokens.get(token)

    def check_auth(self, name: str, args: dict):
        """Writes need a write token; private repos are invisible (404) without a valid token."""
        role = self.token_role()
        if name in WRITE_ROUTES or name == "whoami":
            if role is None:
                raise ApiError(401, "Invalid credentials in Authorization header")
            if role != "write" and name != "whoami":
                raise ApiError(403, "You don't have the rights to write to this repository (read-only token)")
        elif "repo" in args and role is None and self.server.hub.store.repo(args["type"], args["repo"])["private"]:
            raise ApiError(404, f"Repository {args['repo']} not found", "RepoNotFound")

    def json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.server.hub.url}/{prefix}{repo_id}"

    # --- endpoints ---

    def whoami(self):
        hub = self.server.hub
        role = self.token_role()
        return self.send_json(200, {"type": "user", "name": hub.user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": role}}})

    def agent_harnesses(self):
        return self.send_json(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self):
        body = self.json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in ("model", "dataset", "space"):
            raise ApiError(400, f"this test server only hosts model, dataset and space repos, not {repo_type!r}")
        if repo_type == "space" and not body.get("sdk"):  # as the Hub: a Space says what runs it
            raise ApiError(400, "a Space needs an sdk (gradio, docker, static)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", body.get("name") or ""):
            raise ApiError(400, f"invalid repo name {body.get('name')!r}")
        repo_id = f"{body.get('organization') or self.server.hub.user}/{body['name']}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        created = self.server.hub.store.create_repo(repo_type, repo_id, private)
        answer = {"url": self.repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id}
        if not created:
            answer["error"] = f"You already created this {repo_type} repo"
        return self.send_json(200 if created else 409, answer)

    def validate_yaml(self):
        errors, warnings = validate_card_metadata(self.json_body().get("content", ""))
        status = 400 if errors else 200
        return self.send_json(status, {"errors": [{"message": m} for m in errors],
                                       "warnings": [{"message": m} for m in warnings]})

    def repo_info(self, type, repo, rev="main"):
        store = self.server.hub.store
        sha, files = store.files(type, repo, rev)
        commit = store.commit(type, repo, sha)
        return self.send_json(200, {
            "id": repo, "author": repo.split("/")[0], "sha": sha, "private": store.repo(type, repo)["private"],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit["date"])),
            "tags": [], "downloads": 0, "likes": 0, "siblings": [{"rfilename": p} for p in files]})

    def preupload(self, type, repo, rev):
        store = self.server.hub.store
        try:
            files = store.files(type, repo, rev)[1]
        except ApiError as e:  # a new branch has no files yet (it is created before the commit)
            if e.code != "RevisionNotFound":
                raise
            files = {}
        wanted = self.json_body().get("files", [])
        return self.send_json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in wanted]})

    def commit(self, type, repo, rev):
        if self.query.get("create_pr"):
            raise ApiError(400, "this test server does not do pull requests")
        header, added, deleted = {}, {}, []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                raise ApiError(400, f"commit operation {key!r} is not supported by this test server")
        if not header.get("summary"):
            raise ApiError(400, "commit summary is required")
        sha = self.server.hub.store.add_commit(type, repo, rev, header["summary"], added, deleted,
                                               header.get("parentCommit"))
        return self.send_json(200, {"commitOid": sha, "commitUrl": f"{self.repo_url(type, repo)}/commit/{sha}",
                                    "pullRequestUrl": None})

    def create_branch(self, type, repo, rev):
        store = self.server.hub.store
        start = store.resolve(type, repo, self.json_body().get("startingPoint") or "main")
        with store.lock:
            info = store.repo(type, repo)
            if rev in info["refs"]:
                raise ApiError(409, f"Branch {rev} already exists")
            info["refs"][rev] = start
            store.save_repo(type, repo, info)
        return self.send_json(200, {})

    def refs(self, type, repo):
        refs = self.server.hub.store.repo(type, repo)["refs"]
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in refs.items()]
        return self.send_json(200, {"branches": branches, "tags": [], "converts": []})

    def list_commits(self, type, repo, rev):
        history = self.server.hub.store.history(type, repo, rev)
        return self.send_json(200, [
            {"id": sha, "title": c["summary"], "message": "", "authors": [{"user": self.server.hub.user}],
             "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c["date"]))} for sha, c in history])

    def entries(self, files: dict, paths) -> list[dict]:
        """Tree entries for `paths`: files, or directories when some file lies below."""
        store, out = self.server.hub.store, []
        for path in paths:
            if path in files:
                out.append({"type": "file", "oid": files[path], "size": len(store.blob(files[path])), "path": path})
            elif any(p.startswith(path + "/") for p in files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                            "path": path})
        return out

    def tree(self, type, repo, rev, path=""):
        files = self.server.hub.store.files(type, repo, rev)[1]
        path = path.strip("/")
        prefix = path + "/" if path else ""
        below = [p[len(prefix):] for p in files if p.startswith(prefix)]
        if path and not below:
            raise ApiError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        names = set()
        for rest in below:  # immediate children, or (recursive) every file and every folder on the way
            parts = rest.split("/")
            depth = len(parts) if recursive else 1
            names.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        return self.send_json(200, self.entries(files, sorted(names)))

    def paths_info(self, type, repo, rev):
        files = self.server.hub.store.files(type, repo, rev)[1]
        paths = parse_qs(self.body.decode()).get("paths", [])
        return self.send_json(200, self.entries(files, [p.strip("/") for p in paths]))

    def resolve(self, type, repo, rev, path):
        store = self.server.hub.store
        sha, files = store.files(type, repo, rev)
        if path not in files:
            raise ApiError(404, f"Entry not found: {path}", "EntryNotFound")
        data = store.blob(files[path])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{files[path]}"', "Content-Type": "application/octet-stream"}
        return self.send_bytes(200, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is normal, not news
            super().handle_error(request, client_address)


class HubServer:
    """The server in a background thread of this process. `tokens`: {token: "write" | "read"}; None = no auth."""

    def __init__(self, root, tokens: dict | None = None, user: str = "tester", host="127.0.0.1", port=0,
                 verbose: bool = False):
        self.store = Store(root)
        self.tokens, self.user, self.verbose = tokens, user, verbose
        self.faults: list[dict] = []
        self.requests: list[tuple[str, str, object]] = []  # (method, path, status or fault mode)
        self.httpd = _Server((host, port), Handler)  # port 0: the OS picks a free one
        self.httpd.hub = self
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- fault injection ---

    def inject_fault(self, path: str = "", status: int = 500, count: int | None = 1, mode: str = "status",
                     method: str | None = None, delay: float = 5.0):
        """The next `count` requests (None: all) whose path contains `path` fail: mode "status" answers `status`,
        "close" drops the connection without an answer, "hang" waits `delay` s first (a timeout)."""
        assert mode in ("status", "close", "hang"), mode
        with self.store.lock:
            self.faults.append({"path": path, "status": status, "count": count, "mode": mode, "method": method,
                                "delay": delay})

    def clear_faults(self):
        with self.store.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> dict | None:
        with self.store.lock:
            for fault in self.faults:
                if fault["path"] in path and fault["method"] in (None, method):
                    if fault["count"] is not None:
                        fault["count"] -= 1
                        if fault["count"] == 0:
                            self.faults.remove(fault)
                    return fault
        return None

    # --- for tests: look at what was pushed ---

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[tuple[str, dict]]:
        return self.store.history(repo_type, repo_id, revision)

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return self.store.blob(self.store.files(repo_type, repo_id, revision)[1][path])

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return list(self.store.files(repo_type, repo_id, revision)[1])


def main():
    parser = argparse.ArgumentParser(description="a loopback Hugging Face Hub look-alike for tests and demos")
    parser.add_argument("--root", required=True, help="directory holding the repos")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", action="append", help="accept this write token (repeatable); default: no auth")
    args = parser.parse_args()
    tokens = {t: "write" for t in args.token} if args.token else None
    with HubServer(args.root, tokens=tokens, host=args.host, port=args.port, verbose=True) as hub:
        print(f"serving {hub.url}  (export HF_ENDPOINT={hub.url})", flush=True)
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
