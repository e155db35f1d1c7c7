"""The fast loop's checkpoints: written complete or not at all, read back as data. The Trainer
loop writes its own the same way (:mod:`.hf_loop`, with :func:`partial_name`, :func:`publish` and
:func:`write_failed`).

A checkpoint is ``checkpoints/checkpoint-N`` with the adapter (``adapter_model.safetensors``,
``adapter_config.json``) and :data:`STATE_FILE` (the step, the optimizer's and the scheduler's
state). The files go to a hidden folder first and get their name only once complete, so a crash or
a full disk while writing leaves the earlier checkpoints as they were and nothing that looks like a
checkpoint (``--resume`` would otherwise pick the half-written one and fail on it).

They are written in the training thread. Writing from a second thread was tried (135M, standard
preset, 1.15 GB, on 2 CPU cores): the training thread was held 0.3-0.5 s instead of 0.7 s, but
while the writer waited for the interpreter lock a busy Python thread ran 18 % slower for 13 s,
worth 3.5 s of stall in all, and the host that queues the fast loop's kernels is such a thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import TrainError
from ..rundir import CHECKPOINT_STATES, RunDir

STATE_FILE = CHECKPOINT_STATES["fast"]
ADAPTER_FILE = "adapter_model.safetensors"


def save(run: RunDir, model: Any, optimizer: Any, scheduler: Any, step: int, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` (complete or not at all), then keep only the newest ``keep``."""
    import torch
    from peft import get_peft_model_state_dict

    from ..streamed import save_tensors

    final = run.checkpoints_dir / f"checkpoint-{step}"
    partial = run.checkpoints_dir / partial_name(step)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_tensors(partial / ADAPTER_FILE, get_peft_model_state_dict(model))
        model.peft_config["default"].save_pretrained(str(partial))  # adapter_config.json
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   partial / STATE_FILE)
    except OSError as exc:  # e.g. a full disk: leave no half checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        raise write_failed(final, exc) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return publish(run, partial, final, keep)


def publish(run: RunDir, written: Path, final: Path, keep: int) -> Path:
    """Give a completely written checkpoint folder its name ``final`` (one rename, so it appears
    whole), then keep only the newest ``keep`` checkpoints (either loop)."""
    shutil.rmtree(final, ignore_errors=True)
    written.rename(final)
    for old in run.checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_failed(final: Path, exc: OSError) -> TrainError:
    """The one-line error for a checkpoint that could not be written (either loop)."""
    return TrainError(f"writing {final.name} in {final.parent} failed ({exc.strerror or exc}); free disk space "
                      "there (or raise --save-steps) and continue with --resume, which takes the newest "
                      "complete checkpoint")


def partial_name(step: int) -> str:
    """The hidden folder a checkpoint is written into before it gets its name (either loop)."""
    return f".checkpoint-{step}.partial"


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore a checkpoint into the model, optimizer and scheduler; the step it was written at."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / ADAPTER_FILE
    if weights.is_file():
        set_peft_model_state_dict(model, load_file(str(weights)))
    try:  # weights_only: a checkpoint is data; unpickling arbitrary objects could run code
        state = torch.load(path / STATE_FILE, map_location="cuda" if torch.cuda.is_available() else "cpu",
                           weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise TrainError(f"{path / STATE_FILE} is not a plain optimizer state ({type(exc).__name__}); "
                         f"delete {path.name} to resume from an older checkpoint, or train without --resume") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
