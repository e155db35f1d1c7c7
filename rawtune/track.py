"""Experiment tracking with trackio, the Hub's tracker (``--report-to trackio``).

What is logged, under the run directory's name as the trackio run in the project ``rawtune``:
training loss, learning rate and tokens/s at every reported step, held-out loss at every
evaluation, then the run's final numbers (base and tuned perplexity, training tokens/s) and every
numeric figure of every GGUF file that the export recorded (perplexity, its increase, size, and
whatever else the export measures per file).

trackio keeps process-wide state (its current run, a background sender, the Hub token it finds in
the environment), so rawtune runs it in a child process of its own and sends it one JSON line per
record. That keeps it out of the app's process, where many visitors train one after another, and
lets the child see exactly one token: the visitor's or the CLI user's, handed to it in its
environment (never in a file or its arguments) and only when a trackio Space is asked for. Without
``--trackio-space`` the child gets no token at all and logs to trackio's local store
(``TRACKIO_DIR``, else trackio's folder in the Hugging Face cache; inside the run directory on a
shared app, so a visitor's records go when their session does).

Tracking is a side channel: if the child fails mid-run, rawtune says so once and trains on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError
from .hubauth import Token, is_repo_id, login_hint, user_name
from .rundir import RunDir
from .settings import RunSettings, to_dict
from .space import shared

PROJECT = "rawtune"
INSTALL_HINT = "pip install 'rawtune[track]' (or pip install trackio)"
# Training event fields -> trackio metric names.
STEP_METRICS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch"}
FINAL_METRICS = ("ppl_base", "ppl_tuned", "train_tokens", "train_tokens_per_s")


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite int/float fields of a record, under ``prefix``/name (bools and text left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def final_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers a finished run.json holds: perplexities and each GGUF file's figures."""
    metrics = record.get("metrics") or {}
    out = _numbers({k: metrics[k] for k in FINAL_METRICS if k in metrics}, "final")
    for label, entry in (record.get("gguf") or {}).items():
        if isinstance(entry, dict):
            out.update(_numbers(entry, f"gguf/{label}"))
    return out


def event_metrics(event: dict[str, Any]) -> Optional[tuple[dict[str, float], int]]:
    """A training event as (metrics, step), or None for events that carry no metric."""
    if event.get("type") == "step":
        values = {name: event[key] for key, name in STEP_METRICS.items() if event.get(key) is not None}
    elif event.get("type") == "eval" and event.get("eval_loss") is not None:
        values = {"eval/loss": event["eval_loss"]}
    else:
        return None
    numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return (numbers, int(event.get("step") or 0)) if numbers else None


class Tracker:
    """The parent's end of the trackio child: send records, then close once."""

    def __init__(self, proc: subprocess.Popen, log: Callable[[str], None]):
        self.proc = proc
        self.log = log
        self.failed = False

    def send(self, message: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.failed = True
            self.log("[track] trackio stopped early (see logs/trackio.log); training goes on without it")

    def event(self, event: dict[str, Any]) -> None:
        found = event_metrics(event)
        if found:
            self.send({"log": found[0], "step": found[1]})

    def final(self, record: dict[str, Any]) -> None:
        numbers = final_metrics(record)
        if numbers:
            self.send({"log": numbers})

    def close(self, timeout: float = 120.0) -> None:
        """Finish the trackio run and wait for the child (it uploads to a Space before exiting)."""
        self.send({"finish": True})
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code != 0 and not self.failed:
            self.log(f"[track] trackio exited with code {code} (see logs/trackio.log)")


def check(settings: RunSettings, token: Token) -> None:
    """Refuse a tracking setting that cannot work, before any stage runs."""
    if settings.report_to != "trackio":
        if settings.trackio_space:
            raise ConfigError("--trackio-space is only used with --report-to trackio; add it, or drop the Space")
        return
    import importlib.util

    if importlib.util.find_spec("trackio") is None:
        raise ConfigError(f"--report-to trackio needs the trackio package: {INSTALL_HINT}")
    space = settings.trackio_space
    if space and not is_repo_id(space):
        raise ConfigError(f"--trackio-space {space!r}: give a Space id as user/name, e.g. alice/rawtune-trackio")
    if space and not isinstance(token, str):
        raise ConfigError(f"--trackio-space {space} needs a Hugging Face token that can create that Space: "
                          f"{login_hint(token)}")


APP_SPACE = "rawtune-trackio"  # the app's trackio Space in a signed-in visitor's namespace


def space_for_app(wanted: bool, token: Token) -> Optional[str]:
    """The trackio Space of an app run: ``<user>/rawtune-trackio`` for a visitor with a token of their
    own, None when not wanted; asked without a token it is refused (nothing would reach the visitor)."""
    if not wanted:
        return None
    if not isinstance(token, str):
        raise ConfigError(f"logging to trackio from this app needs your own Hugging Face token: {login_hint(token)}, "
                          "or untick \"Log to trackio\"")
    user = user_name(token, "finding your Hub user name for the trackio Space",
                     "try again, or untick \"Log to trackio\"")
    return f"{user}/{APP_SPACE}"


def open_tracker(settings: RunSettings, run: RunDir, token: Token, log: Callable[[str], None]) -> Optional[Tracker]:
    """Start the trackio child for this run (None when tracking is off)."""
    if settings.report_to != "trackio":
        return None
    check(settings, token)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    if settings.trackio_space and isinstance(token, str):
        env["HF_TOKEN"] = token
    else:
        env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    if shared():
        env["TRACKIO_DIR"] = str(run.path / "trackio")
    logs = run.path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "trackio.log", "a", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rawtune.track"], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, env=env, text=True)
    tracker = Tracker(proc, log)
    name = run.path.name
    tracker.send({"init": {"project": PROJECT, "name": name, "space_id": settings.trackio_space,
                           "config": to_dict(settings)}})
    where = f"the Space {settings.trackio_space} (private)" if settings.trackio_space else "trackio's local store"
    log(f"[track] logging to trackio: project {PROJECT}, run {name}, in {where}")
    run.update(tracking={"report_to": "trackio", "project": PROJECT, "run": name,
                         "space": settings.trackio_space})
    return tracker


def _child() -> int:
    """The child: JSON lines on stdin -> trackio calls."""
    import trackio

    started = False
    for line in sys.stdin:
        message = json.loads(line)
        if "init" in message:
            spec = message["init"]
            trackio.init(project=spec["project"], name=spec["name"], space_id=spec.get("space_id"),
                         config=spec.get("config"), resume="allow", private=True if spec.get("space_id") else None,
                         embed=False, auto_log_gpu=False)
            started = True
        elif "log" in message and started:
            trackio.log(message["log"], step=message.get("step"))
        elif message.get("finish") and started:
            break
    if started:
        trackio.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
