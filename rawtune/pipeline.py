"""The pipeline: run the stages named in ``RunSettings.stages`` in order on one run directory.

Each stage reads what the previous one left in the run directory, so any prefix of the pipeline
can be run, stopped and continued (``resume``), and a stage run twice is safe. Each stage holds
the run directory's lock, so a second process on the same directory fails at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError
from .rundir import RunDir
from .settings import RunSettings, STAGES, resume_refusal, to_dict, validate


def prepare_model(settings: RunSettings, run: RunDir, token: Optional[str],
                  log: Callable[[str], None]) -> dict:
    """Resolve the base model once per run and record it in run.json."""
    from .models import resolve_model

    record = run.load().get("model")
    if record and record.get("spec") == settings.train.model and settings.train.resume:
        if record.get("tokenizer_sha") not in (None, tokenizer_fingerprint(record["local_dir"])):
            raise ConfigError(f"--resume: the tokenizer files in {record['local_dir']} changed since this run's "
                              "data was packed; a resumed run keeps its tokenizer. Restore them, or start a new "
                              "run with another --out")
    else:
        record = resolve_model(settings.train.model, token=token, log=log).to_dict()
        record["tokenizer_sha"] = tokenizer_fingerprint(record["local_dir"])
    check_context(settings.train.seq_len, record["local_dir"])
    run.update(model=record)
    return record


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


def tokenizer_fingerprint(local_dir: str) -> str:
    """A hash of the tokenizer files, so a resume can tell the packed token ids still mean the same."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(local_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def check_context(seq_len: int, local_dir: str) -> None:
    """Refuse blocks longer than the positions the model was built for (its config's limit)."""
    try:
        config = json.loads((Path(local_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # resolve_model checked the folder; a model without a readable limit is not refused here
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context of {limit} tokens "
                          f"(max_position_embeddings); use --seq-len {limit} or less")


def check_resume(settings: RunSettings, run: RunDir) -> None:
    """A resumed run must keep the model (and tokenizer) and block length its data was packed for."""
    stored = run.load().get("settings")
    if not settings.train.resume:
        return
    if not stored:
        raise ConfigError(f"--resume: {run.path} holds no run to resume (no settings in run.json); "
                          "run without --resume")
    train = stored.get("train", {})
    for key in ("model", "seq_len"):
        if key in train and train[key] != getattr(settings.train, key):
            raise ConfigError(resume_refusal(key, train[key], getattr(settings.train, key)))


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
    with run.lock():
        check_resume(settings, run)
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
    """Run one stage by name, holding the run directory's lock."""
    with run.lock():
        _run_stage(stage, settings, run, token, callback, stop, log)


def _run_stage(stage: str, settings: RunSettings, run: RunDir, token: Optional[str], callback,
               stop: Optional[threading.Event], log: Callable[[str], None]) -> None:
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
        from .publish.push import push_run

        push_run(run, settings.push, token=token, log=log)
