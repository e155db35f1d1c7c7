"""The page's inputs and layout: the Advanced training inputs are generated from the settings'
field metadata (doc, kind, choices), so a new training setting shows up here by being declared.

Each tab is built by one function that returns its components by name; a :class:`Form` names the
inputs a handler reads, and :func:`bind` hands them to the handler as one dict of values by name.
"""

from __future__ import annotations

import inspect
from dataclasses import Field
from typing import Any, Callable

import gradio as gr

from .. import hubckpt, jobs, quants, space
from ..models import model_choices
from ..settings import PRESETS, DataSettings, concrete_preset, docs, form_fields, tristate
from .session import UPLOAD_TYPES


INTRO = """# rawtune
**Raw text in, an Ollama-pullable small model out.** Load a corpus, continue pretraining a small
model with LoRA, export GGUF quants, push them to the Hub and run them with `ollama run hf.co/...`.
"""

Components = dict[str, Any]


# ---------------------------------------------------------------- forms: inputs by name


class Form(dict):
    """Input components by name, in the order the page sends their values."""

    def by_name(self, sent: tuple) -> dict[str, Any]:
        """The values the page sent for this form's inputs, by input name."""
        return dict(zip(self.keys(), sent))

    def inputs(self) -> list:
        return list(self.values())


def bind(handler: Callable, form: Form, with_token: bool = True) -> Callable:
    """``handler(session, values_by_name[, token_text, oauth_token][, progress=...][, request=...])``
    wired to the inputs ``[session, (token_text,) *form.inputs()]``: the form's values arrive as one
    dict by name, and Gradio fills the login token, the progress bar and the request (who the
    visitor is) by their annotations."""
    extra = inspect.signature(handler).parameters

    def asks(name: str, value: Any) -> dict:
        return {name: value} if name in extra else {}
    if not with_token:
        def plain(session, request: gr.Request = None, *sent):
            return handler(session, form.by_name(sent), **asks("request", request))
        return _named(handler, plain)
    if inspect.iscoroutinefunction(handler):
        async def waited(session, token_text, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None,
                         *sent):
            return await handler(session, form.by_name(sent), token_text, oauth_token, **asks("request", request))
        return _named(handler, waited)
    if "progress" in extra:
        def with_progress(session, token_text, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None,
                          progress=gr.Progress(), *sent):
            yield from handler(session, form.by_name(sent), token_text, oauth_token, progress=progress,
                               **asks("request", request))
        return _named(handler, with_progress)
    if inspect.isgeneratorfunction(handler):  # Gradio streams only from a generator function
        def streamed(session, token_text, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None,
                     *sent):
            yield from handler(session, form.by_name(sent), token_text, oauth_token, **asks("request", request))
        return _named(handler, streamed)

    def call(session, token_text, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None, *sent):
        return handler(session, form.by_name(sent), token_text, oauth_token, **asks("request", request))
    return _named(handler, call)


def _named(handler: Callable, call: Callable) -> Callable:
    """``call`` under the handler's name (Gradio names the event's API after it); a generator
    handler stays a generator, so the page streams its frames."""
    if inspect.isgeneratorfunction(handler) and not inspect.isgeneratorfunction(call):
        plain = call

        def call(*args):  # noqa: F811  (the streaming form of the same call)
            yield from plain(*args)
        call.__signature__ = inspect.signature(plain)  # type: ignore[attr-defined]
        call.__annotations__ = plain.__annotations__  # Gradio fills the request by its annotation
    call.__name__ = call.__qualname__ = handler.__name__
    call.__doc__ = handler.__doc__
    return call


# ---------------------------------------------------------------- inputs from settings metadata


def settings_input(f: Field, preset: str = "auto") -> Any:
    """The input for one settings field, chosen by its kind and choices; empty (or "preset")
    means the field's default, which for training fields is the preset's value."""
    kind, choices = f.metadata["kind"], f.metadata["choices"]
    common = dict(label=f.name.replace("_", " "), info=f.metadata["doc"], elem_id=f"adv-{f.name}")
    if kind == "list" and choices:
        return gr.CheckboxGroup(choices, value=[], **{**common, "info": common["info"] + " (none ticked: the preset's)"})
    if choices:
        offered = (["preset"] if f.default is None else []) + list(choices)
        return gr.Dropdown(offered, value=offered[0], **common)
    if tristate(f):
        return gr.Radio(["preset", "on", "off"], value="preset", **common)
    if kind == "bool":
        return gr.Checkbox(bool(f.default), **common)
    # A textbox, not gr.Number: an empty box must mean "the default", and Number shows 0.
    return gr.Textbox("", placeholder=preset_hint(f, preset), **common)


def text_fields() -> list[Field]:
    """The generated inputs that are text boxes (numbers): their placeholders show the preset."""
    return [f for f in form_fields() if not f.metadata["choices"] and f.metadata["kind"] in ("int", "float", "str")]


def preset_hint(f: Field, preset: str) -> str:
    """What an empty box means under ``preset``: the preset's value, or the field's default."""
    chosen = PRESETS[concrete_preset(preset, space.gpu_expected())]
    if f.name not in chosen and f.default is not None:
        return f"default: {f.default}"
    value = chosen.get(f.name)
    if f.name == "max_steps":
        return "from epochs"
    if f.name == "embedding_learning_rate" and value is None:
        return "preset: learning rate / 10"
    return f"preset: {value:g}" if isinstance(value, (int, float)) else f"preset: {value}"


def preset_summary(preset: str) -> str:
    """What a preset sets, shown under the preset choice."""
    name = concrete_preset(preset, space.gpu_expected())
    p = PRESETS[name]
    shown = f"`auto` = `{name}` here" if name != preset else f"`{name}`"
    return (f"{shown}: seq_len {p['seq_len']}, LoRA r {p['lora_r']} / alpha {p['lora_alpha']}"
            f"{' rsLoRA' if p['use_rslora'] else ''}, {'embeddings trained, ' if p['train_embeddings'] else ''}"
            f"batch {p['batch_size']}×{p['grad_accum']}, {p['epochs']:g} epoch(s), lr {p['learning_rate']:g}, "
            f"{p['lr_scheduler']}, eval every {p['eval_steps'] or 'end only'}. Empty Advanced fields take these values.")


# ---------------------------------------------------------------- tabs


def data_tab() -> Components:
    """The Data tab; its inputs are named after the DataSettings fields they set."""
    doc = docs(DataSettings)
    c: Components = {}
    with gr.Row():
        with gr.Column(scale=3):
            c["dataset"] = gr.Textbox(label="Hub dataset id", placeholder="user/name", info=doc["dataset"],
                                      elem_id="dataset")
            with gr.Row():
                c["dataset_config"] = gr.Textbox(label="config", placeholder="(default)", info=doc["dataset_config"])
                c["split"] = gr.Textbox("train", label="split", info=doc["split"])
                c["text_column"] = gr.Dropdown([], value=None, label="text column", allow_custom_value=True,
                                               info=doc["text_column"], elem_id="text-column")
        c["upload"] = gr.File(label="…or upload a file", file_types=UPLOAD_TYPES, scale=2, elem_id="upload")
    with gr.Accordion("Data options", open=False):
        with gr.Row():
            c["min_chars"] = gr.Number(20, label="min characters", info=doc["min_chars"], precision=0)
            c["max_documents"] = gr.Number(None, label="max documents", info=doc["max_documents"], precision=0,
                                           placeholder="all")
        with gr.Row():
            c["dedupe"] = gr.Checkbox(True, label="drop duplicates", info=doc["dedupe"])
            c["split_blank_lines"] = gr.Checkbox(False, label="split at blank lines", info=doc["split_blank_lines"])
            c["streaming"] = gr.Checkbox(False, label="stream", info=doc["streaming"])
            c["revision"] = gr.Textbox(label="revision", placeholder="main", info=doc["revision"])
    c["load"] = gr.Button("Load dataset", variant="primary", elem_id="load-data")
    c["summary"] = gr.Markdown(elem_id="data-summary")
    c["first_docs"] = gr.Dataframe(headers=["#", "characters", "text"], datatype=["number", "number", "str"],
                                   label="first documents (after cleaning)", wrap=True, max_height=360,
                                   interactive=False, elem_id="first-docs")
    return c


def advanced_inputs() -> Components:
    """Every training setting without an input of its own, four to a row, generated from metadata."""
    fields_ = form_fields()
    c: Components = {}
    for start in range(0, len(fields_), 4):
        with gr.Row():
            c.update({f.name: settings_input(f) for f in fields_[start:start + 4]})
    return c


def train_tab(default_model: str) -> Components:
    """The Train tab: model, preset, the generated Advanced inputs, buttons, status, plot and log."""
    c: Components = {}
    with gr.Row():
        c["model"] = gr.Dropdown(list(dict.fromkeys([default_model] + model_choices())), value=default_model,
                                 allow_custom_value=True, label="base model", scale=3, elem_id="model",
                                 info=("a listed model, any Hub id, a local HF folder or a .gguf file"
                                       if space.allow_server_paths() else "a listed model or any Hub id"))
        c["preset"] = gr.Radio(["auto"] + list(PRESETS), value="auto", label="preset", scale=2, elem_id="preset")
    c["recipe"] = gr.Markdown(preset_summary("auto"))
    budget = space.SLOT.budget
    if budget.seconds or budget.steps:
        gr.Markdown(f"This app is shared: each training gets {budget.describe()}, then stops "
                    "with its adapter and a checkpoint kept; trainings, exports and Compare "
                    "take turns on the GPU.", elem_id="budget")
    with gr.Accordion("Advanced (every training setting)", open=False, elem_id="advanced"):
        c["advanced"] = advanced_inputs()
    with gr.Row():
        c["start"] = gr.Button("Start training", variant="primary", elem_id="start")
        c["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
        c["resume"] = gr.Button("Resume", interactive=False, elem_id="resume")
    c["keep_on_hub"] = gr.Checkbox(hubckpt.keep_by_default(space.shared()), elem_id="keep-on-hub",
                                   label="Keep checkpoints on the Hub (private repo)",
                                   info="needs you signed in; a restart of this app wipes its disk, "
                                        "and a run kept on the Hub can be resumed below")
    c["trackio"] = gr.Checkbox(False, elem_id="trackio", label="Log to trackio (a private Space in your namespace)",
                               info="loss, learning rate, held-out loss and tokens/s as it trains, then the "
                                    "perplexities, in <you>/rawtune-trackio; needs you signed in")
    with gr.Row():
        c["hub_runs"] = gr.Dropdown([], label="your runs kept on the Hub", allow_custom_value=True, scale=3,
                                    elem_id="hub-runs")
        c["list_hub_runs"] = gr.Button("List my runs", scale=1, elem_id="list-hub-runs")
        c["resume_hub"] = gr.Button("Resume from the Hub", scale=1, elem_id="resume-hub")
    c["status"] = gr.Markdown("Load a dataset, pick a model, then start.", elem_id="train-status")
    # Stop answers here, not in the status line: its answer may arrive after the training's last
    # frame, and would then hide the final status.
    c["stop_note"] = gr.Markdown(elem_id="stop-note")
    c["plot"] = gr.LinePlot(x="step", y="loss", color="series", label="loss", height=340,
                            x_title="optimizer step", y_title="loss", elem_id="loss-plot")
    c["result"] = gr.Markdown(elem_id="train-result")
    c["log"] = gr.Textbox(label="log", lines=8, max_lines=12, autoscroll=True, elem_id="train-log")
    return c


def export_tab() -> Components:
    """The Export & Push tab."""
    c: Components = {}
    c["quants"] = gr.CheckboxGroup(quants.EXPORTABLE_LABELS, value=[quants.label_of(q) for q in quants.DEFAULT],
                                   label="GGUF quant types", elem_id="quants",
                                   info="Q4_K_M: what `ollama run` pulls by default; IQ4_XS: smaller, made "
                                        "with an importance matrix from your text; Q5_K_M, Q6_K: closer to "
                                        "the tuned model; Q8_0: near-lossless; F16: unquantized")
    with gr.Row():
        c["repo"] = gr.Textbox(label="Hub repo", placeholder="user/name", elem_id="repo", scale=3)
        c["private"] = gr.Checkbox(False, label="private", elem_id="private", scale=1)
    with gr.Row():
        c["export"] = gr.Button("Export GGUF", variant="primary", elem_id="export")
        c["push"] = gr.Button("Push to the Hub", elem_id="push")
    c["log"] = gr.Textbox(label="log", lines=6, max_lines=10, autoscroll=True, elem_id="export-log")
    c["table"] = gr.Dataframe(headers=["quant", "file", "size (MB)", "perplexity (llama.cpp)", "vs merged",
                                       "KLD mean", "KLD 99th pct", "same top token %"],
                              label="exported files", interactive=False, elem_id="gguf-table")
    c["links"] = gr.Markdown(elem_id="links")
    c["ollama"] = gr.Code(label="run it with Ollama", language="shell", lines=3, interactive=False,
                          buttons=["copy"], elem_id="ollama")
    c["modelfile"] = gr.DownloadButton("Download Modelfile", visible=False, elem_id="modelfile")
    return c


JOBS_HINT = ("Runs this tab's training (a Hub dataset and model only), then the export (the quant types picked "
             "under Export & Push) and a push to the repo below, on HF Jobs hardware billed to your account. "
             "It needs a token that may start jobs (a fine-grained token with the Jobs permission): "
             "signing in to this app cannot grant that.")


def jobs_panel() -> Components:
    """Run on HF Jobs: the Train tab's run on bigger hardware than this app's."""
    c: Components = {}
    with gr.Accordion("Run on HF Jobs (bigger hardware)", open=False, elem_id="jobs"):
        gr.Markdown(JOBS_HINT)
        with gr.Row():
            c["jobs_flavor"] = gr.Dropdown(jobs.flavors(), value="a10g-small", label="hardware", elem_id="jobs-flavor")
            c["jobs_image"] = gr.Textbox(jobs.default_image() or "", label="rawtune Space (the job's image)",
                                         placeholder="hf.co/spaces/user/rawtune", elem_id="jobs-image")
        with gr.Row():
            c["jobs_repo"] = gr.Textbox(label="Hub repo to push to", placeholder="user/name", elem_id="jobs-repo")
            c["jobs_token"] = gr.Textbox(label="token with the Jobs permission", type="password",
                                         placeholder="hf_…", elem_id="jobs-token")
        c["jobs_run"] = gr.Button("Run on HF Jobs", elem_id="jobs-run")
        c["jobs_log"] = gr.Textbox(label="job log", lines=8, max_lines=16, autoscroll=True, elem_id="jobs-log")
        c["jobs_result"] = gr.Markdown(elem_id="jobs-result")
    return c


def compare_tab() -> Components:
    """The Compare tab: one prompt, the base and the tuned answers side by side."""
    c: Components = {}
    with gr.Row():
        c["prompt"] = gr.Textbox(label="prompt", lines=3, scale=4, elem_id="prompt",
                                 placeholder="The beginning of a text in your corpus's style…")
        with gr.Column(scale=2):
            c["mode"] = gr.Radio(["completion", "chat"], value="completion", label="mode", elem_id="mode",
                                 info="completion: plain continuation (raw-text training); chat: the chat template")
            c["tuned"] = gr.Dropdown(["pytorch"], value="pytorch", label="tuned model", elem_id="tuned",
                                     info="PyTorch (adapter) or an exported GGUF run by llama.cpp")
    with gr.Row():
        c["max_new_tokens"] = gr.Slider(1, 512, value=64, step=1, label="max new tokens", elem_id="max-new")
        c["temperature"] = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)",
                                     elem_id="temperature")
        c["top_p"] = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
        c["seed"] = gr.Number(0, label="seed", precision=0)
    c["generate"] = gr.Button("Generate both", variant="primary", elem_id="generate")
    with gr.Row():
        c["base_out"] = gr.Textbox(label="base model", lines=10, elem_id="base-out", buttons=["copy"])
        c["tuned_out"] = gr.Textbox(label="tuned model", lines=10, elem_id="tuned-out", buttons=["copy"])
    return c
