"""Training, evaluation and merging on a tiny model, through the real stage functions."""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from conftest import train_tiny
from rawtune.merge import merge_run
from rawtune.rundir import RunDir


def test_training_lowers_loss_and_heldout_ppl(trained_run):
    record = trained_run.load()
    losses = [e["loss"] for e in record["train"]["history"] if e["type"] == "step"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    m = record["metrics"]
    assert m["ppl_tuned"] < m["ppl_base"] * 0.9
    assert m["train_tokens"] == 12 * 2 * 64 and m["train_tokens_per_s"] > 0
    from rawtune.train.hf_loop import choose_backend

    assert record["train"]["backend"] == choose_backend("auto") and record["versions"]["transformers"]
    assert (trained_run.adapter_dir / "adapter_config.json").is_file()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_matches_adapter_and_unties_embeddings(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_run(trained_run, log=lambda s: None)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # both embed_tokens and lm_head were trained
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    base = AutoModelForCausalLM.from_pretrained(trained_run.load()["model"]["local_dir"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(trained_run.adapter_dir))
    ids = torch.from_numpy(np.load(trained_run.data_dir / "heldout.npy")[:2].astype(np.int64))
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-4)
    # Merging again reuses the folder.
    stamp = (merged_dir / "model.safetensors").stat().st_mtime_ns
    merge_run(trained_run, log=lambda s: None)
    assert (merged_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_lora_only_keeps_embeddings_tied(tmp_path, tiny_llama_dir, tiny_corpus):
    from transformers import AutoModelForCausalLM

    run = train_tiny(tmp_path / "r", tiny_llama_dir, tiny_corpus, max_steps=2, train_embeddings=False,
                     stages=["data", "train"])
    merged = AutoModelForCausalLM.from_pretrained(merge_run(run, log=lambda s: None))
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_embedding_learning_rate_group(tiny_llama_dir):
    from rawtune.settings import TrainSettings, resolve_preset
    from rawtune.train.hf_loop import load_peft
    from rawtune.train.optim import param_groups

    t = resolve_preset(TrainSettings(model=str(tiny_llama_dir), preset="quick", train_embeddings=True))
    model = load_peft(t, str(tiny_llama_dir))
    groups = param_groups(model, 1e-3, 1e-5, 0.01)
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    embed_names = {n for n, p in model.named_parameters() if p.requires_grad and ("embed" in n or "lm_head" in n)}
    assert embed_names and sum(p.numel() for p in groups[1]["params"]) > 0


def test_stop_then_resume_continues_step_count(tmp_path, tiny_llama_dir, tiny_corpus):
    stop = threading.Event()

    def on_event(event):
        if event["type"] == "step" and event["step"] >= 3:
            stop.set()

    from rawtune.pipeline import run_pipeline
    from rawtune.settings import RunSettings, apply

    out = tmp_path / "r"
    values = dict(out=str(out), dataset=str(tiny_corpus), model=str(tiny_llama_dir), preset="quick",
                  seq_len=64, max_steps=6, save_steps=100, stages=["data", "train"])
    run_pipeline(apply(RunSettings(), values), callback=on_event, stop=stop, log=lambda s: None)
    run = RunDir(out)
    first = run.load()["train"]
    assert first["stopped_early"] and first["steps"] == 3
    assert (run.checkpoints_dir / "checkpoint-3").is_dir() and (run.adapter_dir / "adapter_config.json").is_file()
    run_pipeline(apply(RunSettings(), {**values, "resume": True}), log=lambda s: None)
    second = run.load()["train"]
    assert second["resumed_from_step"] == 3 and second["steps"] == 6 and not second["stopped_early"]
    assert [e["step"] for e in second["history"] if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]


class _UnslothThatRefuses:
    """Stands in for an installed Unsloth whose loader refuses the model, the way the real one
    refused a tokenizer whose pad token is its EOS on the GPU machine (it names the folder)."""

    def __init__(self, folder):
        self.folder = folder

    def from_pretrained(self, **kwargs):
        raise RuntimeError(f"Unsloth: tokenizer at {self.folder} has pad_token = eos_token\nsecond line")


def _with_refusing_unsloth(monkeypatch, folder):
    import sys
    import types

    module = types.ModuleType("unsloth")
    module.FastLanguageModel = _UnslothThatRefuses(folder)
    monkeypatch.setitem(sys.modules, "unsloth", module)


def test_auto_falls_back_to_peft_when_unsloth_cannot_load_the_model(monkeypatch, tiny_llama_dir):
    from peft import PeftModel

    from rawtune.settings import TrainSettings, resolve_preset
    from rawtune.train import _load_model

    _with_refusing_unsloth(monkeypatch, tiny_llama_dir)
    lines = []
    t = resolve_preset(TrainSettings(backend="auto", preset="quick", lora_r=4, train_embeddings=False))
    model, backend = _load_model("unsloth", t, str(tiny_llama_dir), lines.append)
    assert backend == "peft" and isinstance(model, PeftModel)
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()
    assert lines == ["[train] Unsloth could not load this model (Unsloth: tokenizer at the model folder has "
                     "pad_token = eos_token); training with PEFT instead"]


def test_backend_unsloth_by_name_gets_one_line_error(monkeypatch, tiny_llama_dir):
    import pytest

    from rawtune.errors import TrainError
    from rawtune.settings import TrainSettings
    from rawtune.train import _load_model

    _with_refusing_unsloth(monkeypatch, tiny_llama_dir)
    with pytest.raises(TrainError) as caught:
        _load_model("unsloth", TrainSettings(backend="unsloth"), str(tiny_llama_dir), print)
    message = str(caught.value)
    assert "\n" not in message and str(tiny_llama_dir) not in message
    assert message.startswith("--backend unsloth: Unsloth could not load this model") and "--backend peft" in message
