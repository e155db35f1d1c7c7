"""The pipeline's segmented run (ZeroGPU), on a tiny model on CPU, and the training-time estimate."""

from __future__ import annotations

import threading
import time

import pytest

from rawtune.errors import ModelError
from rawtune.pipeline import (SEGMENTED_STAGES, Finished, Phase, Progress, SegmentEnd, SegmentError, estimate_seconds,
                              estimate_training, gguf_name, resumable, run_pipeline, run_segmented, segment_events)
from rawtune.rundir import RunDir
from rawtune.settings import RunSettings, apply, from_dict, to_dict

STEPS = 6


def _settings(out, model, corpus, **extra) -> RunSettings:
    values = dict(out=str(out), dataset=str(corpus), model=str(model), preset="quick", seq_len=64, lora_r=8,
                  max_steps=STEPS, learning_rate=0.01, save_steps=100, eval_steps=0)
    values.update(extra)
    return apply(RunSettings(), values)


def _steps(record: dict) -> list[int]:
    return [e["step"] for e in record["train"]["history"] if e["type"] == "step"]


def test_segments_resume_until_done_like_one_run(tmp_path, tiny_llama_dir, tiny_corpus):
    settings = _settings(tmp_path / "seg", tiny_llama_dir, tiny_corpus)
    before = to_dict(settings)
    calls = []

    def gpu_call(settings_dict, token, seconds):  # what the app's GPU decorator wraps
        calls.append(settings_dict["train"]["resume"])
        yield from segment_events(settings_dict, token, seconds)

    # Over before the first step ends (a warm tiny model can load and train all six steps in half a
    # second): every segment stops after its first step, whatever the machine's speed.
    events = list(run_segmented(settings, seconds=0.001, train_call=gpu_call))
    assert to_dict(settings) == before  # the caller's settings are not changed
    ends = [e for e in events if isinstance(e, SegmentEnd)]
    assert len(ends) >= 2 and all(e.stopped_early and e.steps < STEPS for e in ends[:-1])
    assert ends[-1].steps == ends[-1].max_steps == STEPS
    assert calls == [False] + [True] * (len(ends) - 1)  # each next segment resumes
    assert [e.stage for e in events if isinstance(e, Phase)] == ["data"] + ["train"] * len(ends) + ["eval"]
    done = events[-1]
    assert isinstance(done, Finished) and done.completed
    record = RunDir(tmp_path / "seg").load()
    assert record == done.record
    assert record["train"]["steps"] == record["train"]["max_steps"] == STEPS and _steps(record) == list(range(1, 7))
    assert record["train"]["resumed_from_step"] == ends[-2].steps  # the last segment went on from the one before
    assert record["settings"]["stages"] == SEGMENTED_STAGES and record["settings"]["train"]["max_steps"] == STEPS
    assert record["metrics"]["ppl_tuned"] < record["metrics"]["ppl_base"]
    assert sum(isinstance(e, Progress) and e.event["type"] == "step" for e in events) == STEPS
    assert not RunDir(tmp_path / "seg").stop_file.exists()
    # The same run in one piece ends with the same steps.
    started = time.time()
    whole = run_pipeline(_settings(tmp_path / "whole", tiny_llama_dir, tiny_corpus,
                                   stages=["data", "train", "eval"]), log=lambda line: None)
    took = time.time() - started
    assert whole["train"]["steps"] == record["train"]["steps"] and _steps(whole) == _steps(record)
    assert whole["data"]["train_blocks"] == record["data"]["train_blocks"]
    # Each stage's wall time is recorded, and they add up to no more than the run took.
    stage_seconds = whole["stage_seconds"]
    assert list(stage_seconds) == ["data", "train", "eval"] and stage_seconds["train"] > 0, stage_seconds
    assert 0 <= sum(stage_seconds.values()) <= took + 0.05, (stage_seconds, took)


def test_stop_then_resume_across_segments(tmp_path, tiny_llama_dir, tiny_corpus):
    from rawtune.space import Budget

    settings = _settings(tmp_path / "r", tiny_llama_dir, tiny_corpus, max_steps=40)
    stop = threading.Event()
    events = []
    for event in run_segmented(settings, seconds=0.5, stop=stop, budget=Budget(None, 8)):
        events.append(event)
        if isinstance(event, Progress) and event.event["type"] == "step" and event.event["step"] >= 3:
            stop.set()
    assert any("step budget per training is 8 steps" in getattr(e, "line", "") for e in events)
    done = events[-1]
    assert isinstance(done, Finished) and not done.completed
    first = done.record["train"]
    assert first["stopped_early"] and 3 <= first["steps"] < 8 and first["max_steps"] == 8
    assert not any(isinstance(e, Phase) and e.stage == "eval" for e in events)
    assert resumable(RunDir(tmp_path / "r"))
    assert "ppl_tuned" not in done.record.get("metrics", {})
    # Resume from the stored settings: no data stage, the step count continues to the (capped) end.
    resumed = from_dict(done.record["settings"])
    assert resumed.train.max_steps == 8  # the capped length was recorded
    resumed.train.resume = True
    events = list(run_segmented(resumed, seconds=0.5))
    assert [e.stage for e in events if isinstance(e, Phase)][0] == "train"
    done = events[-1]
    assert done.completed and done.record["train"]["steps"] == 8 and _steps(done.record) == list(range(1, 9))
    assert done.record["train"]["resumed_from_step"] >= first["steps"] - 1
    assert done.record["metrics"]["ppl_tuned"] > 0 and not resumable(RunDir(tmp_path / "r"))
    assert gguf_name(" alice/my.model ", RunDir(tmp_path / "r")) == "my.model"
    assert gguf_name("alice/", RunDir(tmp_path / "r")) == f"{tiny_llama_dir.name}-rawtune"
    assert gguf_name("", RunDir(tmp_path / "r")) == f"{tiny_llama_dir.name}-rawtune"


def test_segment_failure_is_raised_with_its_message(tmp_path, tiny_corpus):
    settings = _settings(tmp_path / "bad", tmp_path / "no-such-model", tiny_corpus)
    with pytest.raises(SegmentError) as caught:
        list(run_segmented(settings))
    assert "no-such-model" in str(caught.value)
    with pytest.raises(ModelError):  # the same failure, unsegmented, keeps its own type
        run_pipeline(_settings(tmp_path / "bad2", tmp_path / "no-such-model", tiny_corpus), log=lambda line: None)


def test_estimate(tiny_llama_dir):
    from rawtune.train import format_duration

    assert format_duration(59) == "59s" and format_duration(61) == "1m01s" and format_duration(7300) == "2h01m"
    cpu = estimate_seconds(1_000_000, 1.0, 135e6, cuda=False)
    gpu = estimate_seconds(1_000_000, 1.0, 135e6, cuda=True)
    assert cpu > gpu > 0 and estimate_seconds(1000, 1.0, None, cuda=False) is None
    text = ["the river carries bright stones past old mills"] * 4
    measured = estimate_training(text, 10_000, str(tiny_llama_dir), "auto", gpu=False)
    assert "measured with" in measured.how and measured.epochs == 1.0 and measured.seconds > 0
    assert measured.tokens != 2500  # the tokenizer's own ratio, not the 4-characters guess
    guessed = estimate_training(text, 10_000, "someone/unknown-model", "thorough", gpu=True)
    assert guessed.tokens == 2500 and guessed.seconds is None and guessed.epochs == 3.0


def test_segment_length(monkeypatch):
    from rawtune.pipeline import segment_call_seconds, segment_seconds

    monkeypatch.delenv("RAWTUNE_SEGMENT_SECONDS", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert segment_seconds("any/model") is None and segment_call_seconds() == 150  # off ZeroGPU: one segment
    monkeypatch.setenv("RAWTUNE_SEGMENT_SECONDS", "30")
    assert segment_seconds("any/model") == 30.0 and segment_call_seconds() == 90
    monkeypatch.setenv("RAWTUNE_SEGMENT_SECONDS", "0")
    assert segment_seconds("any/model") is None


def test_push_repo_is_checked_before_any_stage(tmp_path):
    from rawtune.errors import ConfigError

    for repo in ("no-slash", "../x/y", "alice/"):
        settings = apply(RunSettings(), {"out": str(tmp_path / "r"), "repo": repo, "stages": "data,push"})
        with pytest.raises(ConfigError, match="give the Hub repo as user/name"):
            run_pipeline(settings, log=lambda line: None)
        assert not (tmp_path / "r").exists()
