"""The run directory: how stages hand off to each other.

A run directory holds ``run.json`` (resolved settings, versions, data report, metrics and each
stage's results) next to the files stages write: ``data/`` (packed token blocks), ``adapter/``,
``checkpoints/``, ``merged/``, ``gguf/``. ``run.json`` is rewritten atomically so a crash never
leaves it half-written, and never holds a token. Every stage that writes a run directory holds its
lock (an ``flock`` on ``.lock``), so two processes never mix up one run; the kernel drops the lock
when its process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, RawtuneError, StageMissing

try:
    import fcntl
except ImportError:  # Windows has no flock: there only one task of this process is kept out
    fcntl = None

RUN_FILE = "run.json"
# The file each training loop writes last into a checkpoint, the one its resume reads the step from.
CHECKPOINT_STATES = {"trainer": "trainer_state.json", "fast": "fastloop_state.pt"}
LOCK_FILE = ".lock"
# Every kind of Hugging Face token: user access tokens (hf_...), OAuth access tokens handed out
# by a Space login (hf_oauth_..., with underscores inside), and legacy organisation tokens
# (api_org_...). An Authorization header value is masked whatever the token looks like.
TOKEN_RE = re.compile(r"(?:hf_(?:oauth_)?|api_org_)[A-Za-z0-9_-]{8,}|(?i:\bbearer\s+)[^\s'\",]+")
_SECRET_KEYS = {"token", "hf_token", "oauth_token", "password", "authorization"}


def scrub(value: Any) -> Any:
    """Return ``value`` with secret-looking keys dropped and token-like strings masked."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in _SECRET_KEYS}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return TOKEN_RE.sub(_mask, value)
    return value


def _mask(match: "re.Match[str]") -> str:
    text = match.group(0)
    return text.split()[0] + " ***" if text[:6].lower() == "bearer" else "hf_***"


# The kind of value each stage reads from run.json: every top-level section is an object, and these
# fields inside them are read without further checks. An edited or damaged file is refused at load.
SECTION_FIELDS: dict[str, dict[str, type]] = {
    "settings": {}, "versions": {}, "model": {"spec": str, "local_dir": str}, "data": {"train_blocks": int},
    "train": {"steps": int, "max_steps": int, "history": list}, "metrics": {}, "merge": {}, "export": {},
    "gguf": {}, "hub": {},
}
_KIND_NAMES = {str: "text", int: "a whole number", list: "a list", dict: "an object"}


def _wrong_type(record: dict) -> str:
    """What in a run.json record has the wrong kind of value ('' when nothing)."""
    for section, inner in SECTION_FIELDS.items():
        value = record.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            return f"'{section}' must be an object, not {json.dumps(value)[:40]}"
        for name, kind in inner.items():
            item = value.get(name)
            if item is not None and (not isinstance(item, kind) or isinstance(item, bool)):
                return f"'{section}.{name}' must be {_KIND_NAMES[kind]}, not {json.dumps(item)[:40]}"
    return ""


class RunBusy(RawtuneError):
    """Another rawtune process (or another task of this one) is writing the run directory."""


class RunDirUnwritable(RawtuneError):
    """The run directory cannot be made or written: a file in its place, no permission, a full disk."""


def unwritable(path: Path, exc: OSError) -> RunDirUnwritable:
    """The one-line error for a run directory that could not be written."""
    if path.exists() and not path.is_dir():
        return RunDirUnwritable(f"the run directory {path} is a file, not a folder; give --out a folder "
                                "(it is made if missing)")
    return RunDirUnwritable(f"cannot write the run directory {path} ({exc.strerror or exc}); give --out a "
                            "folder you can write to, with free disk space")


# Locks this process holds: resolved path -> [thread id, depth, fd]. A thread may take its own
# lock again (run_pipeline -> run_stage); another thread of the same process may not.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def runs_in_use() -> int:
    """How many run directories this process holds locked now (stages still writing)."""
    with _HELD_GUARD:
        return len(_HELD)


class RunDir:
    """A run directory and its ``run.json``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # Well-known locations, so stages agree on where things live.
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self, complete: bool = False) -> list[Path]:
        """The ``checkpoints/checkpoint-N`` folders, oldest step first (half-written ones are hidden);
        ``complete``: only those holding a loop's state file (what a resume reads), so a folder left
        by an older rawtune that wrote in place, or by a hand copy, is never resumed from."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
        if complete:
            found = [(n, p) for n, p in found if any((p / name).is_file() for name in CHECKPOINT_STATES.values())]
        return [p for _, p in sorted(found)]

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.path / "gguf"

    @property
    def stop_file(self) -> Path:
        """Creating this file asks a running training to stop after the current step."""
        return self.path / "STOP"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @contextmanager
    def lock(self) -> Iterator["RunDir"]:
        """Hold the run directory exclusively, or raise :class:`RunBusy` at once."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(self.path, exc) from None
        key, me = str(self.path.resolve()), threading.get_ident()
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held and held[0] != me:
                raise RunBusy(f"another task of this rawtune process (pid {os.getpid()}) is using {self.path}; "
                              "wait for it to finish")
            if held:
                held[1] += 1
            else:
                _HELD[key] = [me, 1, self._acquire()]
        try:
            yield self
        finally:
            with _HELD_GUARD:
                held = _HELD[key]
                held[1] -= 1
                if held[1] == 0:
                    del _HELD[key]
                    os.close(held[2])  # closing the descriptor releases the flock

    def _acquire(self) -> int:
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise unwritable(self.path, exc) from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunBusy(f"another rawtune process (pid {holder}) is using {self.path}; wait for it to "
                          "finish, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    def exists(self) -> bool:
        return self.run_file.is_file()

    def has_adapter(self) -> bool:
        """Whether training (finished or stopped) has left a LoRA adapter to use."""
        return (self.adapter_dir / "adapter_config.json").is_file()

    def load(self) -> dict[str, Any]:
        """Read run.json (an empty dict when the run has not started)."""
        if not self.run_file.is_file():
            return {}
        try:
            record = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
            raise ConfigError(f"{self.run_file} is damaged (not valid JSON{where}); restore it, or delete "
                              f"{self.path} and train again") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{self.run_file} is damaged (not a JSON object); restore it, or delete "
                              f"{self.path} and train again")
        wrong = _wrong_type(record)
        if wrong:
            raise ConfigError(f"{self.run_file} is damaged ({wrong}); restore it, or delete {self.path} and "
                              "train again")
        return record

    def require(self, key: str, stage: str) -> Any:
        """Return ``run.json[key]`` or explain which stage must run first."""
        record = self.load()
        if key not in record:
            raise StageMissing(
                f"{self.path} has no '{key}' yet: run `rawtune {stage} ...` on it first"
            )
        return record[key]

    def update(self, **sections: Any) -> dict[str, Any]:
        """Merge top-level sections into run.json and write it atomically."""
        record = self.load()
        record.update(scrub(sections))
        tmp = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".run.", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2, sort_keys=False, default=str)
                handle.write("\n")
            os.replace(tmp, self.run_file)
        except OSError as exc:  # run.json stays as it was
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise unwritable(self.path, exc) from None
        return record
