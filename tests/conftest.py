"""Shared fixtures: tiny tokenizer, tiny models and a tiny corpus, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import tiny_model, tiny_tokenizer, write_corpus

# Tests never reach the Hub: anything that tries fails fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines)")
    config.addinivalue_line("markers", "slow: takes more than a minute on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run it on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer, 64-wide llama with tied embeddings (like SmolLM2)."""
    return tiny_model(tmp_path_factory.mktemp("llama"), tiny_tokenizer_dir, "llama", tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer, 64-wide qwen2 (attention biases), untied embeddings."""
    return tiny_model(tmp_path_factory.mktemp("qwen2"), tiny_tokenizer_dir, "qwen2", tie=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def hub_emulator():
    """The Hub emulator (tests/hub_emulator.py) running for the session, seeded with users and datasets.

    Clients are NOT pointed at it by this fixture; use ``hub_server`` in a test, or pass
    ``hub_emulator.client_env()`` to a subprocess.
    """
    from hub_emulator import HubEmulator, seed_default

    with HubEmulator() as hub:
        seed_default(hub)
        yield hub


@pytest.fixture
def hub_server(hub_emulator, tmp_path_factory):
    """The seeded Hub emulator, with huggingface_hub and datasets pointed at it during one test.

    ``hub_server.url`` is the endpoint; tokens are ``hub_emulator.WRITE_TOKEN`` (alice),
    ``READ_TOKEN`` (alice, read-only) and ``BOB_TOKEN``; ``hub_server.files(repo)`` and
    ``hub_server.commits(repo)`` read back what was pushed.
    """
    from hub_emulator import point_clients_at

    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    with point_clients_at(hub_emulator, cache):
        yield hub_emulator


def train_tiny(out: Path, model_dir: Path, corpus: Path, **overrides):
    """Run data -> train -> eval on a tiny model through the real pipeline; return the RunDir."""
    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import RunSettings, apply

    values = dict(out=str(out), dataset=str(corpus), model=str(model_dir), preset="quick",
                  seq_len=64, batch_size=2, max_steps=12, learning_rate=3e-3, save_steps=4,
                  train_embeddings=True, stages=["data", "train", "eval"])
    values.update(overrides)
    run_pipeline(apply(RunSettings(), values), log=lambda line: None)
    return RunDir(out)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_llama_dir, tiny_corpus):
    """A finished tiny run (embeddings trained, so the tied model must be untied at merge).

    Session-wide, so tests may add stages to it (merge, export) but must not delete what is there.
    """
    return train_tiny(tmp_path_factory.mktemp("runs") / "tiny", tiny_llama_dir, tiny_corpus)


# The limits a Space's owner may set; tests that start "as a public Space" clear them, so each runs
# with the defaults a shared app has.
SPACE_LIMIT_VARS = ("RAWTUNE_ALLOW_OWNER_TOKEN", "RAWTUNE_ALLOW_SERVER_PATHS", "RAWTUNE_MAX_CHARS",
                    "RAWTUNE_MAX_UPLOAD_MB", "RAWTUNE_MAX_TRAIN_MINUTES", "RAWTUNE_MAX_TRAIN_STEPS",
                    "RAWTUNE_MAX_MODEL_GB", "RAWTUNE_SHARED", "RAWTUNE_GPU_SLOTS")


@pytest.fixture
def on_space(tmp_path, monkeypatch):
    """The app as a public Space sees it: SPACE_ID set, runs under a temporary folder, default limits."""
    for name in SPACE_LIMIT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPACE_ID", "alice/rawtune")
    monkeypatch.setenv("RAWTUNE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def owner_token(hub_server, monkeypatch):
    """The Space owner's write token in HF_TOKEN, used implicitly by the clients (as on a real
    machine: the test emulator's 'no implicit token' switch is turned back off)."""
    from huggingface_hub import constants

    from hub_emulator import WRITE_TOKEN

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    return WRITE_TOKEN
