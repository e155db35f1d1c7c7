"""What the page's buttons do: small handlers that read a form, call rawtune and show the result.

Handlers take the session, the form's values as one dict by input name (see ``forms.bind``) and
the visitor's token; what to decide (settings from the form, the auto preset, segments, the step
budget, time estimates) is the library's. Errors reach the page through ``background.friendly``.

ZeroGPU: a ZeroGPU Space lends a GPU per call, for a limited time per call and a daily quota per
visitor. Training there runs in segments of ``RAWTUNE_SEGMENT_SECONDS`` (default 90 s) through
:func:`rawtune.pipeline.run_segmented`; each segment is one ``@spaces.GPU`` call
(:func:`train_segment`) that trains, saves a checkpoint and returns. When the quota runs out the
adapter and checkpoint stay, and Resume continues later.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from .. import hubckpt, space, track
from ..errors import ConfigError
from ..pipeline import (Estimate, Finished, Log, Phase, Progress, estimate_training, gguf_name, resumable,
                        run_segmented, segment_call_seconds, segment_events, segment_seconds)
from ..rundir import RunDir
from ..settings import (DEFAULT_MODEL, DataSettings, ExportSettings, PushSettings, RunSettings, form_fields,
                        from_dict, from_form, settings_fields, train_from_form, validate)
from . import session as sessions
from .background import (Background, GpuTurn, append, friendly, gpu, gpu_place, in_load_pool, public, stream_log,
                         wait_for_gpu)
from .forms import preset_hint, preset_summary, text_fields

PLOT_POINTS = 1000  # most train-loss points sent to the plot
PHASES = {"data": "Preparing data", "train": "Training", "eval": "Measuring held-out perplexity"}


def _format_duration(seconds: Optional[float]) -> str:
    from ..train import format_duration

    return format_duration(seconds)


# ---------------------------------------------------------------- Data tab


def data_settings(session: sessions.Session, form: dict[str, Any]) -> DataSettings:
    """The DataSettings of the form: the visitor's upload, or a source they may read."""
    source = str(session.upload) if session.upload else space.guard_source(form.get("dataset") or "", session.dir,
                                                                             "dataset")
    if not source:
        raise ConfigError("Give a Hub dataset id (user/name) or upload a file first")
    known = {f.name for f in settings_fields(DataSettings)} - {"dataset"}
    values = {k: v for k, v in form.items() if k in known}
    values["streaming"] = bool(values.get("streaming")) or space.force_streaming()
    values["max_documents"] = values.get("max_documents") or None  # 0 or empty: all
    return from_form(DataSettings, values, dataset=source)


def load_data(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
              oauth_token: Any = None):
    """Read the source and show the column choice, what cleaning keeps, tokens and a time estimate."""
    session = sessions.current(session)
    try:
        from ..data import preview

        sessions.keep_upload(session, form.get("upload"))
        settings = data_settings(session, form)
        model = sessions.estimate_model(session, form.get("model"))
        info = preview(settings, n=50, token=sessions.visitor_token(token_text, oauth_token))
        if session.upload is not None:
            info["source"] = f"uploaded {session.upload.name}"
        estimate = estimate_training(info["first"], info["characters"], model or DEFAULT_MODEL,
                                     form.get("preset") or "auto", space.gpu_expected())
        return _data_summary(info, estimate), _first_rows(info), _column_choice(info)
    except BaseException as exc:
        raise friendly(exc) from None


def load_new_source(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
                    oauth_token: Any = None):
    """The Load button: a new source gets its column chosen afresh (the old choice may not exist)."""
    return load_data(session, {**form, "text_column": None}, token_text, oauth_token)


async def load_source(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
                      oauth_token: Any = None, request: gr.Request = None):
    """The Load button, in the app's data-load pool (a few loads per visitor at once)."""
    session = sessions.current(session, request)
    return await in_load_pool(sessions.visitor(request), load_new_source, session, form, token_text, oauth_token)


async def column_picked(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
                        oauth_token: Any = None, request: gr.Request = None):
    """Another text column picked: the same source read again, in the data-load pool."""
    session = sessions.current(session, request)
    return await in_load_pool(sessions.visitor(request), load_data, session, form, token_text, oauth_token)


def _data_summary(info: dict, estimate: Estimate) -> str:
    dropped = info["dropped_empty"] + info["dropped_short"] + info["dropped_duplicate"]
    return (
        f"**{info['source']}** · text column **{info['column'] or '(plain text)'}** ({info['column_reason']})\n\n"
        f"| documents read | kept | dropped (empty / short / duplicate) | characters | tokens (≈) | training time (rough) |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {info['documents_read']:,} | {info['documents_kept']:,} | {dropped:,} ({info['dropped_empty']} / "
        f"{info['dropped_short']} / {info['dropped_duplicate']}) | {info['characters']:,} | {estimate.tokens:,} | "
        f"{_format_duration(estimate.seconds)} for {estimate.epochs:g} epoch(s) on {'GPU' if estimate.gpu else 'CPU'} |\n\n"
        f"Tokens {estimate.how}. Held-out documents for perplexity are taken from these."
    )


def _first_rows(info: dict) -> list[list]:
    return [[i + 1, len(t), t[:400] + ("…" if len(t) > 400 else "")] for i, t in enumerate(info["first"][:20])]


def _column_choice(info: dict) -> Any:
    columns = info["columns"] or []
    return gr.Dropdown(choices=columns, value=info["column"] if columns else None, interactive=bool(columns))


# ---------------------------------------------------------------- Train tab


def preset_changed(preset: str) -> list:
    """Show the new preset's values as the placeholders of the empty Advanced boxes."""
    return [preset_summary(preset)] + [gr.Textbox(placeholder=preset_hint(f, preset)) for f in text_fields()]


def run_settings(session: sessions.Session, form: dict[str, Any]) -> RunSettings:
    """The whole run the form describes, in the session's run directory (checked, not resolved)."""
    sessions.keep_upload(session, form.get("upload"))
    data = data_settings(session, form)
    model = space.guard_source(form.get("model") or "", session.dir, "model", (sessions.default_model(),))
    advanced = {f.name: form[f.name] for f in form_fields() if f.name in form}
    train = train_from_form(model, form.get("preset") or "auto", advanced, space.gpu_expected())
    settings = RunSettings(out=str(session.run.path), data=data, train=train)
    validate(settings)  # a bad value is shown now, before anything runs
    return settings


def start_training(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
                   oauth_token: Any = None, progress: Any = gr.Progress(), request: gr.Request = None):
    """Start a new run: data stage, training (in segments on ZeroGPU), held-out perplexity."""
    session = sessions.current(session, request)
    with gpu_place(sessions.visitor(request)):
        try:
            settings = run_settings(session, form)
        except BaseException as exc:
            raise friendly(exc) from None
        token = sessions.visitor_token(token_text, oauth_token)
        try:
            settings.checkpoint_repo = hubckpt.repo_for_app(form.get("keep_on_hub"), token,
                                                            time.strftime("%Y%m%d-%H%M%S"))
            settings.trackio_space = track.space_for_app(bool(form.get("trackio")), token)
            settings.report_to = "trackio" if settings.trackio_space else settings.report_to
        except BaseException as exc:
            raise friendly(exc) from None
        yield from _train(session, settings, token, progress)


def list_hub_runs(token_text: Optional[str] = None, oauth_token: gr.OAuthToken | None = None) -> Any:
    """Fill the dropdown with the visitor's runs kept on the Hub (newest first)."""
    try:
        repos = [r["repo"] for r in hubckpt.list_runs(sessions.visitor_token(token_text, oauth_token))]
    except BaseException as exc:
        raise friendly(exc) from None
    return gr.Dropdown(choices=repos, value=repos[0] if repos else None)


def resume_from_hub(session: Optional[sessions.Session], repo: Optional[str], token_text: Optional[str] = None,
                    oauth_token: gr.OAuthToken | None = None, request: gr.Request = None, progress=gr.Progress()):
    """After a restart: download a run kept on the Hub into the session's run directory, then resume it."""
    session = sessions.current(session, request)
    token = sessions.visitor_token(token_text, oauth_token)
    if not repo:
        raise gr.Error("Pick one of your runs kept on the Hub first (List my runs).")
    try:
        sessions.fresh_run(session)
        hubckpt.download(repo, session.run.path, token, log=lambda line: None)
        stored = from_dict(session.run.load()["settings"])
    except BaseException as exc:
        raise friendly(exc) from None
    settings = dataclasses.replace(stored, out=str(session.run.path), checkpoint_repo=repo,
                                   train=dataclasses.replace(stored.train, resume=True))
    with gpu_place(sessions.visitor(request)):
        yield from _train(session, settings, token, progress)


def resume_training(session: Optional[sessions.Session], token_text: Optional[str] = None,
                    oauth_token: gr.OAuthToken | None = None, request: gr.Request = None, progress=gr.Progress()):
    """Continue the session's stopped run from its newest checkpoint, with its own settings."""
    session = sessions.current(session, request)
    record = session.run.load()
    if not record.get("settings") or not resumable(session.run):
        raise gr.Error("Nothing to resume: start a training first (Stop keeps a checkpoint to resume from).")
    stored = from_dict(record["settings"])
    settings = dataclasses.replace(stored, train=dataclasses.replace(stored.train, resume=True))
    with gpu_place(sessions.visitor(request)):
        yield from _train(session, settings, sessions.visitor_token(token_text, oauth_token), progress)


@gpu(duration=segment_call_seconds())
def train_segment(settings_dict: dict, token: Any, seconds: Optional[float]) -> Iterator[dict]:
    """One training segment as one GPU call (the data stage and the page stay off the GPU)."""
    yield from segment_events(settings_dict, token, seconds)


@gpu(duration=120)
def eval_segment(settings_dict: dict, token: Any, seconds: Optional[float]) -> Iterator[dict]:
    """The held-out evaluation as one GPU call."""
    yield from segment_events(settings_dict, token, seconds)


class TrainView:
    """What the Train tab shows of one run: status, loss plot, log, result and the buttons."""

    def __init__(self, run: RunDir, progress: Any, resume: bool):
        self.run, self.progress, self.phase = run, progress, "Starting"
        self.log: list[str] = []
        self.history: list[dict] = list((run.load().get("train") or {}).get("history", [])) if resume else []
        self.last = next((e for e in reversed(self.history) if e["type"] == "step"), None)

    def frame(self, phase: Optional[str] = None, result: Any = None, training: bool = True,
              plot: bool = True) -> tuple:
        phase = phase or self.phase
        # The progress overlay is for a running training only: on the last frame it would lay the
        # final phase over the status line, and the page would read the overlay, not the status.
        if self.last and training:
            self.progress((self.last["step"], self.last["max_steps"]), desc=f"{phase}: step", unit="steps")
        return (_status(self.last, len(self.history), phase), _plot_frame(self.history) if plot else gr.skip(),
                "\n".join(self.log), gr.skip() if result is None else result,
                *_buttons(training, False if training else resumable(self.run)),
                "" if result == "" else gr.skip())  # a new run clears the last Stop's note

    def show(self, event: Any) -> Optional[tuple]:
        """The frame for one run event (None when there is nothing new to show)."""
        if isinstance(event, Phase):
            self.phase = PHASES[event.stage]
            if event.stage == "eval":
                append(self.log, "[app] measuring held-out perplexity of the base and the tuned model")
            return self.frame(plot=False)
        if isinstance(event, Log):
            append(self.log, event.line)
            return self.frame(plot=False)
        if isinstance(event, Progress) and event.event["type"] in ("step", "eval"):
            self.history.append(event.event)
            self.last = event.event if event.event["type"] == "step" else self.last
            return self.frame()
        return None


def _train(session: sessions.Session, settings: RunSettings, token: Any, progress: Any) -> Iterator[tuple]:
    """The shared body of Start and Resume: the run's events streamed to the page. The run waits
    its turn in the GPU line first; then the model download and the data stage (CPU) and the
    training run within this app's budget, and the run leaves the line when done, stopped or gone."""
    sessions.claim(session, "training")
    resume = settings.train.resume
    view, turn = TrainView(session.run, progress, resume), GpuTurn(session)
    events = None
    try:
        session.stop.clear()
        run = session.run if resume else sessions.fresh_run(session)
        run.stop_file.unlink(missing_ok=True)
        append(view.log, "[app] resuming from the newest checkpoint" if resume else "[app] preparing the data")
        budget = space.SLOT.budget
        if budget.seconds or budget.steps:
            append(view.log, f"[app] this app gives each training {budget.describe()}")
        yield view.frame(result="")
        # The whole run, the model's download and the data stage included, happens in this
        # visitor's turn, so a download never competes with another visitor's training.
        for waiting in turn.wait():
            yield view.frame(waiting, plot=False)
        if not turn.holds():
            yield view.frame("Stopped while waiting for the GPU", result="", training=False)
            return
        events = run_segmented(settings, token, segment_seconds(settings.train.model), stop=session.stop,
                               budget=budget, train_call=train_segment, eval_call=eval_segment)
        for event in events:
            yield from _follow(event, view, turn)
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        if events is not None:
            events.close()
        turn.leave()
        session.run.stop_file.unlink(missing_ok=True)
        sessions.release(session)


def _follow(event: Any, view: TrainView, turn: GpuTurn) -> Iterator[tuple]:
    """Show one run event; watch the time budget while training."""
    if view.phase == PHASES["train"] and turn.over is None and turn.time_up():
        append(view.log, f"[app] {turn.over}: stopping after this step")
    if isinstance(event, Progress) and event.event["type"] == "step":
        turn.report(event.event)
    if isinstance(event, Finished):
        yield view.frame(_final_phase(event.completed, turn.over), result=result_text(view.run), training=False)
        return
    frame = view.show(event)
    if frame is not None:
        yield frame


def _final_phase(completed: bool, over: Optional[str]) -> str:
    if completed:
        return "Done"
    if over:
        return (f"Stopped: {over}. The adapter and a checkpoint are kept (Resume queues for another "
                "turn; Export uses the adapter)")
    return "Stopped: the adapter and a checkpoint are kept (Resume continues; Export uses the adapter)"


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
            f"{event['tokens_per_s']:,.0f} tokens/s · ETA {_format_duration(event['eta_s'])} · {points} plot points")


def _buttons(training: bool, can_resume: bool) -> tuple:
    """Start, Stop and Resume: Stop only while training, Resume only for a stopped run."""
    return (gr.Button(interactive=not training), gr.Button(interactive=training),
            gr.Button(interactive=(not training) and can_resume))


def result_text(run: RunDir) -> str:
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


def training_failed(session: Optional[sessions.Session], request: gr.Request = None) -> tuple:
    """After an error the last frame still shows "training": give Start (and Resume) back."""
    session = sessions.known(session, request)
    run = session.run if session is not None else None
    return _buttons(False, run is not None and resumable(run))


def stop_training(session: Optional[sessions.Session], request: gr.Request = None) -> tuple:
    """Ask the running training to stop after the current step (the adapter is kept); the note
    and a disabled Stop say so at once, the status line once the step is done."""
    session = sessions.known(session, request)
    if session is None or session.busy != "training":
        return "Nothing is training.", gr.skip()
    session.stop.set()
    # The STOP file reaches a training that runs in another process (a ZeroGPU call) as well.
    session.run.stop_file.touch()
    return "**Stopping after the current step…** (the adapter and a checkpoint are kept)", gr.Button(interactive=False)


# ---------------------------------------------------------------- Export & Push tab


def _gguf_table(run: RunDir) -> list[list]:
    record = run.load()
    merged = (record.get("export") or {}).get("ppl_merged")
    rows = [["merged (PyTorch)", "base + adapter", None, round(merged, 4) if merged else None, "", 0.0, None, 100.0]]
    for label, info in (record.get("gguf") or {}).items():
        ppl, rise = info.get("ppl"), info.get("ppl_increase_pct")
        rows.append([label, Path(str(info.get("file", ""))).name, round(info.get("bytes", 0) / 1e6, 2),
                     round(ppl, 4) if ppl else None, f"{rise:+.2f} %" if rise is not None else "",
                     info.get("kld_mean"), info.get("kld_p99"), info.get("same_top_pct")])
    return rows


def _ollama_lines(run: RunDir) -> str:
    record = run.load()
    quants = list((record.get("gguf") or {}).keys())
    hub = record.get("hub") or {}
    if hub.get("repo"):
        return "\n".join(f"ollama run hf.co/{hub['repo']}:{q}" for q in quants)
    name = (record.get("export") or {}).get("name") or run.path.name
    return (f"# after pushing, `ollama run hf.co/<repo>:{quants[0] if quants else 'Q4_K_M'}`; locally:\n"
            f"cd {run.gguf_dir.name} && ollama create {name} -f Modelfile && ollama run {name}")


def export_model(session: Optional[sessions.Session], quants: list[str], repo: str, request: gr.Request = None):
    """Merge, convert and quantize the session's run to GGUF, streaming the log."""
    session = sessions.current(session, request)
    run = session.run
    if not run.has_adapter():
        raise gr.Error("No adapter yet: train first in the Train tab (Stop also keeps the adapter).")
    if not quants:
        raise gr.Error("Tick at least one quant type (Q4_K_M is what Ollama pulls by default).")
    with gpu_place(sessions.visitor(request)):
        sessions.claim(session, "export")
        try:
            sessions.room_for_export()
        except BaseException as exc:
            sessions.release(session)
            raise friendly(exc) from None
        yield from _export(session, quants, repo)


def _export(session: sessions.Session, quants: list[str], repo: str):
    """The export once claimed: its turn in the GPU line, then the export's log streamed."""
    run, log = session.run, []
    ticket = space.SLOT.join("export", session.dir.name)
    try:
        from ..export import export_run

        for waiting in wait_for_gpu(ticket, lambda: session.closed):
            yield waiting, gr.skip(), gr.skip(), gr.skip()
        if not space.SLOT.my_turn(ticket):
            return
        settings = ExportSettings(quant=[q.lower() for q in quants], name=gguf_name(repo, run))
        work = Background(export_run, run, settings)
        for text in stream_log(work, log):
            yield text, gr.skip(), gr.skip(), gr.skip()
        work.raise_error()
        for warning in (work.result or {}).get("warnings", []):
            gr.Warning(warning)
        modelfile = sessions.hand_out(run.gguf_dir / "Modelfile")
        yield ("\n".join(log), _gguf_table(run), _ollama_lines(run),
               gr.DownloadButton(value=str(modelfile) if modelfile else None, visible=modelfile is not None))
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        space.SLOT.leave(ticket)
        sessions.release(session)


def push_model(session: Optional[sessions.Session], repo: str, private: bool, previous_log: str,
               token_text: Optional[str] = None, oauth_token: gr.OAuthToken | None = None,
               request: gr.Request = None):
    """Push the exported run to ``repo`` in one commit; show the links and the ollama lines."""
    session = sessions.current(session, request)
    run = session.run
    if not run.gguf_dir.is_dir() or not any(run.gguf_dir.glob("*.gguf")):
        raise gr.Error("Nothing exported yet: press Export first, then Push.")
    token = sessions.visitor_token(token_text, oauth_token)
    if not token:
        raise gr.Error("Sign in with Hugging Face (or paste a token with write access) to push.")
    sessions.claim(session, "push")
    log: list[str] = [public(line) for line in (previous_log or "").splitlines()]
    try:
        from ..publish.push import push_run

        work = Background(push_run, run, PushSettings(repo=(repo or "").strip(), private=bool(private)), token=token)
        for text in stream_log(work, log):
            yield text, gr.skip(), gr.skip()
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
        sessions.release(session)


def run_on_hf_jobs(session: Optional[sessions.Session], form: dict[str, Any], token_text: Optional[str] = None,
                   oauth_token: Any = None, request: gr.Request = None):
    """Run on HF Jobs: this page's run (data, train, eval, export, push) on the chosen hardware,
    following the job's log. The app's sign-in cannot grant the jobs scope (docs/space.md), so the
    token is one the visitor pasted: the panel's, else the page's token box (off a Space)."""
    from ..jobs import flat_values, image_for, job_config, run_on_jobs

    session = sessions.current(session, request)
    token = (form.get("jobs_token") or "").strip() or (token_text or "").strip()
    if not token:
        raise gr.Error("Paste a token with the Jobs permission (huggingface.co/settings/tokens) to run on HF Jobs; "
                       "signing in to this app cannot start jobs for you.")
    log: list[str] = []
    try:
        settings = run_settings(session, form)
        settings.push.repo = (form.get("jobs_repo") or "").strip() or None
        settings.stages = ["data", "train", "eval", "export", "push"]
        if form.get("quants"):
            settings.export.quant = [q.lower() for q in form["quants"]]
        config = job_config(flat_values(validate(settings)), settings)
        work = Background(run_on_jobs, config, settings.push.repo, form.get("jobs_flavor") or "",
                          image_for(form.get("jobs_image")), token)
        for text in stream_log(work, log):
            yield text, gr.skip()
        work.raise_error()
        yield "\n".join(log), f"**Pushed:** [{settings.push.repo}]({work.result})"
    except BaseException as exc:
        raise friendly(exc) from None


def default_repo(profile: gr.OAuthProfile | None) -> str:
    """Pre-fill the repo box with the signed-in user's namespace."""
    if profile is None:
        return ""
    return f"{profile.username}/my-rawtune-model"


# ---------------------------------------------------------------- Compare tab


def compare_choices(session: Optional[sessions.Session], request: gr.Request = None):
    """The tuned models this session can compare with (PyTorch, and each exported GGUF)."""
    from ..compare import tuned_choices

    session = sessions.known(session, request)
    if session is None or not session.run.exists():
        return gr.Dropdown(choices=["pytorch"], value="pytorch")
    choices = tuned_choices(session.run.path) or ["pytorch"]
    return gr.Dropdown(choices=choices, value=choices[0])


@gpu(duration=60)
def compare_stream(run_path: str, prompt: str, options: dict) -> Iterator[tuple[str, str]]:
    """Both answers, streamed, as one GPU call."""
    from ..compare import stream_compare

    yield from stream_compare(run_path, prompt, options["mode"], options["max_new_tokens"], options["temperature"],
                              options["top_p"], options["seed"], options["tuned"])


def compare_options(form: dict[str, Any]) -> dict:
    """The Compare tab's generation options, with the defaults for empty boxes."""
    from ..settings import parse_number

    def number(name: str, label: str, whole: bool, default: float) -> Any:
        return parse_number(form.get(name), label, whole) or default

    return {"mode": form.get("mode") or "completion", "tuned": form.get("tuned") or "pytorch",
            "max_new_tokens": number("max_new_tokens", "max new tokens", True, 64),
            "temperature": number("temperature", "temperature", False, 0.0),
            "top_p": number("top_p", "top-p", False, 1.0), "seed": number("seed", "seed", True, 0)}


def run_compare(session: Optional[sessions.Session], form: dict[str, Any], request: gr.Request = None):
    """Stream the base and the tuned answers side by side."""
    session = sessions.current(session, request)
    if session.busy == "training":
        raise gr.Error("A training is running in this session: wait for it or stop it, then compare.")
    if not session.run.exists():
        raise gr.Error("Nothing to compare yet: train a model first.")
    with gpu_place(sessions.visitor(request)):
        yield from _compare(session, form)


def _compare(session: sessions.Session, form: dict[str, Any]):
    """Compare in its turn: it loads up to three models, so it waits for the GPU like a training."""
    ticket = space.SLOT.join("compare", session.dir.name)
    try:
        for waiting in wait_for_gpu(ticket, lambda: session.closed):
            yield waiting, gr.skip()
        if not space.SLOT.my_turn(ticket):
            return
        options = compare_options(form)
        pairs = compare_stream(str(session.run.path), form.get("prompt") or "", options)
        kind = options["tuned"]
        label = ("tuned model (PyTorch, base + adapter)" if kind == "pytorch"
                 else f"tuned model ({kind.split(':', 1)[-1]} GGUF in llama.cpp, as Ollama runs it)")
        # Clear both boxes first, so a new answer never looks like the previous one.
        yield "", gr.Textbox(value="", label=label)
        last, base, tuned_text = time.time(), "", ""
        for base, tuned_text in pairs:
            if time.time() - last >= 0.1:
                last = time.time()
                yield base, tuned_text
        yield base, tuned_text
    except BaseException as exc:
        raise friendly(exc) from None
    finally:
        space.SLOT.leave(ticket)
