"""The fast loop's checkpoints: the state of the step they were written at, complete or absent.

A tiny PEFT model with a real AdamW state is checkpointed, then trained further; loading the
checkpoint must give back the state of its step. A write that fails (a full disk, raised from
inside torch.save) must leave the earlier checkpoints and no folder that looks like one.
"""

from __future__ import annotations

import pytest
import torch

from rawtune.errors import TrainError
from rawtune.rundir import RunDir
from rawtune.settings import RunSettings, apply, validate
from rawtune.train import checkpoints
from rawtune.train.hf_loop import load_peft
from rawtune.train.optim import schedule


def _trained(model_dir, steps: int = 2):
    """A LoRA model (embeddings trained too) after ``steps`` AdamW steps, with its optimizer and schedule."""
    t = validate(apply(RunSettings(), {"model": str(model_dir), "preset": "quick", "train_embeddings": True,
                                       "max_steps": 10})).train
    torch.manual_seed(0)
    model = load_peft(t, str(model_dir))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = schedule(t, optimizer, 10)
    for _ in range(steps):
        _step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_checkpoint_holds_the_step_it_was_written_at(tmp_path, tiny_llama_dir):
    model, optimizer, scheduler = _trained(tiny_llama_dir)
    run = RunDir(tmp_path)
    at_two = _trainable(model)
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    folder = checkpoints.save(run, model, optimizer, scheduler, 2)
    _step(model, optimizer, scheduler)
    assert any(not torch.equal(v, at_two[n]) for n, v in _trainable(model).items())  # trained on
    assert {p.name for p in folder.iterdir()} == {checkpoints.ADAPTER_FILE, "adapter_config.json", checkpoints.STATE_FILE}
    assert checkpoints.load(folder, model, optimizer, scheduler) == 2
    for name, value in _trainable(model).items():
        torch.testing.assert_close(value, at_two[name], rtol=0, atol=0)
    for k, v in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(v["exp_avg"], moments[k], rtol=0, atol=0)
    assert scheduler.last_epoch == 2


def test_only_the_newest_two_are_kept(tmp_path, tiny_llama_dir):
    model, optimizer, scheduler = _trained(tiny_llama_dir, steps=1)
    run = RunDir(tmp_path)
    for step in (3, 6, 9):
        checkpoints.save(run, model, optimizer, scheduler, step)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-6", "checkpoint-9"]


def test_a_failed_write_leaves_the_earlier_checkpoint_and_no_half_one(tmp_path, tiny_llama_dir, monkeypatch):
    model, optimizer, scheduler = _trained(tiny_llama_dir, steps=1)
    run = RunDir(tmp_path)
    checkpoints.save(run, model, optimizer, scheduler, 4)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainError, match="writing checkpoint-8 .* failed .No space left on device.; free disk space"):
        checkpoints.save(run, model, optimizer, scheduler, 8)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-4"]
