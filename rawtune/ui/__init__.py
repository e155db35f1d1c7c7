"""rawtune's Gradio app: Data, Train, Export & Push and Compare tabs over the library.

This module only lays out the page (from :mod:`.forms`) and wires events to the small handlers in
:mod:`.handlers`; sessions live in :mod:`.session`, long work and the GPU line in
:mod:`.background`. What a visitor of a shared app may do (whose token, which paths, upload and
training limits, the GPU line) is decided in :mod:`rawtune.space`; everything else the app
decides (settings from the form, presets, segments, estimates) is the library's.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import env
from .. import space
from . import forms, handlers
from .forms import Form, bind
from .session import default_model, end_session, open_page, page_closed

__all__ = ["build_demo", "launch_options"]

# Handlers that may wait inside for the GPU line at once (beyond this, Gradio's own queue holds them).
WAITING_LIMIT = 16
# Data loads Gradio lets in at once: they wait in the app's own load pool, and a visitor's loads
# beyond their share are refused there at once, so one visitor's loads never queue up another's.
LOADS_ENTERING = 32


def launch_options() -> dict[str, Any]:
    """``demo.launch`` arguments that keep visitors apart: no folder is opened to Gradio's file
    route (files are handed out per request), and uploads are capped."""
    options: dict[str, Any] = {"footer_links": ["gradio", "settings"]}
    cap = space.max_upload_bytes()
    if cap:
        options["max_file_size"] = cap
    return options


def _token_input() -> Any:
    """The login button on Spaces (or when asked), else a box for a pasted token."""
    if space.on_spaces() or env.flag("RAWTUNE_LOGIN_BUTTON"):
        gr.LoginButton(scale=0, min_width=260)
        return gr.State(None)
    hint = "; HF_TOKEN or `hf auth login` work too" if space.allow_owner_token() else ""
    return gr.Textbox(label="Hugging Face token (optional)", type="password", scale=3, elem_id="token",
                      placeholder="hf_… for private datasets, gated models and pushes" + hint)


def build_demo() -> gr.Blocks:
    """The whole app; ``app.py`` launches it."""
    with gr.Blocks(title="rawtune", delete_cache=(3600, 24 * 3600)) as demo:
        session = gr.State(None, delete_callback=end_session)
        gr.Markdown(forms.INTRO)
        with gr.Row():
            token = _token_input()
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data = forms.data_tab()
            with gr.Tab("Train", id="train"):
                train = forms.train_tab(default_model())
                jobs = forms.jobs_panel()
            with gr.Tab("Export & Push", id="export"):
                export = forms.export_tab()
            with gr.Tab("Compare", id="compare") as compare_tab:
                compare = forms.compare_tab()
        _wire_data_and_train(session, token, data, train)
        _wire_export_and_compare(session, token, export, compare, compare_tab)
        _wire_jobs(session, token, data, train, export, jobs)
        demo.load(handlers.default_repo, None, export["repo"])
        demo.load(handlers.default_repo, None, jobs["jobs_repo"])
        # A session begins when its page loads and ends when the page is closed or reloaded: the
        # unload event comes with the page's session hash, under which open_page kept the session.
        demo.load(open_page, None, session, queue=False)
        demo.unload(page_closed)
    return demo


def _wire_data_and_train(session: gr.State, token: Any, data: dict, train: dict) -> None:
    """Load and Start read forms by name: the Data inputs (named after DataSettings fields), the
    model and preset, and Start also the generated Advanced inputs (named after TrainSettings fields)."""
    data_fields = {k: data[k] for k in ("dataset", "dataset_config", "split", "upload", "text_column", "min_chars",
                                        "max_documents", "dedupe", "split_blank_lines", "streaming", "revision")}
    load_form = Form(**data_fields, model=train["model"], preset=train["preset"])
    shown = [data["summary"], data["first_docs"], data["text_column"]]
    loads = dict(concurrency_limit=LOADS_ENTERING, concurrency_id="data")
    data["load"].click(bind(handlers.load_source, load_form), [session, token, *load_form.inputs()], shown, **loads)
    # Picking another column (a user action, not the update above) shows that column's documents.
    data["text_column"].input(bind(handlers.column_picked, load_form), [session, token, *load_form.inputs()], shown,
                              **loads)
    text_boxes = [train["advanced"][f.name] for f in forms.text_fields()]
    train["preset"].change(handlers.preset_changed, train["preset"], [train["recipe"], *text_boxes], queue=False)

    buttons = [train["start"], train["stop"], train["resume"]]
    outputs = [train["status"], train["plot"], train["log"], train["result"], *buttons, train["stop_note"]]
    start_form = Form(**load_form, **train["advanced"], keep_on_hub=train["keep_on_hub"], trackio=train["trackio"])
    # Trainings, exports and Compare wait inside their handlers for the GPU line (space.SLOT),
    # where a visitor sees what is ahead; Gradio's queue only caps how many wait at once.
    gpu_queue = dict(concurrency_limit=WAITING_LIMIT, concurrency_id="gpu", show_progress_on=train["status"])
    train["start"].click(bind(handlers.start_training, start_form), [session, token, *start_form.inputs()], outputs,
                         **gpu_queue).failure(handlers.training_failed, session, buttons, queue=False)
    train["resume"].click(handlers.resume_training, [session, token], outputs, **gpu_queue,
                          ).failure(handlers.training_failed, session, buttons, queue=False)
    train["stop"].click(handlers.stop_training, session, [train["stop_note"], train["stop"]], queue=False)
    # After a restart: the visitor's runs kept on the Hub, and Resume from one of them.
    train["list_hub_runs"].click(handlers.list_hub_runs, [token], train["hub_runs"])
    train["resume_hub"].click(handlers.resume_from_hub, [session, train["hub_runs"], token], outputs, **gpu_queue,
                              ).failure(handlers.training_failed, session, buttons, queue=False)


def _wire_jobs(session: gr.State, token: Any, data: dict, train: dict, export: dict, jobs: dict) -> None:
    """Run on HF Jobs reads the same form as Start, the Export tab's quant types and its own panel."""
    names = ("dataset", "dataset_config", "split", "upload", "text_column", "min_chars", "max_documents", "dedupe",
             "split_blank_lines", "streaming", "revision")
    form = Form(**{k: data[k] for k in names}, model=train["model"], preset=train["preset"], **train["advanced"],
                quants=export["quants"], **{k: jobs[k] for k in ("jobs_flavor", "jobs_image", "jobs_repo", "jobs_token")})
    jobs["jobs_run"].click(bind(handlers.run_on_hf_jobs, form), [session, token, *form.inputs()],
                           [jobs["jobs_log"], jobs["jobs_result"]], concurrency_limit=4, concurrency_id="jobs")


def _wire_export_and_compare(session: gr.State, token: Any, export: dict, compare: dict, compare_tab: Any) -> None:
    """Export, Push and Compare take few inputs each; Compare's arrive as a form by name."""
    gpu_queue = dict(concurrency_limit=WAITING_LIMIT, concurrency_id="gpu")
    export["export"].click(handlers.export_model, [session, export["quants"], export["repo"]],
                           [export["log"], export["table"], export["ollama"], export["modelfile"]], **gpu_queue)
    export["push"].click(handlers.push_model, [session, export["repo"], export["private"], export["log"], token],
                         [export["log"], export["links"], export["ollama"]],
                         concurrency_limit=2, concurrency_id="push")
    compare_tab.select(handlers.compare_choices, session, compare["tuned"], queue=False)
    compare_form = Form({k: compare[k] for k in ("prompt", "mode", "tuned", "max_new_tokens", "temperature",
                                                  "top_p", "seed")})
    compare["generate"].click(bind(handlers.run_compare, compare_form, with_token=False), [session, *compare_form.inputs()],
                              [compare["base_out"], compare["tuned_out"]], **gpu_queue)
