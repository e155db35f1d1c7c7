"""Issue 25, items 2 and 4: sessions end and keep to a disk budget; one visitor cannot fill the lines.

Item 2 is checked here on the session layer (a closed page's session ends, the disk budget deletes
the oldest closed sessions first and refuses an upload that does not fit with one line) and in a
real browser in ``tests/test_ui_browser.py::test_item2_session_folder_deleted_when_page_closes``.
Item 4 runs the app's page in this process (``ui.build_demo``, queued as ``app.py`` queues it,
with Gradio's password login so two visitors can be told apart from one address) and talks to it
with ``gradio_client``, one client per browser session.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from rawtune import errors, space, ui  # noqa: E402
from rawtune.ui import handlers  # noqa: E402
from rawtune.ui import session as sessions  # noqa: E402
from test_ui_browser import _form, data_form  # noqa: E402

MB = 2**20
ALICE, BOB = ("alice", "alice-pass-123"), ("bob", "bob-pass-456")


class Page:
    """What Gradio's request says about a page: its session hash (and no login, no address)."""

    def __init__(self, session_hash: str):
        self.session_hash, self.username, self.client = session_hash, None, None


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A shared app (SPACE_ID set) with its runs under a temporary folder."""
    for name in ("RAWTUNE_MAX_DISK_MB", "RAWTUNE_MAX_UPLOAD_MB", "RAWTUNE_MAX_CHARS", "RAWTUNE_ALLOW_SERVER_PATHS",
                 "RAWTUNE_MAX_GPU_PER_VISITOR", "RAWTUNE_MAX_LOADS_PER_VISITOR", "RAWTUNE_RUN_TTL_HOURS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    monkeypatch.setenv("RAWTUNE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _text_file(path: Path, size: int) -> Path:
    """A plain-text file of ``size`` bytes (lines of words), as a visitor would upload."""
    line = "the river keeps the stones and the light on the water\n"
    path.write_text((line * (size // len(line) + 1))[:size])
    return path


def _left_behind(root: Path, name: str, size: int, age_s: float) -> Path:
    """A session folder from before a restart (no open page owns it), last changed ``age_s`` ago."""
    folder = root / f"session-{name}"
    (folder / "uploads").mkdir(parents=True)
    _text_file(folder / "uploads" / "old.txt", size)
    past = time.time() - age_s
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (past, past))
    return folder


# ---------------------------------------------------------------- item 2: sessions end, a disk budget


def test_item2_closed_page_ends_its_session(shared):
    """The page's unload event ends its session: the folder goes at once when idle, and when the
    training it started has stopped. An API client (no page-load event) gets a session kept under
    its session hash, which its unload ends the same way."""
    session = sessions.open_page(Page("page-a"))
    assert session.dir.is_dir() and sessions.current(None, Page("page-a")) is session
    session.run.path.mkdir(parents=True)
    sessions.claim(session, "training")
    sessions.page_closed(Page("page-a"))
    assert session.stop.is_set() and session.run.stop_file.exists()
    assert session.dir.is_dir()  # the training stops after its step and saves into the folder
    sessions.release(session)
    assert not session.dir.exists()

    api = sessions.current(None, Page("client-b"))
    assert sessions.current(None, Page("client-b")) is api and api.dir.is_dir()
    sessions.page_closed(Page("client-b"))
    assert not api.dir.exists()
    with pytest.raises(gr.Error, match="reload the page"):
        sessions.current(None)


def test_item2_disk_budget_evicts_oldest_closed_sessions_first(shared, monkeypatch):
    monkeypatch.setenv("RAWTUNE_MAX_DISK_MB", "1")
    root = sessions.runs_root()
    oldest = _left_behind(root, "oldest", 400_000, age_s=3 * 3600)
    newer = _left_behind(root, "newer", 400_000, age_s=2 * 3600)
    mine = sessions.new_session()
    past = time.time() - 5 * 3600  # an open session older than both is still never deleted
    os.utime(mine.dir, (past, past))

    sessions.keep_upload(mine, str(_text_file(shared / "a.txt", 400_000)))
    assert not oldest.exists() and newer.exists() and mine.dir.exists()
    assert (mine.dir / "uploads" / "a.txt").stat().st_size == 400_000

    # A second visitor's upload does not fit even without the last closed session: one line, and
    # nothing is deleted for nothing.
    other = sessions.new_session()
    big = _text_file(shared / "b.txt", 700_000)
    with pytest.raises(gr.Error) as caught:
        handlers.load_new_source(other, data_form(upload=str(big), min_chars=0))
    message = str(caught.value)
    assert "\n" not in message and "disk for uploads and runs (1 MB)" in message
    assert "your upload b.txt (0.7 MB) does not fit" in message
    assert newer.exists() and (mine.dir / "uploads" / "a.txt").exists() and not (other.dir / "uploads").exists()

    # Once the first page is closed its folder is gone, and the upload fits after the last closed
    # session is deleted.
    sessions.end_session(mine)
    assert not mine.dir.exists()
    summary, _rows, _column = handlers.load_new_source(other, data_form(upload=str(big), min_chars=0))
    assert "uploaded b.txt" in summary and not newer.exists()
    assert (other.dir / "uploads" / "b.txt").stat().st_size == 700_000


def test_item2_disk_budget_decisions(shared, monkeypatch):
    """The budget's choice alone: oldest closed first, only as many as needed, open ones never."""
    folders = [space.Folder(Path("open-old"), 10.0, 300, closed=False),
               space.Folder(Path("closed-new"), 30.0, 300, closed=True),
               space.Folder(Path("closed-old"), 20.0, 300, closed=True)]
    monkeypatch.setenv("RAWTUNE_MAX_DISK_MB", str(1000 / MB))
    assert space.evictions(folders, 100, "x") == []  # 900 + 100 fit in 1000
    assert space.evictions(folders, 150, "x") == [Path("closed-old")]
    assert space.evictions(folders, 500, "x") == [Path("closed-old"), Path("closed-new")]
    with pytest.raises(errors.LimitError, match="taken by open sessions: x .* does not fit"):
        space.evictions(folders, 800, "x")
    monkeypatch.setenv("RAWTUNE_MAX_DISK_MB", "0")
    assert space.evictions(folders, 10**12, "x") == []
    monkeypatch.delenv("RAWTUNE_MAX_DISK_MB")
    assert space.max_disk_bytes() == space.shared_default("RAWTUNE_MAX_DISK_MB") * MB
    monkeypatch.delenv("SPACE_ID")
    assert space.max_disk_bytes() is None  # the CLI and a local app: no budget unless set


def test_item2_training_refused_while_open_sessions_fill_the_disk(shared, monkeypatch, tiny_corpus):
    monkeypatch.setenv("RAWTUNE_MAX_DISK_MB", "0.5")
    first = sessions.new_session()
    sessions.keep_upload(first, str(_text_file(shared / "a.txt", 500_000)))
    second = sessions.new_session()
    monkeypatch.setenv("RAWTUNE_MAX_DISK_MB", "0.4")  # the owner lowered it meanwhile
    with pytest.raises(gr.Error, match="a new training does not fit now"):
        list(handlers.start_training(second, {**data_form("alice/public-text", model=sessions.default_model()),
                                              **_form(max_steps=2)},
                                     progress=lambda *a, **k: None))
    assert second.busy is None and first.upload.exists()


# ---------------------------------------------------------------- item 4: one visitor, one share


def test_item4_visitor_is_the_signed_in_user_else_the_address(monkeypatch):
    from starlette.requests import Request as Starlette

    def request(session: dict | None = None, forwarded: str = "") -> gr.Request:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        scope = {"type": "http", "client": ("10.16.3.80", 4242), "headers": headers, "method": "POST", "path": "/"}
        if session is not None:
            scope["session"] = session
        return gr.Request(Starlette(scope))

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert sessions.visitor(gr.Request(username="alice")) == "user:alice"
    assert sessions.visitor(request({"oauth_info": {"userinfo": {"preferred_username": "carol"}}})) == "user:carol"
    assert sessions.visitor(request()) == sessions.visitor(request({})) == "address:10.16.3.80"
    # Off a Space the header is whatever the client sent: the connecting address counts.
    assert sessions.visitor(request(forwarded="203.0.113.7")) == "address:10.16.3.80"
    # On a Space every request comes from the Space's proxy, which forwards the visitor's address.
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    assert sessions.visitor(request(forwarded="203.0.113.7, 10.16.0.1")) == "address:203.0.113.7"
    assert sessions.visitor(request()) == "address:10.16.3.80"
    assert sessions.visitor(None) is None

    loads = space.PerVisitor(lambda: 2, "You already have {limit} loads")
    loads.take("user:alice")
    loads.take("user:alice")
    with pytest.raises(errors.LimitError, match="You already have 2 loads"):
        loads.take("user:alice")
    loads.take("user:bob")
    loads.give_back("user:alice")
    loads.take("user:alice")
    assert loads.held("user:alice") == 2 and loads.held("user:bob") == 1
    for _ in range(5):
        loads.take(None)  # a direct call from Python is nobody's: no limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama_dir):
    """The page served in this process, two visitors (alice, bob) signing in with Gradio's login,
    two loads and one GPU place each, its own GPU line."""
    patch = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("sec_app")
    for name in ("SPACE_ID", "RAWTUNE_SHARED", "HF_TOKEN", "RAWTUNE_MAX_DISK_MB"):
        patch.delenv(name, raising=False)
    patch.setenv("RAWTUNE_RUNS", str(home / "runs"))
    patch.setenv("RAWTUNE_DEFAULT_MODEL", str(tiny_llama_dir))
    patch.setenv("RAWTUNE_MAX_LOADS_PER_VISITOR", "2")
    patch.setenv("RAWTUNE_MAX_GPU_PER_VISITOR", "1")
    patch.setenv("HF_HUB_OFFLINE", "1")
    slot = space.GpuSlot(space.Budget(None, None))
    patch.setattr(space, "SLOT", slot)
    demo = ui.build_demo()
    demo.queue(default_concurrency_limit=2)  # as app.py queues it
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=[ALICE, BOB], **ui.launch_options())
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", slot=slot, home=home)
    demo.close()
    patch.undo()


def _client(app, login: tuple[str, str]):
    return gradio_client.Client(app.url, auth=login, verbose=False, download_files=False)


def _load_endpoint(client) -> str:
    """The Load button's endpoint (named after its handler: load_new_source before issue 25)."""
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    return next(n for n in ("/load_source", "/load_new_source") if n in names)


def _big_corpus(path: Path, documents: int) -> Path:
    words = "river stone light water field morning keeper bridge lantern harbor".split()
    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(documents):
            out.write(json.dumps({"text": f"doc {i} " + " ".join(rng.choice(words) for _ in range(60))}) + "\n")
    return path


# Timing-sensitive: on a quiet machine Alice's loads finish as fast as Bob's and a third of hers can be
# admitted as soon as one ends, so the expected order and count are a race there (two CI runs of the
# full suite failed on it); run it with `-m slow` on a loaded or slow machine, where it separates main
# (Bob behind her six loads) from the fix.
@pytest.mark.slow
def test_item4_second_visitors_small_load_not_delayed_by_first_visitors_many_loads(app, tmp_path, tiny_corpus,
                                                                                  tiny_llama_dir):
    """Alice sends six Loads of a large file from six tabs; Bob's small Load, sent after them,
    comes back before the first of Alice's. Alice's loads beyond her two get one line at once."""
    big = _big_corpus(tmp_path / "big.jsonl", 100_000)
    alice = [_client(app, ALICE) for _ in range(6)]
    bob = _client(app, BOB)
    endpoint = _load_endpoint(bob)
    finished: dict[int, float] = {}

    def send(client, dataset: Path, key: int):
        job = client.submit("", *data_form(str(dataset), model=str(tiny_llama_dir), min_chars=0).values(),
                            api_name=endpoint)
        job.add_done_callback(lambda _job: finished.setdefault(key, time.time()))
        return job

    jobs = [send(client, big, i) for i, client in enumerate(alice)]
    time.sleep(1.0)  # all six are sent before Bob's
    sent = time.time()
    bob_job = send(bob, tiny_corpus, 99)
    summary = bob_job.result(timeout=300)[0]
    assert "120" in summary  # tiny_corpus: 120 documents
    loaded, refused = [], []
    for i, job in enumerate(jobs):
        try:
            assert "100,000" in job.result(timeout=300)[0]
            loaded.append(finished[i])
        except gradio_client.exceptions.AppError as exc:
            refused.append(str(exc))
    print(f"Bob's load took {finished[99] - sent:.1f} s; Alice's first load ended {min(loaded) - sent:+.1f} s "
          f"after Bob's was sent; {len(refused)} of hers refused")
    # On a quiet machine Alice's first loads finish as fast as Bob's (0.7 s each, seen in CI), so the
    # order of the two is a race; waiting behind her loads (main: Gradio's two workers taken by her six
    # loads) would put Bob a whole round of loads after her first one, well past this half second.
    assert finished[99] <= min(loaded) + 0.5, "Bob's small load waited behind Alice's large ones"
    assert len(loaded) == 2 and len(refused) == 4
    assert all("You already have 2 data load(s) running" in m and "\n" not in m for m in refused)


def test_item4_second_visitors_load_runs_while_first_visitors_loads_are_held(app, tmp_path, tiny_corpus,
                                                                            tiny_llama_dir, monkeypatch):
    """The deterministic form of the test above: Alice's loads are held inside the data stage (the
    test keeps them there), so nothing but the app's own scheduling decides whether Bob's small
    load, sent after her six, comes back. It must come back while hers are still held; her loads
    beyond two are refused at once; hers finish once released. (Before issue 25, Gradio's two
    workers were both taken by her held loads and Bob's waited behind them.)"""
    import threading

    import rawtune.data

    held = _big_corpus(tmp_path / "held.jsonl", 200)
    release, entered, lock = threading.Event(), [], threading.Lock()
    real_preview = rawtune.data.preview

    def preview(settings, *args, **kwargs):
        if str(settings.dataset).endswith("held.jsonl"):
            with lock:
                entered.append(time.time())
            assert release.wait(120), "the test never released Alice's loads"
        return real_preview(settings, *args, **kwargs)

    monkeypatch.setattr(rawtune.data, "preview", preview)
    alice = [_client(app, ALICE) for _ in range(6)]
    bob = _client(app, BOB)
    endpoint = _load_endpoint(bob)

    def send(client, dataset: Path):
        return client.submit("", *data_form(str(dataset), model=str(tiny_llama_dir), min_chars=0).values(),
                             api_name=endpoint)

    try:
        jobs = [send(client, held) for client in alice]
        _wait_for(lambda: len(entered) >= 2, 60, "two of Alice's loads to reach the data stage")
        _wait_for(lambda: sum(j.done() for j in jobs) >= 4, 60, "Alice's loads beyond two to be refused")
        bob_summary = send(bob, tiny_corpus).result(timeout=120)[0]
        assert "120" in bob_summary and not release.is_set()
        assert sum(not j.done() for j in jobs) == 2, "Alice's two held loads ended before they were released"
    finally:
        release.set()
    results = []
    for job in jobs:
        try:
            results.append(job.result(timeout=120)[0])
        except gradio_client.exceptions.AppError as exc:
            results.append(str(exc))
    assert sum("You already have 2 data load(s) running" in r for r in results) == 4
    assert sum("200" in r and "You already" not in r for r in results) == 2
    assert len(entered) == 2


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def test_item4_second_session_of_a_visitor_cannot_take_a_second_gpu_place(app, tiny_corpus, tiny_llama_dir):
    """While someone else's training holds the GPU, Alice's first tab waits in line; her second
    tab's Start is refused with one line, and Bob (another visitor) still gets his place."""
    form = {**data_form(str(tiny_corpus), model=str(tiny_llama_dir)),
            **_form(seq_len=32, lora_r=4, max_steps=2, save_steps=100, eval_steps=0)}
    args = ["", *form.values()]
    someone = app.slot.join("training", "session-someone-else")
    first, second, bob = _client(app, ALICE), _client(app, ALICE), _client(app, BOB)
    try:
        waiting = first.submit(*args, api_name="/start_training")
        _wait_for(lambda: len(app.slot._line) == 2, 180, "Alice's first training to join the GPU line")
        refused = second.submit(*args, api_name="/start_training")
        with pytest.raises(gradio_client.exceptions.AppError) as caught:
            refused.result(timeout=60)
        message = str(caught.value)
        assert "You already have a training, export or Compare using or waiting for the GPU" in message
        assert "\n" not in message
        bobs = bob.submit(*args, api_name="/start_training")
        _wait_for(lambda: len(app.slot._line) == 3, 180, "Bob's training to join the GPU line")
        assert len({t.owner for t in app.slot._line}) == 3
        assert "number 2 in line" in app.slot.describe(app.slot._line[-1])
    finally:
        app.slot.leave(someone)
    assert "Done" in waiting.result(timeout=300)[0] and "Done" in bobs.result(timeout=300)[0]
    assert app.slot._line == [] and app.slot.places.held("user:alice") == 0
