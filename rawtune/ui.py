"""rawtune's Gradio app: Data, Train, Export & Push and Compare tabs over the library.

Handlers come first and only call rawtune's public functions; :func:`build_demo` at the bottom
lays out the page and wires events, nothing else. Every :class:`~rawtune.errors.RawtuneError`
reaches the page as a ``gr.Error`` with its message; an unexpected exception shows its type and
message (tokens masked) while the traceback goes to the server log only.

Sessions: each browser session gets its own folder under ``RAWTUNE_RUNS`` (default ``./runs``)
holding its uploads and its one run directory; nothing (files, tokens, models in training) is
shared between sessions. Folders of closed sessions older than ``RAWTUNE_RUN_TTL_HOURS``
(default 24) are deleted when a new session starts, and a session's folder is deleted when
Gradio drops the session. Files are handed out as per-request copies, never from the runs folder.

What a visitor may do on a shared app (whose token, which paths, upload and training limits, the
GPU line) is decided in :mod:`rawtune.space`; the handlers here only apply and show it.

GPU work (training, evaluation, compare) runs inside ``@spaces.GPU`` functions, which are plain
functions off Hugging Face Spaces. Trainings, exports and Compare take turns on the GPU
(``space.SLOT``); a waiting visitor sees what runs now and a rough wait.

ZeroGPU: a ZeroGPU Space lends a GPU per call, for a limited time per call and a daily quota per
visitor (anonymous visitors get the least, signed-in free accounts more, PRO accounts the most;
see the Hub's ZeroGPU documentation for today's numbers). rawtune therefore trains there in
segments of ``RAWTUNE_SEGMENT_SECONDS`` (default 90 s): each segment is one GPU call that trains,
saves a checkpoint and returns; the next segment resumes from it until the run is done. When the
quota runs out the adapter and checkpoint stay, and Resume continues later.
"""

import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from . import space
from .errors import ConfigError, RawtuneError
from .models import known_param_counts, model_choices
from .rundir import RunDir, scrub
from .settings import (ALL_PROJECTIONS, DEFAULT_MODEL, PRESETS, QUANT_LABELS, QUANTS, DataSettings,
                       ExportSettings, PushSettings, RunSettings, TrainSettings, field_docs, from_dict, to_dict)
from .train import format_duration as _fmt_seconds

# The model list and parameter counts (for the training-time estimate) come from rawtune.models.
SMALL_MODELS = model_choices()
KNOWN_PARAMS = known_param_counts()
UPLOAD_TYPES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet"]
LOG_LINES = 200
PLOT_POINTS = 1000  # most train-loss points sent to the plot
# Handlers that may wait inside for the GPU line at once (beyond this, Gradio's own queue holds them).
WAITING_LIMIT = 16
# Seconds between page updates while a long task streams progress.
TICK = 0.5


# ---------------------------------------------------------------- environment


def on_spaces() -> bool:
    """True inside a Hugging Face Space (where OAuth login works)."""
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_expected() -> bool:
    """True where training will run on a CUDA GPU (on ZeroGPU the GPU only exists inside GPU calls)."""
    from .models import best_device

    return on_zero_gpu() or best_device() == "cuda"


def concrete_preset(preset: Optional[str]) -> str:
    """``auto`` is ``standard`` where training gets a GPU and ``quick`` on a CPU, decided here once
    so the data stage (CPU) and the training (GPU call) agree on the sequence length."""
    if not preset or preset == "auto":
        return "standard" if gpu_expected() else "quick"
    return preset


def runs_root() -> Path:
    return Path(os.environ.get("RAWTUNE_RUNS", "runs")).expanduser().resolve()


def segment_seconds(model: Optional[str] = None) -> Optional[float]:
    """Length of one training segment: set on ZeroGPU (time-limited GPU calls, sized by rawtune.train.plan
    around the model's load and save times), else unlimited."""
    value = os.environ.get("RAWTUNE_SEGMENT_SECONDS")
    if value:
        return float(value) if float(value) > 0 else None
    from .train.plan import segment_seconds as planned, shape_of

    return planned(shape_of(model or DEFAULT_MODEL), 150.0) if on_zero_gpu() else None  # 150: train_segment's duration


def gpu(duration: int) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` on Spaces; leaves the function as it is anywhere else."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


# ---------------------------------------------------------------- sessions


@dataclass
class Session:
    """One browser session's private state: its folder, its run and its stop switch."""

    dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    busy: Optional[str] = None  # what is running now ("training", "export", ...), or None
    closed: bool = False
    upload: Optional[Path] = None  # the uploaded dataset file, copied into the session folder

    @property
    def run(self) -> RunDir:
        return RunDir(self.dir / "run")

    def __deepcopy__(self, memo: dict) -> "Session":
        # Gradio copies a State's initial value; a session holds an Event and must stay one object.
        return self


# Folders of sessions whose page is still open: the TTL sweep never touches them.
_LIVE: set[Path] = set()


def cleanup_old_runs(root: Path, max_age_s: float, live: Optional[set[Path]] = None) -> list[Path]:
    """Delete session folders under ``root`` not modified for ``max_age_s`` seconds, except those
    of sessions still open (``live``, default: this process's open sessions)."""
    removed = []
    if not root.is_dir():
        return removed
    keep = {p.resolve() for p in (_LIVE if live is None else live)}
    now = time.time()
    for path in root.iterdir():
        if not path.is_dir() or not path.name.startswith("session-") or path.resolve() in keep:
            continue
        try:
            newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def new_session() -> Session:
    """A fresh session folder (and a sweep of old ones)."""
    root = runs_root()
    ttl = float(os.environ.get("RAWTUNE_RUN_TTL_HOURS", "24")) * 3600
    cleanup_old_runs(root, ttl)
    folder = root / f"session-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    _LIVE.add(folder.resolve())
    return Session(folder)


def end_session(session: Optional[Session]) -> None:
    """Gradio dropped the session: stop its training and delete its folder once idle."""
    if not isinstance(session, Session):
        return
    session.closed = True
    _LIVE.discard(session.dir.resolve())
    session.stop.set()
    if session.run.path.is_dir():
        session.run.stop_file.touch()
    if session.busy is None:
        shutil.rmtree(session.dir, ignore_errors=True)


def _session(session: Optional[Session]) -> Session:
    if not isinstance(session, Session):
        raise gr.Error("This page's session has expired: reload the page to start a new one.")
    return session


def _release(session: Session) -> None:
    session.busy = None
    if session.closed:
        shutil.rmtree(session.dir, ignore_errors=True)


def _claim(session: Session, what: str) -> None:
    if session.busy:
        raise gr.Error(f"Wait for the {session.busy} to finish (or stop it) before starting the {what}.")
    session.busy = what


# ---------------------------------------------------------------- errors and background work


def friendly(exc: BaseException) -> BaseException:
    """A page-friendly error: rawtune's own message, or the type and message of anything else.

    GeneratorExit and KeyboardInterrupt pass through untouched: they are not errors to show."""
    if isinstance(exc, (gr.Error, GeneratorExit, KeyboardInterrupt)):
        return exc
    if isinstance(exc, RawtuneError):
        return gr.Error(_public(str(exc)))
    # The server log gets the traceback, with tokens masked too.
    print(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))), end="", file=sys.stderr)
    return gr.Error(_public(f"Unexpected {type(exc).__name__}: {exc}. Details are in the server log."))


def _public(text: str) -> str:
    """A message fit for the page: tokens masked, the server's folders cut out of paths."""
    return space.hide_paths(scrub(text), [runs_root()])


def _token(token_text: Optional[str], oauth_token: Any) -> Any:
    """The Hub token for this request: the pasted token or the visitor's Space login. The
    machine's own token (HF_TOKEN, hf CLI) only where the app is not shared or its owner
    allows it; otherwise False, which the Hub clients read as "send no token". Never stored."""
    from .hubauth import resolve_token

    return resolve_token(token_text or None, oauth_token, allow_ambient=space.allow_owner_token())


class Background:
    """Runs ``fn(log=...)`` in a thread; the handler polls it to stream log lines and events."""

    def __init__(self, fn: Callable[..., Any], *args: Any, with_callback: bool = False, **kwargs: Any):
        self.events: "queue.Queue[dict]" = queue.Queue()
        if with_callback:
            kwargs["callback"] = lambda event: self.events.put(dict(event))
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            self.result = fn(*args, log=lambda line: self.events.put({"type": "log", "line": str(line)}), **kwargs)
        except BaseException as exc:  # handed to the handler thread, which shows it in the page
            self.error = exc
        finally:
            self.done.set()

    def poll(self, timeout: float = TICK) -> list[dict]:
        """Events that arrived within ``timeout`` seconds (all of them once the work is done)."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout))
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return out

    def finished(self) -> bool:
        return self.done.is_set() and self.events.empty()

    def raise_error(self) -> None:
        if self.error is not None:
            raise friendly(self.error)


def _append(log: list[str], line: str) -> str:
    # Show paths inside the runs folder relative to it: the server's layout is nobody's business.
    log.append(_public(line.rstrip()))
    del log[:-LOG_LINES]
    return "\n".join(log)


# ---------------------------------------------------------------- Data tab


def _data_settings(dataset: str, config: str, split: str, text_column: Optional[str],
                   min_chars: Any, max_documents: Any, dedupe: bool, split_blank_lines: bool,
                   streaming: bool, revision: str, upload: Optional[Path], own: Path) -> DataSettings:
    source = str(upload) if upload else space.guard_source(dataset, own, "dataset")
    streaming = bool(streaming) or space.force_streaming()
    if not source:
        raise ConfigError("Give a Hub dataset id (user/name) or upload a file first")
    return DataSettings(
        dataset=source, dataset_config=(config or "").strip() or None, split=(split or "").strip() or "train",
        revision=(revision or "").strip() or None, streaming=bool(streaming),
        max_documents=_int_or_none(max_documents, "max documents") or None,  # 0 or empty: all
        text_column=text_column or None, split_blank_lines=bool(split_blank_lines),
        min_chars=_int_or_none(min_chars, "min characters") or 0, dedupe=bool(dedupe))


def _int_or_none(value: Any, name: str) -> Optional[int]:
    number = _float_or_none(value, name)
    if number is None:
        return None
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number, not {value}")
    return int(number)


def _float_or_none(value: Any, name: str) -> Optional[float]:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, not {value!r}") from None


def _quick_tokenizer(model: str) -> Any:
    """The model's tokenizer when it is on disk already (a local folder or the HF cache), else None."""
    from transformers import AutoTokenizer

    try:
        path = Path(model).expanduser()
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # no tokenizer at hand is fine: the estimate falls back to characters
        return None


def _param_count(model: str) -> Optional[float]:
    """Rough parameter count from config.json (local folders) or the list of known models."""
    import json

    for name, count in KNOWN_PARAMS.items():
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


def estimate_seconds(tokens: int, epochs: float, params: Optional[float], cuda: bool) -> Optional[float]:
    """A rough training time: LoRA costs about 6 FLOP per parameter and token, at a throughput
    typical for the device (0.2 TFLOP/s on a few CPU cores, 30 TFLOP/s effective on a GPU with
    transformers + PEFT at small batches)."""
    if not params:
        return None
    flops = 6 * params * tokens * epochs
    return flops / (30e12 if cuda else 0.2e12)


def load_data(session: Optional[Session], dataset: str, config: str, split: str, upload: Optional[str],
              text_column: Optional[str], min_chars: Any, max_documents: Any, dedupe: bool,
              split_blank_lines: bool, streaming: bool, revision: str, model: str, preset: str,
              token_text: Optional[str], oauth_token: gr.OAuthToken | None):
    """Read the source and show the column choice, what cleaning keeps, tokens and a time estimate."""
    session = _session(session)
    try:
        from .data import preview

        if upload:
            session.upload = _copy_upload(session, Path(upload))
        else:
            session.upload = None
        settings = _data_settings(dataset, config, split, text_column, min_chars, max_documents, dedupe,
                                  split_blank_lines, streaming, revision, session.upload, session.dir)
        model = _estimate_model(session, model)
        info = preview(settings, n=50, token=_token(token_text, oauth_token))
        if session.upload is not None:
            info["source"] = f"uploaded {session.upload.name}"
        return _data_outputs(info, model, preset)
    except BaseException as exc:
        raise friendly(exc) from None


def load_new_source(session: Optional[Session], dataset: str, config: str, split: str, upload: Optional[str],
                    text_column: Optional[str], min_chars: Any, max_documents: Any, dedupe: bool,
                    split_blank_lines: bool, streaming: bool, revision: str, model: str, preset: str,
                    token_text: Optional[str], oauth_token: gr.OAuthToken | None):
    """The Load button: a new source gets its column chosen afresh (the old choice may not exist)."""
    return load_data(session, dataset, config, split, upload, None, min_chars, max_documents, dedupe,
                     split_blank_lines, streaming, revision, model, preset, token_text, oauth_token)


def _estimate_model(session: Session, model: str) -> str:
    """The model whose tokenizer and size the estimate may read (the default one when the box
    names something this visitor may not read)."""
    try:
        return space.guard_source(model, session.dir, "model", (_default_model(),)) or _default_model()
    except ConfigError:
        return _default_model()


def _default_model() -> str:
    return os.environ.get("RAWTUNE_DEFAULT_MODEL", DEFAULT_MODEL)


def _copy_upload(session: Session, path: Path) -> Path:
    """Keep the upload in the session's own folder, under its original name (the suffix matters)."""
    if path.suffix.lower() not in UPLOAD_TYPES:
        raise ConfigError(f"{path.name}: unsupported file type; upload one of {', '.join(UPLOAD_TYPES)}")
    space.check_upload(path)
    target = session.dir / "uploads" / re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def _data_outputs(info: dict, model: str, preset: str):
    first = info["first"]
    tokenizer = _quick_tokenizer(model or DEFAULT_MODEL)
    sample_chars = sum(map(len, first)) or 1
    if tokenizer is not None and first:
        sample_tokens = sum(len(ids) + 1 for ids in tokenizer(first, add_special_tokens=False)["input_ids"])
        ratio, how = sample_chars / max(sample_tokens, 1), f"measured with {Path(model).name}'s tokenizer"
    else:
        ratio, how = 4.0, "assuming about 4 characters per token"
    tokens = int(info["characters"] / ratio)
    epochs = PRESETS[concrete_preset(preset)]["epochs"]
    cuda = gpu_expected()
    eta = estimate_seconds(tokens, epochs, _param_count(model or DEFAULT_MODEL), cuda)
    dropped = info["dropped_empty"] + info["dropped_short"] + info["dropped_duplicate"]
    summary = (
        f"**{info['source']}** · text column **{info['column'] or '(plain text)'}** ({info['column_reason']})\n\n"
        f"| documents read | kept | dropped (empty / short / duplicate) | characters | tokens (≈) | training time (rough) |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {info['documents_read']:,} | {info['documents_kept']:,} | {dropped:,} ({info['dropped_empty']} / "
        f"{info['dropped_short']} / {info['dropped_duplicate']}) | {info['characters']:,} | {tokens:,} | "
        f"{_fmt_seconds(eta)} for {epochs:g} epoch(s) on {'GPU' if cuda else 'CPU'} |\n\n"
        f"Tokens {how}. Held-out documents for perplexity are taken from these."
    )
    rows = [[i + 1, len(t), t[:400] + ("…" if len(t) > 400 else "")] for i, t in enumerate(first[:20])]
    columns = info["columns"] or []
    column_update = gr.Dropdown(choices=columns, value=info["column"] if columns else None,
                                interactive=bool(columns))
    return summary, rows, column_update


# ---------------------------------------------------------------- Train tab


ADVANCED_FIELDS = ["backend", "seq_len", "lora_r", "lora_alpha", "lora_dropout", "use_rslora",
                   "target_modules", "train_embeddings", "embedding_learning_rate", "load_in_4bit",
                   "gradient_checkpointing", "batch_size", "grad_accum", "epochs", "max_steps",
                   "learning_rate", "warmup_ratio", "lr_scheduler", "weight_decay", "optimizer", "seed",
                   "save_steps", "eval_steps", "eval_batches", "logging_steps"]
INT_FIELDS = {"seq_len", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_steps", "seed",
              "save_steps", "eval_steps", "eval_batches", "logging_steps"}
FLOAT_FIELDS = {"lora_dropout", "embedding_learning_rate", "epochs", "learning_rate", "warmup_ratio",
                "weight_decay"}
TRISTATE_FIELDS = {"use_rslora", "train_embeddings"}  # "preset", "on" or "off"
# Number fields shown as text boxes (empty = preset), in ADVANCED_FIELDS order.
TEXT_FIELDS = [n for n in ADVANCED_FIELDS if (n in INT_FIELDS or n in FLOAT_FIELDS) and n != "seed"]
CHOICE_FIELDS = {"backend": ["auto", "peft", "unsloth"], "gradient_checkpointing": ["preset", "auto", "on", "off", "unsloth"],
                 "lr_scheduler": ["preset", "cosine", "linear", "constant"], "optimizer": ["auto", "adamw_torch", "adamw_8bit"]}


def train_settings_from_form(model: str, preset: str, values: dict[str, Any]) -> TrainSettings:
    """TrainSettings from the form; an empty field means "the preset's value"."""
    t = TrainSettings(model=(model or "").strip() or DEFAULT_MODEL, preset=concrete_preset(preset))
    for name, value in values.items():
        if name in INT_FIELDS or name in FLOAT_FIELDS:
            parse = _int_or_none if name in INT_FIELDS else _float_or_none
            number = parse(value, name.replace("_", " "))
            # Empty keeps the dataclass default: None (the preset's) or a fixed one like eval_batches 8.
            if number is not None:
                setattr(t, name, number)
        elif name in TRISTATE_FIELDS:
            setattr(t, name, None if value in (None, "", "preset") else value == "on")
        elif name == "target_modules":
            setattr(t, name, list(value) if value else None)
        elif name == "load_in_4bit":
            t.load_in_4bit = bool(value)
        elif name in CHOICE_FIELDS:
            setattr(t, name, None if value == "preset" else value)
    return t


def preset_summary(preset: str) -> str:
    """What a preset sets, shown under the preset choice."""
    name = concrete_preset(preset)
    p = PRESETS[name]
    shown = f"`auto` = `{name}` here" if name != preset else f"`{name}`"
    return (f"{shown}: seq_len {p['seq_len']}, LoRA r {p['lora_r']} / alpha {p['lora_alpha']}"
            f"{' rsLoRA' if p['use_rslora'] else ''}, {'embeddings trained, ' if p['train_embeddings'] else ''}"
            f"batch {p['batch_size']}×{p['grad_accum']}, {p['epochs']:g} epoch(s), lr {p['learning_rate']:g}, "
            f"{p['lr_scheduler']}, eval every {p['eval_steps'] or 'end only'}. Empty Advanced fields take these values.")


def _plot_frame(history: list[dict]) -> Any:
    import pandas as pd

    steps = [e for e in history if e["type"] == "step"]
    if len(steps) > PLOT_POINTS:  # keep the page light on long runs: every k-th step, and the last
        k = -(-len(steps) // PLOT_POINTS)
        steps = steps[::k] + ([steps[-1]] if (len(steps) - 1) % k else [])
    points = [(e["step"], e["loss"], "train loss") for e in steps]
    points += [(e["step"], e["eval_loss"], "eval loss") for e in history if e["type"] == "eval"]
    # Explicit dtypes: an empty frame would otherwise be "object" and the plot's axes nominal.
    frame = pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                          "loss": pd.Series([p[1] for p in points], dtype="float64"),
                          "series": pd.Series([p[2] for p in points], dtype="string")})
    # The browser builds the chart (and its colour scale) once and then only swaps the data, so a
    # series that appears later (the first eval loss) would stay invisible; a changed legend list
    # makes it rebuild the chart.
    return gr.LinePlot(value=frame, colors_in_legend=sorted({p[2] for p in points}))


def _status(event: Optional[dict], points: int, phase: str) -> str:
    if not event:
        return f"**{phase}**"
    return (f"**{phase}** · step **{event['step']}/{event['max_steps']}** · loss {event['loss']:.4f} · "
            f"{event['tokens_per_s']:,.0f} tokens/s · ETA {_fmt_seconds(event['eta_s'])} · {points} plot points")


def _events(settings_dict: dict, token: Optional[str], seconds: Optional[float]) -> Iterator[dict]:
    """Run the pipeline for ``settings_dict`` in a thread and yield its progress events and log lines.

    With ``seconds`` the run is asked to stop (after the current step, keeping a checkpoint) when
    that much time has passed: that is a ZeroGPU segment. Ends with ``{"type": "end"}`` or
    ``{"type": "error", "message": ...}``.
    """
    from .pipeline import run_pipeline

    stop = threading.Event()
    work = Background(run_pipeline, from_dict(settings_dict), token=token, stop=stop, with_callback=True)
    deadline = time.time() + seconds if seconds else None
    try:
        while not work.finished():
            for event in work.poll():
                yield event
            if deadline and time.time() > deadline and not stop.is_set():
                stop.set()
                yield {"type": "log", "line": "[app] GPU segment time is up: checkpointing, then resuming"}
            yield {"type": "tick"}
    finally:
        # The page went away (the generator was closed): stop the training after this step.
        if not work.done.is_set():
            stop.set()
    if work.error is not None:
        error = friendly(work.error)
        yield {"type": "error", "message": str(getattr(error, "message", error))}
    yield {"type": "end"}


# CPU work (the data stage) and GPU work (training, evaluation) are the same generator; only the
# GPU ones are decorated, so a ZeroGPU Space spends GPU time on GPU work only.
prepare_events = _events


@gpu(duration=int(float(os.environ.get("RAWTUNE_SEGMENT_SECONDS") or 90)) + 60)
def train_segment(settings_dict: dict, token: Optional[str], seconds: Optional[float]) -> Iterator[dict]:
    yield from _events(settings_dict, token, seconds)


@gpu(duration=120)
def eval_segment(settings_dict: dict, token: Optional[str]) -> Iterator[dict]:
    yield from _events(settings_dict, token, None)


def _buttons(training: bool, can_resume: bool) -> tuple:
    return (gr.Button(interactive=not training), gr.Button(interactive=training),
            gr.Button(interactive=(not training) and can_resume))


def _can_resume(run: RunDir) -> bool:
    from .train import latest_checkpoint

    record = run.load().get("train") or {}
    return latest_checkpoint(run) is not None and record.get("steps", 0) < record.get("max_steps", 0)


def start_training(session: Optional[Session] = None, token_text: Optional[str] = None,
                   oauth_token: gr.OAuthToken | None = None, progress=gr.Progress(),
                   dataset: str = "", config: str = "", split: str = "train", upload: Optional[str] = None,
                   text_column: Optional[str] = None,
                   min_chars: Any = 20, max_documents: Any = None, dedupe: bool = True,
                   split_blank_lines: bool = False, streaming: bool = False, revision: str = "",
                   model: str = DEFAULT_MODEL, preset: str = "auto", *advanced: Any):
    """Start a new run: data stage, training (in segments on ZeroGPU), held-out perplexity."""
    session = _session(session)
    try:
        from .settings import validate

        session.upload = _copy_upload(session, Path(upload)) if upload else None
        data = _data_settings(dataset, config, split, text_column, min_chars, max_documents, dedupe,
                              split_blank_lines, streaming, revision, session.upload, session.dir)
        model = space.guard_source(model, session.dir, "model", (_default_model(),))
        train = train_settings_from_form(model, preset, dict(zip(ADVANCED_FIELDS, advanced)))
        settings = validate(RunSettings(out=str(session.run.path), data=data, train=train))
    except BaseException as exc:
        raise friendly(exc) from None
    yield from _train_loop(session, settings, _token(token_text, oauth_token), False, progress)


def resume_training(session: Optional[Session], token_text: Optional[str],
                    oauth_token: gr.OAuthToken | None, progress=gr.Progress()):
    """Continue the session's stopped run from its newest checkpoint, with its own settings."""
    session = _session(session)
    record = session.run.load()
    if not record.get("settings") or not _can_resume(session.run):
        raise gr.Error("Nothing to resume: start a training first (Stop keeps a checkpoint to resume from).")
    settings = from_dict(record["settings"])
    yield from _train_loop(session, settings, _token(token_text, oauth_token), True, progress)


def _wait_for_gpu(ticket: "space.Ticket", gone: Callable[[], bool]) -> Iterator[str]:
    """Yield what is ahead of ``ticket`` (position, what runs now, a rough wait) until it holds
    the GPU; returns early once ``gone()`` (the visitor stopped or left)."""
    while not space.SLOT.my_turn(ticket) and not gone():
        yield space.SLOT.describe(ticket)
        time.sleep(TICK)


def _cap_steps(settings: RunSettings, run: RunDir, log: list[str]) -> None:
    """Fit the training into this app's step budget (known once the data stage has counted blocks)."""
    t = settings.train
    blocks = (run.load().get("data") or {}).get("train_blocks") or 0
    capped, note = space.SLOT.budget.cap_steps(t.max_steps, t.epochs, t.batch_size, t.grad_accum, blocks)
    if note:
        t.max_steps = capped
        _append(log, f"[app] {note}")


def _train_loop(session: Session, settings: RunSettings, token: Any, resume: bool, progress: Any):
    """The shared body of Start and Resume: stream status, plot, log and result to the page.

    The data stage runs first (CPU); then the run waits its turn in the GPU line, trains within
    this app's budget, and leaves the line when done, stopped or gone.
    """
    _claim(session, "training")
    run = session.run
    log: list[str] = []
    history: list[dict] = []
    last: Optional[dict] = None
    ticket: Optional[space.Ticket] = None
    budget = space.SLOT.budget
    over: Optional[str] = None  # why the budget stopped the training, if it did

    def frame(phase: str, result: Any = None, training: bool = True, plot: bool = True) -> tuple:
        if last:
            progress((last["step"], last["max_steps"]), desc=f"{phase}: step", unit="steps")
        return (_status(last, len(history), phase), _plot_frame(history) if plot else gr.skip(), "\n".join(log),
                gr.skip() if result is None else result,
                *_buttons(training, False if training else _can_resume(run)))

    def follow(events: Iterator[dict], phase: str) -> Iterator[tuple]:
        nonlocal last, over
        for event in events:
            kind = event["type"]
            if kind == "error":
                raise gr.Error(event["message"])
            if kind == "end":
                return
            if ticket is not None and ticket.started and over is None and phase == "Training":
                over = budget.time_up(time.time() - ticket.started)
                if over:  # stop after this step, as the Stop button does, keeping a checkpoint
                    session.stop.set()
                    run.stop_file.touch()
                    _append(log, f"[app] {over}: stopping after this step")
            if kind == "tick":
                continue  # nothing new to show
            if kind == "log":
                _append(log, event["line"])
            elif kind in ("step", "eval"):
                history.append(event)
                last = event if kind == "step" else last
                if kind == "step" and ticket is not None:
                    space.SLOT.report(ticket, event["step"], event["max_steps"], event.get("eta_s"))
            # Only new points resend the plot (the whole history goes each time).
            yield frame(phase, plot=kind in ("step", "eval"))

    try:
        session.stop.clear()
        if resume:
            history = list((run.load().get("train") or {}).get("history", []))
            last = next((e for e in reversed(history) if e["type"] == "step"), None)
        else:
            shutil.rmtree(run.path, ignore_errors=True)
        run.path.mkdir(parents=True, exist_ok=True)
        run.stop_file.unlink(missing_ok=True)
        _append(log, "[app] resuming from the newest checkpoint" if resume else "[app] preparing the data")
        if budget.seconds or budget.steps:
            _append(log, f"[app] this app gives each training {budget.describe()}")
        yield frame("Starting", result="")
        if not resume:
            settings.stages, settings.train.resume = ["data"], False
            yield from follow(prepare_events(to_dict(settings), token, None), "Preparing data")
            _cap_steps(settings, run, log)
        ticket = space.SLOT.join("training", session.dir.name)
        for waiting in _wait_for_gpu(ticket, lambda: session.stop.is_set() or session.closed):
            yield frame(waiting, plot=False)
        if not space.SLOT.my_turn(ticket):
            yield frame("Stopped while waiting for the GPU", result="", training=False)
            return
        finished = False
        while not session.stop.is_set():
            settings.stages, settings.train.resume = ["train"], resume
            yield from follow(train_segment(to_dict(settings), token, segment_seconds(settings.train.model)), "Training")
            resume = True  # later segments continue from the checkpoint this one saved
            record = run.load().get("train") or {}
            if run.stop_file.exists() or session.stop.is_set():
                break
            if not record.get("stopped_early") or record.get("steps", 0) >= record.get("max_steps", 0):
                finished = True
                break
        if finished:
            _append(log, "[app] measuring held-out perplexity of the base and the tuned model")
            yield frame("Measuring held-out perplexity")
            settings.stages = ["eval"]
            yield from follow(eval_segment(to_dict(settings), token), "Measuring held-out perplexity")
            phase = "Done"
        elif over:
            phase = (f"Stopped: {over}. The adapter and a checkpoint are kept (Resume queues for another "
                     "turn; Export uses the adapter)")
        else:
            phase = "Stopped: the adapter and a checkpoint are kept (Resume continues; Export uses the adapter)"
        yield frame(phase, result=_result_text(run), training=False)
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        if ticket is not None:
            space.SLOT.leave(ticket)
        run.stop_file.unlink(missing_ok=True)
        _release(session)


def _result_text(run: RunDir) -> str:
    record = run.load()
    train = record.get("train") or {}
    metrics = record.get("metrics") or {}
    parts = []
    if train:
        parts.append(f"{train.get('steps')}/{train.get('max_steps')} steps, final loss "
                     f"{train.get('final_loss') or float('nan'):.4f}, "
                     f"{metrics.get('train_tokens_per_s') or 0:,.0f} tokens/s ({train.get('backend')})")
    if metrics.get("ppl_base") and metrics.get("ppl_tuned"):
        base, tuned = metrics["ppl_base"], metrics["ppl_tuned"]
        parts.append(f"held-out perplexity **{base:.3f} → {tuned:.3f}** ({100 * (tuned - base) / base:+.1f} %)")
    return " · ".join(parts)


def training_failed(session: Optional[Session]) -> tuple:
    """After an error the last frame still shows "training": give Start (and Resume) back."""
    run = session.run if isinstance(session, Session) else None
    return _buttons(False, run is not None and _can_resume(run))


def stop_training(session: Optional[Session]) -> str:
    """Ask the running training to stop after the current step (the adapter is kept)."""
    if not isinstance(session, Session) or session.busy != "training":
        return "Nothing is training."
    session.stop.set()
    # The STOP file reaches a training that runs in another process (a ZeroGPU call) as well.
    session.run.stop_file.touch()
    return "**Stopping after the current step…** (the adapter and a checkpoint are kept)"


# ---------------------------------------------------------------- Export & Push tab


def _gguf_table(run: RunDir) -> list[list]:
    record = run.load()
    merged = (record.get("export") or {}).get("ppl_merged")
    rows = [["merged (PyTorch)", "merged/", None, round(merged, 4) if merged else None, ""]]
    for label, info in (record.get("gguf") or {}).items():
        ppl, rise = info.get("ppl"), info.get("ppl_increase_pct")
        rows.append([label, Path(str(info.get("file", ""))).name, round(info.get("bytes", 0) / 1e6, 2),
                     round(ppl, 4) if ppl else None, f"{rise:+.2f} %" if rise is not None else ""])
    return rows


def _ollama_lines(run: RunDir) -> str:
    record = run.load()
    quants = list((record.get("gguf") or {}).keys())
    hub = record.get("hub") or {}
    if hub.get("repo"):
        lines = [f"ollama run hf.co/{hub['repo']}:{q}" for q in quants]
        return "\n".join(lines)
    name = (record.get("export") or {}).get("name") or run.path.name
    return (f"# after pushing, `ollama run hf.co/<repo>:{quants[0] if quants else 'Q4_K_M'}`; locally:\n"
            f"cd {run.gguf_dir.name} && ollama create {name} -f Modelfile && ollama run {name}")


def _export_name(repo: str, run: RunDir) -> Optional[str]:
    repo = (repo or "").strip()
    if "/" in repo and repo.split("/", 1)[1]:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", repo.split("/", 1)[1])
    model = run.load().get("model") or {}
    spec = model.get("upstream_id") or model.get("spec") or "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", Path(str(spec)).name) + "-rawtune"


def export_model(session: Optional[Session], quants: list[str], repo: str):
    """Merge, convert and quantize the session's run to GGUF, streaming the log."""
    session = _session(session)
    run = session.run
    if not run.has_adapter():
        raise gr.Error("No adapter yet: train first in the Train tab (Stop also keeps the adapter).")
    if not quants:
        raise gr.Error("Tick at least one quant type (Q4_K_M is what Ollama pulls by default).")
    _claim(session, "export")
    log: list[str] = []
    ticket = space.SLOT.join("export", session.dir.name)
    try:
        from .export import export_run

        for waiting in _wait_for_gpu(ticket, lambda: session.closed):
            yield waiting, gr.skip(), gr.skip(), gr.skip()
        if not space.SLOT.my_turn(ticket):
            return
        settings = ExportSettings(quant=[q.lower() for q in quants], name=_export_name(repo, run))
        work = Background(export_run, run, settings)
        while not work.finished():
            for event in work.poll():
                _append(log, event["line"])
            yield "\n".join(log), gr.skip(), gr.skip(), gr.skip()
        work.raise_error()
        for warning in (work.result or {}).get("warnings", []):
            gr.Warning(warning)
        modelfile = _hand_out(run.gguf_dir / "Modelfile")
        yield ("\n".join(log), _gguf_table(run), _ollama_lines(run),
               gr.DownloadButton(value=str(modelfile) if modelfile else None, visible=modelfile is not None))
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        space.SLOT.leave(ticket)
        _release(session)


def _hand_out(path: Path) -> Optional[Path]:
    """A copy of ``path`` in a fresh temporary folder for this one request. Gradio serves files it
    was handed by a handler; the runs folder itself is never opened to the file route."""
    if not path.is_file():
        return None
    folder = Path(tempfile.mkdtemp(prefix="rawtune-file-"))
    return Path(shutil.copy2(path, folder / path.name))


def push_model(session: Optional[Session], repo: str, private: bool, previous_log: str,
               token_text: Optional[str], oauth_token: gr.OAuthToken | None):
    """Push the exported run to ``repo`` in one commit; show the links and the ollama lines."""
    session = _session(session)
    run = session.run
    if not run.gguf_dir.is_dir() or not any(run.gguf_dir.glob("*.gguf")):
        raise gr.Error("Nothing exported yet: press Export first, then Push.")
    token = _token(token_text, oauth_token)
    if not token:
        raise gr.Error("Sign in with Hugging Face (or paste a token with write access) to push.")
    _claim(session, "push")
    log: list[str] = [_public(line) for line in (previous_log or "").splitlines()]
    try:
        from .publish.push import push_run

        work = Background(push_run, run, PushSettings(repo=(repo or "").strip(), private=bool(private)), token=token)
        while not work.finished():
            for event in work.poll():
                _append(log, event["line"])
            yield "\n".join(log), gr.skip(), gr.skip()
        work.raise_error()
        hub = work.result
        links = [f"**Pushed:** [{hub['repo']}]({hub['url']}) (commit `{str(hub.get('commit', ''))[:10]}`"
                 f"{', private' if hub.get('private') else ''})"]
        links += [f"- [{q} GGUF]({hub['url']}/blob/main/{Path(str(info.get('file', ''))).name})"
                  for q, info in (run.load().get("gguf") or {}).items()]
        yield "\n".join(log), "\n".join(links), _ollama_lines(run)
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        _release(session)


def default_repo(profile: gr.OAuthProfile | None) -> str:
    """Pre-fill the repo box with the signed-in user's namespace."""
    if profile is None:
        return ""
    return f"{profile.username}/my-rawtune-model"


# ---------------------------------------------------------------- Compare tab


def compare_choices(session: Optional[Session]):
    """The tuned models this session can compare with (PyTorch, and each exported GGUF)."""
    from .compare import tuned_choices

    if not isinstance(session, Session) or not session.run.exists():
        return gr.Dropdown(choices=["pytorch"], value="pytorch")
    choices = tuned_choices(session.run.path) or ["pytorch"]
    return gr.Dropdown(choices=choices, value=choices[0])


@gpu(duration=60)
def compare_stream(run_path: str, prompt: str, mode: str, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, tuned: str) -> Iterator[tuple[str, str]]:
    from .compare import stream_compare

    yield from stream_compare(run_path, prompt, mode, max_new_tokens, temperature, top_p, seed, tuned)


def run_compare(session: Optional[Session], prompt: str, mode: str, tuned: str, max_new_tokens: Any,
                temperature: Any, top_p: Any, seed: Any):
    """Stream the base and the tuned answers side by side."""
    session = _session(session)
    if session.busy == "training":
        raise gr.Error("A training is running in this session: wait for it or stop it, then compare.")
    if not session.run.exists():
        raise gr.Error("Nothing to compare yet: train a model first.")
    # Compare loads up to three models: it waits for the GPU like a training does.
    ticket = space.SLOT.join("compare", session.dir.name)
    try:
        for waiting in _wait_for_gpu(ticket, lambda: session.closed):
            yield waiting, gr.skip()
        if not space.SLOT.my_turn(ticket):
            return
        pairs = compare_stream(str(session.run.path), prompt, mode or "completion",
                               _int_or_none(max_new_tokens, "max new tokens") or 64,
                               _float_or_none(temperature, "temperature") or 0.0,
                               _float_or_none(top_p, "top-p") or 1.0,
                               _int_or_none(seed, "seed") or 0, tuned or "pytorch")
        kind = tuned or "pytorch"
        label = ("tuned model (PyTorch, base + adapter)" if kind == "pytorch"
                 else f"tuned model ({kind.split(':', 1)[-1]} GGUF in llama.cpp, as Ollama runs it)")
        # Clear both boxes first, so a new answer never looks like the previous one.
        yield "", gr.Textbox(value="", label=label)
        last = time.time()
        base = tuned_text = ""
        for base, tuned_text in pairs:
            if time.time() - last >= 0.1:
                last = time.time()
                yield base, tuned_text
        yield base, tuned_text
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        space.SLOT.leave(ticket)


# ---------------------------------------------------------------- layout and wiring


INTRO = """# rawtune
**Raw text in, an Ollama-pullable small model out.** Load a corpus, continue pretraining a small
model with LoRA, export GGUF quants, push them to the Hub and run them with `ollama run hf.co/...`.
"""


def _advanced_input(name: str, info: str) -> gr.components.Component:
    """The input for one TrainSettings field; empty (or "preset") means the preset's value."""
    label = name.replace("_", " ")
    if name in CHOICE_FIELDS:
        choices = CHOICE_FIELDS[name]
        return gr.Dropdown(choices, value=choices[0], label=label, info=info, elem_id=f"adv-{name}")
    if name in TRISTATE_FIELDS:
        return gr.Radio(["preset", "on", "off"], value="preset", label=label, info=info, elem_id=f"adv-{name}")
    if name == "target_modules":
        return gr.CheckboxGroup(ALL_PROJECTIONS, value=[], label=label, elem_id=f"adv-{name}",
                                info=info + " (none ticked: the preset's, all seven)")
    if name == "load_in_4bit":
        return gr.Checkbox(False, label=label, info=info, elem_id=f"adv-{name}")
    if name == "seed":
        return gr.Number(3407, label=label, info=info, precision=0, elem_id=f"adv-{name}")
    # A textbox, not gr.Number: an empty box must mean "the preset's value", and Number shows 0.
    return gr.Textbox("", label=label, info=info, elem_id=f"adv-{name}", placeholder=_preset_hint(name, "auto"))


def _preset_hint(name: str, preset: str) -> str:
    chosen = PRESETS[concrete_preset(preset)]
    if name not in chosen and getattr(TrainSettings(), name) is not None:
        return f"default: {getattr(TrainSettings(), name)}"
    value = chosen.get(name)
    if name == "max_steps":
        return "from epochs"
    if name == "embedding_learning_rate" and value is None:
        return "preset: learning rate / 10"
    return f"preset: {value:g}" if isinstance(value, (int, float)) else f"preset: {value}"


def preset_changed(preset: str) -> list:
    """Show the new preset's values as the placeholders of the empty Advanced boxes."""
    return [preset_summary(preset)] + [gr.Textbox(placeholder=_preset_hint(n, preset)) for n in TEXT_FIELDS]


def launch_options() -> dict[str, Any]:
    """``demo.launch`` arguments that keep visitors apart: no folder is opened to Gradio's file
    route (files are handed out per request), and uploads are capped."""
    options: dict[str, Any] = {"footer_links": ["gradio", "settings"]}
    cap = space.max_upload_bytes()
    if cap:
        options["max_file_size"] = cap
    return options


def build_demo() -> gr.Blocks:
    """The whole app; ``app.py`` launches it."""
    docs = field_docs(TrainSettings)
    data_docs = field_docs(DataSettings)
    default_model = os.environ.get("RAWTUNE_DEFAULT_MODEL", DEFAULT_MODEL)
    with gr.Blocks(title="rawtune", delete_cache=(3600, 24 * 3600)) as demo:
        session = gr.State(new_session, delete_callback=end_session)
        gr.Markdown(INTRO)
        with gr.Row():
            if on_spaces() or os.environ.get("RAWTUNE_LOGIN_BUTTON") == "1":
                gr.LoginButton(scale=0, min_width=260)
                token_text = gr.State(None)
            else:
                token_text = gr.Textbox(label="Hugging Face token (optional)", type="password",
                                        placeholder="hf_… for private datasets, gated models and pushes"
                                                    + ("; HF_TOKEN or `hf auth login` work too"
                                                       if space.allow_owner_token() else ""), scale=3,
                                        elem_id="token")

        with gr.Tabs():
            # ---------------- Data
            with gr.Tab("Data", id="data"):
                with gr.Row():
                    with gr.Column(scale=3):
                        dataset = gr.Textbox(label="Hub dataset id", placeholder="user/name",
                                             info=data_docs["dataset"], elem_id="dataset")
                        with gr.Row():
                            config = gr.Textbox(label="config", placeholder="(default)", info=data_docs["dataset_config"])
                            split = gr.Textbox("train", label="split", info=data_docs["split"])
                            text_column = gr.Dropdown([], value=None, label="text column", allow_custom_value=True,
                                                      info="default 'text', else the longest string column",
                                                      elem_id="text-column")
                    upload = gr.File(label="…or upload a file", file_types=UPLOAD_TYPES, scale=2,
                                     elem_id="upload")
                with gr.Accordion("Data options", open=False):
                    with gr.Row():
                        min_chars = gr.Number(20, label="min characters", info=data_docs["min_chars"], precision=0)
                        max_documents = gr.Number(None, label="max documents", info=data_docs["max_documents"],
                                                  precision=0, placeholder="all")
                    with gr.Row():
                        dedupe = gr.Checkbox(True, label="drop duplicates", info=data_docs["dedupe"])
                        split_blank = gr.Checkbox(False, label="split at blank lines", info=data_docs["split_blank_lines"])
                        streaming = gr.Checkbox(False, label="stream", info=data_docs["streaming"])
                        revision = gr.Textbox(label="revision", placeholder="main", info=data_docs["revision"])
                load_btn = gr.Button("Load dataset", variant="primary", elem_id="load-data")
                data_summary = gr.Markdown(elem_id="data-summary")
                first_docs = gr.Dataframe(headers=["#", "characters", "text"], datatype=["number", "number", "str"],
                                          label="first documents (after cleaning)", wrap=True, max_height=360,
                                          interactive=False, elem_id="first-docs")

            # ---------------- Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    model = gr.Dropdown(list(dict.fromkeys([default_model] + SMALL_MODELS)), value=default_model,
                                        allow_custom_value=True, label="base model", scale=3,
                                        info=("a listed model, any Hub id, a local HF folder or a .gguf file"
                                              if space.allow_server_paths() else "a listed model or any Hub id"),
                                        elem_id="model")
                    preset = gr.Radio(["auto"] + list(PRESETS), value="auto",
                                      label="preset", scale=2, elem_id="preset")
                recipe = gr.Markdown(preset_summary(preset.value))
                budget = space.SLOT.budget
                if budget.seconds or budget.steps:
                    gr.Markdown(f"This app is shared: each training gets {budget.describe()}, then stops "
                                "with its adapter and a checkpoint kept; trainings, exports and Compare "
                                "take turns on the GPU.", elem_id="budget")
                with gr.Accordion("Advanced (every training setting)", open=False, elem_id="advanced"):
                    advanced = []
                    for start in range(0, len(ADVANCED_FIELDS), 4):
                        with gr.Row():
                            advanced += [_advanced_input(n, docs.get(n, "")) for n in ADVANCED_FIELDS[start:start + 4]]
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    resume_btn = gr.Button("Resume", interactive=False, elem_id="resume")
                status = gr.Markdown("Load a dataset, pick a model, then start.", elem_id="train-status")
                plot = gr.LinePlot(x="step", y="loss", color="series", label="loss", height=340,
                                   x_title="optimizer step", y_title="loss", elem_id="loss-plot")
                result = gr.Markdown(elem_id="train-result")
                train_log = gr.Textbox(label="log", lines=8, max_lines=12, autoscroll=True, elem_id="train-log")

            # ---------------- Export & Push
            with gr.Tab("Export & Push", id="export"):
                quants = gr.CheckboxGroup([QUANT_LABELS[q] for q in QUANTS], value=["Q4_K_M", "Q8_0"],
                                          label="GGUF quant types", elem_id="quants",
                                          info="Q4_K_M: what `ollama run` pulls by default; Q8_0: near-lossless; F16: unquantized")
                with gr.Row():
                    repo = gr.Textbox(label="Hub repo", placeholder="user/name", elem_id="repo", scale=3)
                    private = gr.Checkbox(False, label="private", elem_id="private", scale=1)
                with gr.Row():
                    export_btn = gr.Button("Export GGUF", variant="primary", elem_id="export")
                    push_btn = gr.Button("Push to the Hub", elem_id="push")
                export_log = gr.Textbox(label="log", lines=6, max_lines=10, autoscroll=True, elem_id="export-log")
                gguf_table = gr.Dataframe(headers=["quant", "file", "size (MB)", "perplexity (llama.cpp)",
                                                   "vs merged"], label="exported files",
                                          interactive=False, elem_id="gguf-table")
                links = gr.Markdown(elem_id="links")
                ollama = gr.Code(label="run it with Ollama", language="shell", lines=3, interactive=False,
                                 buttons=["copy"], elem_id="ollama")
                modelfile = gr.DownloadButton("Download Modelfile", visible=False, elem_id="modelfile")

            # ---------------- Compare
            with gr.Tab("Compare", id="compare") as compare_tab:
                with gr.Row():
                    prompt = gr.Textbox(label="prompt", lines=3, scale=4, elem_id="prompt",
                                        placeholder="The beginning of a text in your corpus's style…")
                    with gr.Column(scale=2):
                        mode = gr.Radio(["completion", "chat"], value="completion", label="mode", elem_id="mode",
                                        info="completion: plain continuation (raw-text training); chat: the chat template")
                        tuned = gr.Dropdown(["pytorch"], value="pytorch", label="tuned model", elem_id="tuned",
                                            info="PyTorch (adapter) or an exported GGUF run by llama.cpp")
                with gr.Row():
                    max_new = gr.Slider(1, 512, value=64, step=1, label="max new tokens", elem_id="max-new")
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
                    seed = gr.Number(0, label="seed", precision=0)
                compare_btn = gr.Button("Generate both", variant="primary", elem_id="generate")
                with gr.Row():
                    base_out = gr.Textbox(label="base model", lines=10, elem_id="base-out", buttons=["copy"])
                    tuned_out = gr.Textbox(label="tuned model", lines=10, elem_id="tuned-out", buttons=["copy"])

        # ---------------- wiring
        hub_inputs = [token_text]
        data_inputs = [dataset, config, split, upload, text_column, min_chars, max_documents, dedupe,
                       split_blank, streaming, revision, model, preset]
        load_btn.click(load_new_source, [session] + data_inputs + hub_inputs, [data_summary, first_docs, text_column])
        # Picking another column (a user action, not the update above) shows that column's documents.
        text_column.input(load_data, [session] + data_inputs + hub_inputs, [data_summary, first_docs, text_column])
        text_boxes = [c for n, c in zip(ADVANCED_FIELDS, advanced) if n in TEXT_FIELDS]
        preset.change(preset_changed, preset, [recipe] + text_boxes, queue=False)

        buttons = [start_btn, stop_btn, resume_btn]
        train_outputs = [status, plot, train_log, result] + buttons
        # Trainings, exports and Compare wait inside their handlers for the GPU line (space.SLOT),
        # where a visitor sees what is ahead; Gradio's queue only caps how many wait at once.
        limit = WAITING_LIMIT
        start_btn.click(start_training, [session] + hub_inputs + data_inputs + advanced, train_outputs,
                        concurrency_limit=limit, concurrency_id="gpu", show_progress_on=status,
                        ).failure(training_failed, session, buttons, queue=False)
        resume_btn.click(resume_training, [session] + hub_inputs, train_outputs,
                         concurrency_limit=limit, concurrency_id="gpu", show_progress_on=status,
                         ).failure(training_failed, session, buttons, queue=False)
        stop_btn.click(stop_training, session, status, queue=False)

        export_btn.click(export_model, [session, quants, repo], [export_log, gguf_table, ollama, modelfile],
                         concurrency_limit=limit, concurrency_id="gpu")
        push_btn.click(push_model, [session, repo, private, export_log] + hub_inputs, [export_log, links, ollama],
                       concurrency_limit=2, concurrency_id="push")

        compare_tab.select(compare_choices, session, tuned, queue=False)
        compare_btn.click(run_compare, [session, prompt, mode, tuned, max_new, temperature, top_p, seed],
                          [base_out, tuned_out], concurrency_limit=limit, concurrency_id="gpu")
        demo.load(default_repo, None, repo)
    return demo
