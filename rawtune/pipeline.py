"""The pipeline: run the stages named in ``RunSettings.stages`` in order on one run directory.

Each stage reads what the previous one left in the run directory, so any prefix of the pipeline
can be run, stopped and continued (``resume``), and a stage run twice is safe.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import ConfigError
from .rundir import RunDir
from .settings import RunSettings, STAGES, to_dict, validate


def prepare_model(settings: RunSettings, run: RunDir, token: Optional[str],
                  log: Callable[[str], None]) -> dict:
    """Resolve the base model once per run and record it in run.json."""
    from .models import resolve_model

    record = run.load().get("model")
    if record and record.get("spec") == settings.train.model and settings.train.resume:
        return record
    source = resolve_model(settings.train.model, token=token, log=log)
    run.update(model=source.to_dict())
    return source.to_dict()


def run_data(settings: RunSettings, run: RunDir, token: Optional[str], log: Callable[[str], None]) -> dict:
    """The data stage (skipped when resuming, so the blocks stay exactly the same)."""
    from dataclasses import asdict

    from .data import prepare
    from .models import load_tokenizer

    model = prepare_model(settings, run, token, log)
    if settings.train.resume and (run.data_dir / "train.npy").is_file():
        log("[data] resuming: keeping the packed blocks already in the run directory")
        return run.load()["data"]
    tokenizer = load_tokenizer(model["local_dir"])
    report = prepare(settings.data, tokenizer, settings.train.seq_len, run, seed=settings.train.seed,
                     token=token, log=log)
    return asdict(report)


def run_pipeline(settings: RunSettings, token: Optional[str] = None, callback=None,
                 stop: Optional[threading.Event] = None, log: Callable[[str], None] = print) -> dict:
    """Validate settings, then run each requested stage; return the final run.json."""
    settings = validate(settings)
    if not settings.out:
        raise ConfigError("--out: give a run directory, e.g. --out runs/my-run")
    run = RunDir(settings.out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.stop_file.unlink(missing_ok=True)
    run.update(settings=to_dict(settings))
    if "train" in settings.stages:
        from .train import import_backend_first

        import_backend_first(settings.train.backend)
    for stage in [s for s in STAGES if s in settings.stages]:
        if stop is not None and stop.is_set():
            log(f"[pipeline] stopped before {stage}")
            break
        run_stage(stage, settings, run, token, callback, stop, log)
    return run.load()


def run_stage(stage: str, settings: RunSettings, run: RunDir, token: Optional[str], callback,
              stop: Optional[threading.Event], log: Callable[[str], None]) -> None:
    """Run one stage by name."""
    if stage == "data":
        run_data(settings, run, token, log)
    elif stage == "train":
        if "data" not in settings.stages:
            prepare_model(settings, run, token, log)
        from .train import train

        train(settings, run, callback=callback, stop=stop, token=token, log=log)
    elif stage == "eval":
        from .evaluate import evaluate_run

        evaluate_run(run, log=log)
    elif stage == "merge":
        from .merge import merge_run

        merge_run(run, log=log)
    elif stage == "export":
        from .export import export_run

        export_run(run, settings.export, log=log)
    elif stage == "push":
        from .hub import push_run

        push_run(run, settings.push, token=token, log=log)
