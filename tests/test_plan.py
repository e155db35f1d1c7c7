"""The GPU plan per card, made without a GPU: precision, 4-bit loading, embeddings' state, ZeroGPU.

The plan is pure arithmetic on a model's shape and a card's memory, so every card is checked on
CPU. The ZeroGPU tests also run the fast loop's real training entry on a tiny model on CPU with
``torch.compile`` wrapped to record its calls: with the flag on nothing is compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import train_tiny
from rawtune.train import fast_loop as fastloop
from rawtune.train import plan as gpu
from rawtune.settings import RunSettings, apply, validate

SMOL = gpu.known_shape("HuggingFaceTB/SmolLM2-135M")
LLAMA_1B = {**gpu.known_shape("meta-llama/Llama-3.2-1B"), "vocab_size": 49152}  # the GPU benchmark's shape
LLAMA_3B = gpu.known_shape("meta-llama/Llama-3.2-3B-Instruct")
LLAMA_8B = gpu.known_shape("meta-llama/Llama-3.1-8B")


def _t(preset: str = "standard", **kw):
    s = RunSettings()
    s.train.preset = preset  # the GPU default recipe, also on CPU machines
    for k, v in kw.items():
        setattr(s.train, k, v)
    return validate(s).train


@pytest.fixture(autouse=True)
def _no_zero_gpu(monkeypatch):
    """Tests start off ZeroGPU whatever the machine's environment says."""
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("RAWTUNE_ZERO_GPU", raising=False)
    monkeypatch.delenv("RAWTUNE_COMPILE", raising=False)


def test_known_shapes_count_parameters():
    assert abs(gpu.param_count(SMOL) / 1e6 - 134.5) < 1  # SmolLM2-135M
    assert abs(gpu.param_count(LLAMA_8B) / 1e9 - 8.03) < 0.02  # Llama-3.1-8B


def test_t4_plans_fp16_and_never_bf16():
    for shape in (SMOL, LLAMA_1B, LLAMA_3B, LLAMA_8B):
        p = gpu.plan_for_card(_t(), shape, "t4")
        assert p.precision == "fp16" and not p.fast_loop and not p.compiled
        assert p.micro_batch * p.grad_accum == 16 and p.predicted_peak_gib <= gpu.CARDS["t4"].gib
    assert gpu.plan_for_card(_t(), SMOL, "l4").precision == "bf16"


def test_8b_on_a_24gb_card_loads_in_4bit_and_fits():
    card = gpu.CARDS["l4"]
    p = gpu.plan_for_card(_t(), LLAMA_8B, "l4")
    assert p.load_in_4bit and p.engine == "unsloth"
    assert p.predicted_peak_gib <= gpu.usable_bytes(card.gib * gpu.GIB) / gpu.GIB
    # The 16-bit weights alone (16 GB) plus the recipe's state do not fit 24 GB; on 80 GB they do.
    assert not gpu.plan_for_card(_t(), LLAMA_8B, "h100").load_in_4bit
    # The quick recipe (r=16, no embeddings, seq 512) is small enough for 16-bit.
    quick = gpu.plan_for_card(_t("quick"), LLAMA_8B, "l4")
    assert not quick.load_in_4bit and quick.predicted_peak_gib <= gpu.usable_bytes(card.gib * gpu.GIB) / gpu.GIB


def test_embeddings_fp32_and_adamw_state_is_counted():
    t = _t()
    d, vocab = LLAMA_3B["hidden_size"], LLAMA_3B["vocab_size"]
    state = gpu.embedding_state_bytes(t, LLAMA_3B, "peft")
    assert state == 2 * vocab * d * 16 and state / gpu.GIB > 10  # 128k vocab x 3072, two copies
    assert gpu.embedding_state_bytes(t, LLAMA_3B, "unsloth") == state // 2  # tied: Unsloth trains one copy
    assert gpu.embedding_state_bytes(_t(train_embeddings=False), LLAMA_3B, "peft") == 0
    with_e = gpu.estimate_trainer_bytes(t, LLAMA_3B, 2, True, False, "unsloth")
    without = gpu.estimate_trainer_bytes(_t(train_embeddings=False), LLAMA_3B, 2, True, False, "unsloth")
    assert with_e - without == state // 2
    # An 8B with a 128k vocabulary cannot keep that state on 24 GB: the plan says so and drops it.
    p = gpu.plan_for_card(t, LLAMA_8B, "l4")
    assert not p.train_embeddings and "embed_tokens/lm_head not trained" in p.why and "GiB" in p.why
    assert gpu.plan_for_card(t, LLAMA_8B, "h100").train_embeddings


def test_fast_loop_only_where_it_was_measured_faster():
    t = _t()
    assert gpu.plan_for_card(t, SMOL, "h100").fast_loop  # 135M: 1.6x Unsloth
    big = gpu.plan_for_card(t, LLAMA_1B, "h100")
    assert not big.fast_loop and big.engine == "unsloth" and "1.04x" in big.why
    # Unsloth's measured best at the 1B shape on the H200 was 16 x 1 without checkpointing (37.3 GiB).
    assert (big.micro_batch, big.checkpointing) == (16, "off") and abs(big.predicted_peak_gib - 37.3) < 3
    assert fastloop.why_not_for_settings(t, LLAMA_1B, bf16=True) is not None


def test_without_unsloth_the_fast_loop_has_no_size_limit():
    """Against PEFT's Trainer (a family Unsloth refuses, --backend peft, RAWTUNE_FP8=1's only path)
    the flattened loop is planned at 1B and 3B wherever its predicted peak fits; ZeroGPU still keeps it out."""
    t = _t()
    assert fastloop.why_not_for_settings(t, LLAMA_1B, bf16=True, unsloth=False) is None
    for shape in (LLAMA_1B, LLAMA_3B):
        p = gpu.choose(t, shape, 80 * gpu.GIB, unsloth=False)
        assert p.fast_loop and p.engine == "fast loop" and p.predicted_peak_gib <= gpu.usable_bytes(80 * gpu.GIB) / gpu.GIB
    # Under a 24 GiB cap: 8 x 2 is predicted at 36.1 GiB, 4 x 4 at 22.6 GiB (the 1B shape's measured
    # 16 x 1 peak, 64.1 GiB, was 1.6 % above its prediction), so 4 x 4 without checkpointing.
    capped = gpu.choose(t, LLAMA_1B, 24 * gpu.GIB, unsloth=False, capped=True)
    assert capped.fast_loop and (capped.micro_batch, capped.checkpointing) == (4, "off")
    assert gpu.estimate_fast_bytes(t, LLAMA_1B, 8) > gpu.capped_bytes(24 * gpu.GIB)
    assert gpu.plan_for_card(t, LLAMA_1B, "h100").engine == "unsloth"  # with Unsloth the rule stands


def test_fp8_base_weights_plan_the_flattened_loop_with_their_smaller_peak():
    """RAWTUNE_FP8=1 on an FP8 card: only the flattened loop holds FP8 weights, so at 1B it is planned
    even with Unsloth installed, from a peak that counts one byte per frozen projection weight."""
    t = _t()
    bf16_peak, fp8_peak = (gpu.estimate_fast_bytes(t, LLAMA_1B, 4, fp8=f) for f in (False, True))
    linear = LLAMA_1B["num_hidden_layers"] * 2048 * (2048 + 2 * 512 + 2048 + 3 * 8192)
    fused = LLAMA_1B["num_hidden_layers"] * 2048 * (2048 + 2 * 512 + 2 * 8192)
    assert bf16_peak - fp8_peak == linear + 2 * fused  # bf16 weights and fused copies -> one byte each
    p = gpu.choose(t, LLAMA_1B, 24 * gpu.GIB, unsloth=True, capped=True, fp8=True)
    assert p.fast_loop and p.fp8 and (p.micro_batch, p.checkpointing) == (4, "off")
    assert abs(p.predicted_peak_gib - fp8_peak / gpu.GIB) < 1e-9 and "FP8" in gpu.describe(p)
    # Without FP8 the same card keeps Unsloth's model at this size, and says nothing of FP8.
    q = gpu.choose(t, LLAMA_1B, 24 * gpu.GIB, unsloth=True, capped=True)
    assert not q.fast_loop and not q.fp8 and "FP8" not in gpu.describe(q)


def test_zero_gpu_plan_never_compiles(monkeypatch):
    t = _t()
    for shape in (SMOL, LLAMA_1B, LLAMA_3B, LLAMA_8B):
        p = gpu.plan_for_card(t, shape, "zerogpu")
        assert not p.compiled and not p.fast_loop and p.engine == "unsloth"
    # The same card size off ZeroGPU compiles the 135M fast loop: the flag is what changes it.
    assert gpu.choose(t, SMOL, int(44.7 * gpu.GIB)).compiled
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert gpu.zero_gpu() and not gpu.compile_allowed()
    p = gpu.choose(t, SMOL, int(44.7 * gpu.GIB))
    assert not p.compiled and not p.fast_loop
    assert "ZeroGPU" in fastloop.why_not_for_settings(t, SMOL, bf16=True)


def _fit_fast(tmp_path, tiny_llama_dir, tiny_corpus) -> tuple[list, dict]:
    """The fast loop's training entry on CPU, with torch.compile wrapped to record its calls."""
    from rawtune.data import load_blocks
    from rawtune.train.hf_loop import load_peft
    from rawtune.train.progress import Progress, StopSignal

    values = dict(out=str(tmp_path / "r"), dataset=str(tiny_corpus), model=str(tiny_llama_dir), preset="quick",
                  seq_len=64, batch_size=2, max_steps=2, save_steps=100, stages=["data"])
    run = train_tiny(tmp_path / "r", tiny_llama_dir, tiny_corpus, max_steps=2, stages=["data"])
    settings = validate(apply(RunSettings(), values))
    t = settings.train
    model = load_peft(t, str(tiny_llama_dir))
    lines: list = []
    progress = Progress(t.batch_size * t.grad_accum * t.seq_len, None, lines.append)
    result = fastloop.fit(t, run, model, load_blocks(run, "train"), load_blocks(run, "heldout"), progress,
                          StopSignal(run, threading.Event(), lines.append), None)
    return lines, {"steps": result.steps}


def test_zero_gpu_training_calls_no_torch_compile(monkeypatch, tmp_path, tiny_llama_dir, tiny_corpus):
    calls: list = []

    def recording_compile(fn=None, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return fn  # run eagerly: what matters is whether compiling was asked for

    monkeypatch.setattr(torch, "compile", recording_compile)
    lines, record = _fit_fast(tmp_path / "off", tiny_llama_dir, tiny_corpus)
    assert calls and record["steps"] == 2  # off ZeroGPU the fast loop compiles (the control)
    calls.clear()
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    lines, record = _fit_fast(tmp_path / "on", tiny_llama_dir, tiny_corpus)
    assert calls == [] and record["steps"] == 2
    assert any("eager" in line for line in lines)


def test_segment_leaves_room_for_load_and_save():
    small, large = gpu.segment_seconds(SMOL, 150), gpu.segment_seconds(LLAMA_8B, 150)
    assert gpu.load_seconds(LLAMA_8B) > gpu.load_seconds(SMOL) + 60
    assert small - gpu.load_seconds(SMOL) >= 60  # a 135M model trains most of a 150 s call
    assert large >= gpu.load_seconds(LLAMA_8B) + gpu.MIN_TRAIN_SECONDS  # always some training after the load
    assert gpu.call_seconds_for(LLAMA_8B) > 150 > gpu.call_seconds_for(SMOL)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "rawtune.train.plan", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_prints_every_card(tmp_path, tiny_llama_dir):
    out = _cli("meta-llama/Llama-3.1-8B-Instruct")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[1:]
    assert [r.split("  ")[0] for r in rows] == list(gpu.PRINTED.values())
    assert "fp16" in rows[0] and "4-bit" in rows[1] and "fast CUDA loop + Unsloth's forward, 16-bit" in rows[2]
    folder = _cli(str(tiny_llama_dir))  # a local folder (its config.json)
    assert folder.returncode == 0 and len(folder.stdout.splitlines()) == 1 + len(gpu.PRINTED)
    unknown = _cli("someone/unknown-model")
    assert unknown.returncode != 0 and "not a known model id" in unknown.stderr


def test_cli_plans_as_the_run_would_for_a_peft_only_family(tmp_path):
    """gpt-oss-20b's shape (the registry: Unsloth cannot train it): every card is planned with PEFT,
    as a run is, and a card it does not fit gets the reason alone, not a plan of zeros."""
    from transformers import GptOssConfig

    config = {**GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict(),
              "architectures": ["GptOssForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = _cli(str(tmp_path / "config.json"))
    assert out.returncode == 0, out.stderr
    head, *rows = out.stdout.splitlines()
    assert "gpt-oss: PEFT (the registry: Unsloth cannot train it)" in head
    assert rows[0].split("  ")[0] == gpu.PRINTED["t4"] and "does not fit: this model needs about" in rows[0]
    assert "micro-batch 0" not in out.stdout and "nan" not in out.stdout
    assert "Trainer + PEFT" in rows[-1] and "Unsloth's forward" not in out.stdout, rows[-1]


# ---------------------------------------------------------------- under a memory cap (issue 22, item 4)

CAPPED_SHAPES = {"135m": SMOL, "1b": LLAMA_1B}


@pytest.mark.parametrize("shape", sorted(CAPPED_SHAPES))
@pytest.mark.parametrize("cap_gib", [16, 24])
def test_capped_plan_is_the_fastest_fitting_candidate(shape, cap_gib):
    """Every setting the planner can run is enumerated here from the estimates; the plan is the one
    the speed order puts first among those that fit the cap less its margin, and never exceeds it."""
    t, c, cap = _t(), CAPPED_SHAPES[shape], cap_gib * gpu.GIB
    p = gpu.choose(t, c, cap, capped=True)
    budget = gpu.capped_bytes(cap)
    assert cap - budget >= gpu.CAP_MARGIN and p.predicted_peak_gib * gpu.GIB <= budget
    fast_ok = fastloop.why_not_for_settings(t, c, bf16=True) is None
    fitting = []
    for micro in (1, 2, 4, 8, 16):
        if fast_ok and gpu.estimate_fast_bytes(t, c, micro) <= budget:
            fitting.append(("fast loop", micro, False))
        for gc in (False, True):
            if gpu.estimate_trainer_bytes(t, c, micro, gc, False, "unsloth") <= budget:
                fitting.append(("unsloth", micro, gc))
    best = min(fitting, key=lambda k: gpu.speed_rank(*k))
    assert (p.engine, p.micro_batch, p.checkpointing != "off") == best
    assert p.micro_batch * p.grad_accum == 16 and not p.load_in_4bit and p.train_embeddings


def test_capped_plans_pick_unsloths_fastest_measured_settings():
    """The settings measured fastest at these caps (docs/benchmarks.md, issue 22): at 135M under 16 GiB
    Unsloth's 16 x 1 (214k tokens/s against the fast loop's 4 x 4 at 164k); at the 1B shape 8 x 2
    under 24 GiB and 4 x 4 under 16 GiB, without checkpointing (16 x 1 with it: 59.7k against 69.0k)."""
    t = _t()
    small = gpu.choose(t, SMOL, 16 * gpu.GIB, capped=True)
    assert (small.engine, small.micro_batch, small.checkpointing) == ("unsloth", 16, "off")
    assert small.flatten_refused and not small.fast_loop  # the flattened loop's 16 x 1 needs 27.6 GiB
    assert gpu.estimate_fast_bytes(t, SMOL, 16) > 16 * gpu.GIB
    for cap, split in ((24, (8, 2)), (16, (4, 4))):
        p = gpu.choose(t, LLAMA_1B, cap * gpu.GIB, capped=True)
        assert (p.engine, (p.micro_batch, p.grad_accum), p.checkpointing) == ("unsloth", split, "off")
        assert not p.flatten_refused  # the fast loop is vetoed at 1B anyway
    # A whole card keeps its CUDA-context reserve: the same 16 GiB as a card leaves less room.
    card = gpu.choose(t, SMOL, 16 * gpu.GIB)
    assert card.predicted_peak_gib * gpu.GIB <= gpu.usable_bytes(16 * gpu.GIB) < gpu.capped_bytes(16 * gpu.GIB)
    assert card.micro_batch < small.micro_batch
    # Without Unsloth the PEFT Trainer's fp32 logits do not fit 16 x 1: the fast loop's largest fitting split runs.
    peft = gpu.choose(t, SMOL, 16 * gpu.GIB, unsloth=False, capped=True)
    assert peft.fast_loop and (peft.micro_batch, peft.grad_accum) == (8, 2) and not peft.flatten_refused


def test_capped_plan_reaches_training_through_the_environment(monkeypatch):
    monkeypatch.setenv("RAWTUNE_GPU_MEMORY_GIB", "16")
    assert gpu.cap_bytes() == 16 * gpu.GIB
    monkeypatch.delenv("RAWTUNE_GPU_MEMORY_GIB")
    assert gpu.cap_bytes() is None


def test_planner_counts_experts_and_per_layer_embeddings():
    """The dense formula saw gpt-oss-20b as 1.8B parameters and planned it onto a T4; the model
    built on the meta device counts its experts (bf16 in 4-bit too: they are not nn.Linear)."""
    from transformers import GptOssConfig

    c = GptOssConfig(hidden_size=2880, num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4,
                     intermediate_size=2880, vocab_size=201088, num_attention_heads=64, num_key_value_heads=8,
                     head_dim=64).to_dict()
    c["architectures"] = ["GptOssForCausalLM"]
    linear, other = gpu.weight_split(c)
    assert 20.5e9 < linear + other < 21.3e9  # the model card: 21B
    assert other > 19e9  # the stacked experts stay bf16
    t4 = gpu.plan_for_card(_t(), c, "t4")
    assert t4.micro_batch == 0 and "GiB" in t4.why  # refused on a 16 GB card, saying how much it needs
    # A known id without a config: the model card's count, not the dense formula's 3.2B.
    assert abs(gpu.param_count(gpu.known_shape("google/gemma-4-E2B-it")) - families_params("google/gemma-4-E2B-it")) < 1e6


def families_params(repo: str) -> float:
    from rawtune import families

    return next(m.params for m in families.known_models(listed_only=False) if m.repo == repo)


def test_small_effective_batch_is_not_checkpointed_for_nothing():
    """With an effective batch of 2 (the quick preset) no larger micro-batch exists for checkpointing
    to buy, so the plan is the fast loop at 2 x 1 without it (it was the Trainer with checkpointing,
    which also kept RAWTUNE_FP8=1 from running on the GPU machine)."""
    t = _t("quick", batch_size=2, grad_accum=1)
    p = gpu.choose(t, SMOL, 80 * gpu.GIB)
    assert (p.engine, p.micro_batch, p.grad_accum, p.checkpointing) == ("fast loop", 2, 1, "off")
    peft = gpu.choose(t, SMOL, 80 * gpu.GIB, unsloth=False)
    assert peft.fast_loop and peft.checkpointing == "off"


def test_config_claiming_huge_counts_is_not_built(monkeypatch):
    """A Hub config.json that claims a million layers gets the dense formula, fast, not a million
    Python modules on the meta device (a visitor could otherwise stall the Space)."""
    from rawtune.train import engine

    c = {**SMOL, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1_000_000}
    built = engine._meta_counts.cache_info().misses
    linear, _ = gpu.weight_split(c)
    assert linear == engine.dense_linear_params(c) and engine._meta_counts.cache_info().misses == built
    assert engine.lora_params(_t("standard"), c) is None and engine._meta_counts.cache_info().misses == built
    assert not engine._buildable({**c, "num_hidden_layers": 8, "num_experts": 10_000})
    assert engine._buildable({**c, "num_hidden_layers": 8})
