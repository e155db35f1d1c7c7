"""Training on several GPUs for a caller that trains in its own process (the app, a script).

With ``RAWTUNE_GPUS=all`` (or a number) :func:`rawtune.train.train` hands the training to
:func:`train_in_workers`: it starts one worker per GPU through torchrun
(:mod:`.worker`), relays rank 0's log lines and progress events to the caller's ``log`` and
``callback`` as they come, turns the caller's stop (event or Ctrl-C) into the run's STOP file
(every worker stops after the same step, rank 0 saves the adapter and a checkpoint), and returns
the ``train`` record rank 0 wrote. Without the variable nothing here runs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any, Callable, Optional

from .. import env
from ..errors import ConfigError, TrainError
from ..rundir import RunDir
from ..settings import RunSettings, has_cuda, to_dict
from .distributed import world_size
from .progress import Callback, StopSignal, TrainResult

LOG, EVENT, ERROR = "RAWTUNE-LOG ", "RAWTUNE-EVENT ", "RAWTUNE-ERROR "  # the worker's tags (worker.py)


def requested_processes() -> int:
    """How many worker processes ``RAWTUNE_GPUS`` asks for (1: train in this process).

    ``all`` is every CUDA GPU of the machine; a number is that many GPUs (without CUDA: that many
    CPU processes, which is what the CPU tests use). Inside a launched job it is always 1.
    """
    value = (env.get("RAWTUNE_GPUS") or "").lower()
    if not value or world_size() > 1:
        return 1
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "all":
        return max(count, 1)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"RAWTUNE_GPUS={value!r}: give a number of GPUs (1 or more) or 'all'")
    if count and int(value) > count:
        raise ConfigError(f"RAWTUNE_GPUS={value}: this machine shows {count} GPU(s); use at most that many or 'all'")
    return int(value)


def torchrun_command(processes: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` starting ``processes`` copies of ``python -m module args`` here."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", module, *args]


def train_in_workers(settings: RunSettings, run: RunDir, processes: int, callback: Optional[Callback],
                     stop: Optional[threading.Event], log: Callable[[str], None]) -> TrainResult:
    """Train in ``processes`` torchrun workers; relay rank 0's reports; return its ``train`` record."""
    fd, settings_file = tempfile.mkstemp(prefix="rawtune-settings-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(to_dict(settings), handle)  # settings hold no token
    command = torchrun_command(processes, "rawtune.train.worker", [settings_file, str(run.path)])
    log(f"[train] {processes} worker processes through torchrun, one per "
        f"{'GPU' if has_cuda() else 'CPU process (no CUDA)'}; rank 0 reports here")
    # Its own session: a Ctrl-C here becomes the STOP file, not a signal torchrun would repeat.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True, bufsize=1)
    try:
        errors = _relay(proc, run, StopSignal(run, stop, log), callback, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # an abort here: torchrun stops its workers
        code = proc.wait()
        os.unlink(settings_file)
    if errors:
        raise TrainError(errors[-1])
    if code != 0:
        raise TrainError(f"training in {processes} worker processes failed (torchrun exit code {code}); "
                         "the workers' errors are printed above")
    return TrainResult(**run.load()["train"])


def _relay(proc: Any, run: RunDir, signal_: StopSignal, callback: Optional[Callback],
           log: Callable[[str], None]) -> list[str]:
    """Hand rank 0's lines to ``log``/``callback`` until the workers end; write STOP when asked."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    errors: list[str] = []
    asked, made = False, False
    with signal_:
        while True:
            if not asked and signal_.requested():
                made = not run.stop_file.exists()
                run.stop_file.touch()
                asked = True
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            _dispatch(line, callback, log, errors)
    if made:  # a stop asked by event or Ctrl-C leaves no STOP file behind, as in one process
        run.stop_file.unlink(missing_ok=True)
    return errors


def _dispatch(line: str, callback: Optional[Callback], log: Callable[[str], None], errors: list[str]) -> None:
    if line.startswith(LOG):
        log(line[len(LOG):])
    elif line.startswith(EVENT):
        if callback:
            callback(json.loads(line[len(EVENT):]))
    elif line.startswith(ERROR):
        errors.append(line[len(ERROR):])
    else:
        print(line, flush=True)  # the libraries' own output, as it would have been printed in-process
