"""FP8 frozen base weights (``RAWTUNE_FP8=1``, :mod:`rawtune.train.fp8`).

On the CPU the FP8 matmul runs as its reference (the e4m3 values dequantized): these tests check
the quantization, the per-channel/per-row scales, the autograd Function's forward and input
gradient against fp32 within FP8's error, the fast model's loss and LoRA gradients with FP8 base
weights, and that a CPU run falls back to bf16 with one log line. The ``gpu`` tests compare the
real ``torch._scaled_mm`` path with bf16 and train a tiny llama through the pipeline with FP8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rawtune.train import fast_loop, fp8
from rawtune.train.fast_model import BASE_WEIGHTS

E4M3_REL = 2.0 ** -4  # half a unit in the last place of e4m3's 3-bit mantissa


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_weight_quantization_is_per_output_channel_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    w8, sw = fp8.quantize_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (48, 32) and w8.is_contiguous()
    assert sw.shape == (48,) and sw.dtype == torch.float32
    back = fp8.dequantize(w8, sw)
    # each row's largest value maps to 448, so the error is relative to each value, not to the tensor
    bound = w.abs() * E4M3_REL + sw[:, None] * 2.0 ** -9  # (subnormal spacing near zero)
    assert bool(((back - w).abs() <= bound * 1.0001).all())
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((48,), 448.0))
    assert 0 < _rel(back, w) < 0.05


def test_rows_get_their_own_scale():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [1000.0, 3.0, -250.0, 7.0]])
    x8, sx = fp8.quantize_rows(x)
    assert sx.shape == (2, 1)
    assert torch.allclose(sx[:, 0], torch.tensor([4.0, 1000.0]) / 448.0)
    assert torch.allclose(x8.float() * sx, x, rtol=E4M3_REL)


def test_fp8_linear_forward_and_input_gradient_match_fp32_within_fp8_error():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=gen) * 0.05
    x = torch.randn(3, 10, 64, generator=gen, requires_grad=True)
    dy = torch.randn(3, 10, 96, generator=gen)
    w8, sw = fp8.quantize_weight(w)
    y = fp8.linear(x, w8, sw)
    assert y.shape == (3, 10, 96) and y.dtype == x.dtype
    y.backward(dy)
    ref_x = x.detach().clone().requires_grad_(True)
    (ref_x @ w.t()).backward(dy)
    # a few per cent: e4m3 rounds x (or dY) and W to 3 mantissa bits; the sums average it down
    assert 1e-4 < _rel(y.detach(), ref_x.detach() @ w.t()) < 0.05
    assert x.grad.shape == x.shape
    assert 1e-4 < _rel(x.grad, ref_x.grad) < 0.05
    # the input gradient uses the same w8: exactly (dY*sw quantized per row) @ w8, dequantized
    g8, sg = fp8.quantize_rows(dy.reshape(-1, 96) * sw[None, :])
    expect = (g8.float() * sg) @ w8.float()
    assert torch.allclose(x.grad.reshape(-1, 64), expect, rtol=1e-5, atol=1e-6)


def test_the_scaled_mm_kernel_takes_the_layouts_and_scales_given(monkeypatch):
    """PyTorch's CPU _scaled_mm with the same operands the CUDA kernel gets: row-major x8 and dY8,
    column-major w8 (forward) and w8 seen transposed (input gradient), rowwise scales."""
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=torch.float8_e4m3fn), torch.zeros(16, 16, dtype=torch.float8_e4m3fn).t(),
                         scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this PyTorch has no CPU _scaled_mm with rowwise scales ({exc})")
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=gen) * 0.05
    x = torch.randn(2, 16, 64, generator=gen).bfloat16()
    dy = torch.randn(2, 16, 96, generator=gen).bfloat16()
    w8, sw = fp8.quantize_weight(w)
    results = {}
    for kernel in (False, True):
        monkeypatch.setattr(fp8, "CPU_KERNEL", kernel)
        xi = x.clone().requires_grad_(True)
        y = fp8.linear(xi, w8, sw)
        y.backward(dy)
        results[kernel] = (y.detach(), xi.grad)
    for ref, got in zip(results[False], results[True]):
        assert got.dtype == torch.bfloat16 and _rel(got, ref) < 0.01
    assert _rel(results[True][1], dy.float() @ w) < 0.05


def _tiny_peft(model_dir, r: int = 8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # B away from zero, so the LoRA gradients reach A as well
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _loss_and_grads(model, ids, use_fp8: bool) -> tuple:
    net = fast_loop.extract(model, torch.float32, fp8=use_fp8)
    fast = fast_loop.FastModel(net, compile=False)
    labels = fast_loop.shifted_labels(ids, len(ids))
    n = (labels >= 0).sum().float()
    for _, p in net.trainable:
        p.grad = None
    loss = fast.loss(ids, labels, n)
    loss.backward()
    return net, float(loss.detach()), {name: p.grad.clone() for name, p in net.trainable}


def test_fast_model_with_fp8_base_weights_matches_full_precision(tiny_llama_dir):
    model = _tiny_peft(tiny_llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    _, ref_loss, ref_grads = _loss_and_grads(model, ids, use_fp8=False)
    net, loss, grads = _loss_and_grads(model, ids, use_fp8=True)
    for tensors in net.layers:
        assert len(tensors) == 28
        for slot, i in enumerate(BASE_WEIGHTS):
            assert tensors[i].dtype == torch.float8_e4m3fn  # the tiny llama's dims are multiples of 16
            assert tensors[24 + slot].shape == (tensors[i].shape[0],)
        assert tensors[7].dtype == torch.float32  # LoRA A stays as it was
    assert abs(loss - ref_loss) / ref_loss < 0.01 and loss != ref_loss
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < 0.1, name


def test_odd_shaped_weights_stay_unquantized():
    from rawtune.train.fast_model import _fp8_layer

    t = [None] * 24
    t[1], t[3], t[5], t[6] = torch.randn(48, 32), torch.randn(32, 24), torch.randn(64, 32), torch.randn(32, 40)
    out = _fp8_layer(tuple(t))
    assert out[1].dtype == torch.float8_e4m3fn and out[24] is not None
    assert out[3].dtype == torch.float32 and out[25] is None  # 24 columns: not in 16s
    assert out[6].dtype == torch.float32 and out[27] is None


def test_training_with_fp8_base_lowers_the_loss_like_full_precision(tiny_llama_dir):
    """Adam steps on a repeated batch: the FP8 run's losses follow the fp32 run's."""
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(3))
    curves = {}
    for use_fp8 in (False, True):
        model = _tiny_peft(tiny_llama_dir)
        net = fast_loop.extract(model, torch.float32, fp8=use_fp8)
        fast = fast_loop.FastModel(net, compile=False)
        opt = torch.optim.AdamW([p for _, p in net.trainable], lr=1e-2)
        labels = fast_loop.shifted_labels(ids, len(ids))
        n = (labels >= 0).sum().float()
        losses = []
        for _ in range(12):
            opt.zero_grad()
            loss = fast.loss(ids, labels, n)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        curves[use_fp8] = np.array(losses)
    full, low = curves[False], curves[True]
    assert low[-1] < low[0] - 0.5 and full[-1] < full[0] - 0.5
    assert np.abs(low - full).max() / full[0] < 0.02


def test_fp8_is_refused_without_an_fp8_card_with_one_log_line(monkeypatch):
    lines = []
    monkeypatch.setenv("RAWTUNE_FP8", "1")
    assert fast_loop.fp8_base(torch.device("cpu"), False, lines.append) is False
    assert len(lines) == 1 and "RAWTUNE_FP8=1 not used" in lines[0] and "bf16" in lines[0]
    monkeypatch.setenv("RAWTUNE_FP8", "0")
    assert fast_loop.fp8_base(torch.device("cpu"), False, lines.append) is False and len(lines) == 1


def test_a_cpu_run_asked_for_fp8_trains_in_bf16_and_says_so_once(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import RunSettings, apply

    monkeypatch.setenv("RAWTUNE_FP8", "1")
    lines = []
    values = dict(out=str(tmp_path / "r"), dataset=str(tiny_corpus), model=str(tiny_llama_dir), preset="quick",
                  seq_len=32, batch_size=2, max_steps=2, save_steps=100, stages=["data", "train"])
    run_pipeline(apply(RunSettings(), values), log=lines.append)
    said = [line for line in lines if "RAWTUNE_FP8" in line]
    assert len(said) == 1 and "not used" in said[0]
    assert RunDir(tmp_path / "r").load()["train"]["steps"] == 2


# ---------------------------------------------------------------- on an FP8 card


def _fp8_card() -> None:
    if not torch.cuda.is_available() or fp8.why_not(torch.device("cuda")):
        pytest.skip("needs a CUDA card with FP8 (compute capability 8.9+)")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048, 3072), (4096, 8192, 2048), (2048, 576, 960)])
def test_scaled_mm_path_matches_bf16_and_the_reference(shape):
    _fp8_card()
    m, k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    dy = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    w8, sw = fp8.quantize_weight(w)
    y = fp8.linear(x, w8, sw)
    y.backward(dy)
    ref = x.detach().float() @ w.float().t()
    assert y.dtype == torch.bfloat16 and 1e-4 < _rel(y, ref) < 0.05
    assert 1e-4 < _rel(x.grad, dy.float() @ w.float()) < 0.05
    # the real kernel computes what the dequantized reference does (up to fp32/bf16 sums)
    x8, sx = fp8.quantize_rows(x.detach())
    emulated = (x8.float() * sx) @ fp8.dequantize(w8, sw).t()
    assert _rel(y, emulated) < 0.01


@pytest.mark.gpu
def test_fast_loop_trains_with_fp8_base_like_bf16(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    _fp8_card()
    from rawtune.pipeline import run_pipeline
    from rawtune.rundir import RunDir
    from rawtune.settings import RunSettings, apply

    def run(name: str, flag: str) -> tuple:
        monkeypatch.setenv("RAWTUNE_FP8", flag)
        lines = []
        values = dict(out=str(tmp_path / name), dataset=str(tiny_corpus), model=str(tiny_llama_dir),
                      preset="quick", seq_len=64, batch_size=2, max_steps=30, learning_rate=3e-3, save_steps=100,
                      train_embeddings=True, stages=["data", "train", "eval"], backend="peft")
        run_pipeline(apply(RunSettings(), values), log=lines.append)
        record = RunDir(tmp_path / name).load()
        losses = [e["loss"] for e in record["train"]["history"] if e["type"] == "step"]
        return np.array(losses), record["metrics"]["ppl_tuned"], lines

    bf16, ppl_bf16, _ = run("bf16", "0")
    low, ppl_fp8, lines = run("fp8", "1")
    assert any("frozen base weights in FP8" in line for line in lines), \
        "\n".join(line for line in lines if line.startswith("[train]"))[:3000]
    assert len(low) == 30 and low[-3:].mean() < low[:3].mean() - 0.3
    assert abs(low[-5:].mean() - bf16[-5:].mean()) < 0.05 * bf16[-5:].mean()
    assert abs(ppl_fp8 - ppl_bf16) / ppl_bf16 < 0.03
