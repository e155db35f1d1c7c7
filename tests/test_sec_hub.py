"""Issue 25's Hub-facing items, one test group each, against the Hub emulator with the real clients.

1. a dataset card cannot widen the files read: absolute paths, globs out of the repo, ``file://``
   and ``http://`` entries are refused with one line, and nothing outside the repo is touched;
6. a Hub model is checked (file list with sizes, config.json) before any weights are downloaded,
   capped on a shared app, downloaded inside the visitor's GPU turn, and messages never show the
   cache's location;
8. the pushed adapter's config names the base by its Hub id, never a local folder;
11. the gated-model check follows the token rule: on a shared app the owner's token does not
    count for an anonymous visitor.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import SPACE_LIMIT_VARS
from hub_emulator import WRITE_TOKEN, _jsonl, text_rows
from rawtune import space
from rawtune.data import read_documents
from rawtune.errors import DataError, ModelError
from rawtune.models import load_tokenizer, resolve_model
from rawtune.settings import DataSettings

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
SECRET = "SERVER-SIDE SECRET that no visitor may ever read from this machine"


def _name(prefix: str) -> str:
    return f"alice/{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- 1. dataset cards


class Canary:
    """An HTTP server on 127.0.0.1 that counts every request it gets (and serves a JSON line)."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def _answer(self):
                hits.append((self.command, self.path))
                body = _jsonl(text_rows(5, "fetched from the canary"))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def canary():
    server = Canary()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file on the server (as another visitor's upload would be), which no card may reach."""
    folder = tmp_path / "runs" / "session-other" / "uploads"
    folder.mkdir(parents=True)
    path = folder / "theirs.jsonl"
    path.write_text(_jsonl([{"text": f"{SECRET} {i}", "id": i} for i in range(5)]).decode())
    return path


def _card_dataset(hub, entry: str) -> str:
    """A public dataset whose card's train split is ``entry``; the repo holds its own text too."""
    card = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
            f"    path: {json.dumps(entry)}\n---\n# A card that points elsewhere\n")
    repo = _name("card")
    hub.create_repo(repo, "dataset", files={"README.md": card, "train.jsonl": _jsonl(text_rows(8, "repo's own"))})
    return repo


def _refused(repo: str, canary: Canary, streaming: bool = False) -> str:
    """Read the dataset; it must be refused with one line naming the card, and the canary untouched."""
    with pytest.raises(DataError) as caught:
        read_documents(DataSettings(dataset=repo, streaming=streaming))
    message = str(caught.value)
    assert "\n" not in message and "not a file of the dataset repo" in message and SECRET not in message
    assert canary.hits == []
    return message


@pytest.mark.parametrize("streaming", [False, True])
def test_item1_card_absolute_path_is_refused(hub_server, canary, secret, streaming):
    message = _refused(_card_dataset(hub_server, str(secret)), canary, streaming)
    assert repr(str(secret)) in message


@pytest.mark.parametrize("pattern", ["{root}/runs/*/uploads/*", "../../**/*.jsonl", "**/../../*", "~/*"])
def test_item1_card_glob_escaping_the_repo_is_refused(hub_server, canary, secret, on_space, pattern):
    _refused(_card_dataset(hub_server, pattern.format(root=on_space)), canary)


def test_item1_card_file_url_is_refused(hub_server, canary, secret):
    _refused(_card_dataset(hub_server, f"file://{secret}"), canary)


def test_item1_card_http_url_is_refused_and_canary_gets_nothing(hub_server, canary, on_space):
    gr = pytest.importorskip("gradio")
    from rawtune.ui import handlers
    from rawtune.ui import session as sessions
    from test_ui_browser import data_form

    repo = _card_dataset(hub_server, f"{canary.url}/x.jsonl")
    _refused(repo, canary)
    # The page's Load button as an anonymous visitor of a shared app (streaming is forced there).
    with pytest.raises(gr.Error) as caught:
        handlers.load_new_source(sessions.new_session(), data_form(repo, min_chars=0), None, None)
    assert "not a file of the dataset repo" in str(caught.value) and "\n" not in str(caught.value)
    assert canary.hits == []


def test_item1_card_globs_match_only_the_repos_own_files(hub_server, canary, secret):
    """A glob that stays inside the repo is fine: it selects among the repo's files and nothing else."""
    docs = read_documents(DataSettings(dataset=_card_dataset(hub_server, "**"), min_chars=0))
    assert len(docs.texts) == 8 and all(t.startswith("repo's own") for t in docs.texts)
    assert canary.hits == []


def test_item1_repo_files_are_read_at_one_listed_commit(hub_server):
    """What datasets is handed: hf:// files of the repo at the commit that was listed."""
    repo = _name("pinned")
    hub_server.create_repo(repo, "dataset", files={"data/train-00000-of-00001.jsonl": _jsonl(text_rows(6, "old"))})
    before = len(hub_server.requests)
    docs = read_documents(DataSettings(dataset=repo))
    sha = hub_server.repo(repo, "dataset").head.oid
    reads = [path for method, path, status in hub_server.requests[before:] if "/resolve/" in path]
    assert reads and all(f"/resolve/{sha}/" in path for path in reads)
    assert len(docs.texts) == 6


# ---------------------------------------------------------------- 6. Hub models


@pytest.fixture
def hub_model(hub_server, tiny_llama_dir):
    """Upload the tiny llama's files as a new Hub model repo; returns a function taking overrides."""

    def make(prefix: str = "tiny", **overrides: bytes) -> str:
        files = {p.name: p.read_bytes() for p in Path(tiny_llama_dir).iterdir() if p.is_file()}
        files.update(overrides)
        repo = _name(prefix)
        hub_server.create_repo(repo, "model", files=files)
        return repo

    return make


def _weights_fetched(hub, repo: str, since: int) -> list[str]:
    return [path for method, path, status in hub.requests[since:]
            if method == "GET" and f"/{repo}/resolve/" in path and path.endswith(".safetensors")]


def test_item6_model_over_the_size_cap_is_refused_before_download(hub_server, hub_model, on_space, monkeypatch):
    from rawtune.ui import session as sessions

    assert space.max_model_bytes() == space.shared_default("RAWTUNE_MAX_MODEL_GB") * 10**9  # a shared app has a cap by default
    repo = hub_model()
    monkeypatch.setenv("RAWTUNE_MAX_MODEL_GB", "0.00001")  # 10 kB: the tiny model is larger
    before = len(hub_server.requests)
    with pytest.raises(ModelError, match=r"to download; this app takes models up to") as caught:
        resolve_model(repo, token=sessions.visitor_token(None, None), log=lambda line: None)
    assert "\n" not in str(caught.value)
    assert _weights_fetched(hub_server, repo, before) == []
    monkeypatch.setenv("RAWTUNE_MAX_MODEL_GB", "1")  # the owner raises it: the same model loads
    source = resolve_model(repo, token=sessions.visitor_token(None, None), log=lambda line: None)
    assert source.upstream_id == repo and _weights_fetched(hub_server, repo, before)


def test_item6_model_cap_is_off_outside_a_on_space(monkeypatch):
    for name in SPACE_LIMIT_VARS + ("SPACE_ID",):
        monkeypatch.delenv(name, raising=False)
    assert space.max_model_bytes() is None
    monkeypatch.setenv("RAWTUNE_MAX_MODEL_GB", "2.5")
    assert space.max_model_bytes() == 2_500_000_000


def test_item6_not_a_causal_lm_is_refused_before_download(hub_server, hub_model):
    vision = json.dumps({"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": 64}).encode()
    repo = hub_model("vit", **{"config.json": vision})
    before = len(hub_server.requests)
    with pytest.raises(ModelError, match=r"is not a causal language model transformers implements"):
        resolve_model(repo, log=lambda line: None)
    assert _weights_fetched(hub_server, repo, before) == []
    no_weights = _name("no-weights")
    hub_server.create_repo(no_weights, "model", files={"config.json": json.dumps({"model_type": "llama"}),
                                                       "big.bin": b"\0" * 4096})
    with pytest.raises(ModelError, match=r"has no model.safetensors \(or its index\), no tokenizer"):
        resolve_model(no_weights, log=lambda line: None)


def test_item6_errors_never_show_the_cache_path(hub_server, hub_model):
    from huggingface_hub import constants

    repo = hub_model("broken-tokenizer", **{"tokenizer.json": b"{ this is not json", "tokenizer.model": b""})
    source = resolve_model(repo, log=lambda line: None)
    cache = str(Path(constants.HF_HUB_CACHE).resolve())
    assert Path(source.local_dir).resolve().is_relative_to(cache)
    with pytest.raises(ModelError) as caught:
        load_tokenizer(source.local_dir)
    message = str(caught.value)
    assert repo in message and "snapshots" not in message and str(constants.HF_HUB_CACHE) not in message
    assert cache not in message
    # Later stages name the folder they read; the page shows such a message with the repo id instead.
    pytest.importorskip("gradio")
    from rawtune.errors import ExportError
    from rawtune.streamed import base_files
    from rawtune.ui.background import public

    (Path(source.local_dir) / "model.safetensors").unlink()
    with pytest.raises(ExportError) as caught:
        base_files(Path(source.local_dir))
    shown = public(str(caught.value))
    assert f"{repo} has no model.safetensors" in shown and cache not in shown and "snapshots" not in shown


def test_item6_download_waits_for_the_visitors_gpu_turn(hub_server, hub_model, on_space, monkeypatch):
    pytest.importorskip("gradio")
    from rawtune.ui import handlers
    from rawtune.ui import session as sessions
    from test_ui_browser import _form, data_form

    repo = hub_model()
    other = space.SLOT.join("training", "someone-else")  # another visitor holds the GPU
    session = sessions.new_session()
    before = len(hub_server.requests)
    frames = handlers.start_training(session, {**data_form("alice/public-text", model=repo, min_chars=0),
                                               **_form(seq_len=64, max_steps=2)}, progress=lambda *a, **k: None)
    try:
        deadline, status = time.time() + 120, ""
        while "Waiting for the GPU" not in status and time.time() < deadline:
            status = next(frames)[0]
        assert "Waiting for the GPU" in status
        time.sleep(1.0)  # a download started beside the wait would show by now
        assert [p for m, p, s in hub_server.requests[before:] if f"/{repo}/" in p] == []
    finally:
        frames.close()
        space.SLOT.leave(other)
    assert session.busy is None


# ---------------------------------------------------------------- 8. the pushed adapter


def _adapter_run(tmp_path: Path, tiny_llama_dir: Path, upstream):
    """A run with a real PEFT adapter saved from the tiny base (PEFT writes the base's folder
    into its config, as training does) and run.json's model record as resolve_model writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from test_hub import make_run

    run = make_run(tmp_path / "run", upstream=upstream)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(run.adapter_dir))
    written = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tiny_llama_dir)  # what would leak
    return run


@pytest.mark.parametrize("upstream", ["HuggingFaceTB/SmolLM2-135M", None])
def test_item8_pushed_adapter_config_names_the_hub_id(hub_server, tmp_path, tiny_llama_dir, upstream):
    from peft import PeftConfig

    from rawtune.publish.push import push_run
    from rawtune.settings import PushSettings

    run = _adapter_run(tmp_path, tiny_llama_dir, upstream)
    repo = _name("item8")
    push_run(run, PushSettings(repo=repo), token=WRITE_TOKEN, log=lambda line: None)
    pushed = hub_server.read(repo, "adapter/adapter_config.json")
    assert str(tiny_llama_dir).encode() not in pushed and str(Path.home()).encode() not in pushed
    config = json.loads(pushed)
    assert config["base_model_name_or_path"] == upstream and config["r"] == 4
    # PEFT reads it as the config of an adapter for that base.
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(pushed)
    assert PeftConfig.from_pretrained(str(folder)).base_model_name_or_path == upstream


# ---------------------------------------------------------------- 11. the gated check


def test_item11_gated_check_does_not_count_the_owners_token(hub_server, owner_token, on_space):
    from rawtune.models import check_gated_access
    from rawtune.ui import session as sessions

    visitor = sessions.visitor_token(None, None)
    assert visitor is False
    with pytest.raises(ModelError, match=r"is gated.*sign in with Hugging Face") as caught:
        check_gated_access("google/gemma-3-270m", visitor)
    assert WRITE_TOKEN not in str(caught.value)
    before = len(hub_server.requests)
    with pytest.raises(ModelError, match=r"is gated.*sign in with Hugging Face"):
        resolve_model("meta-llama/Llama-3.2-1B", token=visitor, log=lambda line: None)
    assert hub_server.requests[before:] == []  # refused before asking the Hub anything


def test_item11_cli_still_counts_the_machines_token(hub_server, owner_token, monkeypatch):
    from rawtune.models import check_gated_access

    for name in SPACE_LIMIT_VARS + ("SPACE_ID",):
        monkeypatch.delenv(name, raising=False)
    check_gated_access("google/gemma-3-270m", None)  # the CLI's user is the machine's owner: HF_TOKEN counts
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ModelError, match=r"is gated.*pass --token, set HF_TOKEN"):
        check_gated_access("google/gemma-3-270m", None)
