"""The GPU training path: the fast loop's maths (checked on CPU against PEFT) and GPU-only runs.

The unmarked tests run everywhere: the fast loop's hand-written forward must give the PEFT
model's loss and gradients, and the GPU plan must keep the effective batch. The ``gpu`` tests
train tiny models on CUDA through the real stage functions (skipped on CPU machines).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import train_tiny
from tiny import fast_loop_vs_peft
from rawtune.train import fast_loop as fastloop
from rawtune.train.plan import GIB, choose, estimate_fast_bytes, usable_bytes
from rawtune.settings import RunSettings, TrainSettings, resolve_preset, validate
from rawtune.train.hf_loop import load_peft

SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "hidden_act": "silu"}


def _cpu_peft(t: TrainSettings, model_dir) -> object:
    """The PEFT model as load_peft builds it, but fp32 on the CPU even where CUDA exists."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rawtune.train.hf_loop import peft_config

    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), peft_config(t))


def _standard(**kw) -> TrainSettings:
    s = RunSettings()
    s.train.preset = "standard"  # the seed's recipe, also on CPU machines (where 'auto' means quick)
    for k, v in kw.items():
        setattr(s.train, k, v)
    return validate(s).train


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_fast_forward_matches_peft_loss_and_gradients(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    t = _standard(seq_len=32)
    torch.manual_seed(0)
    model = _cpu_peft(t, model_dir)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random B makes the LoRA path count
            p.data.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (3, 32))
    loss_diff, errors = fast_loop_vs_peft(model, ids)
    assert loss_diff < 1e-5
    assert len(errors) > 10
    for name, err in errors.items():
        assert err < 1e-4, name


def test_padding_rows_do_not_change_the_loss(tiny_llama_dir):
    t = _standard(seq_len=32)
    model = _cpu_peft(t, tiny_llama_dir)
    fast = fastloop.FastModel(fastloop.extract(model, torch.float32), compile=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    padded = torch.cat([ids, torch.zeros(2, 32, dtype=torch.long)])
    n = torch.tensor(2.0 * 31)
    with torch.no_grad():
        a = fast.loss(ids, fastloop.shifted_labels(ids, 2), n)
        b = fast.loss(padded, fastloop.shifted_labels(padded, 2), n)
    assert abs(a.item() - b.item()) < 1e-6


def test_each_epoch_visits_every_block_once_and_every_step_is_full():
    steps = [fastloop.step_blocks(s, 37, 8, seed=1) for s in range(10)]
    assert all(len(s) == 8 for s in steps)  # the fifth step ends epoch 0 and starts epoch 1
    stream = np.concatenate(steps).tolist()
    assert sorted(stream[:37]) == list(range(37)) and len(set(stream[37:74])) == 37
    assert stream[37:40] != stream[:3]  # epoch 1 in a fresh order
    assert fastloop.total_steps(_standard(batch_size=2, grad_accum=4, epochs=2.0), 37) == 10  # 74 / 8
    assert fastloop.total_steps(_standard(batch_size=2, grad_accum=4, epochs=1.0), 32) == 4
    assert fastloop.total_steps(_standard(batch_size=3, grad_accum=1, epochs=0.1), 30) == 1
    small = [fastloop.step_blocks(s, 5, 8, seed=1) for s in range(2)]  # smaller than one step: all of it
    assert [sorted(s.tolist()) for s in small] == [list(range(5))] * 2 and small[0].tolist() != small[1].tolist()


def test_plan_keeps_effective_batch_and_fits_small_cards():
    t = _standard()
    effective = t.batch_size * t.grad_accum
    big = choose(t, SMOL, 80 * GIB)
    assert big.fast_loop and big.checkpointing == "off" and big.micro_batch * big.grad_accum == effective
    assert big.micro_batch == effective
    small = choose(t, SMOL, 16 * GIB)
    assert small.micro_batch * small.grad_accum == effective
    assert small.predicted_peak_gib * GIB <= usable_bytes(16 * GIB)
    assert small.micro_batch < big.micro_batch and not small.fast_loop  # Unsloth's 8 x 2 beats the fast loop's 4 x 4
    t4 = choose(t, SMOL, 15 * GIB, bf16=False)
    assert not t4.fast_loop and t4.checkpointing == "unsloth" and (t4.micro_batch, t4.grad_accum) == (2, 8)
    explicit = choose(_standard(gradient_checkpointing="unsloth"), SMOL, 80 * GIB)
    assert not explicit.fast_loop and explicit.micro_batch == 2


def test_fast_loop_declines_what_it_cannot_train():
    t = resolve_preset(TrainSettings(preset="standard"))
    assert "4-bit" in fastloop.why_not_for_settings(TrainSettings(**{**t.__dict__, "load_in_4bit": True}), SMOL, bf16=True)
    assert "architecture" in fastloop.why_not_for_settings(t, {**SMOL, "model_type": "gemma"}, bf16=True)
    assert "dropout" in fastloop.why_not_for_settings(TrainSettings(**{**t.__dict__, "lora_dropout": 0.1}), SMOL, bf16=True)


# ---------------------------------------------------------------- on a CUDA GPU


@pytest.fixture(scope="module")
def padded_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny llama with a pad token of its own: Unsloth's loader refuses pad == eos on a model
    whose embedding it cannot grow (RuntimeError 'Could not find a valid pad token')."""
    from transformers import AutoTokenizer

    from tiny import tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok_dir = tmp_path_factory.mktemp("padded-tokenizer")
    tok.save_pretrained(tok_dir)
    return tiny_model(tmp_path_factory.mktemp("padded-llama"), tok_dir, "llama", tie=True)


def _fit_alone(run, model_dir, own_forward: bool, resume_from=None) -> tuple:
    """The fast loop on the CPU in this process, with the flattened model or the model's own forward."""
    from rawtune.data import load_blocks
    from rawtune.settings import apply
    from rawtune.train.progress import Progress, StopSignal

    # A learning rate that still lowers the loss in 6 steps but does not blow float rounding up:
    # AdamW's first steps move near-zero gradients by about the learning rate whatever their size.
    values = dict(preset="quick", seq_len=64, train_embeddings=True, learning_rate=1e-3, batch_size=2,
                  grad_accum=2, max_steps=6, save_steps=4, eval_steps=3, optimizer="adamw_torch", logging_steps=1)
    t = validate(apply(RunSettings(), {**values, "model": str(model_dir)})).train
    model = load_peft(t, str(model_dir))
    progress = Progress(t.batch_size * t.grad_accum * t.seq_len, None, lambda line: None)
    fastloop.fit(t, run, model, load_blocks(run, "train"), load_blocks(run, "heldout"), progress,
                 StopSignal(run, None, lambda line: None), resume_from, own_forward=own_forward)
    weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return progress.losses(), progress.history, weights


def test_own_forward_takes_the_fast_models_steps(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    """The fast loop around the model's own forward (Unsloth's model on CUDA; PEFT's here) computes
    the same steps as around the flattened model: the labels, the step's token count and the
    parameter groups reach the model's loss the same way."""
    monkeypatch.setenv("RAWTUNE_COMPILE", "0")
    data = train_tiny(tmp_path / "data", tiny_llama_dir, tiny_corpus, stages=["data"])
    flat_losses, flat_history, flat = _fit_alone(data, tiny_llama_dir, own_forward=False)
    own_losses, own_history, own = _fit_alone(data, tiny_llama_dir, own_forward=True)
    assert len(own_losses) == 6 and own_losses[-1] < own_losses[0]
    # The first two steps agree to float rounding (a wrong label shift or token count would not);
    # later, AdamW turns the gradients' rounding differences (~1e-5 relative) into small steps.
    np.testing.assert_allclose(own_losses[:2], flat_losses[:2], rtol=1e-6)
    np.testing.assert_allclose(own_losses, flat_losses, atol=5e-3)
    evals = [[e["eval_loss"] for e in h if e["type"] == "eval"] for h in (flat_history, own_history)]
    assert len(evals[1]) == 2
    np.testing.assert_allclose(evals[1], evals[0], atol=5e-3)
    assert own.keys() == flat.keys()
    for name in own:  # measured: at most 1.4 % (a LoRA B), 0.06 % for the embeddings
        assert ((own[name] - flat[name]).norm() / flat[name].norm()).item() < 0.05, name
    assert (data.checkpoints_dir / "checkpoint-4" / fastloop.STATE_FILE).is_file()
    # A fresh model resumed from the own-forward run's checkpoint takes that run's last two steps.
    resumed, _, _ = _fit_alone(data, tiny_llama_dir, own_forward=True, resume_from=data.checkpoints_dir / "checkpoint-4")
    assert len(resumed) == 2
    np.testing.assert_allclose(resumed, own_losses[4:], rtol=1e-5)


def test_compile_mode_is_checked_by_name(monkeypatch, tiny_llama_dir):
    from rawtune.errors import ConfigError
    from rawtune.train.engine import compile_mode

    monkeypatch.delenv("RAWTUNE_COMPILE_MODE", raising=False)
    assert compile_mode() is None
    monkeypatch.setenv("RAWTUNE_COMPILE_MODE", "reduce-overhead")
    assert compile_mode() == "reduce-overhead"
    net = fastloop.extract(_cpu_peft(_standard(seq_len=32), tiny_llama_dir), torch.float32)
    assert not fastloop.FastModel(net, compile=False, mode=compile_mode()).graphs  # eager: nothing recorded
    monkeypatch.setenv("RAWTUNE_COMPILE_MODE", "fast")
    with pytest.raises(ConfigError, match="RAWTUNE_COMPILE_MODE='fast': use one of default, reduce-overhead"):
        compile_mode()


def _losses(run) -> list[float]:
    return [e["loss"] for e in run.load()["train"]["history"] if e["type"] == "step"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["peft", "unsloth"])
def test_fast_loop_trains_on_cuda(tmp_path, padded_llama_dir, tiny_corpus, backend):
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    run = train_tiny(tmp_path / "r", padded_llama_dir, tiny_corpus, backend=backend, max_steps=30,
                     gradient_checkpointing="auto", eval_steps=10)
    record = run.load()
    losses = _losses(run)
    evals = [e["eval_loss"] for e in record["train"]["history"] if e["type"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert len(losses) == 30 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert record["train"]["backend"] == backend
    assert record["train"]["effective_settings"]["gradient_checkpointing"] == "off"
    assert record["metrics"]["ppl_tuned"] < record["metrics"]["ppl_base"]
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
def test_unsloth_trainer_path_trains_on_cuda(tmp_path, padded_llama_dir, tiny_corpus, monkeypatch):
    pytest.importorskip("unsloth")
    monkeypatch.setenv("RAWTUNE_FASTLOOP", "0")
    run = train_tiny(tmp_path / "r", padded_llama_dir, tiny_corpus, backend="unsloth", max_steps=30,
                     gradient_checkpointing="unsloth", logging_steps=1)  # the Trainer records logged steps only
    losses = _losses(run)
    assert len(losses) == 30 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3


@pytest.mark.gpu
def test_compiled_bf16_loss_matches_peft_on_cuda(tiny_llama_dir):
    t = _standard(seq_len=64)
    model = load_peft(t, str(tiny_llama_dir))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.float().item()
        fast = fastloop.FastModel(fastloop.extract(model), compile=True)
        labels = fastloop.shifted_labels(ids, 4)
        got = fast.loss(ids, labels, (labels >= 0).sum().float()).item()
    assert abs(got - ref) / ref < 2e-2


@pytest.mark.gpu
def test_fast_loop_stops_and_resumes(tmp_path, tiny_llama_dir, tiny_corpus):
    import threading

    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import apply

    stop = threading.Event()
    values = dict(out=str(tmp_path / "r"), dataset=str(tiny_corpus), model=str(tiny_llama_dir), preset="quick",
                  seq_len=64, batch_size=2, max_steps=10, learning_rate=3e-3, save_steps=100, backend="peft",
                  stages=["data", "train"])
    run_pipeline(apply(RunSettings(), values), log=lambda s: None, stop=stop,
                 callback=lambda e: stop.set() if e["type"] == "step" and e["step"] >= 4 else None)
    run = RunDir(tmp_path / "r")
    first = run.load()["train"]
    assert first["stopped_early"] and 4 <= first["steps"] < 10
    run_pipeline(apply(RunSettings(), {**values, "resume": True}), log=lambda s: None)
    second = run.load()["train"]
    assert second["resumed_from_step"] == first["steps"] and second["steps"] == 10


@pytest.mark.gpu
def test_unsloth_forward_in_the_fast_loop_stops_and_resumes(tmp_path, padded_llama_dir, tiny_corpus, monkeypatch):
    """Checkpointing asked for keeps the flattened model out, so the fast loop drives Unsloth's own
    forward: it trains, stops with a checkpoint of its own format, and resumes from it. The token
    blocks stay in CPU memory, as a corpus too large for the card would."""
    import threading

    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import apply

    pytest.importorskip("unsloth")
    monkeypatch.delenv("RAWTUNE_UNSLOTH_LOOP", raising=False)  # the default
    monkeypatch.setattr(fastloop, "BLOCKS_ON_CARD_BYTES", 0)
    stop, lines = threading.Event(), []
    values = dict(out=str(tmp_path / "r"), dataset=str(tiny_corpus), model=str(padded_llama_dir), preset="quick",
                  seq_len=64, batch_size=2, max_steps=30, learning_rate=3e-3, save_steps=100, backend="unsloth",
                  gradient_checkpointing="unsloth", stages=["data", "train"])
    run_pipeline(apply(RunSettings(), values), log=lines.append, stop=stop,
                 callback=lambda e: stop.set() if e["type"] == "step" and e["step"] >= 12 else None)
    assert any("Unsloth's forward" in line for line in lines), lines
    run = RunDir(tmp_path / "r")
    first = run.load()["train"]
    assert first["stopped_early"] and 12 <= first["steps"] < 30
    assert (run.checkpoints_dir / f"checkpoint-{first['steps']}" / fastloop.STATE_FILE).is_file()
    run_pipeline(apply(RunSettings(), {**values, "resume": True, "stages": ["train", "eval"]}), log=lines.append)
    record = run.load()
    losses = _losses(run)
    assert record["train"]["resumed_from_step"] == first["steps"] and record["train"]["steps"] == 30
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert record["metrics"]["ppl_tuned"] < record["metrics"]["ppl_base"]


@pytest.mark.gpu
def test_step_inputs_reach_the_card_without_making_the_host_wait(tmp_path):
    """What the loop copies to the card every step (block indices, a block batch from host memory, the
    token count, the stop flag) is queued without a stream synchronisation, so the host keeps queueing
    the next step while the card works; torch raises on any synchronisation in this mode."""
    import threading

    import torch.distributed as td

    from rawtune.rundir import RunDir
    from rawtune.train import distributed
    from rawtune.train.progress import StopSignal

    card = torch.device("cuda", torch.cuda.current_device())
    td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1, device_id=card)
    try:
        d = distributed.Dist(2, 0, "nccl")  # the several-process path, over a group of one
        d.sum_(torch.ones(1, device=card))  # the communicator's first use, outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            idx = fastloop.to_device(torch.from_numpy(np.arange(8)), card)
            ids = fastloop.to_device(torch.arange(64).view(4, 16)[[0, 2]], card)
            n_items = torch.full((), 2.0 * 15, device=card)
            first = d.should_stop(StopSignal(RunDir(tmp_path), threading.Event()))
            with pytest.raises(RuntimeError, match="synchroniz"):  # what the mode catches: a plain copy
                torch.tensor([1.0], device=card)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        td.destroy_process_group()
    assert idx.device == card and idx.tolist() == list(range(8))
    assert ids.device == card and ids[1, 0].item() == 32 and n_items.item() == 30.0
    assert first is False and d.stop_flag.item() == 0.0


@pytest.mark.gpu
def test_layers_recorded_as_cuda_graphs_train_as_the_default_compile_does(tmp_path, padded_llama_dir, tiny_corpus,
                                                                         monkeypatch):
    """RAWTUNE_COMPILE_MODE=reduce-overhead: the same losses as torch.compile's default mode, with
    two micro-batches a step (a graph's gradient output is overwritten by the next replay unless
    autograd adds into buffers of the loop's own)."""
    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import apply

    def losses(name: str) -> tuple[list[float], list[str]]:
        lines: list[str] = []
        values = dict(out=str(tmp_path / name), dataset=str(tiny_corpus), model=str(padded_llama_dir), preset="quick",
                      seq_len=64, batch_size=2, grad_accum=2, gradient_checkpointing="off", max_steps=8,
                      learning_rate=3e-3, save_steps=100, backend="peft", logging_steps=1, stages=["data", "train"])
        run_pipeline(apply(RunSettings(), values), log=lines.append)
        return _losses(RunDir(tmp_path / name)), lines

    monkeypatch.delenv("RAWTUNE_COMPILE_MODE", raising=False)
    default, _ = losses("default")
    monkeypatch.setenv("RAWTUNE_COMPILE_MODE", "reduce-overhead")
    graphs, lines = losses("graphs")
    assert any("fast CUDA loop: micro-batch 2 x 2 accumulation, compiled as CUDA graphs" in line for line in lines)
    assert len(graphs) == len(default) == 8
    np.testing.assert_allclose(graphs, default, rtol=2e-3)
