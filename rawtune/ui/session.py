"""Browser sessions of the app: each gets a private folder, one run directory and a stop switch.

Each browser session gets its own folder under ``RAWTUNE_RUNS`` (default ``./runs``) holding its
uploads and its one run directory; nothing (files, tokens, models in training) is shared between
sessions. A session ends when its page is closed or reloaded (the page's unload event): its
training stops and its folder is deleted once nothing runs in it. Folders left behind (from before
a restart) are deleted by the sweep of folders older than ``RAWTUNE_RUN_TTL_HOURS`` (default 24)
when a new session starts, and by the disk budget (``space.max_disk_bytes``), which deletes the
oldest closed sessions' folders first when an upload, a training or an export needs the room.
Files are handed out as per-request copies, never from the runs folder.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from .. import env
from .. import space
from ..errors import ConfigError
from ..rundir import RunDir
from ..settings import DEFAULT_MODEL

UPLOAD_TYPES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet"]


def runs_root() -> Path:
    return Path(env.get("RAWTUNE_RUNS")).expanduser().resolve()


def default_model() -> str:
    """The model the app offers first (``RAWTUNE_DEFAULT_MODEL``), always allowed in the model box."""
    return env.get("RAWTUNE_DEFAULT_MODEL") or DEFAULT_MODEL


@dataclass
class Session:
    """One browser session's private state: its folder, its run and its stop switch."""

    dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    busy: Optional[str] = None  # what is running now ("training", "export", ...), or None
    closed: bool = False
    upload: Optional[Path] = None  # the uploaded dataset file, copied into the session folder

    @property
    def run(self) -> RunDir:
        return RunDir(self.dir / "run")

    def __deepcopy__(self, memo: dict) -> "Session":
        # Gradio copies a State's initial value; a session holds an Event and must stay one object.
        return self


# Folders of sessions whose page is open or in which something still runs: neither the TTL sweep
# nor the disk budget touches them.
_LIVE: set[Path] = set()
# Each open page's session by Gradio's session hash, for the page's unload event (and for API
# clients, whose State stays empty: they run no page-load event).
_PAGES: dict[str, Session] = {}
_PAGES_LOCK = threading.Lock()
# Uploads, trainings and exports measure the disk and take their room one at a time.
_DISK = threading.Lock()


def _measure(path: Path) -> Optional[space.Folder]:
    """A session folder's size in bytes and newest modification time (None if it vanished)."""
    try:
        stats = [path.lstat()] + [p.lstat() for p in path.rglob("*")]
    except OSError:
        return None
    return space.Folder(path, max(s.st_mtime for s in stats),
                        sum(s.st_size for s in stats if stat.S_ISREG(s.st_mode)), path.resolve() not in _LIVE)


def _session_folders(root: Path) -> list[space.Folder]:
    if not root.is_dir():
        return []
    found = (_measure(p) for p in root.iterdir() if p.is_dir() and p.name.startswith("session-"))
    return [f for f in found if f is not None]


def cleanup_old_runs(root: Path, max_age_s: float, live: Optional[set[Path]] = None) -> list[Path]:
    """Delete session folders under ``root`` not modified for ``max_age_s`` seconds, except those
    of sessions still open (``live``, default: this process's open sessions)."""
    keep = {p.resolve() for p in (_LIVE if live is None else live)}
    now = time.time()
    removed = []
    for folder in _session_folders(root):
        if folder.path.resolve() not in keep and now - folder.modified > max_age_s:
            shutil.rmtree(folder.path, ignore_errors=True)
            removed.append(folder.path)
    return removed


def make_room(need: int, what: str) -> None:
    """Delete the oldest closed sessions' folders until ``need`` more bytes fit in the app's disk
    budget; a :class:`LimitError` naming ``what`` when open sessions leave no room (call under ``_DISK``)."""
    if not space.max_disk_bytes():
        return
    for path in space.evictions(_session_folders(runs_root()), need, what):
        shutil.rmtree(path, ignore_errors=True)


def new_session() -> Session:
    """A fresh session folder (and a sweep of old ones)."""
    root = runs_root()
    ttl = float(env.get("RAWTUNE_RUN_TTL_HOURS")) * 3600
    cleanup_old_runs(root, ttl)
    folder = root / f"session-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    _LIVE.add(folder.resolve())
    return Session(folder)


def _hash(request: Any) -> Optional[str]:
    return getattr(request, "session_hash", None) if request is not None else None


def open_page(request: gr.Request) -> Session:
    """A page has loaded: its new session, kept under Gradio's session hash for :func:`page_closed`.
    It reaches the page's State as this load event's output, so Gradio's own deletion of the State
    (an hour after the page is gone) calls end_session too."""
    session = new_session()
    if _hash(request):
        with _PAGES_LOCK:
            _PAGES[_hash(request)] = session
    return session


def page_closed(request: gr.Request) -> None:
    """The page was closed or reloaded (Gradio's unload event): its session ends."""
    if _hash(request):
        with _PAGES_LOCK:
            session = _PAGES.pop(_hash(request), None)
        end_session(session)


def known(session: Optional[Session], request: Any = None) -> Optional[Session]:
    """The page's session: the State's, else the one kept under the request's session hash."""
    if isinstance(session, Session):
        return session
    with _PAGES_LOCK:
        return _PAGES.get(_hash(request)) if _hash(request) else None


def current(session: Optional[Session], request: Any = None) -> Session:
    """The page's session; an API client (no page-load event, so an empty State) gets one on its
    first call, kept under its session hash. A message to reload the page when Gradio has dropped it."""
    found = known(session, request)
    if found is None and _hash(request):
        with _PAGES_LOCK:
            found = _PAGES.get(_hash(request)) or _PAGES.setdefault(_hash(request), new_session())
    if found is None:
        raise gr.Error("This page's session has expired: reload the page to start a new one.")
    return found


def end_session(session: Optional[Session]) -> None:
    """The session's page is gone: stop its training and delete its folder once idle."""
    if not isinstance(session, Session):
        return
    session.closed = True
    session.stop.set()
    if session.run.path.is_dir():
        session.run.stop_file.touch()
    if session.busy is None:
        _delete(session)


def _delete(session: Session) -> None:
    shutil.rmtree(session.dir, ignore_errors=True)
    _LIVE.discard(session.dir.resolve())


def claim(session: Session, what: str) -> None:
    """Mark the session busy with ``what``; one long task at a time per session."""
    if session.busy:
        raise gr.Error(f"Wait for the {session.busy} to finish (or stop it) before starting the {what}.")
    session.busy = what


def release(session: Session) -> None:
    """The long task ended; a session closed meanwhile is deleted now."""
    session.busy = None
    if session.closed:
        _delete(session)


def fresh_run(session: Session) -> RunDir:
    """An empty run directory for a new training (a session holds one run), if the disk budget
    has room for one."""
    shutil.rmtree(session.run.path, ignore_errors=True)
    with _DISK:
        make_room(0, "a new training")
    session.run.path.mkdir(parents=True, exist_ok=True)
    return session.run


def room_for_export() -> None:
    """Refuse an export while the disk budget is used up (after deleting closed sessions)."""
    with _DISK:
        make_room(0, "an export")


def keep_upload(session: Session, upload: Optional[str]) -> Optional[Path]:
    """Copy an upload into the session's own folder under its original name (the suffix matters)."""
    if not upload:
        session.upload = None
        return None
    if session.closed:  # a load that waited in the pool past its page's end: nothing to keep
        raise ConfigError("This page's session has ended: reload the page to start a new one")
    path = Path(upload)
    if path.suffix.lower() not in UPLOAD_TYPES:
        raise ConfigError(f"{path.name}: unsupported file type; upload one of {', '.join(UPLOAD_TYPES)}")
    space.check_upload(path)
    folder = session.dir / "uploads"
    target = folder / re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    with _DISK:
        # The new upload replaces the session's earlier ones, so their bytes count as free.
        kept = sum(p.stat().st_size for p in folder.glob("*") if p.is_file()) if folder.is_dir() else 0
        make_room(max(path.stat().st_size - kept, 0), f"your upload {path.name}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copyfile(path, target)
    session.upload = target
    return target


def hand_out(path: Path) -> Optional[Path]:
    """A copy of ``path`` in a fresh temporary folder for this one request. Gradio serves files it
    was handed by a handler; the runs folder itself is never opened to the file route."""
    if not path.is_file():
        return None
    folder = Path(tempfile.mkdtemp(prefix="rawtune-file-"))
    return Path(shutil.copy2(path, folder / path.name))


def visitor(request: Any) -> Optional[str]:
    """Who sent ``request``, for the limits per visitor: the signed-in user (Gradio's own login or
    a Space's Hugging Face login), else the client's address; None without a request (a direct
    call from Python). Gradio gives the address of whoever connected; on a Space that is the
    Space's proxy, for every visitor, so there the address the proxy forwarded is used."""
    if request is None:
        return None
    user = getattr(request, "username", None) or _hub_login(request)
    if user:
        return f"user:{user}"
    host = (_forwarded(request) if space.on_spaces() else None) or getattr(getattr(request, "client", None), "host", None)
    return f"address:{host}" if host else None


def _forwarded(request: Any) -> Optional[str]:
    """The first address of the request's X-Forwarded-For header (the visitor, as a Space's proxy
    reports it)."""
    headers = getattr(request, "headers", None)
    value = headers.get("x-forwarded-for") if headers is not None else None
    return value.split(",")[0].strip() or None if value else None


def _hub_login(request: Any) -> Optional[str]:
    """The username of a Space's "Sign in with Hugging Face" login, read from the request's
    session (present only where that login is set up)."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else None
    info = (session or {}).get("oauth_info") or {}
    return (info.get("userinfo") or {}).get("preferred_username")


def visitor_token(token_text: Optional[str], oauth_token: Any) -> Any:
    """The Hub token for this request: the pasted token or the visitor's Space login. The
    machine's own token (HF_TOKEN, hf CLI) only where the app is not shared or its owner
    allows it; otherwise False, which the Hub clients read as "send no token". Never stored."""
    from ..hubauth import resolve_token

    return resolve_token(token_text or None, oauth_token, allow_ambient=space.allow_owner_token())


def estimate_model(session: Session, model: Optional[str]) -> str:
    """The model whose tokenizer and size the estimate may read (the default one when the box
    names something this visitor may not read)."""
    try:
        return space.guard_source(model or "", session.dir, "model", (default_model(),)) or default_model()
    except ConfigError:
        return default_model()
