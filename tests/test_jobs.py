"""``rawtune run --on-hf-jobs``: the run submitted through huggingface_hub's jobs API to the Hub
emulator, which runs the job for real as a local subprocess of this checkout's rawtune and streams
its output back as the job's log events.

The checks are on what came out: the GGUF in the emulator's repo, the job spec the emulator received
(the token only among its secrets), and what the CLI printed (the job's log lines, the pushed repo,
never the token).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from hub_emulator import READ_TOKEN, WRITE_TOKEN
from rawtune import jobs
from rawtune.cli import main

IMAGE = "hf.co/spaces/alice/rawtune"
MODEL_REPO = "alice/tiny-llama-for-jobs"

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def upload_model(hub, folder: Path) -> str:
    """The tiny model as a Hub model repo in the emulator (a job cannot read a local folder)."""
    if not hub.has_repo(MODEL_REPO):
        hub.create_repo(MODEL_REPO, files={p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    return MODEL_REPO


def write_config(path: Path, **values) -> Path:
    lines = [f"{k}: {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_on_hf_jobs_pushes_the_gguf(hub_server, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """data,train,eval,export(q8_0),push in the job; the CLI follows its logs and prints the repo."""
    pytest.importorskip("llama_cpp", reason="GGUF quantization needs llama-cpp-python")
    monkeypatch.delenv("SPACE_ID", raising=False)
    model = upload_model(hub_server, tiny_llama_dir)
    cfg = write_config(tmp_path / "cfg.yaml", out=str(tmp_path / "jobrun"), dataset="alice/public-text",
                       model=model, stages=["data", "train", "eval", "export", "push"], quant=["q8_0"],
                       preset="quick", seq_len=32, max_steps=3, batch_size=2, min_heldout_blocks=2, verify=False,
                       repo="alice/jobs-tiny")
    before = set(hub_server.jobs)

    code = main(["run", "--config", str(cfg), "--on-hf-jobs", "cpu-basic", "--hf-jobs-image", IMAGE,
                 "--token", WRITE_TOKEN])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:] + printed.out[-3000:]

    # The CLI printed the job's own lines as they came, then the repo.
    out = printed.out
    assert "held-out perplexity:" in out and "run directory: runs/jobrun" in out
    assert out.rstrip().splitlines()[-1] == f"pushed: {hub_server.url}/alice/jobs-tiny"
    assert WRITE_TOKEN not in out + printed.err

    # The job spec: the Space image, the flavor, the config as an env var; the token only as a secret.
    (job_id,) = set(hub_server.jobs) - before
    job = hub_server.jobs[job_id]
    spec = job.spec
    assert job.stage == "COMPLETED"
    assert spec["spaceId"] == "alice/rawtune" and spec["flavor"] == "cpu-basic"
    assert spec["secrets"] == {"HF_TOKEN": WRITE_TOKEN}
    assert WRITE_TOKEN not in json.dumps(spec["command"]) + json.dumps(spec["environment"])
    assert WRITE_TOKEN not in json.dumps({k: v for k, v in spec.items() if k != "secrets"})
    assert "repo: alice/jobs-tiny" in spec["environment"][jobs.CONFIG_VAR]

    # The run happened in the job's folder, not here; its GGUF is in the emulator's repo.
    assert not (tmp_path / "jobrun").exists()
    files = hub_server.files("alice/jobs-tiny")
    assert files["jobrun.Q8_0.gguf"][:4] == b"GGUF" and len(files["jobrun.Q8_0.gguf"]) > 10_000
    assert "Modelfile" in files and "README.md" in files
    record = json.loads(files["run.json"])
    assert record["settings"]["push"]["repo"] == "alice/jobs-tiny"
    assert WRITE_TOKEN not in files["run.json"].decode() + files["README.md"].decode()


@pytest.mark.parametrize("change, argv_extra, message", [
    ({"dataset": "LOCAL"}, [], "push the data to the Hub first"),
    ({"dataset": "alice/nope/../x"}, [], "push the data to the Hub first"),
    ({"model": "LOCAL_MODEL"}, [], "local path the job cannot reach"),
    ({"repo": None}, [], "give --repo user/name"),
    ({"stages": ["data", "train", "eval"]}, [], "must end with push"),
    ({}, ["--on-hf-jobs", "a10g-tiny"], "not an HF Jobs flavor"),
    ({}, ["--token", ""], "needs a token that may start jobs"),
    ({}, ["--token", READ_TOKEN], "the Hub refused the token for HF Jobs"),
    ({}, ["--hf-jobs-image", ""], "--hf-jobs-image: give your rawtune Space"),
])
def test_refusals_say_what_to_do(hub_server, tmp_path, tiny_corpus, tiny_llama_dir, capsys, monkeypatch,
                                 change, argv_extra, message):
    """What a job cannot run is refused in one line (exit 1) before, or by, the Hub; no job runs."""
    monkeypatch.delenv("SPACE_ID", raising=False)
    values = dict(dataset="alice/public-text", model=upload_model(hub_server, tiny_llama_dir), repo="alice/x",
                  out=str(tmp_path / "r"))
    values.update(change)
    values = {k: (str(tiny_corpus) if v == "LOCAL" else str(tiny_llama_dir) if v == "LOCAL_MODEL" else v)
              for k, v in values.items() if v is not None}
    cfg = write_config(tmp_path / "cfg.yaml", **values)
    argv = ["run", "--config", str(cfg), "--on-hf-jobs", "cpu-basic", "--hf-jobs-image", IMAGE,
            "--token", WRITE_TOKEN]
    for i in range(0, len(argv_extra), 2):  # replace a flag's value
        argv[argv.index(argv_extra[i]) + 1] = argv_extra[i + 1]
    before = {k: j.stage for k, j in hub_server.jobs.items()}
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert WRITE_TOKEN not in err and READ_TOKEN not in err
    assert set(hub_server.jobs) == set(before)


def test_space_is_the_default_image(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    assert jobs.image_for(None) == "hf.co/spaces/alice/rawtune"
    assert jobs.image_for("bob/rawtune") == "hf.co/spaces/bob/rawtune"
    monkeypatch.delenv("SPACE_ID")
    with pytest.raises(Exception, match="--hf-jobs-image"):
        jobs.image_for(None)


def test_stop_cancels_the_job(hub_server):
    """Setting stop while following (the CLI does on Ctrl-C) cancels the job on the Hub."""
    from huggingface_hub import HfApi

    job = HfApi(endpoint=hub_server.url).run_job(
        image=IMAGE, command=["python", "-u", "-c", "import time\nfor i in range(600): print('tick', i); time.sleep(0.1)"],
        token=WRITE_TOKEN)
    stop, lines = threading.Event(), []

    def log(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            stop.set()

    info = jobs.follow(job, WRITE_TOKEN, log, stop)
    assert info.status.stage == "CANCELED"
    assert lines[:3] == ["tick 0", "tick 1", "tick 2"] and lines[-1].startswith("rawtune: cancelled the HF Job")
    assert hub_server.jobs[job.id].process.wait(timeout=10) != 0  # the process was stopped, not finished


# ---------------------------------------------------------------- the app's button


@pytest.fixture
def space_app(tmp_path, monkeypatch):
    """The app as a Space runs it: SPACE_ID set (the job's default image), runs in a temporary folder."""
    pytest.importorskip("gradio")
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    monkeypatch.setenv("RAWTUNE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def app_form(**jobs_fields) -> dict:
    from test_ui_browser import _form, data_form

    return {**data_form("alice/public-text", model=MODEL_REPO, min_chars=0), **_form(seq_len=32, max_steps=2),
            "quants": ["Q8_0"], "jobs_flavor": "cpu-basic", "jobs_image": "", "jobs_repo": "alice/jobs-from-app",
            **jobs_fields}


class OAuth:  # the shape of gr.OAuthToken: the visitor signed in (read-repos + contribute-repos, no jobs)
    token = "hf_oauth_emuAliceApp00000000000000"


def test_app_button_runs_the_job_with_the_pasted_token(hub_server, space_app, tiny_llama_dir):
    pytest.importorskip("llama_cpp", reason="GGUF quantization needs llama-cpp-python")
    from rawtune.ui import handlers
    from rawtune.ui import session as sessions

    upload_model(hub_server, tiny_llama_dir)
    before = set(hub_server.jobs)
    frames = list(handlers.run_on_hf_jobs(sessions.new_session(), app_form(jobs_token=WRITE_TOKEN), None, OAuth()))
    log, result = frames[-1]
    assert result == f"**Pushed:** [alice/jobs-from-app]({hub_server.url}/alice/jobs-from-app)"
    assert "held-out perplexity:" in log and WRITE_TOKEN not in log
    (job_id,) = set(hub_server.jobs) - before
    spec = hub_server.jobs[job_id].spec
    assert spec["spaceId"] == "alice/rawtune" and spec["secrets"] == {"HF_TOKEN": WRITE_TOKEN}
    assert WRITE_TOKEN not in json.dumps({k: v for k, v in spec.items() if k != "secrets"})
    files = hub_server.files("alice/jobs-from-app")
    assert {name for name in files if name.endswith(".gguf")} and all(
        files[name][:4] == b"GGUF" for name in files if name.endswith(".gguf"))
    assert [n for n in files if n.endswith(".gguf")][0].endswith(".Q8_0.gguf")


def test_app_button_needs_a_pasted_jobs_token(hub_server, space_app, tiny_llama_dir, tiny_corpus):
    """Signing in cannot grant the jobs scope: without a pasted token the button says what to do; a
    dataset the job cannot reach is refused before anything is submitted."""
    import gradio as gr
    from rawtune.ui import handlers
    from rawtune.ui import session as sessions

    upload_model(hub_server, tiny_llama_dir)
    before = set(hub_server.jobs)
    with pytest.raises(gr.Error, match="Paste a token with the Jobs permission"):
        list(handlers.run_on_hf_jobs(sessions.new_session(), app_form(jobs_token=""), None, OAuth()))
    session = sessions.new_session()
    upload = session.dir / "corpus.jsonl"
    upload.write_bytes(tiny_corpus.read_bytes())
    form = app_form(jobs_token=WRITE_TOKEN, dataset="", upload=str(upload))
    with pytest.raises(gr.Error, match="push the data to the Hub first"):
        list(handlers.run_on_hf_jobs(session, form, None, OAuth()))
    assert set(hub_server.jobs) == before


def test_ctrl_c_cancels_the_job(hub_server, tmp_path, tiny_llama_dir, monkeypatch):
    """Ctrl-C in `rawtune run --on-hf-jobs` (a real SIGINT to the CLI process) cancels the job and exits
    130, although huggingface_hub's log stream swallows the interrupt itself."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model = upload_model(hub_server, tiny_llama_dir)
    cfg = write_config(tmp_path / "cfg.yaml", out="long", dataset="alice/public-text", model=model, preset="quick",
                       seq_len=32, max_steps=100_000, repo="alice/never-pushed")
    env = {**os.environ, **hub_server.client_env(tmp_path / "cli-cache"), "HF_TOKEN": WRITE_TOKEN,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("SPACE_ID", None)
    before = set(hub_server.jobs)
    cli = subprocess.Popen([sys.executable, "-m", "rawtune", "run", "--config", str(cfg), "--on-hf-jobs", "cpu-basic",
                            "--hf-jobs-image", IMAGE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.time() + 300
        while not [j for k, j in hub_server.jobs.items() if k not in before and j.lines] and time.time() < deadline:
            time.sleep(0.5)  # the job is running and has printed a line, so the CLI is following it
        time.sleep(2)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    (job_id,) = set(hub_server.jobs) - before
    job = hub_server.jobs[job_id]
    assert cli.returncode == 130, err[-2000:]
    assert job.stage == "CANCELED" and job.process.wait(timeout=30) != 0
    assert f"cancelled the HF Job {job_id}" in out and "the HF Job was cancelled" in err
    assert WRITE_TOKEN not in out + err
    assert not hub_server.has_repo("alice/never-pushed")
