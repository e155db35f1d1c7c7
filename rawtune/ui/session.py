"""Browser sessions of the app: each gets a private folder, one run directory and a stop switch.

Each browser session gets its own folder under ``RAWTUNE_RUNS`` (default ``./runs``) holding its
uploads and its one run directory; nothing (files, tokens, models in training) is shared between
sessions. Folders of closed sessions older than ``RAWTUNE_RUN_TTL_HOURS`` (default 24) are deleted
when a new session starts, and a session's folder is deleted when Gradio drops the session. Files
are handed out as per-request copies, never from the runs folder.
"""

from __future__ import annotations

import os
import re
import shutil
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


# Folders of sessions whose page is still open: the TTL sweep never touches them.
_LIVE: set[Path] = set()


def cleanup_old_runs(root: Path, max_age_s: float, live: Optional[set[Path]] = None) -> list[Path]:
    """Delete session folders under ``root`` not modified for ``max_age_s`` seconds, except those
    of sessions still open (``live``, default: this process's open sessions)."""
    removed = []
    if not root.is_dir():
        return removed
    keep = {p.resolve() for p in (_LIVE if live is None else live)}
    now = time.time()
    for path in root.iterdir():
        if not path.is_dir() or not path.name.startswith("session-") or path.resolve() in keep:
            continue
        try:
            newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def new_session() -> Session:
    """A fresh session folder (and a sweep of old ones)."""
    root = runs_root()
    ttl = float(env.get("RAWTUNE_RUN_TTL_HOURS")) * 3600
    cleanup_old_runs(root, ttl)
    folder = root / f"session-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    _LIVE.add(folder.resolve())
    return Session(folder)


def end_session(session: Optional[Session]) -> None:
    """Gradio dropped the session: stop its training and delete its folder once idle."""
    if not isinstance(session, Session):
        return
    session.closed = True
    _LIVE.discard(session.dir.resolve())
    session.stop.set()
    if session.run.path.is_dir():
        session.run.stop_file.touch()
    if session.busy is None:
        shutil.rmtree(session.dir, ignore_errors=True)


def current(session: Optional[Session]) -> Session:
    """The page's session, or a message to reload the page when Gradio has dropped it."""
    if not isinstance(session, Session):
        raise gr.Error("This page's session has expired: reload the page to start a new one.")
    return session


def claim(session: Session, what: str) -> None:
    """Mark the session busy with ``what``; one long task at a time per session."""
    if session.busy:
        raise gr.Error(f"Wait for the {session.busy} to finish (or stop it) before starting the {what}.")
    session.busy = what


def release(session: Session) -> None:
    """The long task ended; a session closed meanwhile is deleted now."""
    session.busy = None
    if session.closed:
        shutil.rmtree(session.dir, ignore_errors=True)


def fresh_run(session: Session) -> RunDir:
    """An empty run directory for a new training (a session holds one run)."""
    shutil.rmtree(session.run.path, ignore_errors=True)
    session.run.path.mkdir(parents=True, exist_ok=True)
    return session.run


def keep_upload(session: Session, upload: Optional[str]) -> Optional[Path]:
    """Copy an upload into the session's own folder under its original name (the suffix matters)."""
    if not upload:
        session.upload = None
        return None
    path = Path(upload)
    if path.suffix.lower() not in UPLOAD_TYPES:
        raise ConfigError(f"{path.name}: unsupported file type; upload one of {', '.join(UPLOAD_TYPES)}")
    space.check_upload(path)
    target = session.dir / "uploads" / re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
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
