"""Tests for the compare engine (rawtune.chat) on a tiny llama trained for a few steps."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from rawtune import compare as chat
from rawtune.errors import ConfigError, StageMissing
from rawtune.rundir import RunDir

from conftest import train_tiny


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> Path:
    """A run directory with data, a model record and an adapter trained hard enough to differ."""
    out = tmp_path_factory.mktemp("chat") / "run"
    return train_tiny(out, tiny_llama_dir, tiny_corpus, lora_r=8, max_steps=40, learning_rate=2e-2,
                      save_steps=100, train_embeddings=False, stages=["data", "train"]).path


def test_build_prompt_modes(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert chat.build_prompt(tok, "Once upon", "completion") == "Once upon"
    text = chat.build_prompt(tok, "Hello?", "chat")
    assert text == "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError, match="empty"):
        chat.build_prompt(tok, "   ", "completion")
    with pytest.raises(ConfigError, match="completion or chat"):
        chat.build_prompt(tok, "x", "poem")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        chat.build_prompt(tok, "Hello?", "chat")


def test_sampling_rules():
    import torch

    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    assert chat.sample_next(logits, chat.Sampling(temperature=0.0), gen) == 1
    # A tiny top-p keeps only the most likely token, whatever the temperature.
    picks = {chat.sample_next(logits, chat.Sampling(temperature=2.0, top_p=0.01), gen) for _ in range(20)}
    assert picks == {1}
    # Same seed, same draws.
    a = [chat.sample_next(logits, chat.Sampling(temperature=1.5), torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [chat.sample_next(logits, chat.Sampling(temperature=1.5), torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b
    with pytest.raises(ConfigError, match="top-p"):
        chat.Sampling(top_p=0).check()
    with pytest.raises(ConfigError, match="max new tokens"):
        chat.Sampling(max_new_tokens=0).check()


def test_greedy_stream_matches_transformers_generate(tiny_llama_dir):
    """The manual KV-cache loop must produce exactly what model.generate does greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = "The river carries bright stones"
    texts = list(chat.stream_torch(model, tok, prompt, "completion",
                                   chat.Sampling(max_new_tokens=12, temperature=0.0)))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    new = [t for t in ref[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
    expected = tok.decode(new[: len(new)], skip_special_tokens=True)
    assert texts, "the stream yielded nothing"
    assert expected.startswith(texts[-1])
    # Each update extends the previous one: the page shows the answer growing.
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and after != before


def test_stream_compare_base_and_tuned_differ(chat_run):
    pairs = list(chat.stream_compare(chat_run, "The river", "completion", max_new_tokens=16,
                                     temperature=0.0, top_p=1.0, seed=0, tuned_kind="pytorch"))
    assert len(pairs) >= 2
    base, tuned = pairs[-1]
    assert base and tuned
    assert base != tuned, "40 steps at lr 2e-2 must change the tuned model's greedy answer"
    # Both sides stream: some intermediate pair has a shorter answer than the final one.
    assert any(len(b) < len(base) for b, _ in pairs) and any(len(t) < len(tuned) for _, t in pairs)
    # The tuned model learned the corpus' vocabulary: its answer uses more distinct corpus words.
    words = set("the river carries bright stones past old mills while keepers of lighthouse count "
                "ships and gulls over grey water near harbour at dawn dusk".split())
    def hits(text):
        return len({w.strip(".,").lower() for w in text.split()} & words)
    assert hits(tuned) > hits(base)


def test_same_seed_same_answers(chat_run):
    kwargs = dict(mode="completion", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=123)
    first = chat.compare(chat_run, "Keepers of the", **kwargs)
    again = chat.compare(chat_run, "Keepers of the", **kwargs)
    other = chat.compare(chat_run, "Keepers of the", **{**kwargs, "seed": 124})
    assert first == again
    assert first != other


def test_chat_mode_feeds_the_template(chat_run):
    """Chat mode continues exactly the chat-templated question (this tokenizer adds no BOS)."""
    from transformers import AutoTokenizer

    kwargs = dict(max_new_tokens=8, temperature=0.0)
    question = "Where are the ships?"
    tok = AutoTokenizer.from_pretrained(RunDir(chat_run).load()["model"]["local_dir"])
    in_chat = chat.compare(chat_run, question, mode="chat", **kwargs)
    templated = chat.build_prompt(tok, question, "chat")
    assert in_chat == chat.compare(chat_run, templated, mode="completion", **kwargs)
    # The template makes a difference: on the bare question the base model answers otherwise.
    assert in_chat[0] != chat.compare(chat_run, question, mode="completion", **kwargs)[0]


def test_errors_are_rawtune_errors(tmp_path, chat_run):
    with pytest.raises(StageMissing, match="not a run directory"):
        list(chat.stream_compare(tmp_path / "nothing", "x"))
    with pytest.raises(ConfigError, match="unknown"):
        list(chat.stream_compare(chat_run, "x", tuned_kind="onnx"))
    with pytest.raises(StageMissing, match="export first"):
        list(chat.stream_compare(chat_run, "x", tuned_kind="gguf:Q4_K_M"))
    # A run without an adapter (data stage only) cannot be compared yet.
    bare = tmp_path / "bare"
    shutil.copytree(chat_run, bare, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    assert chat.tuned_choices(bare) == []
    with pytest.raises(StageMissing, match="no adapter"):
        list(chat.stream_compare(bare, "x"))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_gguf_side_streams_from_llama_cpp(tmp_path, chat_run):
    from rawtune.export import export_run
    from rawtune.settings import ExportSettings

    run_dir = tmp_path / "run"
    shutil.copytree(chat_run, run_dir)
    export_run(RunDir(run_dir), ExportSettings(quant=["f16", "q8_0"], verify=False), log=lambda line: None)
    assert chat.tuned_choices(run_dir) == ["pytorch", "gguf:Q8_0", "gguf:F16"]
    pairs = list(chat.stream_compare(run_dir, "The river", max_new_tokens=10, temperature=0.0,
                                     tuned_kind="gguf:F16"))
    _, gguf_answer = pairs[-1]
    _, torch_answer = chat.compare(run_dir, "The river", max_new_tokens=10, temperature=0.0)
    assert gguf_answer
    # F16 llama.cpp and the fp32 PyTorch model agree on the first greedy tokens.
    assert gguf_answer[:8] == torch_answer[:8]
    with pytest.raises(StageMissing, match="no Q4_K_M"):
        list(chat.stream_compare(run_dir, "x", tuned_kind="gguf:Q4_K_M"))


def test_streaming_leaves_grad_mode_alone(tiny_llama_dir):
    """A half-consumed stream must not switch off autograd in the caller (it broke training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rawtune.compare import Sampling, stream_torch

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    stream = stream_torch(model, tokenizer, "The river", "completion",
                          Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0))
    next(stream)
    assert torch.is_grad_enabled()
    stream.close()
