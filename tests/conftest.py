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
