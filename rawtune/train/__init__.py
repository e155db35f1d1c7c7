"""The training stage: LoRA continued pretraining on the packed blocks of a run directory.

:func:`train` checks the blocks, picks the backend, lets the memory plan (:mod:`.plan`) size the
batch on CUDA, loads the LoRA model and hands it to one of two loops: the fast CUDA loop
(:mod:`.fast_loop`) where it can train this model, else the Trainer path (:mod:`.hf_loop`). Both
report through :mod:`.progress`; the adapter and the ``train`` record are written here, once.
A stop event, a STOP file or Ctrl-C stops after the current step and keeps the adapter and a
resumable checkpoint.

Under a launcher that starts several processes (``torchrun``, ``accelerate launch``, ``rawtune
train --gpus N``) every process calls :func:`train`: rank 0 decides the settings (backend, memory
plan, resume point) and shares them, all ranks train data-parallel (:mod:`.distributed`), and only
rank 0 logs, reports to the callback and writes the adapter and the record. A caller that trains
in its own process (the app) gets the same on all GPUs with ``RAWTUNE_GPUS=all``: :mod:`.launch`
starts the workers and relays rank 0's reports.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional

from .. import env
from ..errors import TrainError
from ..rundir import RunDir
from ..settings import RunSettings, TrainSettings, free_gpu_memory, has_cuda
from . import distributed
from .hf_loop import import_backend_first
from .launch import requested_processes, train_in_workers
from .progress import (Callback, Progress, StopSignal, TrainResult, format_duration, latest_checkpoint,
                       make_record, step_of, write_record)

__all__ = ["TrainResult", "follow", "format_duration", "import_backend_first", "latest_checkpoint", "train"]


def train(settings: RunSettings, run: RunDir, callback: Optional[Callback] = None,
          stop: Optional[threading.Event] = None, token: Optional[str] = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA adapter on ``run``'s packed blocks; store the train record and return it."""
    from ..data import load_blocks

    processes = requested_processes()  # RAWTUNE_GPUS: this process hands the training to workers
    if processes > 1:
        return train_in_workers(settings, run, processes, callback, stop, log)
    dist = distributed.setup()  # a single process: no process group, nothing changes
    log, callback = dist.log_for(log), (callback if dist.main else None)
    local_dir = run.require("model", "train")["local_dir"]
    train_blocks = load_blocks(run, "train")
    held = load_blocks(run, "heldout")
    decided = _decide(settings.train, run, local_dir, train_blocks, dist, log) if dist.main else None
    t, backend, resume_from, flatten = dist.share(decided)
    if not dist.main:
        _quiet_libraries()
    log(f"[train] backend {backend}; LoRA r={t.lora_r} alpha={t.lora_alpha}"
        f"{' rsLoRA' if t.use_rslora else ''}{' + embed_tokens/lm_head' if t.train_embeddings else ''}")
    model, backend = _load_model(backend, t, local_dir, log)
    progress = Progress(t.batch_size * t.grad_accum * t.seq_len, callback, log)
    signal = StopSignal(run, stop, log)
    loop = _loop_for(model, t, resume_from, backend, log, flatten)
    t = _split(t, dist, loop, log)
    result = loop(t, run, model, train_blocks, held, progress, signal, resume_from, dist=dist)
    if dist.main:
        _save_adapter(run, model)
        record = write_record(t, run, result, progress, signal, backend)
    else:
        record = make_record(t, run, result, progress, signal, backend)
    distributed.finish(dist)  # every rank waits here until rank 0 has written the adapter
    return record


def _decide(t: TrainSettings, run: RunDir, local_dir: str, train_blocks: Any, dist: distributed.Dist,
            log: Callable[[str], None]) -> tuple[TrainSettings, str, Any, bool]:
    """Rank 0's decisions for the run: checked blocks, backend, family limits, memory plan, resume point,
    and whether the plan lets the flattened fast loop run (it may prefer Unsloth's larger micro-batch)."""
    from .hf_loop import choose_backend

    if train_blocks.shape[1] != t.seq_len:
        raise TrainError(f"the packed blocks have length {train_blocks.shape[1]} but --seq-len is {t.seq_len}; "
                         "rerun the data stage (`rawtune train` without --resume)")
    backend = choose_backend(t.backend)
    t, backend = _family_limits(t, backend, local_dir, log)
    if dist.active and backend == "unsloth":
        # Unsloth documents multi-GPU training only through its own launch recipes, and rawtune has
        # not measured it; PEFT loads the same LoRA model, which both loops train data-parallel.
        log(f"[train] {dist.world} processes: loading with PEFT, not Unsloth (rawtune's data-parallel "
            "training is measured with PEFT's model)")
        backend = "peft"
    import_backend_first(backend)  # a no-op when the pipeline already did it
    flatten = True
    if has_cuda():
        from .plan import plan

        t, chosen = plan(t, local_dir, log=log, backend=backend)
        flatten = not chosen.flatten_refused
        _say_idle_gpus(dist, log)
    return t, backend, _resume_point(t, run, log), flatten


def _say_idle_gpus(dist: distributed.Dist, log: Callable[[str], None]) -> None:
    """One process on a machine with several GPUs trains on one of them: say so, and how to use all."""
    import torch

    count = torch.cuda.device_count()
    if not dist.active and count > 1:
        log(f"[train] 1 of {count} GPUs: this process trains on one; `rawtune train --gpus {count} ...`, "
            "torchrun, or RAWTUNE_GPUS=all (the app) trains data-parallel on all of them")


def _quiet_libraries() -> None:
    """Ranks other than 0: no progress bars from transformers (rank 0's are the ones shown)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _split(t: TrainSettings, dist: distributed.Dist, loop: Callable, log: Callable[[str], None]) -> TrainSettings:
    """With several processes: a micro-batch that fits one rank's share of each step (same effective batch)."""
    from . import hf_loop

    if not dist.active:
        return t
    split = distributed.split_for(t, dist.world, trainer=loop is hf_loop.fit)
    log(distributed.describe(dist, "Trainer" if loop is hf_loop.fit else "fast loop")
        + f"; micro-batch {split.batch_size}, {split.batch_size * split.grad_accum} blocks per step in all")
    return split


def follow(settings: RunSettings, run: RunDir) -> TrainResult:
    """A rank other than 0 of a launched job: wait until rank 0 reaches its training stage (after
    the data stage has written the blocks), then train beside it, silently; rank 0 writes."""
    return train(settings, run, log=lambda line: None)


def _family_limits(t: TrainSettings, backend: str, local_dir: str,
                   log: Callable[[str], None]) -> tuple[TrainSettings, str]:
    """Adjust what this model family cannot do (each change said in one log line), and refuse what
    llama.cpp could not run before any training time is spent (the family registry's facts)."""
    import dataclasses
    import json
    from pathlib import Path

    from .. import families

    config = json.loads((Path(local_dir) / "config.json").read_text(encoding="utf-8"))
    family = families.family_for_config(config)
    if family is None:
        return t, backend
    arch = (config.get("architectures") or [family.name])[0]
    if family.refuse is not None:
        from ..models import load_tokenizer

        reason = family.refuse(config, frozenset(load_tokenizer(local_dir).get_vocab()))
        if reason:
            raise TrainError(reason)
    if family.embeddings.shared and t.train_embeddings:
        log(f"[train] {arch}: embed_tokens/lm_head stay frozen (llama.cpp reads one shared matrix for "
            "both, so a trained lm_head could not be exported)")
        t = dataclasses.replace(t, train_embeddings=False)
    if family.training.unsloth_fails and backend == "unsloth":
        why = family.training.unsloth_fails
        if t.backend != "auto":  # asked for by name: say so now, not with a traceback from inside Unsloth
            raise TrainError(f"--backend unsloth: {arch}: {why}; use --backend peft (or auto, which picks PEFT for it)")
        log(f"[train] {arch}: training with PEFT ({why})")
        backend = "peft"
    elif not family.training.unsloth and backend == "unsloth":
        if t.backend != "auto":
            raise TrainError(f"--backend unsloth: Unsloth does not support {arch}; use --backend peft "
                             "(or auto, which picks PEFT for it)")
        log(f"[train] {arch}: training with PEFT (Unsloth does not support this architecture)")
        backend = "peft"
    return t, backend


def _resume_point(t: TrainSettings, run: RunDir, log: Callable[[str], None]) -> Any:
    """The checkpoint to resume from (None without --resume); refuses what cannot be resumed."""
    if not t.resume:
        return None
    resume_from = latest_checkpoint(run)
    if resume_from is None:
        raise TrainError(f"--resume: no checkpoint in {run.checkpoints_dir}; run without --resume")
    if t.max_steps and step_of(resume_from) >= t.max_steps:
        # The Trainer would take one more step past the end; a finished run has nothing to resume.
        raise TrainError(f"--resume: {run.path} has already trained all {t.max_steps} steps of --max-steps; "
                         "pass a larger --max-steps to train further")
    log(f"[train] resuming from {resume_from.name}")
    return resume_from


def _load_model(backend: str, t: TrainSettings, local_dir: str, log: Callable[[str], None]) -> tuple[Any, str]:
    """The LoRA-wrapped model and the backend that loaded it. Where Unsloth was only picked by
    ``auto`` and its loader fails on this model (a tokenizer it will not take, a layer it cannot
    patch), PEFT loads it instead, with one line saying why; ``--backend unsloth`` gets that line
    as the error."""
    from .hf_loop import load_peft, load_unsloth

    if backend != "unsloth":
        return load_peft(t, local_dir), backend
    try:
        return load_unsloth(t, local_dir), backend
    except (ImportError, RuntimeError, ValueError, TypeError, AttributeError, KeyError, TrainError) as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise  # PEFT would not fit either; the memory error says what to change
        why = _reason(exc).replace(str(local_dir), "the model folder")  # no server paths in the page
        if t.backend != "auto":
            raise TrainError(f"--backend unsloth: Unsloth could not load this model ({why}); "
                             "use --backend peft (or auto, which then falls back to PEFT)") from None
        log(f"[train] Unsloth could not load this model ({why}); training with PEFT instead")
    free_gpu_memory()  # what the failed load left on the card goes back before PEFT loads
    return load_peft(t, local_dir), "peft"


def _reason(exc: BaseException) -> str:
    """The first line of an error (token-like strings masked, as for Hub errors), cut short; its
    type's name when it has no text."""
    from ..hubauth import safe_text

    text = safe_text(str(exc).strip()) or type(exc).__name__
    return text[:200] + ("…" if len(text) > 200 else "")


def _loop_for(model: Any, t: TrainSettings, resume_from: Any, backend: str, log: Callable[[str], None],
              flatten: bool = True) -> Callable:
    """The fast CUDA loop where it can train this model and the plan allows it (``flatten``); else
    that loop around Unsloth's own forward (:mod:`.model_loss`); else the Trainer path (saying why)."""
    from . import hf_loop

    if has_cuda():
        import torch

        from . import fast_loop
        from .fp8 import will_run

        # With FP8 base weights on the way, only the flattened model can hold them: Unsloth's model
        # does not keep the flattened loop out by size then (the plan decided the same).
        unsloth = backend == "unsloth" and not will_run(torch.device("cuda"))
        why_not = (fast_loop.why_not_for_model(model, t, resume_from, unsloth=unsloth) if flatten else
                   "the memory plan picked a larger micro-batch than the flattened loop fits")
        if why_not is None:
            return fast_loop.fit
        why_not_own = fast_loop.why_not_own_forward(backend, resume_from, bool(t.load_in_4bit))
        if why_not_own is None:
            log(f"[train] fast CUDA loop with Unsloth's forward (not the flattened model: {why_not})")
            return functools.partial(fast_loop.fit, own_forward=True)
        log(f"[train] Trainer loop ({why_not if why_not_own == why_not else f'{why_not}; {why_not_own}'})")
    if env.get("RAWTUNE_FP8") == "1":
        log("[train] RAWTUNE_FP8=1 not used: only the fast CUDA loop's flattened model holds FP8 base weights")
    return hf_loop.fit


def _save_adapter(run: RunDir, model: Any) -> None:
    """The adapter and the base model's tokenizer, side by side in ``adapter/``."""
    from ..models import load_tokenizer

    run.adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(run.adapter_dir))
    load_tokenizer(run.load()["model"]["local_dir"]).save_pretrained(str(run.adapter_dir))
