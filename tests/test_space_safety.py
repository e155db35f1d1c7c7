"""A shared app (a public Space) that strangers can use safely: one test group per safety rule.

Each ``test_itemN_...`` checks one rule through what the app really does: the handlers the page
calls (``rawtune.ui``), the library they call, the real Hub clients talking to the Hub emulator
(``tests/hub_emulator.py``), or the app itself served by ``python app.py`` on 127.0.0.1.

1. a visitor's Hub actions never use the owner's token;
2. the dataset and model boxes refuse server paths and other sessions' files;
3. no session's files can be fetched through Gradio's file route;
4. every kind of Hugging Face token is masked in every message;
5. uploads are capped and files are read in batches within a character cap;
6. trainings get a budget, waiting visitors see what is ahead, Compare waits for the GPU;
7. the TTL sweep leaves open sessions alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from hub_emulator import BOB_TOKEN, WRITE_TOKEN  # noqa: E402
from rawtune import ui  # noqa: E402
from rawtune.ui import handlers  # noqa: E402
from rawtune.ui import session as sessions  # noqa: E402
from rawtune.ui.background import friendly  # noqa: E402
from rawtune.data import read_documents  # noqa: E402
from rawtune.errors import DataError, HubError, ModelError  # noqa: E402
from rawtune.rundir import scrub  # noqa: E402
from rawtune.settings import DataSettings  # noqa: E402
from test_hub import make_run  # noqa: E402
from test_ui_browser import _form, data_form  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OAUTH_TOKEN = "hf_oauth_CaRoLvisitor0123_abcDEF456789"  # the shape a Space login hands out
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


class OAuth:
    """The shape of gr.OAuthToken."""

    def __init__(self, token: str):
        self.token = token


def _drain(gen) -> list:
    return list(gen)


def _load(session, dataset: str = "", upload=None, oauth=None, token_text=None, model: str = ""):
    """The Data tab's Load button, as the page calls it."""
    return handlers.load_new_source(session, data_form(dataset, upload=upload, min_chars=0, model=model),
                                    token_text, oauth)


# ---------------------------------------------------------------- 1. tokens


def test_item1_anonymous_visitor_never_gets_owner_token(on_space, owner_token, hub_server):
    session = sessions.new_session()
    make_run(session.run.path)
    with pytest.raises(gr.Error, match="Sign in with Hugging Face"):
        _drain(handlers.push_model(session, "alice/pushed-by-a-stranger", False, "", None, None))
    assert not hub_server.has_repo("alice/pushed-by-a-stranger")
    with pytest.raises(gr.Error) as caught:
        _load(session, "alice/private-text")
    assert "private" in str(caught.value) and "sign in with Hugging Face" in str(caught.value)
    # The library call the data stage makes with the app's token reads nothing either.
    with pytest.raises((DataError, HubError)):
        read_documents(DataSettings(dataset="alice/private-text"), token=sessions.visitor_token(None, None))


def test_item1_private_model_not_downloaded_for_anonymous_visitor(on_space, owner_token, hub_server):
    from rawtune.models import resolve_model

    if not hub_server.has_repo("alice/private-model"):
        hub_server.create_repo("alice/private-model", "model", private=True,
                               files={"config.json": json.dumps({"model_type": "llama"})})
    with pytest.raises(ModelError, match="not found"):
        resolve_model("alice/private-model", token=sessions.visitor_token(None, None), log=lambda line: None)


def test_item1_visitor_acts_with_own_token_only(on_space, owner_token, hub_server):
    hub_server.add_token(OAUTH_TOKEN, "carol", "write")
    session = sessions.new_session()
    make_run(session.run.path)
    # Carol's own login pushes to her namespace...
    frames = _drain(handlers.push_model(session, "carol/my-model", False, "", None, OAuth(OAUTH_TOKEN)))
    assert hub_server.has_repo("carol/my-model") and "Pushed" in frames[-1][1]
    # ...and cannot reach the owner's namespace or data, though HF_TOKEN could.
    with pytest.raises(gr.Error, match="cannot write to alice/"):
        _drain(handlers.push_model(session, "alice/by-carol", False, "", None, OAuth(OAUTH_TOKEN)))
    assert not hub_server.has_repo("alice/by-carol")
    with pytest.raises(gr.Error, match="no access"):
        _load(session, "alice/private-text", token_text=BOB_TOKEN)
    # A pasted token reads what its owner may read.
    summary, rows, _ = _load(session, "alice/public-text", token_text=BOB_TOKEN)
    assert "alice/public-text" in summary and rows


def test_item1_owner_can_opt_in_for_a_private_space(on_space, owner_token, hub_server, monkeypatch):
    monkeypatch.setenv("RAWTUNE_ALLOW_OWNER_TOKEN", "1")
    assert sessions.visitor_token(None, None) == WRITE_TOKEN
    summary, rows, _ = _load(sessions.new_session(), "alice/private-text")
    assert "alice/private-text" in summary and rows[0][2].startswith("private")


# ---------------------------------------------------------------- 2. paths


def test_item2_server_paths_refused_in_app(on_space, tmp_path):
    me, other = sessions.new_session(), sessions.new_session()
    secret = "the other visitor's confidential corpus line number one"
    (other.dir / "uploads").mkdir(parents=True)
    (other.dir / "uploads" / "mine.txt").write_text(secret * 3)
    (other.run.merged_dir).mkdir(parents=True)
    (other.run.merged_dir / "config.json").write_text("{}")
    runs = str(sessions.runs_root())
    for spec in [str(other.dir / "uploads"), str(other.dir / "uploads" / "mine.txt"), "runs",
                 f"runs/{other.dir.name}", "../" + tmp_path.name, str(tmp_path)]:
        with pytest.raises(gr.Error) as caught:
            _load(me, spec)
        message = str(caught.value)
        assert "not available here" in message and secret not in message, (spec, message)
        assert runs not in message.replace(spec, ""), (spec, message)
    with pytest.raises(gr.Error, match="model .* is not available here"):
        _drain(handlers.start_training(me, data_form("alice/public-text", model=str(other.run.merged_dir)),
                                       progress=lambda *a, **k: None))
    from rawtune import space

    assert space.hide_paths(f"read {runs}/session-x/a.csv", [Path(runs)]) == "read session-x/a.csv"
    assert space.hide_paths(f"see https://host{runs}/x", [Path(runs)]) == f"see https://host{runs}/x"
    # The visitor's own upload is read, and named without the server's folders.
    upload = tmp_path / "gradio-upload" / "notes.txt"
    upload.parent.mkdir()
    upload.write_text("My own notes about rivers and mills, long enough to keep.\n")
    summary, rows, _ = _load(me, upload=str(upload))
    assert "uploaded notes.txt" in summary and rows[0][2].startswith("My own notes")


def test_item2_cli_still_reads_local_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("RAWTUNE_SHARED", raising=False)
    (tmp_path / "a.txt").write_text("Local text is fine for the command line.")
    assert read_documents(DataSettings(dataset=str(tmp_path))).texts == ["Local text is fine for the command line."]


# ---------------------------------------------------------------- 3. the file route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_item3_other_sessions_files_not_served(tmp_path):
    runs = tmp_path / "runs"
    victim = runs / "session-0123456789ab" / "run" / "gguf"
    victim.mkdir(parents=True)
    secret = b"GGUF another visitor's model weights"
    (victim / "model.Q4_K_M.gguf").write_bytes(secret)
    (victim.parent / "run.json").write_text('{"settings": {}}')
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "SPACE_ID")}
    env.update(RAWTUNE_RUNS=str(runs), GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    log = (tmp_path / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "app.py did not start"
                time.sleep(0.5)
        for path in [victim / "model.Q4_K_M.gguf", victim.parent / "run.json"]:
            status, body = _get(f"{base}/gradio_api/file={path}")
            assert status == 403 and secret not in body, (path, status)
        assert _get(base + "/config")[0] == 200  # the server itself answers
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_item3_files_handed_out_as_copies(on_space):
    session = sessions.new_session()
    (session.run.gguf_dir).mkdir(parents=True)
    (session.run.gguf_dir / "Modelfile").write_text("FROM ./x.gguf\n")
    copy = sessions.hand_out(session.run.gguf_dir / "Modelfile")
    assert copy.read_text() == "FROM ./x.gguf\n"
    assert not copy.resolve().is_relative_to(sessions.runs_root())
    assert "allowed_paths" not in ui.launch_options()


# ---------------------------------------------------------------- 4. tokens in messages


def test_item4_every_token_kind_is_masked():
    for token in ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", OAUTH_TOKEN, "api_org_AbCdEfGhIjKlMnOpQrSt"]:
        for text in [f"token {token} rejected", f"Authorization: Bearer {token}", f"x={token},y",
                     f"https://u:{token}@host/x"]:
            assert token not in scrub(text) and "oauth_CaRoL" not in scrub(text), text
    assert scrub("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert scrub({"note": OAUTH_TOKEN, "token": "x"}) == {"note": "hf_***"}


def test_item4_cli_error_line_is_scrubbed(tmp_path, capsys):
    from rawtune.cli import main

    missing = tmp_path / OAUTH_TOKEN
    assert main(["push", str(missing), "--repo", "alice/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rawtune: error:") and OAUTH_TOKEN[:14] not in err and "hf_***" in err


def test_item4_oauth_token_never_in_page_log_or_pushed_files(on_space, hub_server):
    hub_server.add_token(OAUTH_TOKEN, "carol", "write")
    session = sessions.new_session()
    make_run(session.run.path)
    frames = _drain(handlers.push_model(session, "carol/scrubbed", False, f"[app] token {OAUTH_TOKEN}",
                                  None, OAuth(OAUTH_TOKEN)))
    shown = json.dumps([str(f) for f in frames[-1]])
    assert "carol/scrubbed" in shown and OAUTH_TOKEN not in shown and "oauth_CaRoL" not in shown
    for data in hub_server.files("carol/scrubbed").values():
        assert b"oauth_CaRoL" not in data
    assert "oauth_CaRoL" not in session.run.run_file.read_text()
    # An unexpected error that quotes a token reaches the page masked.
    error = friendly(RuntimeError(f"upstream said {OAUTH_TOKEN} is bad in {sessions.runs_root()}/session-x"))
    assert "oauth_CaRoL" not in str(error) and str(sessions.runs_root()) not in str(error)


# ---------------------------------------------------------------- 5. uploads and reading


def test_item5_upload_cap(on_space, tmp_path, monkeypatch):
    from rawtune import space

    monkeypatch.setenv("RAWTUNE_MAX_UPLOAD_MB", "1")
    big = tmp_path / "big.txt"
    big.write_text("many words here. " * 70_000)  # about 1.2 MB
    with pytest.raises(gr.Error, match="uploads up to 1 MB"):
        _load(sessions.new_session(), upload=str(big))
    assert ui.launch_options()["max_file_size"] == 1024 * 1024
    monkeypatch.delenv("RAWTUNE_MAX_UPLOAD_MB")
    assert ui.launch_options()["max_file_size"] == space.shared_default("RAWTUNE_MAX_UPLOAD_MB") * 1024 * 1024


PARQUET_BOMB = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
text = "a" * 1_000_000
schema = pa.schema([("text", pa.string())])
with pq.ParquetWriter(sys.argv[1], schema, compression="zstd") as writer:
    for _ in range(400):  # 400 row groups of one 1 MB string: 400 MB of text, a few hundred KB on disk
        writer.write_table(pa.table({"text": [text]}, schema=schema))
"""

READ_AND_MEASURE = """
import json, sys
from rawtune.data import read_documents
from rawtune.settings import DataSettings
docs = read_documents(DataSettings(dataset=sys.argv[1]))
# VmHWM: this process's peak resident memory (ru_maxrss may carry the forking parent's peak).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"chars": sum(map(len, docs.texts)), "docs": len(docs.texts), "peak_mb": peak_kb / 1024}))
"""


def test_item5_small_parquet_cannot_take_hundreds_of_mb(tmp_path):
    from rawtune import space

    bomb = tmp_path / "bomb.parquet"
    subprocess.run([sys.executable, "-c", PARQUET_BOMB, str(bomb)], check=True)
    assert bomb.stat().st_size < 2_000_000
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPACE_ID": "alice/rawtune"}
    env.pop("RAWTUNE_MAX_CHARS", None)
    out = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(bomb)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["chars"] == space.shared_default("RAWTUNE_MAX_CHARS")  # the cap, not the 400 M characters inside
    assert result["peak_mb"] < 250, result  # reading all of it took about 940 MB


def test_item5_readers_stop_at_the_caps(tmp_path, monkeypatch):
    monkeypatch.setenv("RAWTUNE_MAX_CHARS", "1000")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} " + "x" * 90}) + "\n" for i in range(5000)))
    docs = read_documents(DataSettings(dataset=str(rows)))
    assert sum(map(len, docs.texts)) == 1000 and len(docs.texts) == 11
    plain = tmp_path / "book.txt"
    plain.write_text("é" * 50_000)
    assert read_documents(DataSettings(dataset=str(plain))).texts == ["é" * 1000]
    wide = tmp_path / "wide.csv"
    wide.write_text("text\n" + "y" * 5000 + "\n")
    with pytest.raises(DataError, match="wide.csv: the field on line 2 is larger than this app reads"):
        read_documents(DataSettings(dataset=str(wide)))
    monkeypatch.delenv("RAWTUNE_MAX_CHARS")
    docs = read_documents(DataSettings(dataset=str(rows), max_documents=7))
    assert [t.split()[1] for t in docs.texts] == [str(i) for i in range(7)]


def test_item5_csv_row_with_extra_fields_is_one_line_error(tmp_path):
    bad = tmp_path / "table.csv"
    bad.write_text("text,id\nfirst document,1\nsecond, with a comma,2\n")
    with pytest.raises(DataError) as caught:
        read_documents(DataSettings(dataset=str(bad)))
    message = str(caught.value)
    assert message.startswith("table.csv, line 3: 3 fields but the header has 2") and "\n" not in message


def test_item5_hub_datasets_are_streamed_on_a_space(on_space, hub_server):
    summary, rows, _ = _load(sessions.new_session(), "alice/public-text")
    assert "streaming" in summary and rows


# ---------------------------------------------------------------- 6. one GPU, many visitors


def test_item6_waiting_visitor_sees_what_is_ahead():
    from rawtune import space

    slot = space.GpuSlot(space.Budget(seconds=20 * 60, steps=None))
    running = slot.join("training", "session-a")
    compare = slot.join("compare", "session-b")
    later = slot.join("training", "session-c")
    assert slot.my_turn(running) and not slot.my_turn(compare) and not slot.my_turn(later)
    slot.report(running, 40, 200, eta_s=300)
    text = slot.describe(later)
    assert "number 2 in line" in text and "step 40/200" in text and "about 5m00s left" in text
    assert "then 1 more waiting" in text and "20m00s per training" in text
    assert slot.ahead(later)["wait_s"] == pytest.approx(300 + space.COMPARE_SECONDS_GUESS, abs=2)
    assert slot.describe(running) == ""
    slot.leave(running)
    assert slot.my_turn(compare) and slot.position(later) == 1
    # Where each call has a GPU of its own (RAWTUNE_GPU_SLOTS), that many run at once.
    two = space.GpuSlot(space.Budget(None, None), slots=2)
    a, b, c = (two.join("training", f"s{i}") for i in range(3))
    assert two.my_turn(a) and two.my_turn(b) and not two.my_turn(c)
    two.report(a, 1, 10, eta_s=90)
    two.report(b, 5, 10, eta_s=30)
    text = two.describe(c)
    assert "number 1 in line" in text and "step 1/10" in text and "step 5/10" in text
    two.leave(b)
    assert two.my_turn(c) and c.started is not None


def test_item6_budget_decisions(monkeypatch):
    from rawtune import space

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("RAWTUNE_SHARED", raising=False)
    for name in ("RAWTUNE_MAX_TRAIN_MINUTES", "RAWTUNE_MAX_TRAIN_STEPS"):
        monkeypatch.delenv(name, raising=False)
    assert space.Budget.from_env() == space.Budget(None, None)  # the CLI and a local app: no budget
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    budget = space.Budget.from_env()
    assert budget == space.Budget(space.shared_default("RAWTUNE_MAX_TRAIN_MINUTES") * 60, space.shared_default("RAWTUNE_MAX_TRAIN_STEPS"))
    monkeypatch.setenv("RAWTUNE_MAX_TRAIN_MINUTES", "0")
    monkeypatch.setenv("RAWTUNE_MAX_TRAIN_STEPS", "100")
    budget = space.Budget.from_env()
    assert budget.seconds is None and budget.time_up(1e9) is None
    assert budget.cap_steps(None, 1.0, 4, 2, 400) == (None, None)  # 50 planned steps fit
    steps, note = budget.cap_steps(None, 3.0, 4, 2, 400)  # 150 planned
    assert steps == 100 and "150" in note
    assert budget.cap_steps(500, None, 1, 1, 10)[0] == 100
    assert space.Budget(60.0, None).time_up(61) and not space.Budget(60.0, None).time_up(59)


def test_item6_compare_waits_for_a_running_training(on_space, monkeypatch):
    from rawtune import space

    monkeypatch.setattr(space, "SLOT", space.GpuSlot(space.Budget(None, None)))
    other = space.SLOT.join("training", "session-other")
    space.SLOT.report(other, 3, 10, eta_s=42)
    session = sessions.new_session()
    session.run.update(settings={})
    compare = handlers.run_compare(session, dict(prompt="The river", mode="completion", tuned="pytorch",
                                                 max_new_tokens=8, temperature=0, top_p=1, seed=0))
    base, tuned = next(compare)
    assert base.startswith("Waiting for the GPU") and "a training at step 3/10" in base
    assert space.SLOT.position(space.SLOT._line[-1]) == 1
    compare.close()  # the visitor leaves: their place in line goes too
    assert space.SLOT._line == [other]


def _train_under_budget(tmp_path, monkeypatch, model_dir, corpus, budget: dict) -> tuple:
    """An 8-step training started from the app with the shared-app budget ``budget`` (env
    variables) in force; the session and the last frame's status and log."""
    from rawtune import space

    monkeypatch.setenv("RAWTUNE_RUNS", str(tmp_path))
    for name, value in budget.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setattr(space, "SLOT", space.GpuSlot())
    session = sessions.new_session()
    frames = list(handlers.start_training(
        session, {**data_form(str(corpus), model=str(model_dir)),
                  **_form(seq_len=64, lora_r=8, max_steps=8, learning_rate=0.01, save_steps=100, eval_steps=0)},
        progress=lambda *a, **k: None))
    status, _plot, log, _result = frames[-1][:4]
    return session, status, log


def test_item6_training_keeps_to_the_step_budget(tmp_path, monkeypatch, tiny_llama_dir, tiny_corpus):
    from rawtune import space

    session, status, log = _train_under_budget(tmp_path, monkeypatch, tiny_llama_dir, tiny_corpus,
                                               {"RAWTUNE_MAX_TRAIN_STEPS": "3"})
    assert status.startswith("**Done**") and "step budget per training is 3 steps" in log
    record = session.run.load()["train"]
    assert record["steps"] == record["max_steps"] == 3
    assert space.SLOT._line == []


# ---------------------------------------------------------------- 7. TTL cleanup


def test_item7_ttl_cleanup_skips_open_sessions(on_space, monkeypatch):
    monkeypatch.setenv("RAWTUNE_RUN_TTL_HOURS", "1")
    open_session = sessions.new_session()
    (open_session.run.path).mkdir(parents=True)
    (open_session.run.run_file).write_text("{}")
    closed = sessions.runs_root() / "session-closed00000"
    (closed / "run").mkdir(parents=True)
    past = time.time() - 3 * 3600
    for folder in (open_session.dir, closed):
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (past, past))
    sessions.new_session()  # a new visitor's arrival runs the sweep
    assert open_session.dir.exists() and open_session.run.run_file.exists()
    assert not closed.exists()
    sessions.end_session(open_session)
    assert not open_session.dir.exists()


def test_item6_training_stops_at_the_time_budget(tmp_path, monkeypatch, tiny_llama_dir, tiny_corpus):
    from rawtune import space

    # 0.001 minutes = 0.06 s: over before the first step ends
    session, status, log = _train_under_budget(tmp_path, monkeypatch, tiny_llama_dir, tiny_corpus,
                                               {"RAWTUNE_MAX_TRAIN_MINUTES": "0.001"})
    assert "time budget per training" in status and "Resume" in status
    record = session.run.load()["train"]
    assert 1 <= record["steps"] < 8 and session.run.has_adapter()
    assert space.SLOT._line == []
