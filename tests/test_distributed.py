"""Data-parallel training on the CPU: 2 processes (gloo) against 1, on the tiny model.

The fast loop's own code runs on the CPU (its tests of the loop logic do so): two processes take
their shares of every step, and their summed gradients must give the losses and the adapter of one
process with the same effective batch; a stop seen by one rank must stop both; only rank 0 may
write; a 2-process checkpoint must resume in 1 process. The whole command (``rawtune train --gpus
2``, torchrun, the Trainer path on a CPU) must leave one coherent run directory that a 1-process
``--resume`` continues.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_tiny
from rawtune.rundir import RunDir
from rawtune.train import distributed

ROOT = Path(__file__).resolve().parents[1]
# The multi-process tests below check the CPU (gloo) path; on a CUDA machine the same processes
# would take GPUs (and need two), which the gpu-marked test covers.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
VALUES = dict(preset="quick", seq_len=64, train_embeddings=True, learning_rate=3e-3, batch_size=2, grad_accum=2,
              max_steps=5, save_steps=100, eval_steps=2, optimizer="adamw_torch", logging_steps=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(run_path: str, model_dir: str, out: str, stop_at: int = 0, resume: bool = False) -> None:
    """One rank of the fast loop on the CPU; saves its losses and trained tensors to ``out``."""
    from rawtune.data import load_blocks
    from rawtune.settings import RunSettings, apply, validate
    from rawtune.train import fast_loop
    from rawtune.train.hf_loop import load_peft
    from rawtune.train.progress import Progress, StopSignal, latest_checkpoint

    os.environ["RAWTUNE_COMPILE"] = "0"  # eager: compiling on the CPU would only cost time
    dist = distributed.setup()
    t = validate(apply(RunSettings(), {**VALUES, "model": model_dir})).train
    t = distributed.split_for(t, dist.world, trainer=False)
    run = RunDir(run_path)
    model = load_peft(t, model_dir)
    stop = threading.Event()

    def on_event(event: dict) -> None:
        if stop_at and event["type"] == "step" and event["step"] >= stop_at:
            stop.set()  # on rank 0 only: rank 1 must stop at the same step without being told

    lines: list[str] = []
    progress = Progress(t.batch_size * t.grad_accum * t.seq_len, on_event if dist.main else None, lines.append)
    result = fast_loop.fit(t, run, model, load_blocks(run, "train"), load_blocks(run, "heldout"), progress,
                           StopSignal(run, stop, lines.append), latest_checkpoint(run) if resume else None, dist=dist)
    weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"losses": progress.losses(), "steps": result.steps, "start": result.start_step,
                "weights": weights, "lines": lines, "micro": t.batch_size}, out)
    distributed.finish(dist)


def _rank(rank: int, world: int, port: int, runs: list, model_dir: str, outs: list, stop_at: int,
          resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    _fit(runs[rank], model_dir, outs[rank], stop_at=stop_at, resume=resume)


def _two_ranks(runs: list, model_dir: str, outs: list, stop_at: int = 0, resume: bool = False) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, _free_port(), [str(r) for r in runs], model_dir, [str(o) for o in outs], stop_at,
                          resume), nprocs=2, join=True)


def _copy_run(src: RunDir, dst: Path) -> RunDir:
    """A second run directory with the same data: rank 1 is pointed at it, so anything it writes shows."""
    shutil.copytree(src.path, dst)
    return RunDir(dst)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> RunDir:
    return train_tiny(tmp_path_factory.mktemp("ddp") / "data", tiny_llama_dir, tiny_corpus, max_steps=5,
                      stages=["data"])


def test_shards_split_every_step_between_the_ranks():
    from rawtune.train.fast_loop import step_blocks

    for step in range(6):
        every = step_blocks(step, 23, 4, 3407)
        parts = [distributed.shard(every, distributed.Dist(2, r)) for r in range(2)]
        assert len(parts[0]) and len(parts[1]) and not set(parts[0]) & set(parts[1])
        assert sorted(np.concatenate(parts)) == sorted(every)
    # 23 blocks, 4 per step: the sixth step ends the epoch and starts the next, full on both ranks
    assert [len(distributed.shard(step_blocks(5, 23, 4, 3407), distributed.Dist(2, r))) for r in range(2)] == [2, 2]
    small = step_blocks(0, 3, 4, 3407)  # a corpus smaller than a step: shares differ by one
    assert [len(distributed.shard(small, distributed.Dist(2, r))) for r in range(2)] == [2, 1]


def test_split_keeps_the_effective_batch():
    from rawtune.errors import ConfigError
    from rawtune.settings import TrainSettings

    t = TrainSettings(batch_size=16, grad_accum=1)
    two = distributed.split_for(t, 2, trainer=False)
    assert (two.batch_size, two.grad_accum) == (8, 2)
    assert distributed.split_for(TrainSettings(batch_size=16, grad_accum=2), 2, trainer=False).batch_size == 16
    three = distributed.split_for(t, 3, trainer=False)  # 16 blocks over 3 ranks: shares of 6, 5, 5
    assert three.batch_size * three.grad_accum == 16 and three.batch_size <= 6
    trainer = distributed.split_for(TrainSettings(batch_size=2, grad_accum=8), 2, trainer=True)
    assert (trainer.batch_size, distributed.trainer_accumulation(trainer, 2)) == (2, 4)
    with pytest.raises(ConfigError, match="divisible by 3"):
        distributed.split_for(t, 3, trainer=True)
    assert distributed.split_for(t, 1, trainer=True) is t


def _one_process(tmp_path, data_run, model_dir) -> dict:
    """The fast loop in this process on a copy of ``data_run``: the reference the ranks must equal."""
    one = _copy_run(data_run, tmp_path / "one")
    _fit(str(one.path), str(model_dir), str(tmp_path / "one.pt"))
    return torch.load(tmp_path / "one.pt")


def _run_two_ranks(tmp_path, runs, model_dir, **kw) -> list[dict]:
    """Two gloo ranks, each on its own copy of the run directory; what each reported."""
    _two_ranks([r.path for r in runs], str(model_dir), [tmp_path / "r0.pt", tmp_path / "r1.pt"], **kw)
    return [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]


@cpu_only
def test_fast_loop_on_two_ranks_equals_one_process(tmp_path, data_run, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("RAWTUNE_COMPILE", "0")
    reference = _one_process(tmp_path, data_run, tiny_llama_dir)
    runs = [_copy_run(data_run, tmp_path / "rank0"), _copy_run(data_run, tmp_path / "rank1")]
    stamp = runs[1].run_file.read_bytes()
    ranks = _run_two_ranks(tmp_path, runs, tiny_llama_dir)
    assert reference["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 5
    assert reference["micro"] == 2 and ranks[0]["micro"] == 2  # each rank: one micro-batch of its 2 blocks
    # The loss of each step (summed over the ranks) and the trained tensors equal one process's.
    np.testing.assert_allclose(ranks[0]["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
    for name, value in reference["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ranks[1]["weights"][name], ranks[0]["weights"][name], rtol=0, atol=0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in reference["weights"].items() if "lora_B" in n)
    # Only rank 0 logged and evaluated; rank 1 wrote nothing into its run directory.
    assert any("held-out loss" in s for s in ranks[0]["lines"]) and not any("held-out" in s for s in ranks[1]["lines"])
    assert runs[1].run_file.read_bytes() == stamp and not runs[1].checkpoints_dir.exists()


@cpu_only
def test_stop_on_one_rank_stops_both_and_resumes_in_one_process(tmp_path, data_run, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("RAWTUNE_COMPILE", "0")
    reference = _one_process(tmp_path, data_run, tiny_llama_dir)
    runs = [_copy_run(data_run, tmp_path / "rank0"), _copy_run(data_run, tmp_path / "rank1")]
    ranks = _run_two_ranks(tmp_path, runs, tiny_llama_dir, stop_at=2)
    stopped = ranks[0]["steps"]
    assert 2 <= stopped < 5 and ranks[1]["steps"] == stopped  # rank 1 stopped at rank 0's step
    assert [p.name for p in runs[0].checkpoints_dir.iterdir()] == [f"checkpoint-{stopped}"]
    assert not runs[1].checkpoints_dir.exists()
    # The 2-process checkpoint resumes in 1 process and ends where the 1-process run ended.
    _fit(str(runs[0].path), str(tiny_llama_dir), str(tmp_path / "resumed.pt"), resume=True)
    resumed = torch.load(tmp_path / "resumed.pt")
    assert resumed["start"] == stopped and resumed["steps"] == 5
    np.testing.assert_allclose(resumed["losses"], reference["losses"][stopped:], rtol=1e-5, atol=1e-5)
    for name, value in reference["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=1e-4, atol=1e-5)


@cpu_only
def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, data_run, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("RAWTUNE_COMPILE", "0")
    reference = _one_process(tmp_path, data_run, tiny_llama_dir)
    first = _copy_run(data_run, tmp_path / "first")
    _fit(str(first.path), str(tiny_llama_dir), str(tmp_path / "first.pt"), stop_at=2)
    stopped = torch.load(tmp_path / "first.pt")["steps"]
    assert 2 <= stopped < 5
    # Rank 1 reads the checkpoint from its own copy of the run directory (it writes nothing there).
    second = RunDir(shutil.copytree(first.path, tmp_path / "second"))
    _two_ranks([first.path, second.path], str(tiny_llama_dir), [tmp_path / "r0.pt", tmp_path / "r1.pt"], resume=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert ranks[0]["start"] == ranks[1]["start"] == stopped and ranks[0]["steps"] == ranks[1]["steps"] == 5
    np.testing.assert_allclose(ranks[0]["losses"], reference["losses"][stopped:], rtol=1e-5, atol=1e-5)
    for name, value in reference["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-5)


def _cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rawtune.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@cpu_only
def test_cli_gpus_two_writes_one_run_that_resumes_in_one_process(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "run"
    common = ["--dataset", str(tiny_corpus), "--model", str(tiny_llama_dir), "--preset", "quick", "--seq-len", "64",
              "--batch-size", "2", "--grad-accum", "2", "--save-steps", "2", "--eval-steps", "0",
              "--logging-steps", "1", "--optimizer", "adamw_torch"]
    single = _cli(["train", "--out", str(tmp_path / "single"), *common, "--max-steps", "4"])
    assert single.returncode == 0, single.stderr[-3000:]
    two = _cli(["train", "--out", str(out), *common, "--max-steps", "4", "--gpus", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    text = two.stdout + two.stderr
    assert "data-parallel on 2 CPU processes" in text
    # Rank 0 alone logs: each step once, the data stage once.
    steps = [line.split()[2] for line in text.splitlines() if line.startswith("[train] step ")]
    assert steps == ["1/4", "2/4", "3/4", "4/4"]
    assert sum(line.startswith("[data] ") and "documents kept" in line for line in text.splitlines()) == 1
    record = RunDir(out).load()
    assert record["train"]["steps"] == 4 and record["metrics"]["ppl_tuned"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert {p.name for p in out.iterdir()} <= {".lock", "adapter", "checkpoints", "data", "run.json"}
    # The same effective batch over 2 processes trains on the same blocks: the same losses as 1 process.
    losses = [e["loss"] for e in record["train"]["history"] if e["type"] == "step"]
    reference = [e["loss"] for e in RunDir(tmp_path / "single").load()["train"]["history"] if e["type"] == "step"]
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    # A 1-process resume of the 2-process checkpoint.
    resumed = _cli(["train", "--out", str(out), "--resume", "--max-steps", "6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train = RunDir(out).load()["train"]
    assert train["resumed_from_step"] == 4 and train["steps"] == 6
    assert [e["step"] for e in train["history"] if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]


@cpu_only
def test_in_process_caller_trains_in_workers_and_gets_their_reports(tmp_path, tiny_llama_dir, tiny_corpus,
                                                                    monkeypatch):
    """What the app does (run_pipeline in its own process, a callback and a stop event), with
    RAWTUNE_GPUS=2: the training runs in 2 worker processes and reports back as if in-process."""
    from rawtune.pipeline import run_pipeline
    from rawtune.settings import RunSettings, apply

    values = dict(dataset=str(tiny_corpus), model=str(tiny_llama_dir), preset="quick", seq_len=64, batch_size=2,
                  grad_accum=2, max_steps=6, save_steps=100, logging_steps=1, optimizer="adamw_torch",
                  stages=["data", "train"])
    monkeypatch.delenv("RAWTUNE_GPUS", raising=False)
    single = run_pipeline(apply(RunSettings(), {**values, "out": str(tmp_path / "single")}), log=lambda s: None)
    reference = [e["loss"] for e in single["train"]["history"] if e["type"] == "step"]
    monkeypatch.setenv("RAWTUNE_GPUS", "2")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    stop, events, lines = threading.Event(), [], []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["type"] == "step" and event["step"] >= 2:
            stop.set()

    out = tmp_path / "workers"
    first = run_pipeline(apply(RunSettings(), {**values, "out": str(out)}), callback=on_event, stop=stop,
                         log=lines.append)
    assert any("2 worker processes through torchrun" in s for s in lines)
    assert any("data-parallel on 2 CPU processes" in s for s in lines)  # rank 0's own line, relayed
    stopped = first["train"]["steps"]
    assert first["train"]["stopped_early"] and 2 <= stopped < 6
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, stopped + 1))
    assert events[-1]["type"] == "done" and not (out / "STOP").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{stopped}"]
    # Resumed in this process: on a CPU the Trainer's own resume in several processes fails inside
    # torch.load (transformers passes the process's device as map_location when world_size > 1).
    monkeypatch.delenv("RAWTUNE_GPUS")
    resumed = run_pipeline(apply(RunSettings(), {**values, "out": str(out), "resume": True}), log=lambda s: None)
    losses = [e["loss"] for e in resumed["train"]["history"] if e["type"] == "step"]
    assert resumed["train"]["steps"] == 6 and resumed["train"]["resumed_from_step"] == stopped
    np.testing.assert_allclose(losses, reference, rtol=1e-4)


@pytest.mark.gpu
def test_two_gpus_fast_loop_matches_one_gpu_and_resumes_on_one(tmp_path, tiny_llama_dir, tiny_corpus):
    """On a machine with 2 GPUs: the compiled fast loop through the command line, 1 GPU against 2."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    common = ["--dataset", str(tiny_corpus), "--model", str(tiny_llama_dir), "--preset", "standard", "--seq-len",
              "64", "--backend", "peft", "--gradient-checkpointing", "off", "--batch-size", "4", "--grad-accum", "2",
              "--max-steps", "6", "--save-steps", "3", "--eval-steps", "0", "--logging-steps", "1"]
    one = _cli(["train", "--out", str(tmp_path / "one"), *common])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(["train", "--out", str(tmp_path / "two"), *common, "--gpus", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    text = two.stdout + two.stderr
    assert "data-parallel on 2 GPUs (nccl, fast loop)" in text and "on each of 2 processes" in text

    def losses(name: str) -> list[float]:
        return [e["loss"] for e in RunDir(tmp_path / name).load()["train"]["history"] if e["type"] == "step"]

    reference, both = losses("one"), losses("two")
    assert len(reference) == len(both) == 6
    np.testing.assert_allclose(both, reference, rtol=1e-2)
    resumed = _cli(["train", "--out", str(tmp_path / "two"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train = RunDir(tmp_path / "two").load()["train"]
    assert train["resumed_from_step"] == 3 and train["steps"] == 6
    np.testing.assert_allclose(losses("two")[3:], reference[3:], rtol=1e-2)


def test_gpus_relaunch_command_drops_the_flag_and_moves_the_token(monkeypatch):
    from rawtune.cli import relaunch_command

    monkeypatch.delenv("HF_TOKEN", raising=False)
    cmd, env = relaunch_command(2, ["train", "--gpus", "2", "--token=hf_secret", "--out", "r", "--max-steps", "3"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:] == ["rawtune.cli", "train", "--out", "r", "--max-steps", "3"]
    assert env["HF_TOKEN"] == "hf_secret" and "hf_secret" not in " ".join(cmd)


def test_single_process_never_starts_a_process_group(monkeypatch, tmp_path):
    import torch.distributed as td

    from rawtune.train.progress import StopSignal

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup()
    assert (d.world, d.rank, d.active, d.main) == (1, 0, False, True) and not td.is_initialized()
    asked = threading.Event()
    asked.set()
    assert d.share({"a": 1}) == {"a": 1} and d.should_stop(StopSignal(RunDir(tmp_path), asked)) is True
