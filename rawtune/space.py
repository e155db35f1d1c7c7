"""What a visitor of a shared rawtune app may do: the decisions, kept apart from the UI.

A *shared* app is one that strangers reach: a Hugging Face Space (``SPACE_ID`` is set) or
``python app.py --share`` (which sets ``RAWTUNE_SHARED=1``). There, by default:

- the machine's own Hub token is never used for a visitor (``RAWTUNE_ALLOW_OWNER_TOKEN=1``
  opts in, for a private single-user Space);
- the dataset and model boxes take Hub ids and the visitor's own uploads only, never a path on
  the server (``RAWTUNE_ALLOW_SERVER_PATHS=1`` opts in);
- uploads are capped (``RAWTUNE_MAX_UPLOAD_MB``), reading stops at ``RAWTUNE_MAX_CHARS``
  characters, and Hub datasets are streamed instead of downloaded whole;
- a Hub model is downloaded only up to ``RAWTUNE_MAX_MODEL_GB``, checked on its file list first;
- each training gets a budget (``RAWTUNE_MAX_TRAIN_MINUTES``, ``RAWTUNE_MAX_TRAIN_STEPS``) and
  waits its turn for the GPU in :class:`GpuSlot`, which exports and Compare share;
- uploads and runs of all sessions together stay within a disk budget (``RAWTUNE_MAX_DISK_MB``):
  the oldest closed sessions' folders go first (:func:`evictions`);
- one visitor (the signed-in user, else the client's address) holds at most
  ``RAWTUNE_MAX_GPU_PER_VISITOR`` places in the GPU line and ``RAWTUNE_MAX_LOADS_PER_VISITOR``
  data loads at a time (:class:`PerVisitor`).

Off a shared app (the CLI, a local single-user app) none of these limits apply unless their
variable is set. It also says where the app runs: on a Space, on ZeroGPU (a GPU lent per call),
and whether training will get a GPU. Every function reads the environment when called, so tests and owners can
change a setting without restarting Python. Nothing here imports gradio.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import env
from .errors import ConfigError, LimitError
from .hubauth import is_repo_id
from .units import format_duration

LOAD_WORKERS = 4  # data loads the app runs at once (its own pool, beside the GPU line); more wait their turn
COMPARE_SECONDS_GUESS = 60  # what one Compare is assumed to take, for a waiting visitor's estimate


def shared() -> bool:
    """True where strangers reach the app: on a Space, or with ``--share``."""
    return bool(os.environ.get("SPACE_ID")) or env.flag("RAWTUNE_SHARED")


def on_spaces() -> bool:
    """True inside a Hugging Face Space (where OAuth login works)."""
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space, which lends a GPU per call for a limited time."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_expected() -> bool:
    """True where training will run on a CUDA GPU (on ZeroGPU the GPU only exists inside GPU calls)."""
    from .settings import has_cuda

    return on_zero_gpu() or has_cuda()


def allow_owner_token() -> bool:
    """Whether a visitor's Hub actions may fall back to the machine's own token."""
    return not shared() or env.flag("RAWTUNE_ALLOW_OWNER_TOKEN")


def allow_server_paths() -> bool:
    """Whether the dataset and model boxes may name files on the server."""
    return not shared() or env.flag("RAWTUNE_ALLOW_SERVER_PATHS")


def shared_default(name: str) -> float:
    """A limit's value on a shared app when its variable is unset (declared in rawtune/env.py)."""
    value = env.declared(name).shared_default
    assert value is not None, f"{name} is not a limit"
    return value


def _limit(name: str) -> Optional[float]:
    """A positive number from ``name``; else the default on a shared app; 0 or unset: no limit."""
    raw = env.get(name)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
        return value if value > 0 else None
    return shared_default(name) if shared() else None


def max_upload_bytes() -> Optional[int]:
    mb = _limit("RAWTUNE_MAX_UPLOAD_MB")
    return int(mb * 1024 * 1024) if mb else None


def max_chars() -> Optional[int]:
    """Most characters read from one source (files and Hub datasets); None: no cap."""
    value = _limit("RAWTUNE_MAX_CHARS")
    return int(value) if value else None


def max_model_bytes() -> Optional[int]:
    """Most bytes one Hub model download may take (``RAWTUNE_MAX_MODEL_GB``); None: no cap."""
    gb = _limit("RAWTUNE_MAX_MODEL_GB")
    return int(gb * 1e9) if gb else None


def max_disk_bytes() -> Optional[int]:
    """The disk budget for uploads and runs of all sessions together; None: no budget."""
    mb = _limit("RAWTUNE_MAX_DISK_MB")
    return int(mb * 1024 * 1024) if mb else None


def force_streaming() -> bool:
    """Hub datasets are streamed on a shared app, so only what is read is downloaded."""
    return shared()


# ---------------------------------------------------------------- what a visitor may name


def check_upload(path: Path) -> None:
    """Refuse an upload larger than the cap (before it is copied or read)."""
    cap = max_upload_bytes()
    size = path.stat().st_size
    if cap and size > cap:
        raise ConfigError(f"{path.name} is {size / 2**20:.1f} MB; this app takes uploads up to "
                          f"{cap / 2**20:.0f} MB: upload a smaller file or use a Hub dataset (streamed)")


@dataclass
class Folder:
    """A session folder as the disk budget sees it."""

    path: Path
    modified: float  # newest modification time inside it
    bytes: int
    closed: bool  # its page is closed and nothing runs in it: it may be deleted


def evictions(folders: list[Folder], need: int, what: str) -> list[Path]:
    """The closed sessions' folders to delete, oldest first, so ``need`` more bytes fit in the
    disk budget; raises :class:`LimitError` when even deleting all of them is not enough."""
    budget = max_disk_bytes()
    if not budget:
        return []
    used = sum(f.bytes for f in folders)
    chosen = []
    for folder in sorted((f for f in folders if f.closed), key=lambda f: f.modified):
        if used + need <= budget:
            break
        chosen.append(folder.path)
        used -= folder.bytes
    if used + need > budget:
        size = f"{what} ({need / 2**20:.1f} MB)" if need else what
        raise LimitError(f"This app's disk for uploads and runs ({budget / 2**20:,.0f} MB) is taken by open "
                         f"sessions: {size} does not fit now; try again later or use a Hub dataset (streamed)")
    return chosen


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (OSError, ValueError):
        return False


def guard_source(spec: str, own_folder: Path, what: str, allowed: tuple[str, ...] = ()) -> str:
    """Return ``spec`` if a visitor may use it as a dataset or model source, else raise.

    Accepted: a Hub id (``user/name``) that is not also a path on the server, a path inside the
    visitor's own session folder, and any value in ``allowed`` (the owner's own defaults). The
    message repeats only what the visitor typed, never a resolved server path.
    """
    spec = (spec or "").strip()
    if allow_server_paths() or not spec or spec in allowed:
        return spec
    candidate = Path(spec)
    if candidate.is_absolute() and _inside(candidate, own_folder):
        return spec
    local = candidate.expanduser()
    if is_repo_id(spec) and not local.exists():
        return spec
    raise ConfigError(f"{what} {spec!r} is not available here: give a Hub id like user/name"
                      + (" or upload a file" if what == "dataset" else ""))


# A path into a Hugging Face cache snapshot (models--<owner>--<name>/snapshots/<commit>), wherever the cache is.
SNAPSHOT = re.compile(r"(?<![\w/.:-])/[^\s'\"]*?/(?:models|datasets)--([\w.-]+?)--([\w.-]+)/snapshots/[0-9a-f]{40}")


def hide_paths(text: str, roots: list[Path]) -> str:
    """``text`` with the server's folders (``roots``, the working folder) cut out of paths, and
    a Hugging Face cache snapshot named by its repo id (``owner/name/file``) instead."""
    text = SNAPSHOT.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    for root in sorted({str(r) for r in roots} | {os.getcwd()}, key=len, reverse=True):
        if len(root) > 1:
            # Only where a path starts (not inside a URL such as https://host/app/...).
            start = r"(?<![\w/.:-])" + re.escape(root)
            text = re.sub(start + "/", "", text)
            text = re.sub(start + r"(?![\w.-])", ".", text)
    return text


# ---------------------------------------------------------------- one GPU, many visitors


@dataclass
class Budget:
    """The most one training may take on a shared app: wall time and optimizer steps."""

    seconds: Optional[float]
    steps: Optional[int]

    @classmethod
    def from_env(cls) -> "Budget":
        minutes = _limit("RAWTUNE_MAX_TRAIN_MINUTES")
        steps = _limit("RAWTUNE_MAX_TRAIN_STEPS")
        return cls(minutes * 60 if minutes else None, int(steps) if steps else None)

    def describe(self) -> str:
        parts = []
        if self.seconds:
            parts.append(f"{format_duration(self.seconds, 'unknown')}")
        if self.steps:
            parts.append(f"{self.steps:,} steps")
        return " or ".join(parts) + " per training" if parts else "no limit per training"

    def time_up(self, elapsed_s: float) -> Optional[str]:
        """Why the training must stop now, or None while it is within its time."""
        if self.seconds and elapsed_s >= self.seconds:
            return f"this app's time budget per training ({format_duration(self.seconds, 'unknown')}) is used up"
        return None

    def cap_steps(self, max_steps: Optional[int], epochs: Optional[float], batch_size: int,
                  grad_accum: int, train_blocks: int) -> tuple[Optional[int], Optional[str]]:
        """The ``max_steps`` a training may run with, and a note when the budget lowered it.

        Without ``max_steps`` the length comes from the epochs (steps per epoch = blocks per
        optimizer step, rounded up, as the training loops count); only a plan longer than the
        budget is changed, so a short run keeps its own schedule.
        """
        if not self.steps:
            return max_steps, None
        per_epoch = max(math.ceil(train_blocks / max(batch_size * grad_accum, 1)), 1)
        planned = max_steps or math.ceil((epochs or 1.0) * per_epoch)
        if planned <= self.steps:
            return max_steps, None
        return self.steps, (f"this app's step budget per training is {self.steps:,} steps: the planned "
                            f"{planned:,} steps are cut to {self.steps:,} (the learning-rate schedule fits)")

    def seconds_left(self, elapsed_s: float) -> Optional[float]:
        return max(0.0, self.seconds - elapsed_s) if self.seconds else None




def max_gpu_per_visitor() -> Optional[int]:
    value = _limit("RAWTUNE_MAX_GPU_PER_VISITOR")
    return int(value) if value else None


def max_loads_per_visitor() -> Optional[int]:
    value = _limit("RAWTUNE_MAX_LOADS_PER_VISITOR")
    return int(value) if value else None


class PerVisitor:
    """Work in flight per visitor (the signed-in user, else the client's address): at most
    ``limit()`` at a time each, so one visitor with many tabs cannot take every place."""

    def __init__(self, limit: Callable[[], Optional[int]], refusal: str):
        self._limit, self._refusal = limit, refusal
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def held(self, visitor: str) -> int:
        with self._lock:
            return self._held.get(visitor, 0)

    def take(self, visitor: Optional[str]) -> None:
        """One more place for ``visitor``; :class:`LimitError` when they hold their limit already.
        No visitor (a direct call, not a page's request): no limit."""
        limit = self._limit() if visitor else None
        with self._lock:
            count = self._held.get(visitor or "", 0)
            if limit and count >= limit:
                raise LimitError(self._refusal.format(limit=limit))
            self._held[visitor or ""] = count + 1

    def give_back(self, visitor: Optional[str]) -> None:
        with self._lock:
            left = self._held.get(visitor or "", 0) - 1
            if left > 0:
                self._held[visitor or ""] = left
            else:
                self._held.pop(visitor or "", None)

    @contextmanager
    def hold(self, visitor: Optional[str]) -> Iterator[None]:
        """A place for ``visitor`` while the block runs (see :meth:`take`)."""
        self.take(visitor)
        try:
            yield
        finally:
            self.give_back(visitor)


LOADS = PerVisitor(max_loads_per_visitor,
                   "You already have {limit} data load(s) running (the most one visitor may run at once here): "
                   "wait for them to finish, then load again")


@dataclass
class Ticket:
    """One visitor's place in line for the GPU (a training or a Compare)."""

    kind: str  # "training" or "compare"
    owner: str  # the session it belongs to
    joined: float = field(default_factory=time.time)
    started: Optional[float] = None  # when it got the GPU
    step: int = 0
    max_steps: int = 0
    eta_s: Optional[float] = None


class GpuSlot:
    """The GPU: a first-come line that trainings, exports and Compare share.

    Only the first ``slots`` tickets of the line use the GPU (one by default, so a Compare never
    loads models beside someone else's training; ``RAWTUNE_GPU_SLOTS`` raises it where each call
    gets a GPU of its own, as on ZeroGPU or a multi-GPU machine). Holders report their progress,
    which :meth:`describe` turns into what a waiting visitor sees. ``places`` counts each visitor's
    work that uses or waits for the GPU, so one visitor cannot fill the line from several tabs.
    """

    def __init__(self, budget: Optional[Budget] = None, slots: Optional[int] = None):
        self._line: list[Ticket] = []
        # A visitor's place is held from Start (data stage included) until the work ends.
        self.places = PerVisitor(max_gpu_per_visitor,
                                 "You already have a training, export or Compare using or waiting for the GPU "
                                 "(in this or another tab): wait for it to finish or stop it, then try again")
        self._lock = threading.Lock()
        self._budget = budget
        self._slots = slots

    @property
    def budget(self) -> Budget:
        return self._budget or Budget.from_env()

    @property
    def slots(self) -> int:
        if self._slots:
            return self._slots
        raw = env.get("RAWTUNE_GPU_SLOTS")
        try:
            return max(int(raw), 1) if raw else 1
        except ValueError:
            raise ConfigError(f"RAWTUNE_GPU_SLOTS must be a whole number, not {raw!r}") from None

    def _start_holders(self) -> None:
        """Stamp the start time of tickets that have just reached a slot (under the lock)."""
        for ticket in self._line[:self.slots]:
            if ticket.started is None:
                ticket.started = time.time()

    def join(self, kind: str, owner: str) -> Ticket:
        ticket = Ticket(kind, owner)
        with self._lock:
            self._line.append(ticket)
            self._start_holders()
        return ticket

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._line:
                self._line.remove(ticket)
            self._start_holders()

    def my_turn(self, ticket: Ticket) -> bool:
        with self._lock:
            return ticket in self._line[:self.slots]

    def report(self, ticket: Ticket, step: int, max_steps: int, eta_s: Optional[float]) -> None:
        ticket.step, ticket.max_steps, ticket.eta_s = step, max_steps, eta_s

    def position(self, ticket: Ticket) -> int:
        """How many tickets are ahead of this one in the waiting part of the line (0: on the GPU)."""
        with self._lock:
            index = self._line.index(ticket) if ticket in self._line else 0
        return max(index - self.slots + 1, 0)

    def _expected_s(self, ticket: Ticket, now: float) -> Optional[float]:
        """How long ``ticket`` will still hold the GPU (or hold it once it gets it)."""
        if ticket.kind != "training":
            return COMPARE_SECONDS_GUESS
        budget = self.budget
        elapsed = now - ticket.started if ticket.started else 0.0
        left = budget.seconds_left(elapsed)
        if ticket.eta_s is not None:
            return min(ticket.eta_s, left) if left is not None else ticket.eta_s
        return left

    def ahead(self, ticket: Ticket) -> dict[str, Any]:
        """What is ahead of ``ticket``: its place, what runs now, who waits before it, a rough wait.

        The wait is the time until a slot frees up for it: with one slot, the sum of what is
        ahead; with several, a rough share of it (each slot works through its part of the line).
        """
        now = time.time()
        slots = self.slots
        with self._lock:
            line = list(self._line)
        index = line.index(ticket) if ticket in line else 0
        running = line[:min(slots, index)]
        waiting = line[slots:index] if index >= slots else []
        waits = [self._expected_s(t, now) for t in running + waiting]
        wait = None if any(w is None for w in waits) else sum(waits) / slots
        return {"position": len(waiting) + 1 if index >= slots else 0, "running": running,
                "waiting": waiting, "wait_s": wait}

    def _doing(self, ticket: Ticket) -> str:
        if ticket.kind == "training" and ticket.max_steps:
            return (f"a training at step {ticket.step:,}/{ticket.max_steps:,}"
                    f" (about {format_duration(self._expected_s(ticket, time.time()), 'unknown')} left)")
        if ticket.kind == "training":
            return "a training that is starting"
        return f"a{'n' if ticket.kind[0] in 'aeiou' else ''} {ticket.kind.capitalize()} (about a minute)"

    def describe(self, ticket: Ticket) -> str:
        """One line for a waiting visitor; empty once the ticket holds the GPU."""
        info = self.ahead(ticket)
        if not info["position"]:
            return ""
        now_text = ", ".join(self._doing(t) for t in info["running"])
        more = len(info["waiting"])
        queue = f", then {more} more waiting before you" if more else ""
        wait = f"; expected wait about {format_duration(info['wait_s'], 'unknown')}" if info["wait_s"] is not None else ""
        return (f"Waiting for the GPU: you are number {info['position']} in line. Running now: {now_text}"
                f"{queue}{wait}. Each training here gets {self.budget.describe()}.")


SLOT = GpuSlot()  # the app's one GPU; tests make their own
