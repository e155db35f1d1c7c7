"""A small Hugging Face Hub emulator for tests: a real HTTP server on 127.0.0.1.

The Hub is unreachable from the test machines, so the tests run the real ``huggingface_hub`` and
``datasets`` clients against this server instead. It speaks the subset of the Hub's HTTP API those
clients use for what rawtune does:

- ``GET /api/whoami-v2`` (token role ``read``, ``write`` or ``contribute``: an app's OAuth token with the
  contribute-repos scope, which creates repos and writes only those it created),
- ``POST /api/repos/create``, ``GET /api/{models,datasets}/{id}[/revision/{rev}]``,
- ``GET .../auth-check``, ``POST /api/validate-yaml``, ``POST .../preupload/{rev}``, ``POST .../commit/{rev}`` (NDJSON),
- the Git LFS batch API with the ``basic`` transfer (PUT upload + verify),
- ``GET .../tree/{rev}/{path}``, ``POST .../paths-info/{rev}``, ``GET .../commits/{rev}``,
- ``HEAD``/``GET /{datasets/}{id}/resolve/{rev}/{path}`` with byte ranges,
- HF Jobs: ``POST /api/jobs/{namespace}`` (run), ``GET /api/jobs/{namespace}/{id}`` (inspect), the
  server-sent-events log stream ``GET .../{id}/logs`` and ``POST .../{id}/cancel``. A job RUNS for real,
  as a local subprocess of its command with the job's environment and secrets, its Hub clients pointed
  at this emulator and this checkout's rawtune importable (the image is ignored); its output lines are
  the log events, and its exit code sets the stage (RUNNING -> COMPLETED or ERROR; CANCELED on cancel).

It enforces private repos (owner or org member only), gated repos (granted users only) and write
rights (a ``write`` token on its own namespace), with the status codes and ``X-Error-Code``
headers the real Hub sends, so client-side error mapping is exercised for real. Every commit is
kept as a full snapshot, so tests can count commits and read back any file.

Upload of LFS files uses the legacy LFS protocol, not Xet: :func:`point_clients_at` turns Xet
off in ``huggingface_hub`` while it is active.

Use it from tests through the ``hub_server`` fixture in ``conftest.py``, or directly::

    with HubEmulator() as hub, point_clients_at(hub, cache_dir):
        hub.add_token(WRITE_TOKEN, "alice", "write")
        ...
    # a subprocess (e.g. the Gradio app under a browser test) gets hub.client_env()
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

CHECKOUT = Path(__file__).resolve().parents[1]  # the rawtune a job runs (its image is ignored)

# Tokens the seeded emulator knows (see seed_default). They look like real tokens on purpose, so
# rawtune's token scrubbing is exercised too.
WRITE_TOKEN = "hf_emuAliceWrite000000000000000000"  # alice, may write to alice/* and org acme/*
READ_TOKEN = "hf_emuAliceRead0000000000000000000"  # alice, read-only
BOB_TOKEN = "hf_emuBobWrite00000000000000000000"  # bob, write on bob/* only
# alice signed in to the app (OAuth scopes read-repos + contribute-repos): creates repos, writes only those
OAUTH_TOKEN = "hf_oauth_emuAliceApp00000000000000"

# Suffixes the Hub's default .gitattributes routes through LFS (plus .gguf, which the Hub treats
# as LFS as well); any binary or large file is LFS too, as on the real Hub.
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow",
                ".npy", ".npz", ".onnx", ".h5", ".msgpack", ".model", ".zip", ".gz", ".tar", ".zst")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The Git LFS pointer file stored in git for an LFS file."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Token:
    """A user access token the emulator accepts."""

    user: str
    role: str = "write"  # "read", "write", or "contribute" (an OAuth app's contribute-repos scope)
    orgs: tuple[str, ...] = ()
    value: str = ""  # the token itself (which repos a contribute-repos token created)


@dataclass
class Commit:
    """One commit: a full snapshot of the repo's files after it."""

    oid: str
    title: str
    description: str
    author: str
    date: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored through LFS


@dataclass
class Repo:
    """A repo and its history (a single branch, ``main``)."""

    repo_type: str  # model or dataset
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users who accepted a gated repo's terms
    commits: list[Commit] = field(default_factory=list)
    created_at: str = field(default_factory=_now)
    created_by: Optional[str] = None  # the token that created it through the API (contribute-repos writes only these)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: Optional[str]) -> Optional[Commit]:
        """The commit a revision names: main, or a (prefix of a) commit id."""
        if revision in (None, "", "main"):
            return self.head
        for commit in self.commits:
            if len(revision) >= 7 and commit.oid.startswith(revision):
                return commit
        return None


@dataclass
class Job:
    """An HF Job: the spec as posted (secrets included, for tests to check) and its process."""

    id: str
    owner: str
    spec: dict
    stage: str = "RUNNING"
    message: Optional[str] = None
    lines: list[str] = field(default_factory=list)  # its output so far, one log event each
    created_at: str = field(default_factory=_now)
    process: Optional[subprocess.Popen] = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def ended(self) -> bool:
        return self.stage not in ("RUNNING", "SCHEDULING")

    def info(self) -> dict:
        """The job as the Hub describes it; secret values are never sent back."""
        image = {"spaceId": self.spec["spaceId"]} if "spaceId" in self.spec else {"dockerImage": self.spec.get("dockerImage")}
        return {"id": self.id, "createdAt": self.created_at, **image,
                "owner": {"id": hashlib.sha1(self.owner.encode()).hexdigest()[:24], "name": self.owner, "type": "user"},
                "command": self.spec.get("command"), "arguments": self.spec.get("arguments", []),
                "environment": self.spec.get("environment", {}),
                "secrets": {k: None for k in self.spec.get("secrets", {})},
                "flavor": self.spec.get("flavor"), "labels": self.spec.get("labels", {}),
                "status": {"stage": self.stage, "message": self.message}}


class HubError(Exception):
    """An HTTP error the emulator answers with (status, X-Error-Code, message)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubEmulator:
    """An in-memory Hub served over HTTP on 127.0.0.1 (a random free port)."""

    def __init__(self) -> None:
        self.tokens: dict[str, Token] = {}
        self.repos: dict[tuple[str, str], Repo] = {}
        # (repo_type, repo_id) -> sha256 -> content: LFS objects belong to a repo, as with Git LFS.
        self.lfs_store: dict[tuple[str, str], dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for debugging
        self.fail_uploads = False  # when True, LFS uploads fail (a broken storage backend)
        self.jobs: dict[str, Job] = {}
        self._job_folders: list[Path] = []  # each job's working folder, removed by stop()
        self.lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubEmulator":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for job in self.jobs.values():
            self.cancel_job(job)
        for folder in self._job_folders:
            shutil.rmtree(folder, ignore_errors=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "HubEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def client_env(self, cache_dir: Optional[str | os.PathLike] = None) -> dict[str, str]:
        """Environment for a subprocess whose Hub clients should talk to this emulator.

        With ``cache_dir``, the Hugging Face caches (and the stored login) live there too.
        """
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
        if cache_dir is not None:
            cache = Path(cache_dir)
            env.update({"HF_HOME": str(cache / "hf"), "HF_HUB_CACHE": str(cache / "hub"),
                        "HF_DATASETS_CACHE": str(cache / "datasets")})
        return env

    # ------------------------------------------------------------ test-side API (no HTTP)

    def start_job(self, owner: str, spec: dict) -> Job:
        """Run a job's command as a local subprocess in a folder of its own (see the module docstring)."""
        job = Job(secrets.token_hex(12), owner, spec)
        folder = Path(tempfile.mkdtemp(prefix=f"hf-job-{job.id}-"))
        self._job_folders.append(folder)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(self.client_env(folder / "cache"))
        env["RAWTUNE_CACHE"] = str(folder / "cache" / "rawtune")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        env.update({k: str(v) for k, v in spec.get("environment", {}).items()})
        env.update({k: str(v) for k, v in spec.get("secrets", {}).items()})
        job.process = subprocess.Popen([*spec["command"], *spec.get("arguments", [])], cwd=folder, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
        self.jobs[job.id] = job
        threading.Thread(target=self._pump, args=(job,), name=f"hf-job-{job.id}", daemon=True).start()
        return job

    def _pump(self, job: Job) -> None:
        """Each output line becomes a log event; the exit code ends the job (after its last line)."""
        assert job.process is not None and job.process.stdout is not None
        for line in job.process.stdout:
            with job.changed:
                job.lines.append(line.rstrip("\n"))
                job.changed.notify_all()
        code = job.process.wait()
        with job.changed:
            if job.stage == "RUNNING":
                job.stage, job.message = ("COMPLETED", None) if code == 0 else ("ERROR", f"exit code {code}")
            job.changed.notify_all()

    def cancel_job(self, job: Job) -> None:
        with job.changed:
            if job.ended:
                return
            job.stage, job.message = "CANCELED", "canceled by the user"
            job.changed.notify_all()
        if job.process is not None and job.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGTERM)

    def add_token(self, token: str, user: str, role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = Token(user, role, tuple(orgs), token)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    gated: bool = False, files: Optional[dict[str, bytes | str]] = None) -> Repo:
        """Create a repo with its initial commit, then one commit holding ``files`` if given."""
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise ValueError(f"{repo_type} {repo_id} exists already")
            repo = Repo(repo_type, repo_id, private=private, gated=gated)
            self.repos[key] = repo
            self._commit(repo, {".gitattributes": GITATTRIBUTES}, "initial commit", "", repo.owner)
            if files:
                data = {p: (c.encode() if isinstance(c, str) else c) for p, c in files.items()}
                self._commit(repo, data, "Upload files", "", repo.owner)
            return repo

    def add_commit(self, repo_id: str, files: dict[str, bytes | str], repo_type: str = "model",
                   message: str = "Update files") -> str:
        """Commit ``files`` directly (as if someone pushed from elsewhere); returns the commit id."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            data = {p: (c.encode() if isinstance(c, str) else c) for p, c in files.items()}
            return self._commit(repo, data, message, "", repo.owner).oid

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"the emulator has no {repo_type} repo {repo_id}") from None

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self.repos

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """All commits of a repo, oldest first (the first is the Hub's 'initial commit')."""
        return list(self.repo(repo_id, repo_type).commits)

    def files(self, repo_id: str, repo_type: str = "model", revision: Optional[str] = None) -> dict[str, bytes]:
        """Every file at a revision (default: main), as path -> bytes."""
        commit = self.repo(repo_id, repo_type).at(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision}")
        return dict(commit.files)

    def read(self, repo_id: str, path: str, repo_type: str = "model", revision: Optional[str] = None) -> bytes:
        return self.files(repo_id, repo_type, revision)[path]

    # ------------------------------------------------------------ internals

    def _commit(self, repo: Repo, additions: dict[str, bytes], title: str, description: str,
                author: str, deletions: tuple[str, ...] = (), lfs_paths: tuple[str, ...] = ()) -> Commit:
        files = dict(repo.commits[-1].files) if repo.commits else {}
        lfs = set(repo.commits[-1].lfs) if repo.commits else set()
        for path in deletions:
            if path.endswith("/"):
                for p in [p for p in files if p.startswith(path)]:
                    files.pop(p)
                    lfs.discard(p)
            else:
                files.pop(path, None)
                lfs.discard(path)
        for path, data in additions.items():
            files[path] = data
            if path in lfs_paths or _is_lfs(path, data):
                lfs.add(path)
            else:
                lfs.discard(path)
        seed = f"{repo.repo_id}:{len(repo.commits)}:{title}:{time.time_ns()}:{secrets.token_hex(4)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, description, author, _now(), files, lfs)
        repo.commits.append(commit)
        return commit

    def token_of(self, authorization: Optional[str]) -> Optional[Token]:
        """The token in an Authorization header; an unknown token is a 401 as on the Hub."""
        if not authorization:
            return None
        value = authorization.split(" ", 1)[-1].strip()
        token = self.tokens.get(value)
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def readable(self, repo_type: str, repo_id: str, token: Optional[Token]) -> Repo:
        """The repo if this token may see it; missing and private-without-access look the same."""
        repo = self.repos.get((repo_type, repo_id))
        visible = repo is not None and (
            not repo.private or (token is not None and (token.user == repo.owner or repo.owner in token.orgs)))
        if not visible:
            # The Hub answers 401 to anonymous callers and 404 to authenticated ones, both RepoNotFound.
            status = 401 if token is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def check_gate(self, repo: Repo, token: Optional[Token]) -> None:
        if not repo.gated:
            return
        if token is None:
            raise HubError(401, f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have "
                           "access to it and be authenticated to access it. Please log in.", "GatedRepo")
        if token.user != repo.owner and token.user not in repo.granted:
            raise HubError(403, f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are not in "
                           "the authorized list. Visit the repo page to ask for access.", "GatedRepo")

    def check_write(self, namespace: str, token: Optional[Token], what: str, repo: Optional[Repo] = None) -> None:
        """Write access as the Hub grants it. A contribute-repos token (an OAuth app's least privilege)
        may create repos in its user's namespace and write only to the repos it created."""
        if token is None:
            raise HubError(401, "You must be authenticated to " + what)
        own = namespace == token.user or namespace in token.orgs
        created_here = repo is None or (repo.created_by is not None and repo.created_by == token.value)
        allowed = own and (token.role == "write" or (token.role == "contribute" and namespace == token.user
                                                      and created_here))
        if not allowed:
            raise HubError(403, f"You don't have the rights to {what} under the namespace \"{namespace}\"")


def _is_lfs(path: str, data: bytes) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or b"\0" in data[:512]


def _card_tags(readme: bytes) -> list[str]:
    """The ``tags`` of a README's YAML metadata (the Hub lists a repo under them)."""
    text = readme.decode("utf-8", "replace")
    if not text.startswith("---"):
        return []
    import yaml

    try:
        tags = (yaml.safe_load(text.split("---", 2)[1]) or {}).get("tags") or []
    except Exception:
        return []
    return [str(t) for t in tags] if isinstance(tags, list) else [str(tags)]


def _split_repo(parts: list[str]) -> tuple[str, str, list[str]]:
    """(repo_type, repo_id, rest) from URL segments after an optional 'datasets'/'models' prefix."""
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces", "models"):
        repo_type = {"datasets": "dataset", "spaces": "space", "models": "model"}[parts[0]]
        parts = parts[1:]
    if len(parts) < 2:
        raise HubError(404, "Not found")
    return repo_type, f"{parts[0]}/{parts[1]}", parts[2:]


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the emulator."""

    hub: HubEmulator
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        return

    # ------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict[str, str]] = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _json(self, value: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _error(self, exc: HubError) -> None:
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self._send(exc.status, json.dumps({"error": exc.message}).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        parts = [unquote(p) for p in split.path.split("/") if p != ""]
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            if parts[:2] == ["api", "jobs"] and len(parts) >= 3:
                # Outside the lock: a log stream lasts as long as its job, whose own Hub calls come here too.
                with self.hub.lock:
                    token = self.hub.token_of(self.headers.get("Authorization"))
                return self._jobs(parts[2:], token, body)
            with self.hub.lock:
                token = self.hub.token_of(self.headers.get("Authorization"))
                self._route(parts, token, body)
        except HubError as exc:
            self._error(exc)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _route(self, parts: list[str], token: Optional[Token], body: bytes) -> None:
        method = self.command
        if parts[:2] == ["api", "whoami-v2"]:
            return self._whoami(token)
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(token, json.loads(body or b"{}"))
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if parts == ["api", "models"] and method == "GET":
            return self._list_models(token)
        if parts[:1] == ["lfs-upload"] and method == "PUT":
            # /lfs-upload/{repo_type}/{namespace}/{name}/{oid}
            if self.hub.fail_uploads:
                raise HubError(400, "simulated storage failure")
            key, oid = (parts[1], f"{parts[2]}/{parts[3]}"), parts[4]
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "uploaded content does not match its oid")
            self.hub.lfs_store.setdefault(key, {})[oid] = body
            return self._send(200)
        if parts[:1] == ["lfs-verify"] and method == "POST":
            info = json.loads(body)
            if info.get("oid") not in self.hub.lfs_store.get((parts[1], f"{parts[2]}/{parts[3]}"), {}):
                raise HubError(404, "object not uploaded")
            return self._json({})
        if parts and parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            repo_type, repo_id, rest = _split_repo(parts[1:])
            return self._api_repo(method, repo_type, repo_id, rest, token, body)
        # Git LFS batch API: /{datasets/}ns/name.git/info/lfs/objects/batch
        if len(parts) >= 5 and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            head = parts[:-4]
            head[-1] = head[-1][: -len(".git")] if head[-1].endswith(".git") else head[-1]
            repo_type, repo_id, _ = _split_repo(head)
            return self._lfs_batch(repo_type, repo_id, token, json.loads(body))
        if "resolve" in parts and method in ("GET", "HEAD"):
            i = parts.index("resolve")
            repo_type, repo_id, _ = _split_repo(parts[:i])
            return self._resolve(repo_type, repo_id, parts[i + 1], "/".join(parts[i + 2:]), token)
        raise HubError(404, f"the Hub emulator has no route for {method} {self.path}")

    # ------------------------------------------------------------ HF Jobs

    def _jobs(self, parts: list[str], token: Optional[Token], body: bytes) -> None:
        namespace, rest = parts[0], parts[1:]
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if namespace != token.user and namespace not in token.orgs:
            raise HubError(403, f"you cannot access jobs in {namespace}")
        if not rest and self.command == "POST":
            if token.role != "write":  # a read token, or an app's token without the jobs scope
                raise HubError(403, "this token may not start jobs (it needs the jobs permission)")
            spec = json.loads(body or b"{}")
            if not spec.get("command") or ("spaceId" not in spec and "dockerImage" not in spec):
                raise HubError(400, "a job needs a command and an image")
            return self._json(self.hub.start_job(namespace, spec).info())
        job = self.hub.jobs.get(rest[0]) if rest else None
        if job is None or job.owner != namespace:
            raise HubError(404, "Job not found")
        if rest[1:] == [] and self.command == "GET":
            return self._json(job.info())
        if rest[1:] == ["cancel"] and self.command == "POST":
            self.hub.cancel_job(job)
            return self._json(job.info())
        if rest[1:] == ["logs"] and self.command == "GET":
            return self._job_logs(job)
        raise HubError(404, f"the Hub emulator has no route for {self.command} {self.path}")

    def _job_logs(self, job: Job) -> None:
        """Server-sent events, one per output line, until the job has ended and every line is sent."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.hub.requests.append((self.command, self.path, 200))

        def event(text: str) -> bytes:
            return f"data: {json.dumps({'timestamp': _now(), 'data': text})}\n\n".encode()

        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped reading
            self.wfile.write(event(f"===== Job started at {job.created_at} ====="))
            while True:
                with job.changed:
                    if sent >= len(job.lines) and not job.ended:
                        job.changed.wait(timeout=10)
                    new, ended = job.lines[sent:], job.ended
                self.wfile.write(b"".join(event(line) for line in new) if new else b": keep-alive\n\n")
                self.wfile.flush()
                sent += len(new)
                if ended and sent >= len(job.lines):
                    return

    # ------------------------------------------------------------ endpoints

    def _whoami(self, token: Optional[Token]) -> None:
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": hashlib.sha1(token.user.encode()).hexdigest()[:24], "name": token.user,
            "fullname": token.user.title(), "email": f"{token.user}@example.com", "emailVerified": True,
            "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in token.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": f"{token.user}-{token.role}", "role": token.role,
                                     "createdAt": "2026-01-01T00:00:00.000Z"}},
        })

    def _create_repo(self, token: Optional[Token], payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or (token.user if token else "")
        repo_id = f"{namespace}/{payload['name']}"
        self.hub.check_write(namespace, token, f"create a {repo_type}")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            return self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_id, repo_type, private=private).created_by = token.value
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except (yaml.YAMLError, IndexError) as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        if errors:
            return self._json({"errors": errors}, 400)
        self._json({"errors": [], "warnings": []})

    def _api_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str],
                  token: Optional[Token], body: bytes) -> None:
        if method in ("GET", "HEAD") and (not rest or rest[0] == "revision"):
            repo = self.hub.readable(repo_type, repo_id, token)
            return self._info(repo, rest[1] if len(rest) > 1 else None)
        if not rest:
            raise HubError(404, "Not found")
        action, revision, sub = rest[0], (rest[1] if len(rest) > 1 else "main"), "/".join(rest[2:])
        if action == "auth-check" and method == "GET":
            repo = self.hub.readable(repo_type, repo_id, token)
            if rest[1:2] == ["write"]:
                self.hub.check_write(repo.owner, token, "write", repo)
            else:
                self.hub.check_gate(repo, token)
            return self._json({})
        if action == "preupload" and method == "POST":
            repo = self.hub.readable(repo_type, repo_id, token)
            self.hub.check_write(repo.owner, token, "upload files", repo)
            return self._preupload(repo, json.loads(body))
        if action == "commit" and method == "POST":
            repo = self.hub.readable(repo_type, repo_id, token)
            self.hub.check_write(repo.owner, token, "commit", repo)
            return self._commit(repo, revision, body, token)
        if action == "tree" and method == "GET":
            repo = self.hub.readable(repo_type, repo_id, token)
            return self._tree(repo, revision, sub)
        if action == "paths-info" and method == "POST":
            repo = self.hub.readable(repo_type, repo_id, token)
            return self._paths_info(repo, revision, parse_qs(body.decode()))
        if action == "commits" and method == "GET":
            repo = self.hub.readable(repo_type, repo_id, token)
            return self._commits(repo, revision)
        raise HubError(404, f"the Hub emulator has no route for {method} {self.path}")

    def _commit_at(self, repo: Repo, revision: Optional[str]) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _info(self, repo: Repo, revision: Optional[str]) -> None:
        commit = self._commit_at(repo, revision)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.owner, "sha": commit.oid, "private": repo.private,
            "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "createdAt": repo.created_at, "lastModified": commit.date,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        readme = commit.files.get("README.md", b"").decode("utf-8", "replace")
        if readme.startswith("---"):
            import yaml

            with contextlib.suppress(Exception):
                info["cardData"] = yaml.safe_load(readme.split("---", 2)[1]) or {}
        self._json(info)

    def _list_models(self, token: Optional[Token]) -> None:
        """GET /api/models?author=&filter=: the model repos this token may see, by author and tag
        (tags from the README's metadata), as ``list_models`` reads them; one page."""
        author, tags = self.query.get("author", [None])[0], set(self.query.get("filter", []))
        found = []
        for (repo_type, repo_id), repo in sorted(self.hub.repos.items()):
            if repo_type != "model" or (author and repo.owner != author):
                continue
            try:
                self.hub.readable(repo_type, repo_id, token)
            except HubError:
                continue
            if tags <= set(_card_tags(repo.head.files.get("README.md", b""))):
                found.append({"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                              "author": repo.owner, "private": repo.private, "tags": _card_tags(
                                  repo.head.files.get("README.md", b"")),
                              "createdAt": repo.created_at, "lastModified": repo.head.date})
        self._json(found)

    def _preupload(self, repo: Repo, payload: dict) -> None:
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].lower().endswith(LFS_SUFFIXES) or f.get("size", 0) >= LFS_MIN_SIZE or b"\0" in sample
            head = repo.head
            oid = None
            if f["path"] in head.files:
                data = head.files[f["path"]]
                oid = hashlib.sha256(data).hexdigest() if f["path"] in head.lfs else git_blob_sha1(data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": repo.head.oid})

    def _lfs_batch(self, repo_type: str, repo_id: str, token: Optional[Token], payload: dict) -> None:
        repo = self.hub.readable(repo_type, repo_id, token)
        if payload.get("operation") == "upload":
            self.hub.check_write(repo.owner, token, "upload files", repo)
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_store.get((repo_type, repo_id), {}):
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{repo_type}/{repo_id}/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{repo_type}/{repo_id}"},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _commit(self, repo: Repo, revision: str, body: bytes, token: Token) -> None:
        if revision != "main":
            raise HubError(400, "the emulator only commits to main")
        header: dict = {}
        additions: dict[str, bytes] = {}
        lfs_paths: list[str] = []
        deletions: list[str] = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.hub.lfs_store.get((repo.repo_type, repo.repo_id), {}).get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                additions[value["path"]] = data
                lfs_paths.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                # huggingface_hub sends a folder's path with its trailing slash
                deletions.append(value["path"].rstrip("/") + "/" if key == "deletedFolder" else value["path"])
        parent = header.get("parentCommit")
        if parent and parent != repo.head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.hub._commit(repo, additions, header.get("summary", ""), header.get("description", ""),
                                  token.user, tuple(deletions), tuple(lfs_paths))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json({"success": True, "commitOid": commit.oid,
                    "commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}"})

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            data = commit.files[path]
            is_lfs = path in commit.lfs
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data),
                                     "oid": git_blob_sha1(lfs_pointer(data) if is_lfs else data)}
            if is_lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": len(lfs_pointer(data))}
        else:
            entry = {"type": "directory", "path": path, "size": 0,
                     "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()}
        if expand:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    def _tree(self, repo: Repo, revision: str, folder: str) -> None:
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        expand = self.query.get("expand", ["false"])[0].lower() == "true"
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{folder} does not exist on \"{revision}\"", "EntryNotFound")
        seen: dict[str, dict] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            # Folders on the way, then the file itself when recursive or directly inside.
            for depth in range(1, len(parts)):
                sub = prefix + "/".join(parts[:depth])
                if sub not in seen and (recursive or depth == 1):
                    seen[sub] = self._entry(commit, sub, expand)
            if recursive or len(parts) == 1:
                seen[path] = self._entry(commit, path, expand)
        self._json(list(seen.values()))

    def _paths_info(self, repo: Repo, revision: str, form: dict[str, list[str]]) -> None:
        commit = self._commit_at(repo, revision)
        expand = form.get("expand", ["False"])[0].lower() == "true"
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files or any(p.startswith(path + "/") for p in commit.files):
                out.append(self._entry(commit, path, expand))
        self._json(out)

    def _commits(self, repo: Repo, revision: str) -> None:
        head = self._commit_at(repo, revision)
        history = repo.commits[: repo.commits.index(head) + 1]
        self._json([{"id": c.oid, "title": c.title, "message": c.description, "date": c.date,
                     "authors": [{"user": c.author}]} for c in reversed(history)])

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, token: Optional[Token]) -> None:
        repo = self.hub.readable(repo_type, repo_id, token)
        self.hub.check_gate(repo, token)
        commit = self._commit_at(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = commit.files[path]
        is_lfs = path in commit.lfs
        etag = hashlib.sha256(data).hexdigest() if is_lfs else git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if is_lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status = 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start_s, _, end_s = wanted[len("bytes="):].partition("-")
            if start_s == "":  # suffix range: the last N bytes
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            else:
                start, end = int(start_s), (int(end_s) if end_s else len(data) - 1)
            end = min(end, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(416, b"", headers)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


# ---------------------------------------------------------------- pointing the clients at it


@contextlib.contextmanager
def point_clients_at(hub: HubEmulator, cache_dir: str | os.PathLike) -> Iterator[HubEmulator]:
    """Make huggingface_hub and datasets (already imported or not) use ``hub`` until exit.

    Both libraries read ``HF_ENDPOINT``, offline mode and cache paths into module constants at
    import time, so setting the environment is not enough once they are imported: the constants
    are switched too, and everything is put back afterwards. Xet is turned off because the
    emulator speaks the LFS protocol; caches go to ``cache_dir`` so runs never see stale files.
    """
    cache = Path(cache_dir)
    env = hub.client_env(cache)
    saved_env = {k: os.environ.get(k) for k in [*env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]}
    os.environ.update(env)
    # A token from the developer's own environment must not leak into tests.
    os.environ.pop("HF_TOKEN", None)
    os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)

    import datasets.config as dconfig
    from huggingface_hub import constants

    patches = [
        (constants, "ENDPOINT", hub.url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True),
        (constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"]),
        (constants, "HF_TOKEN_PATH", str(cache / "hf" / "token")),
        (constants, "HF_STORED_TOKENS_PATH", str(cache / "hf" / "stored_tokens")),
        (dconfig, "HF_ENDPOINT", hub.url),
        (dconfig, "HUB_DATASETS_URL", hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        (dconfig, "HF_HUB_OFFLINE", False),
        (dconfig, "HF_DATASETS_OFFLINE", False),
        (dconfig, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"])),
        (dconfig, "DOWNLOADED_DATASETS_PATH", Path(env["HF_DATASETS_CACHE"]) / "downloads"),
        (dconfig, "EXTRACTED_DATASETS_PATH", Path(env["HF_DATASETS_CACHE"]) / "downloads" / "extracted"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches if hasattr(mod, name)]
    for mod, name, value in patches:
        setattr(mod, name, value)
    _clear_client_caches()
    try:
        yield hub
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_client_caches()


def _clear_client_caches() -> None:
    """Forget cached filesystem instances so none keeps the previous endpoint or token."""
    with contextlib.suppress(Exception):
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()


# ---------------------------------------------------------------- seeded content for tests


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def text_rows(n: int, prefix: str) -> list[dict]:
    """Rows with a text column and a metadata column, each text unique and long enough to keep."""
    words = "the river carries bright stones past old mills while keepers count ships".split()
    return [{"text": f"{prefix} {i}: " + " ".join(words[(i + k) % len(words)] for k in range(12)) + ".",
             "id": i} for i in range(n)]


TWO_CONFIGS_CARD = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: validation
    path: en/validation.jsonl
- config_name: fr
  data_files:
  - split: train
    path: fr/train.jsonl
---
# Two configs

A dataset with an English and a French subset.
"""


def seed_default(hub: HubEmulator) -> HubEmulator:
    """Tokens and datasets the tests share (names are documented beside each line)."""
    hub.add_token(WRITE_TOKEN, "alice", "write", orgs=("acme",))
    hub.add_token(READ_TOKEN, "alice", "read", orgs=("acme",))
    hub.add_token(BOB_TOKEN, "bob", "write")
    hub.add_token(OAUTH_TOKEN, "alice", "contribute")
    # Public, parquet with train and test splits (file names give the splits, as on the Hub).
    hub.create_repo("alice/public-text", "dataset", files={
        "README.md": "---\nlicense: cc-by-4.0\n---\n# Public text\n",
        "data/train-00000-of-00001.parquet": _parquet(text_rows(60, "public train")),
        "data/test-00000-of-00001.parquet": _parquet(text_rows(10, "public test")),
    })
    # Private: only alice's tokens can see it.
    hub.create_repo("alice/private-text", "dataset", private=True, files={
        "train.jsonl": _jsonl(text_rows(30, "private")),
    })
    # Gated: bob is not on the list.
    hub.create_repo("alice/gated-text", "dataset", gated=True, files={
        "README.md": "---\nextra_gated_prompt: Agree to the terms\n---\n# Gated\n",
        "train.jsonl": _jsonl(text_rows(20, "gated")),
    })
    # Two configurations declared in the card's YAML.
    hub.create_repo("alice/two-configs", "dataset", files={
        "README.md": TWO_CONFIGS_CARD,
        "en/train.jsonl": _jsonl(text_rows(25, "english")),
        "en/validation.jsonl": _jsonl(text_rows(5, "english validation")),
        "fr/train.jsonl": _jsonl([{"text": f"texte français numéro {i} avec assez de mots pour rester.", "id": i}
                                  for i in range(15)]),
    })
    # No string column at all.
    hub.create_repo("alice/numbers", "dataset", files={
        "train.jsonl": _jsonl([{"a": i, "b": i * 2.5} for i in range(10)]),
    })
    return hub
