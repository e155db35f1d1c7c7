"""The Hub layer against a real HTTP endpoint: pulling datasets and pushing runs.

Every test goes through rawtune's public functions and the real huggingface_hub / datasets
clients, talking to the Hub emulator in tests/hub_emulator.py (fixture ``hub_server``), and checks
what the emulator stored or what the user would read.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import yaml

from hub_emulator import BOB_TOKEN, OAUTH_TOKEN, READ_TOKEN, WRITE_TOKEN, point_clients_at
from rawtune.data import prepare, read_documents
from rawtune.errors import DataError, HubError, StageMissing
from rawtune.data.hub import load_hub_rows
from rawtune.publish.push import push_run
from rawtune.hubauth import resolve_token
from rawtune.rundir import RunDir
from rawtune.settings import DataSettings, PushSettings, RunSettings, to_dict, validate

# huggingface_hub's LFS upload passes a file to httpx the deprecated way; not rawtune's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

SENTINEL = "hf_SENTINELsentinelSENTINEL0123456789"
BASE = "HuggingFaceTB/SmolLM2-135M"
CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")


# ---------------------------------------------------------------- helpers


def fake_gguf(quant_type: int, payload: int) -> bytes:
    """A structurally valid GGUF header (magic, version 3, no tensors, one KV) plus padding."""
    key = b"general.file_type"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, quant_type)  # type 4 = uint32
    return head + kv + bytes(range(256)) * (payload // 256)


def make_run(path: Path, *, backend: str = "peft", dataset: str = "alice/public-text",
             license: str | None = "apache-2.0", upstream: str | None = BASE, ppl_tuned: float = 12.25) -> RunDir:
    """A run directory shaped like one after data/train/eval/merge/export (small fake files)."""
    run = RunDir(path)
    settings = RunSettings(out=str(path), stages=["data", "train", "eval", "merge", "export", "push"])
    settings.data.dataset = dataset
    settings.train.preset = "quick"
    settings.push.repo = "alice/placeholder"
    run.update(
        settings=to_dict(validate(settings)),
        model={"spec": upstream or "./base", "local_dir": str(path / "base-model"), "upstream_id": upstream,
               "source": "hub", "license": license},
        data={"source": dataset, "column": "text", "column_reason": "named 'text'", "documents_read": 60,
              "documents_kept": 58, "train_tokens": 4096, "heldout_tokens": 512, "seq_len": 512},
        train={"backend": backend, "steps": 8, "max_steps": 8, "stopped_early": False, "final_loss": 2.3456,
               "history": [], "seconds": 42.0},
        metrics={"ppl_base": 20.5, "ppl_tuned": ppl_tuned, "train_tokens": 4096},
    )
    gguf = run.gguf_dir
    gguf.mkdir(parents=True, exist_ok=True)
    q4 = fake_gguf(15, 4096)
    q8 = fake_gguf(7, 8192)
    (gguf / f"{path.name}.Q4_K_M.gguf").write_bytes(q4)
    (gguf / f"{path.name}.Q8_0.gguf").write_bytes(q8)
    (gguf / "template").write_text(CHATML_TEMPLATE)
    (gguf / "params").write_text(json.dumps({"stop": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}))
    (gguf / "Modelfile").write_text(f"FROM ./{path.name}.Q4_K_M.gguf\nTEMPLATE \"\"\"{CHATML_TEMPLATE}\"\"\"\n"
                                    'PARAMETER stop "<|im_end|>"\n')
    run.update(gguf={
        "Q4_K_M": {"file": f"{path.name}.Q4_K_M.gguf", "bytes": len(q4), "ppl": 12.9, "seconds": 1.5,
                   "kld_mean": 0.0312, "kld_p99": 0.2871, "same_top_pct": 91.3},
        "Q8_0": {"file": f"{path.name}.Q8_0.gguf", "bytes": len(q8), "ppl": 12.3, "seconds": 1.1},
    })
    run.adapter_dir.mkdir(exist_ok=True)
    (run.adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 16, "base_model_name_or_path": upstream}))
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 64)
    return run


def card_yaml(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---", 2)[1])


class Lines(list):
    """A log callback that keeps the lines."""

    def __call__(self, line: str) -> None:
        self.append(line)


# ---------------------------------------------------------------- tokens


def test_resolve_token_order(monkeypatch, tmp_path):
    """The request's own token first; the machine's (HF_TOKEN, then the stored login) only where
    ambient credentials are allowed (the CLI, a local single-user app)."""
    from huggingface_hub import constants

    stored = tmp_path / "token"
    stored.write_text("hf_storedLoginToken000000000000")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fromEnvironment0000000000000")

    class OAuth:  # the shape of gr.OAuthToken
        token = "hf_fromOAuthLogin000000000000000"

    assert resolve_token("hf_explicit000000000000000000", OAuth()) == "hf_explicit000000000000000000"
    assert resolve_token(None, OAuth()) == "hf_fromOAuthLogin000000000000000"
    assert resolve_token(None, OAuth(), allow_ambient=False) == "hf_fromOAuthLogin000000000000000"
    assert resolve_token("  ", None) == "hf_fromEnvironment0000000000000"
    # Without ambient credentials there is no fallback: False means "send no token at all".
    assert resolve_token("  ", None, allow_ambient=False) is False
    assert resolve_token(False) is False
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token() == "hf_storedLoginToken000000000000"
    assert resolve_token(allow_ambient=False) is False
    stored.unlink()
    assert resolve_token() is None


# ---------------------------------------------------------------- pulling


def test_pull_public_dataset(hub_server):
    docs = read_documents(DataSettings(dataset="alice/public-text"))
    assert len(docs.texts) == 60
    assert docs.column == "text" and docs.texts[0].startswith("public train 0:")
    assert "alice/public-text" in docs.source and "split train" in docs.source


def test_pull_other_split_and_config(hub_server):
    test = read_documents(DataSettings(dataset="alice/public-text", split="test"))
    assert [t.split(":")[0] for t in test.texts[:2]] == ["public test 0", "public test 1"]
    fr = read_documents(DataSettings(dataset="alice/two-configs", dataset_config="fr"))
    assert len(fr.texts) == 15 and fr.texts[0].startswith("texte français")
    val = read_documents(DataSettings(dataset="alice/two-configs", dataset_config="en", split="validation"))
    assert len(val.texts) == 5 and "config en" in val.source


def test_pull_private_needs_token(hub_server):
    settings = DataSettings(dataset="alice/private-text")
    docs = read_documents(settings, token=WRITE_TOKEN)
    assert len(docs.texts) == 30 and docs.texts[0].startswith("private 0")
    with pytest.raises(HubError, match="not found on the Hub, or it is private and no token was given") as exc:
        read_documents(settings)
    assert "HF_TOKEN" in str(exc.value)
    with pytest.raises(HubError, match="this token has no access to it"):
        read_documents(settings, token=BOB_TOKEN)


def test_pull_gated_dataset(hub_server):
    settings = DataSettings(dataset="alice/gated-text")
    with pytest.raises(HubError, match="is gated and this token has no access yet: accept its terms"):
        read_documents(settings, token=BOB_TOKEN)
    with pytest.raises(HubError, match="is gated and no token was given"):
        read_documents(settings)
    hub_server.repo("alice/gated-text", "dataset").granted.add("bob")
    try:
        assert len(read_documents(settings, token=BOB_TOKEN).texts) == 20
    finally:
        hub_server.repo("alice/gated-text", "dataset").granted.discard("bob")


def test_pull_streaming_is_lazy_and_packs(hub_server, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    settings = DataSettings(dataset="alice/public-text", streaming=True)
    before = len(hub_server.requests)
    rows, source = load_hub_rows(settings)
    assert not isinstance(rows, list) and "streaming" in source
    # Opening the stream may read byte ranges (the Parquet footer), but never a whole data file.
    whole = [r for r in hub_server.requests[before:] if r[0] == "GET" and r[1].endswith(".parquet") and r[2] == 200]
    assert whole == []
    first = next(iter(rows))
    assert first["text"].startswith("public train 0:")
    assert any(m == "GET" and r.endswith(".parquet") and s == 206 for m, r, s in hub_server.requests[before:])
    # Without streaming the same call downloads whole files up front (into an empty cache).
    before = len(hub_server.requests)
    with point_clients_at(hub_server, tmp_path / "empty-cache"):
        load_hub_rows(DataSettings(dataset="alice/public-text"))
    assert any(m == "GET" and r.endswith(".parquet") and s == 200 for m, r, s in hub_server.requests[before:])

    # The whole data stage on the stream: max_documents stops reading, packing works on what came.
    settings.max_documents = 40
    settings.min_heldout_blocks = 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    report = prepare(settings, tokenizer, 32, RunDir(tmp_path / "run"), log=lambda _: None)
    assert report.documents_read == 40 and report.train_blocks > 0 and report.heldout_blocks >= 1
    assert "streaming" in report.source


@pytest.mark.parametrize("streaming", [False, True])
def test_pull_bad_split_lists_splits(hub_server, streaming):
    with pytest.raises(DataError) as exc:
        read_documents(DataSettings(dataset="alice/public-text", split="validation", streaming=streaming))
    message = str(exc.value)
    assert "has no split 'validation'" in message and "train, test" in message and "--split" in message


def test_pull_bad_or_missing_config_lists_configs(hub_server):
    with pytest.raises(DataError, match=r"has no configuration 'de'; its configurations are: en, fr"):
        read_documents(DataSettings(dataset="alice/two-configs", dataset_config="de"))
    with pytest.raises(DataError, match=r"has several configurations: en, fr; pick one with --dataset-config"):
        read_documents(DataSettings(dataset="alice/two-configs"))


def test_pull_not_found_bad_revision_and_no_text(hub_server):
    with pytest.raises(HubError, match="dataset alice/does-not-exist was not found on the Hub"):
        read_documents(DataSettings(dataset="alice/does-not-exist"), token=WRITE_TOKEN)
    with pytest.raises(DataError, match="has no revision 'v9'"):
        read_documents(DataSettings(dataset="alice/public-text", revision="v9"))
    with pytest.raises(DataError, match=r"no text column found; columns are: a, b"):
        read_documents(DataSettings(dataset="alice/numbers"))
    with pytest.raises(HubError, match="rejected the token"):
        read_documents(DataSettings(dataset="alice/private-text"), token="hf_notAKnownToken00000000000")


def test_pull_revision_pins_a_commit(hub_server):
    old = hub_server.repo("alice/private-text", "dataset").head.oid
    hub_server.add_commit("alice/private-text", {"train.jsonl": '{"text": "a single newer document here"}\n'},
                          repo_type="dataset")
    try:
        pinned = read_documents(DataSettings(dataset="alice/private-text", revision=old), token=WRITE_TOKEN)
        assert len(pinned.texts) == 30
        latest = read_documents(DataSettings(dataset="alice/private-text"), token=WRITE_TOKEN)
        assert latest.texts == ["a single newer document here"]
    finally:
        hub_server.add_commit("alice/private-text", {"train.jsonl": hub_server.files(
            "alice/private-text", "dataset", old)["train.jsonl"]}, repo_type="dataset")


# ---------------------------------------------------------------- pushing


def test_push_new_repo(hub_server, tmp_path):
    run = make_run(tmp_path / "river-run")
    log = Lines()
    hub = push_run(run, PushSettings(repo="alice/river-gguf"), token=WRITE_TOKEN, log=log)

    commits = hub_server.commits("alice/river-gguf")
    assert [c.title for c in commits] == ["initial commit", "rawtune: river-run"]
    files = hub_server.files("alice/river-gguf")
    root = {p for p in files if "/" not in p}
    assert root == {".gitattributes", "README.md", "run.json", "template", "params", "Modelfile",
                    "river-run.Q4_K_M.gguf", "river-run.Q8_0.gguf"}
    assert {p for p in files if p.startswith("adapter/")} == {"adapter/adapter_config.json",
                                                              "adapter/adapter_model.safetensors"}
    # GGUFs went through the LFS upload path, byte for byte.
    repo = hub_server.repo("alice/river-gguf")
    assert {"river-run.Q4_K_M.gguf", "river-run.Q8_0.gguf"} <= repo.head.lfs
    assert files["river-run.Q8_0.gguf"] == (run.gguf_dir / "river-run.Q8_0.gguf").read_bytes()
    assert files["template"].decode() == CHATML_TEMPLATE
    params = json.loads(files["params"])
    assert "<|im_end|>" in params["stop"]

    # run.json: pushed without the local paths; the local one records the push.
    pushed = json.loads(files["run.json"])
    assert "hub" not in pushed and str(tmp_path) not in files["run.json"].decode()
    assert hub == run.load()["hub"] and hub["repo"] == "alice/river-gguf"
    assert hub["commit"] == commits[-1].oid and hub["url"] == f"{hub_server.url}/alice/river-gguf"
    assert set(hub["files"]) == set(files) - {".gitattributes"}
    assert any("ollama run hf.co/alice/river-gguf:Q4_K_M" in line for line in log)
    assert any(hub_server.url + "/alice/river-gguf" in line for line in log)


def test_model_card_metadata_and_body(hub_server, tmp_path):
    run = make_run(tmp_path / "card-run", backend="unsloth")
    push_run(run, PushSettings(repo="acme/card-model"), token=WRITE_TOKEN, log=lambda _: None)
    card = hub_server.read("acme/card-model", "README.md").decode()
    meta = card_yaml(card)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["alice/public-text"] and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "llama-cpp-python" and meta["pipeline_tag"] == "text-generation"
    assert {"gguf", "ollama", "rawtune", "unsloth"} <= set(meta["tags"])
    body = card.split("---", 2)[2]
    assert "ollama run hf.co/acme/card-model:Q4_K_M" in body and "ollama run hf.co/acme/card-model:Q8_0" in body
    assert "llama-cli -hf acme/card-model:Q4_K_M" in body
    assert 'Llama.from_pretrained(repo_id="acme/card-model", filename="*Q4_K_M.gguf")' in body
    assert "| base | 20.50 |" in body and "| tuned | 12.25 |" in body
    assert "| `card-run.Q8_0.gguf` | Q8_0 |" in body and "| 12.30 |" in body
    # KL divergence columns: measured for Q4_K_M, not recorded for Q8_0 (an export before they existed).
    assert "| KL divergence, mean | KLD, 99th percentile | same top token |" in body
    assert "| 12.90 | 0.0312 | 0.2871 | 91.3 % |" in body and "| 12.30 | n/a | n/a | n/a |" in body
    assert "KL divergence: of each file's next-token distribution from the merged model's" in body
    # The Hub parses the same header (served back as cardData by the emulator's repo info).
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub_server.url).model_info("acme/card-model")
    assert info.card_data["base_model"] == BASE


def test_card_without_hub_dataset_licence_or_unsloth(hub_server, tmp_path):
    run = make_run(tmp_path / "local-run", dataset="./notes.jsonl", license=None)
    push_run(run, PushSettings(repo="alice/local-data"), token=WRITE_TOKEN, log=lambda _: None)
    meta = card_yaml(hub_server.read("alice/local-data", "README.md").decode())
    assert "datasets" not in meta and "license" not in meta and "unsloth" not in meta["tags"]
    assert meta["base_model"] == BASE


def test_repush_makes_one_new_commit(hub_server, tmp_path):
    run = make_run(tmp_path / "again")
    push_run(run, PushSettings(repo="alice/again"), token=WRITE_TOKEN, log=lambda _: None)
    first = hub_server.commits("alice/again")
    # Retrain/re-export: new weights and metrics, then push again.
    (run.gguf_dir / "again.Q4_K_M.gguf").write_bytes(fake_gguf(15, 6144))
    run.update(metrics={"ppl_base": 20.5, "ppl_tuned": 9.75})
    hub = push_run(run, PushSettings(repo="alice/again"), token=WRITE_TOKEN, log=lambda _: None)
    second = hub_server.commits("alice/again")
    assert len(second) == len(first) + 1 and second[:-1] == first
    assert hub["commit"] == second[-1].oid != first[-1].oid
    files = hub_server.files("alice/again")
    assert files["again.Q4_K_M.gguf"] == fake_gguf(15, 6144)
    assert "| tuned | 9.75 |" in files["README.md"].decode()


def test_failed_upload_commits_nothing(hub_server, tmp_path):
    run = make_run(tmp_path / "broken")
    hub_server.fail_uploads = True
    try:
        with pytest.raises(HubError, match="nothing was committed, so retrying the push is safe"):
            push_run(run, PushSettings(repo="alice/broken-upload"), token=WRITE_TOKEN, log=lambda _: None)
    finally:
        hub_server.fail_uploads = False
    # The repo exists but holds nothing that looks like a model: no card, no GGUF.
    assert set(hub_server.files("alice/broken-upload")) == {".gitattributes"}
    assert "hub" not in run.load()
    push_run(run, PushSettings(repo="alice/broken-upload"), token=WRITE_TOKEN, log=lambda _: None)
    assert [c.title for c in hub_server.commits("alice/broken-upload")] == ["initial commit", "rawtune: broken"]


def test_push_private_repo(hub_server, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    run = make_run(tmp_path / "secret")
    hub = push_run(run, PushSettings(repo="alice/secret-model", private=True), token=WRITE_TOKEN, log=lambda _: None)
    assert hub["private"] is True and hub_server.repo("alice/secret-model").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=BOB_TOKEN).model_info("alice/secret-model")
    assert HfApi(endpoint=hub_server.url, token=WRITE_TOKEN).model_info("alice/secret-model").private
    # Asking for private on an existing public repo is refused rather than publishing.
    assert push_run(run, PushSettings(repo="alice/public-model"), token=WRITE_TOKEN, log=lambda _: None)["private"] is False
    # Pushing the same run again without --private: nothing to commit, and the repo stays private.
    log = Lines()
    count = len(hub_server.commits("alice/secret-model"))
    assert push_run(run, PushSettings(repo="alice/secret-model"), token=WRITE_TOKEN, log=log)["private"]
    assert len(hub_server.commits("alice/secret-model")) == count
    assert any("already up to date" in line for line in log)
    count = len(hub_server.commits("alice/public-model"))
    with pytest.raises(HubError, match="already exists and is public, but --private was asked"):
        push_run(run, PushSettings(repo="alice/public-model", private=True), token=WRITE_TOKEN, log=lambda _: None)
    assert len(hub_server.commits("alice/public-model")) == count


def test_read_only_token_is_refused(hub_server, tmp_path):
    run = make_run(tmp_path / "ro")
    with pytest.raises(HubError) as exc:
        push_run(run, PushSettings(repo="alice/ro-model"), token=READ_TOKEN, log=lambda _: None)
    assert str(exc.value).startswith("this token cannot write to alice/ro-model; create a token with write access")
    assert not hub_server.has_repo("alice/ro-model") and "hub" not in run.load()
    # A write token for another namespace gets the same answer (the Hub's 403 is caught).
    with pytest.raises(HubError, match="this token cannot write to alice/ro-model; create a token with write access"):
        push_run(run, PushSettings(repo="alice/ro-model"), token=BOB_TOKEN, log=lambda _: None)
    assert not hub_server.has_repo("alice/ro-model")


def test_signed_in_visitor_pushes_only_to_repos_the_app_created(hub_server, tmp_path):
    """The app's Sign-in asks for contribute-repos, not write-repos: the visitor's token creates a
    repo and pushes to it again, but an existing repo of theirs that the app did not create is
    refused with a message that gives both ways out (a new name, or a pasted write token)."""
    run = make_run(tmp_path / "oauth")
    first = push_run(run, PushSettings(repo="alice/made-by-app"), token=OAUTH_TOKEN, log=lambda _: None)
    again = push_run(make_run(tmp_path / "oauth2"), PushSettings(repo="alice/made-by-app"), token=OAUTH_TOKEN,
                     log=lambda _: None)
    assert first["commit"] != again["commit"] and len(hub_server.commits("alice/made-by-app")) == 3
    push_run(run, PushSettings(repo="alice/made-by-hand"), token=WRITE_TOKEN, log=lambda _: None)
    before = len(hub_server.commits("alice/made-by-hand"))
    with pytest.raises(HubError) as exc:
        push_run(make_run(tmp_path / "oauth3"), PushSettings(repo="alice/made-by-hand"), token=OAUTH_TOKEN,
                 log=lambda _: None)
    message = str(exc.value)
    assert "create new repos and write only to the repos it created" in message
    assert "push to a new repo name, or paste a write token" in message and OAUTH_TOKEN not in message
    assert len(hub_server.commits("alice/made-by-hand")) == before


def test_push_needs_token_repo_and_export(hub_server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = make_run(tmp_path / "needs")
    with pytest.raises(HubError, match="needs a Hugging Face token with write access"):
        push_run(run, PushSettings(repo="alice/needs"), log=lambda _: None)
    with pytest.raises(HubError, match="give the Hub model repo as user/name"):
        push_run(run, PushSettings(repo="needs"), token=WRITE_TOKEN, log=lambda _: None)
    with pytest.raises(HubError, match="the Hub rejected this token"):
        push_run(run, PushSettings(repo="alice/needs"), token="hf_notAKnownToken00000000000", log=lambda _: None)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="offline mode is on"):
        push_run(run, PushSettings(repo="alice/needs"), token=WRITE_TOKEN, log=lambda _: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        push_run(run, PushSettings(repo="alice/needs"), token=WRITE_TOKEN, log=lambda _: None)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    assert not hub_server.has_repo("alice/needs")
    empty = RunDir(tmp_path / "empty")
    empty.update(settings={})
    with pytest.raises(StageMissing, match="run `rawtune export"):
        push_run(empty, PushSettings(repo="alice/needs"), token=WRITE_TOKEN, log=lambda _: None)


def test_push_is_refused_while_another_task_holds_the_run(hub_server, tmp_path):
    """The app exports and pushes in worker threads: a push of a run another task is writing is
    refused at once (RunBusy) rather than uploading half-written files, and works once it is free."""
    import threading

    from rawtune.rundir import RunBusy

    run = make_run(tmp_path / "busy")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with run.lock():
            held.set()
            release.wait(30)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert held.wait(10)
        with pytest.raises(RunBusy, match="another task of this rawtune process"):
            push_run(run, PushSettings(repo="alice/busy"), token=WRITE_TOKEN, log=lambda _: None)
        assert not hub_server.has_repo("alice/busy")
    finally:
        release.set()
        other.join()
    push_run(run, PushSettings(repo="alice/busy"), token=WRITE_TOKEN, log=lambda _: None)
    assert hub_server.has_repo("alice/busy")


def test_sentinel_token_never_written(hub_server, tmp_path, monkeypatch, capsys, caplog, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hub_server.add_token(SENTINEL, "alice", "write")
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    caplog.set_level(logging.DEBUG)
    log = Lines()
    run = make_run(tmp_path / "sentinel")
    # The data stage reads a private dataset with the token from the environment...
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    data = DataSettings(dataset="alice/private-text", min_heldout_blocks=1)
    prepare(data, tokenizer, 32, run, token=resolve_token(), log=log)
    # ...the push takes it from the environment too, and a failing push gets it as an argument.
    push_run(run, PushSettings(repo="alice/sentinel-model"), log=log)
    with pytest.raises(HubError) as exc:
        push_run(run, PushSettings(repo="bob/not-alice"), token=SENTINEL, log=log)
    with pytest.raises(HubError) as missing:
        read_documents(DataSettings(dataset="bob/missing"), token=SENTINEL)

    captured = capsys.readouterr()
    texts = {"log": "\n".join(log), "stdout": captured.out, "stderr": captured.err, "logging": caplog.text,
             "error": str(exc.value), "missing": str(missing.value)}
    for name, text in texts.items():
        assert SENTINEL not in text, f"token found in {name}"
    for path in run.path.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), f"token found in {path}"
    for name, data_bytes in hub_server.files("alice/sentinel-model").items():
        assert SENTINEL.encode() not in data_bytes, f"token found in pushed {name}"
    assert "ollama run hf.co/alice/sentinel-model:Q4_K_M" in texts["log"]


# ---------------------------------------------------------------- end to end


def test_pipeline_end_to_end_push(hub_server, tmp_path, tiny_llama_dir):
    """data (from the Hub) -> train -> eval -> merge -> export -> push, on the tiny model."""
    pytest.importorskip("llama_cpp", reason="GGUF quantization needs llama-cpp-python")
    from rawtune.pipeline import run_pipeline

    settings = RunSettings(out=str(tmp_path / "e2e"), stages=["data", "train", "eval", "merge", "export", "push"])
    settings.data.dataset = "alice/public-text"
    settings.data.min_heldout_blocks = 2
    settings.train.model = str(tiny_llama_dir)
    settings.train.preset = "quick"
    settings.train.seq_len = 32
    settings.train.max_steps = 3
    settings.train.batch_size = 2
    settings.push.repo = "alice/e2e-tiny"
    log = Lines()
    record = run_pipeline(settings, token=WRITE_TOKEN, log=log)

    files = hub_server.files("alice/e2e-tiny")
    assert {"e2e.Q4_K_M.gguf", "e2e.Q8_0.gguf", "template", "params", "Modelfile", "README.md",
            "run.json"} <= set(files)
    assert files["e2e.Q4_K_M.gguf"][:4] == b"GGUF"
    assert files["e2e.Q4_K_M.gguf"] == (RunDir(settings.out).gguf_dir / "e2e.Q4_K_M.gguf").read_bytes()
    local = RunDir(settings.out).gguf_dir
    assert "stop" in json.loads(files["params"]) and files["params"] == (local / "params").read_bytes()
    assert files["template"] == (local / "template").read_bytes() and b"<|im_start|>" in files["template"]
    assert any(p.startswith("adapter/") for p in files)
    assert [c.title for c in hub_server.commits("alice/e2e-tiny")] == ["initial commit", "rawtune: e2e"]
    card = files["README.md"].decode()
    assert "ollama run hf.co/alice/e2e-tiny:Q4_K_M" in card and "ollama run hf.co/alice/e2e-tiny:Q8_0" in card
    meta = card_yaml(card)
    assert meta["datasets"] == ["alice/public-text"]
    assert record["hub"]["commit"] == hub_server.commits("alice/e2e-tiny")[-1].oid
    ppl = record["metrics"]
    assert f"| tuned | {ppl['ppl_tuned']:.2f} |" in card
