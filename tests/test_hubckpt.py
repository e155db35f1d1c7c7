"""Runs that survive a restart: checkpoints uploaded to a private Hub repo, the run directory
deleted, the run downloaded into a new directory and resumed (rawtune/hubckpt.py), against the Hub
emulator (tests/hub_emulator.py) with the real huggingface_hub client."""

from __future__ import annotations

import shutil
import threading
import uuid

import pytest
import yaml

from hub_emulator import BOB_TOKEN, WRITE_TOKEN
from rawtune import hubckpt
from rawtune.cli import main as cli_main
from rawtune.errors import ConfigError, HubError
from rawtune.pipeline import run_pipeline
from rawtune.rundir import RunDir
from rawtune.settings import RunSettings, apply

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

STEPS = 8


@pytest.fixture
def repo() -> str:
    """A checkpoint repo of alice's that no other test used (the emulator lives for the session)."""
    return f"alice/rawtune-ckpt-{uuid.uuid4().hex[:8]}"


def _values(out, model, corpus, **more):
    return dict(out=str(out), dataset=str(corpus), model=str(model), preset="quick", seq_len=64, batch_size=2,
                max_steps=STEPS, learning_rate=3e-3, save_steps=2, stages=["data", "train"], **more)


def _losses(record: dict) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in record["train"]["history"] if e["type"] == "step"}


def _train_stopped_at(out, model, corpus, step: int, repo: str, **more) -> RunDir:
    """Train with checkpoints uploaded and stop after ``step`` (a checkpoint is saved on stop)."""
    stop = threading.Event()

    def on_event(event):
        if event["type"] == "step" and event["step"] >= step:
            stop.set()

    run_pipeline(apply(RunSettings(), _values(out, model, corpus, checkpoint_repo=repo, **more)), token=WRITE_TOKEN,
                 callback=on_event, stop=stop, log=lambda line: None)
    return RunDir(out)


def test_restart_then_resume_from_the_hub(hub_server, repo, tmp_path, tiny_llama_dir, tiny_corpus, capsys):
    run = _train_stopped_at(tmp_path / "first", tiny_llama_dir, tiny_corpus, 4, repo)
    stopped = run.load()["train"]
    assert stopped["stopped_early"] and stopped["steps"] == 4
    files = hub_server.files(repo)
    assert hub_server.repo(repo).private
    # Only the newest checkpoint is kept in the repo, whole, with run.json and the data.
    held = sorted({p.split("/")[1] for p in files if p.startswith("checkpoints/")})
    assert held == ["checkpoint-4"]
    local = {f.relative_to(run.checkpoints_dir / "checkpoint-4").as_posix(): f.read_bytes()
             for f in (run.checkpoints_dir / "checkpoint-4").rglob("*") if f.is_file()}
    assert {p[len("checkpoints/checkpoint-4/"):]: b for p, b in files.items() if p.startswith("checkpoints/")} == local
    assert files["data/train.npy"] == (run.data_dir / "train.npy").read_bytes()
    assert files["data/heldout.npy"] == (run.data_dir / "heldout.npy").read_bytes()
    assert b'"settings"' in files["run.json"]
    assert yaml.safe_load(files["README.md"].decode().split("---")[1])["tags"] == [hubckpt.TAG]

    shutil.rmtree(run.path)  # the Space restarts: its disk is wiped
    out = tmp_path / "after-restart"
    code = cli_main(["train", "--out", str(out), "--resume-from-hub", repo, "--token", WRITE_TOKEN])
    assert code == 0, capsys.readouterr().err
    resumed = RunDir(out).load()["train"]
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == STEPS and not resumed["stopped_early"]
    assert (RunDir(out).adapter_dir / "adapter_model.safetensors").is_file()
    # The resumed run kept uploading to the same repo: it now holds the final checkpoint only.
    assert sorted({p.split("/")[1] for p in hub_server.files(repo) if p.startswith("checkpoints/")}) == [
        f"checkpoint-{STEPS}"]

    # The same run without a restart: the steps after the resume have the same losses.
    whole = run_pipeline(apply(RunSettings(), _values(tmp_path / "whole", tiny_llama_dir, tiny_corpus)),
                         log=lambda line: None)
    after, straight = _losses(RunDir(out).load()), _losses(whole)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-5), step


def test_the_token_is_in_no_uploaded_file(hub_server, repo, tmp_path, tiny_llama_dir, tiny_corpus):
    _train_stopped_at(tmp_path / "r", tiny_llama_dir, tiny_corpus, 2, repo)
    files = hub_server.files(repo)
    assert "run.json" in files and any(p.startswith("checkpoints/checkpoint-") for p in files)
    for path, data in files.items():
        assert WRITE_TOKEN.encode() not in data, path
        assert b"hf_emu" not in data, path


def test_listing_finds_only_the_users_checkpoint_repos(hub_server, repo, tmp_path, tiny_llama_dir, tiny_corpus,
                                                       capsys):
    _train_stopped_at(tmp_path / "r", tiny_llama_dir, tiny_corpus, 2, repo)
    other = f"{repo}-other"
    hub_server.create_repo(other, files={"README.md": "---\ntags:\n- other\n---\n"})
    listed = [r["repo"] for r in hubckpt.list_runs(WRITE_TOKEN)]
    assert repo in listed and other not in listed
    # Everything listed is alice's and carries the tag (other tests of the session add more of them).
    assert all(r.startswith("alice/") and f"- {hubckpt.TAG}".encode() in hub_server.read(r, "README.md")
               for r in listed)
    assert repo not in [r["repo"] for r in hubckpt.list_runs(BOB_TOKEN)]  # alice's private repo is not bob's
    assert hubckpt.main(["--list", "--token", WRITE_TOKEN]) == 0
    assert capsys.readouterr().out.split() == listed
    with pytest.raises(ConfigError, match="sign in"):
        hubckpt.list_runs(False)


def test_a_failed_upload_logs_one_line_and_training_goes_on(hub_server, repo, tmp_path, tiny_llama_dir,
                                                            tiny_corpus):
    lines = []
    hub_server.fail_uploads = True
    try:
        run_pipeline(apply(RunSettings(), _values(tmp_path / "r", tiny_llama_dir, tiny_corpus, checkpoint_repo=repo)),
                     token=WRITE_TOKEN, log=lines.append)
    finally:
        hub_server.fail_uploads = False
    assert RunDir(tmp_path / "r").load()["train"]["steps"] == STEPS
    failed = [line for line in lines if line.startswith("[hub-checkpoints]") and "failed" in line]
    assert failed and all("\n" not in line and WRITE_TOKEN not in line for line in failed)
    assert not (tmp_path / "r" / hubckpt.STAGING).exists()


def test_refusals(hub_server, repo, tmp_path, tiny_llama_dir, tiny_corpus):
    values = _values(tmp_path / "r", tiny_llama_dir, tiny_corpus, checkpoint_repo=repo)
    with pytest.raises(ConfigError, match="needs a Hugging Face token"):
        run_pipeline(apply(RunSettings(), values), token=False, log=lambda line: None)
    with pytest.raises(ConfigError, match="user/name"):
        run_pipeline(apply(RunSettings(), {**values, "checkpoint_repo": "no-slash"}), token=WRITE_TOKEN,
                     log=lambda line: None)
    with pytest.raises(HubError, match="no complete rawtune checkpoint"):
        hub_server.create_repo(repo)
        hubckpt.download(repo, tmp_path / "x", WRITE_TOKEN, log=lambda line: None)
    with pytest.raises(HubError):
        hubckpt.download("alice/does-not-exist", tmp_path / "y", WRITE_TOKEN, log=lambda line: None)


def test_repo_for_a_visitor():
    assert hubckpt.repo_for("alice", "run 3/ok") == "alice/rawtune-ckpt-run-3-ok"


def test_the_app_keeps_checkpoints_only_for_a_visitor_with_a_token(hub_server):
    from hub_emulator import OAUTH_TOKEN

    assert hubckpt.keep_by_default(True) and not hubckpt.keep_by_default(False)
    assert hubckpt.repo_for_app(True, OAUTH_TOKEN, "20261207-151500") == "alice/rawtune-ckpt-20261207-151500"
    assert hubckpt.repo_for_app(True, False, "x") is None  # a visitor who did not sign in: nothing uploaded
    assert hubckpt.repo_for_app(False, OAUTH_TOKEN, "x") is None


def test_the_apps_list_button_fills_the_dropdown(hub_server, repo):
    pytest.importorskip("gradio")
    from rawtune.ui import handlers

    hub_server.create_repo(repo, private=True, files={"README.md": hubckpt.CARD.format(repo=repo)})
    shown = handlers.list_hub_runs(WRITE_TOKEN, None)
    choices = [c[0] for c in shown.choices]
    assert repo in choices and choices == [r["repo"] for r in hubckpt.list_runs(WRITE_TOKEN)]
    assert shown.value == choices[0]  # the newest is picked


def test_the_app_keeps_a_run_on_the_hub_and_resumes_it_after_a_restart(hub_server, tmp_path, monkeypatch,
                                                                        tiny_llama_dir, tiny_corpus):
    """Start in the app with the box ticked (the visitor's token), wipe the session's disk, then
    List my runs and Resume from the Hub in a new session."""
    pytest.importorskip("gradio")
    from test_ui_browser import _form, data_form

    from rawtune import space
    from rawtune.ui import handlers
    from rawtune.ui import session as sessions

    monkeypatch.setenv("RAWTUNE_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(space, "SLOT", space.GpuSlot())
    monkeypatch.setenv("RAWTUNE_MAX_TRAIN_MINUTES", "0.00001")  # the turn ends after its first step
    first = sessions.new_session()
    form = {**data_form(str(tiny_corpus), model=str(tiny_llama_dir)), "keep_on_hub": True,
            **_form(seq_len=64, lora_r=8, max_steps=4, learning_rate=0.01, save_steps=2, eval_steps=0)}
    list(handlers.start_training(first, form, WRITE_TOKEN, None, progress=lambda *a, **k: None))
    repo = first.run.load()["settings"]["checkpoint_repo"]
    assert repo.startswith("alice/rawtune-ckpt-") and hub_server.repo(repo).private
    stopped = first.run.load()["train"]
    assert stopped["stopped_early"] and stopped["steps"] < 4
    assert any(p.startswith(f"checkpoints/checkpoint-{stopped['steps']}/") for p in hub_server.files(repo))

    shutil.rmtree(tmp_path / "runs")  # the restart
    monkeypatch.delenv("RAWTUNE_MAX_TRAIN_MINUTES")
    again = sessions.new_session()
    shown = handlers.list_hub_runs(WRITE_TOKEN, None)
    assert repo in [c[0] for c in shown.choices]
    list(handlers.resume_from_hub(again, repo, WRITE_TOKEN, None, progress=lambda *a, **k: None))
    resumed = again.run.load()["train"]
    assert resumed["resumed_from_step"] == stopped["steps"] and resumed["steps"] == 4
    assert (again.run.adapter_dir / "adapter_model.safetensors").is_file()
