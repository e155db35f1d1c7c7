"""What both training loops report and obey: the speed meter, the typed progress events, the stop
signal, the checkpoints a resume starts from, and the ``train`` record written to run.json.

The Trainer path (:mod:`.hf_loop`) and the fast CUDA loop (:mod:`.fast_loop`) each drive one
:class:`Progress` and one :class:`StopSignal`; neither knows the other. Events reach the caller's
callback as plain dicts (``{"type": "step", ...}``), the shape the CLI and the app consume.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import TrainError
from ..rundir import RunDir
from ..settings import TrainSettings
from ..units import format_duration

Callback = Callable[[dict], None]
Log = Callable[[str], None]


# ---------------------------------------------------------------- events


@dataclass
class StepEvent:
    """One optimizer step finished (``eta_s`` is NaN until a step has been timed)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float
    epoch: float
    type: str = "step"


@dataclass
class EvalEvent:
    """A held-out loss measured during training."""

    step: int
    eval_loss: float
    type: str = "eval"


@dataclass
class DoneEvent:
    """Training ended (finished or stopped) and the adapter is saved."""

    steps: int
    max_steps: int
    stopped_early: bool
    final_loss: Optional[float]
    type: str = "done"


def as_dict(event: Any) -> dict:
    """The event as the callback receives it: ``type`` first, then its fields."""
    values = dataclasses.asdict(event)
    return {"type": values.pop("type"), **values}




# ---------------------------------------------------------------- meter and progress


class Meter:
    """Tokens per second and time left, timed from a marked step (so start-up is not counted)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.origin: Optional[tuple[int, float]] = None

    def mark(self, step: int, when: Optional[float] = None) -> None:
        """Start timing at ``step`` (the first step that is not warm-up)."""
        self.origin = (step, time.time() if when is None else when)

    def rate(self, step: int, max_steps: int, when: Optional[float] = None) -> tuple[float, float]:
        """(tokens/s, seconds left) at ``step``; (0, NaN) before any step was timed."""
        if self.origin is None:
            self.mark(step, when)
        first, t0 = self.origin
        steps = step - first
        elapsed = (time.time() if when is None else when) - t0
        if not steps or elapsed <= 0:
            return 0.0, float("nan")
        return steps * self.tokens_per_step / elapsed, (max_steps - step) * elapsed / steps


@dataclass
class Progress:
    """Turns a loop's steps and evaluations into events, log lines and the history in run.json."""

    tokens_per_step: int
    callback: Optional[Callback] = None
    log: Log = print
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.meter = Meter(self.tokens_per_step)

    def _emit(self, event: Any) -> dict:
        values = as_dict(event)
        if values["type"] != "done":
            self.history.append(values)
        if self.callback:
            self.callback(values)
        return values

    def step(self, step: int, max_steps: int, loss: float, lr: float, epoch: float,
             when: Optional[float] = None, show: bool = True) -> dict:
        """Report a finished step; ``show=False`` keeps it out of the log (the callback still gets it).

        A loss that is NaN or infinite stops training with :class:`TrainError`: the weights are
        already ruined, and a run that went on would end "done" with a model that outputs nothing.
        """
        if not math.isfinite(loss):
            raise TrainError(f"the training loss became {loss} at step {step}: training diverged, and the "
                             "adapter is not saved; lower --learning-rate (or --embedding-learning-rate), "
                             "check the base model's weights, and train again without --resume")
        tok_s, eta = self.meter.rate(step, max_steps, when)
        if show:
            self.log(f"[train] step {step}/{max_steps} loss {loss:.4f} {tok_s:,.0f} tok/s eta {format_duration(eta)}")
        return self._emit(StepEvent(step, max_steps, loss, lr, tok_s, eta, epoch))

    def eval(self, step: int, loss: float) -> dict:
        self.log(f"[train] step {step} held-out loss {loss:.4f}")
        return self._emit(EvalEvent(step, loss))

    def done(self, steps: int, max_steps: int, stopped_early: bool, final_loss: Optional[float]) -> dict:
        """Training ended and the adapter is saved (not part of the history)."""
        return self._emit(DoneEvent(steps, max_steps, stopped_early, final_loss))

    def losses(self) -> list[float]:
        return [e["loss"] for e in self.history if e["type"] == "step"]


# ---------------------------------------------------------------- stopping


# The stop signals of the trainings running in this process, so a shutdown can stop them all.
_ACTIVE: set = set()
_ACTIVE_GUARD = threading.Lock()


def stop_all(reason: str) -> int:
    """Ask every training running in this process (any thread) to stop after its current step,
    saving the adapter and a checkpoint, as Ctrl-C does; how many were asked."""
    with _ACTIVE_GUARD:
        active = list(_ACTIVE)
    for signal_ in active:
        signal_.log(f"[train] {reason}: stopping after this step; the adapter and a checkpoint will be saved")
        signal_.event.set()
    return len(active)


class StopSignal:
    """A clean stop after the current step: asked by an event, a STOP file or Ctrl-C.

    :meth:`requested` is what the loops poll; :attr:`stopped` records that a stop (or an abort
    by a second Ctrl-C) ended training early.
    """

    def __init__(self, run: RunDir, event: Optional[threading.Event] = None, log: Log = print):
        self.run, self.event, self.log = run, event or threading.Event(), log
        self.stopped = False
        self._previous: Any = None

    def requested(self) -> bool:
        if self.event.is_set() or self.run.stop_file.exists():
            self.stopped = True
        return self.stopped

    def __enter__(self) -> "StopSignal":
        """First Ctrl-C asks for a clean stop (adapter + checkpoint saved); the second one aborts."""
        with _ACTIVE_GUARD:
            _ACTIVE.add(self)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._ctrl_c)
        return self

    def _ctrl_c(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.log("[train] stopping after this step; the adapter and a checkpoint will be saved (Ctrl-C again to abort)")
        self.event.set()

    def __exit__(self, exc_type, exc, tb) -> bool:
        with _ACTIVE_GUARD:
            _ACTIVE.discard(self)
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if exc_type is KeyboardInterrupt:
            self.log("[train] aborted; saving the adapter as it is now")
            self.stopped = True
            return True  # the adapter as it is now is still saved by the caller
        return False


# ---------------------------------------------------------------- checkpoints and the record


def latest_checkpoint(run: RunDir) -> Optional[Path]:
    """The newest complete ``checkpoints/checkpoint-N`` folder, or None."""
    found = run.checkpoints(complete=True)
    return found[-1] if found else None


def step_of(checkpoint: Optional[Path]) -> int:
    """The step a ``checkpoint-N`` folder was saved at (0 for none)."""
    return int(checkpoint.name.split("-")[1]) if checkpoint else 0


@dataclass
class LoopResult:
    """What a training loop hands back: where it ended and how long it took."""

    steps: int  # global step reached (counting steps before a resume)
    max_steps: int
    start_step: int
    seconds: float


@dataclass
class TrainResult:
    """The ``train`` record of run.json (its keys in this order)."""

    backend: str
    steps: int
    max_steps: int
    resumed_from_step: int
    stopped_early: bool
    final_loss: Optional[float]
    seconds: float
    history: list[dict]
    adapter: str
    effective_settings: dict


def versions(backend: str) -> dict[str, str]:
    """Versions of the libraries that shaped the result, for run.json."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("rawtune", "torch", "transformers", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    out["backend"] = backend
    return out


def make_record(t: TrainSettings, run: RunDir, loop: LoopResult, progress: Progress, stop: StopSignal,
                backend: str) -> TrainResult:
    """The ``train`` record of this training (run.json is only read)."""
    losses = progress.losses()
    previous = run.load().get("train", {}).get("history", []) if loop.start_step else []
    return TrainResult(
        backend=backend, steps=loop.steps, max_steps=loop.max_steps, resumed_from_step=loop.start_step,
        stopped_early=stop.stopped, final_loss=losses[-1] if losses else None, seconds=round(loop.seconds, 2),
        history=[e for e in previous if e["step"] <= loop.start_step] + progress.history,
        adapter=run.adapter_dir.name, effective_settings=dataclasses.asdict(t))


def write_record(t: TrainSettings, run: RunDir, loop: LoopResult, progress: Progress, stop: StopSignal,
                 backend: str) -> TrainResult:
    """Store ``train`` (with ``t``, the settings training really used), the training metrics and
    the library versions in run.json, once; then send the done event."""
    tokens = (loop.steps - loop.start_step) * progress.tokens_per_step
    result = make_record(t, run, loop, progress, stop, backend)
    metrics = run.load().get("metrics", {})
    metrics.update(train_tokens=tokens, train_seconds=round(loop.seconds, 2),
                   train_tokens_per_s=round(tokens / loop.seconds, 1) if loop.seconds > 0 else None)
    run.update(train=dataclasses.asdict(result), metrics=metrics, versions=versions(backend))
    progress.done(result.steps, result.max_steps, result.stopped_early, result.final_loss)
    return result
