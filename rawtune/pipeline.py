"""The pipeline: run the stages named in ``RunSettings.stages`` in order on one run directory.

Each stage reads what the previous one left in the run directory, so any prefix of the pipeline
can be run, stopped and continued (``resume``), and a stage run twice is safe. Each stage holds
the run directory's lock, so a second process on the same directory fails at once.

:func:`run_segmented` is the same run cut into time-limited training segments, for a ZeroGPU
Space (which lends a GPU per call, for a limited time per call): the data once, then segments
that each train, save a checkpoint and return, each next one resuming, then the evaluation. It
is a generator of typed events, so the app only shows them. :func:`estimate_training` is the
rough training time the app shows before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from . import env
from . import hubckpt, track
from .errors import ConfigError, RawtuneError
from .hubauth import is_repo_id
from .rundir import RunDir, runs_in_use, scrub
from .settings import (DEFAULT_MODEL, PRESETS, STAGES, RunSettings, concrete_preset, from_dict, resume_refusal,
                       to_dict, validate)


# Seconds a SIGTERM'd app waits for its trainings to save (Docker and Kubernetes kill after 10-30 s).
SIGTERM_GRACE_S = 20


def exit_on_sigterm(grace_s: float = SIGTERM_GRACE_S) -> None:
    """In a long-lived process whose trainings run in threads (the app), make SIGTERM (how Spaces,
    schedulers and ``docker stop`` end a process) stop every training after its current step,
    wait until their adapters, checkpoints and records are written (at most ``grace_s``), then
    exit with 143. Call it from the main thread, after the server has started: a handler found
    there (Gradio's, which stops its Node server) still runs, once the trainings are saved."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        from .train.progress import stop_all

        stop_all("SIGTERM")
        deadline = time.time() + grace_s
        while runs_in_use() and time.time() < deadline:
            time.sleep(0.2)
        if callable(previous):
            try:
                previous(signum, frame)
            except SystemExit:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)  # the server's and the trainings' threads need no more than what was just written

    signal.signal(signal.SIGTERM, handler)


def prepare_model(settings: RunSettings, run: RunDir, token: Optional[str],
                  log: Callable[[str], None]) -> dict:
    """Resolve the base model once per run and record it in run.json."""
    from .models import resolve_model

    record = run.load().get("model")
    if record and record.get("spec") == settings.train.model and settings.train.resume:
        if not Path(record.get("local_dir") or "").is_dir():  # e.g. a run downloaded after a restart
            record = {**resolve_model(settings.train.model, token=token, log=log).to_dict(),
                      "tokenizer_sha": record.get("tokenizer_sha")}
        if record.get("tokenizer_sha") not in (None, tokenizer_fingerprint(record["local_dir"])):
            raise ConfigError(f"--resume: the tokenizer files of {record.get('spec')} changed since this run's "
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
    track.check(settings, token)
    hubckpt.check(settings.checkpoint_repo, token)
    with run.lock():
        check_resume(settings, run)
        run.stop_file.unlink(missing_ok=True)
        run.update(settings=to_dict(settings))
        if "train" in settings.stages:
            from .train import import_backend_first

            import_backend_first(settings.train.backend)
        tracker = track.open_tracker(settings, run, token, log)
        try:
            _run_stages(settings, run, token, _tracked(callback, tracker), stop, log)
            if tracker:
                tracker.final(run.load())
        finally:
            if tracker:
                tracker.close()
        return run.load()


def _tracked(callback, tracker: Optional[track.Tracker]):
    """The training callback, with each event also sent to the tracker."""
    if tracker is None:
        return callback

    def both(event: dict) -> None:
        tracker.event(event)
        if callback is not None:
            callback(event)

    return both


def _run_stages(settings: RunSettings, run: RunDir, token: Optional[str], callback,
                stop: Optional[threading.Event], log: Callable[[str], None]) -> None:
    for stage in [s for s in STAGES if s in settings.stages]:
        if stop is not None and stop.is_set():
            log(f"[pipeline] stopped before {stage}")
            break
        run_stage(stage, settings, run, token, callback, stop, log)


def run_stage(stage: str, settings: RunSettings, run: RunDir, token: Optional[str], callback,
              stop: Optional[threading.Event], log: Callable[[str], None]) -> None:
    """Run one stage by name, holding the run directory's lock; its wall time goes to
    ``run.json["stage_seconds"][stage]`` when it ends without an error (the last run of it counts)."""
    started = time.time()
    with run.lock():
        _run_stage(stage, settings, run, token, callback, stop, log)
        seconds = dict(run.load().get("stage_seconds") or {})
        seconds[stage] = round(time.time() - started, 2)
        run.update(stage_seconds=seconds)


def _run_stage(stage: str, settings: RunSettings, run: RunDir, token: Optional[str], callback,
               stop: Optional[threading.Event], log: Callable[[str], None]) -> None:
    if stage == "data":
        run_data(settings, run, token, log)
    elif stage == "train":
        if "data" not in settings.stages:
            prepare_model(settings, run, token, log)
        from .train import train

        with hubckpt.uploading(settings.checkpoint_repo, run, token, log):
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


# ---------------------------------------------------------------- training in segments (ZeroGPU)


@dataclass(frozen=True)
class Log:
    """A line of progress text."""

    line: str


@dataclass(frozen=True)
class Tick:
    """Nothing new: lets the consumer refresh its page and check its own limits."""


@dataclass(frozen=True)
class Phase:
    """A stage starts: ``data``, ``train`` (segment 1, 2, ...) or ``eval``. The generator pauses
    at each event, so a consumer may wait here (for its turn on the GPU) before asking for more."""

    stage: str
    segment: int = 0


@dataclass(frozen=True)
class Progress:
    """A training event as the training reports it (``type`` step, eval or done)."""

    event: dict


@dataclass(frozen=True)
class SegmentEnd:
    """A training segment returned; ``stopped_early`` until the last one."""

    segment: int
    steps: int
    max_steps: int
    stopped_early: bool


@dataclass(frozen=True)
class Finished:
    """The end: ``completed`` when training reached its last step and the evaluation ran
    (otherwise it was stopped; the adapter and a checkpoint are kept). ``record`` is run.json."""

    completed: bool
    record: dict


SegmentEvent = Union[Log, Tick, Phase, Progress, SegmentEnd, Finished]
# One GPU call: (settings as a dict, token, seconds or None) -> plain dict events (see segment_events).
SegmentCall = Callable[[dict, Any, Optional[float]], Iterator[dict]]
# What a segmented run records as its stages in run.json.
SEGMENTED_STAGES = ["data", "train", "eval"]
TICK = 0.5  # seconds between Tick events while a segment runs


def segment_call_seconds() -> int:
    """How long one GPU call that trains a segment may last (the app's ``@spaces.GPU`` duration):
    the segment (``RAWTUNE_SEGMENT_SECONDS``, default 90 s) and a minute to load and save."""
    return int(float(env.get("RAWTUNE_SEGMENT_SECONDS") or 90)) + 60


def segment_seconds(model: Optional[str] = None) -> Optional[float]:
    """Training time of one segment: ``RAWTUNE_SEGMENT_SECONDS`` when set (0: unlimited); on
    ZeroGPU, what the memory planner leaves of one GPU call once the model's load and save times
    are taken out; elsewhere None (one segment, unlimited)."""
    value = env.get("RAWTUNE_SEGMENT_SECONDS")
    if value:
        return float(value) if float(value) > 0 else None
    from .space import on_zero_gpu

    if not on_zero_gpu():
        return None
    from .train.plan import segment_seconds as planned, shape_of

    return planned(shape_of(model or DEFAULT_MODEL), float(segment_call_seconds()))


class SegmentError(RawtuneError):
    """A stage inside a segment failed; the message is that failure's (already fit to show)."""


def segment_events(settings_dict: dict, token: Any, seconds: Optional[float]) -> Iterator[dict]:
    """Run :func:`run_pipeline` for ``settings_dict`` in a thread; yield its events as plain dicts.

    Plain dicts and a message instead of an exception, because on ZeroGPU this runs inside a GPU
    call in another process and only picklable values (and no exception text) come back. With
    ``seconds`` the run is asked to stop after the current step (keeping a checkpoint) when that
    much time has passed. Ends with ``{"type": "end"}`` or ``{"type": "error", "message": ...}``.
    """
    events: "queue.Queue[dict]" = queue.Queue()
    stop, done, failure = threading.Event(), threading.Event(), []

    def work() -> None:
        try:
            run_pipeline(from_dict(settings_dict), token=token, stop=stop,
                         callback=lambda event: events.put({**event}),
                         log=lambda line: events.put({"type": "log", "line": str(line)}))
        except BaseException as exc:  # handed to the consumer as an event
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, daemon=True).start()
    deadline = time.time() + seconds if seconds else None
    try:
        while not (done.is_set() and events.empty()):
            yield from _drain(events)
            if deadline and time.time() > deadline and not stop.is_set():
                stop.set()
                yield {"type": "log", "line": "[pipeline] GPU segment time is up: checkpointing, then resuming"}
            yield {"type": "tick"}
    finally:
        if not done.is_set():  # the consumer went away: stop the training after this step
            stop.set()
    if failure:
        yield {"type": "error", "message": _failure_message(failure[0])}
    yield {"type": "end"}


def _drain(events: "queue.Queue[dict]") -> Iterator[dict]:
    """The events that arrive within one tick."""
    try:
        yield events.get(timeout=TICK)
        while True:
            yield events.get_nowait()
    except queue.Empty:
        return


def _failure_message(exc: BaseException) -> str:
    """rawtune's own message, or the type and message of anything else (its traceback goes to
    the server log); tokens masked either way."""
    if isinstance(exc, RawtuneError):
        return scrub(str(exc))
    print(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))), end="", file=sys.stderr)
    return scrub(f"Unexpected {type(exc).__name__}: {exc}. Details are in the server log.")


def run_segmented(settings: RunSettings, token: Any = None, seconds: Optional[float] = None,
                  stop: Optional[threading.Event] = None, budget: Any = None,
                  train_call: SegmentCall = segment_events,
                  eval_call: SegmentCall = segment_events) -> Iterator[SegmentEvent]:
    """Data once, training in segments of ``seconds`` (None: one segment), each ending with a
    checkpoint and each next one resuming, then the held-out evaluation; yields typed events.

    ``settings.train.resume`` continues a stopped run (no data stage). ``stop`` (or a STOP file in
    the run directory) ends the run after the current step. ``budget`` (a ``space.Budget``) caps
    the steps once the data stage has counted the blocks. ``train_call``/``eval_call`` run one
    segment: the app passes them wrapped in its GPU-call decorator. The caller's settings are never
    changed; the run directory's run.json records the whole run's settings at the end.
    """
    s = validate(settings)
    if not s.out:
        raise ConfigError("--out: give a run directory, e.g. --out runs/my-run")
    run, stop = RunDir(s.out), stop or threading.Event()
    run.path.mkdir(parents=True, exist_ok=True)
    run.stop_file.unlink(missing_ok=True)
    if not s.train.resume:
        yield Phase("data")
        yield from _follow(segment_events(_stage(s, "data", False), token, None), stop, run)
        s, note = _fit_budget(s, run, budget)
        if note:
            yield Log(f"[pipeline] {note}")
    completed = yield from _train_segments(s, token, seconds, stop, run, train_call)
    if completed:
        yield Phase("eval")
        yield from _follow(eval_call(_stage(s, "eval", True), token, None), stop, run)
    run.update(settings=to_dict(dataclasses.replace(s, stages=list(SEGMENTED_STAGES))))
    run.stop_file.unlink(missing_ok=True)
    yield Finished(completed, run.load())


def _train_segments(s: RunSettings, token: Any, seconds: Optional[float], stop: threading.Event,
                    run: RunDir, call: SegmentCall) -> Iterator[SegmentEvent]:
    """Train segment after segment; return True once training reached its last step."""
    resume, segment = s.train.resume, 0
    while not _stopped(stop, run):
        segment += 1
        yield Phase("train", segment)
        yield from _follow(call(_stage(s, "train", resume), token, seconds), stop, run)
        resume = True  # later segments continue from the checkpoint this one saved
        record = run.load().get("train") or {}
        steps, max_steps = record.get("steps", 0), record.get("max_steps", 0)
        yield SegmentEnd(segment, steps, max_steps, bool(record.get("stopped_early")))
        if _stopped(stop, run):
            return False
        if not record.get("stopped_early") or steps >= max_steps:
            return True
    return False


def resumable(run: RunDir) -> bool:
    """Whether a run stopped before its last step and has a checkpoint to continue from."""
    from .train import latest_checkpoint

    record = run.load().get("train") or {}
    return latest_checkpoint(run) is not None and record.get("steps", 0) < record.get("max_steps", 0)


def gguf_name(repo: Optional[str], run: RunDir) -> str:
    """The file name stem of a run's GGUFs: the repo's name when a Hub repo id is given (what the
    Hub page shows), else the base model's name with ``-rawtune``."""
    repo = (repo or "").strip()
    if is_repo_id(repo):
        return repo.split("/", 1)[1]
    model = run.load().get("model") or {}
    spec = model.get("upstream_id") or model.get("spec") or "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", Path(str(spec)).name) + "-rawtune"


def _stage(s: RunSettings, stage: str, resume: bool) -> dict:
    """The settings of one pipeline call as a plain dict (what crosses into a GPU call)."""
    values = to_dict(s)
    values["stages"] = [stage]
    values["train"]["resume"] = resume
    return values


def _stopped(stop: threading.Event, run: RunDir) -> bool:
    return stop.is_set() or run.stop_file.exists()


def _fit_budget(s: RunSettings, run: RunDir, budget: Any) -> tuple[RunSettings, Optional[str]]:
    """Fit the training into a step budget (known once the data stage has counted the blocks)."""
    if budget is None:
        return s, None
    t = s.train
    blocks = (run.load().get("data") or {}).get("train_blocks") or 0
    capped, note = budget.cap_steps(t.max_steps, t.epochs, t.batch_size, t.grad_accum, blocks)
    if not note:
        return s, None
    return dataclasses.replace(s, train=dataclasses.replace(t, max_steps=capped)), note


def _follow(events: Iterator[dict], stop: threading.Event, run: RunDir) -> Iterator[SegmentEvent]:
    """Turn one call's dict events into typed ones; pass a stop on to the running segment."""
    for event in events:
        if stop.is_set() and not run.stop_file.exists():
            # The STOP file reaches a training that runs in another process (a ZeroGPU call) too.
            run.stop_file.touch()
        kind = event["type"]
        if kind == "end":
            return
        if kind == "error":
            raise SegmentError(event["message"])
        yield Log(event["line"]) if kind == "log" else Tick() if kind == "tick" else Progress(event)


# ---------------------------------------------------------------- training-time estimate


@dataclass(frozen=True)
class Estimate:
    """A rough size and training time of a corpus, before anything is loaded."""

    tokens: int
    how: str  # how the tokens were counted
    epochs: float
    seconds: Optional[float]  # None when the model's size is unknown
    gpu: bool


def estimate_training(first: list[str], characters: int, model: str, preset: str, gpu: bool) -> Estimate:
    """Tokens in ``characters`` of text (measured on the documents ``first`` with the model's
    tokenizer when it is on disk, else about 4 characters per token) and the preset's training time."""
    tokenizer = quick_tokenizer(model)
    sample_chars = sum(map(len, first)) or 1
    if tokenizer is not None and first:
        sample_tokens = sum(len(ids) + 1 for ids in tokenizer(first, add_special_tokens=False)["input_ids"])
        ratio, how = sample_chars / max(sample_tokens, 1), f"measured with {Path(model).name}'s tokenizer"
    else:
        ratio, how = 4.0, "assuming about 4 characters per token"
    tokens = int(characters / ratio)
    epochs = PRESETS[concrete_preset(preset, gpu)]["epochs"]
    return Estimate(tokens, how, epochs, estimate_seconds(tokens, epochs, param_count(model), gpu), gpu)


def estimate_seconds(tokens: int, epochs: float, params: Optional[float], cuda: bool) -> Optional[float]:
    """A rough training time: LoRA costs about 6 FLOP per parameter and token, at a throughput
    typical for the device (0.2 TFLOP/s on a few CPU cores, 30 TFLOP/s effective on a GPU with
    transformers + PEFT at small batches)."""
    if not params:
        return None
    flops = 6 * params * tokens * epochs
    return flops / (30e12 if cuda else 0.2e12)


def quick_tokenizer(model: str) -> Any:
    """The model's tokenizer when it is on disk already (a local folder or the HF cache), else None."""
    from transformers import AutoTokenizer

    try:
        path = Path(model).expanduser()
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # no tokenizer at hand is fine: the estimate falls back to characters
        return None


def param_count(model: str) -> Optional[float]:
    """Rough parameter count from the table of known models, or config.json (local folders)."""
    from .models import known_param_counts

    for name, count in known_param_counts().items():
        if name in model:
            return count
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        h, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or 4 * (h or 0)
        if h and layers and vocab:
            return layers * (4 * h * h + 3 * h * inter) + vocab * h
    return None
