"""FP8 (e4m3) frozen base weights for the fast loop's LoRA'd projections (``RAWTUNE_FP8=1``).

A frozen weight W [out, in] is held as ``w8`` (float8_e4m3fn, row-major, 1 byte a value) and a
per-output-channel fp32 scale ``sw`` [out] with W ~= sw[:, None] * w8. Activations are quantized
per row on the fly. :func:`linear` is y = x @ W^T with the input gradient dX = dY @ W from the same
``w8``; W gets no gradient (it is frozen). LoRA's A/B, embeddings, norms and the optimizer stay as
they were.

Layouts for ``torch._scaled_mm(a, b, scale_a, scale_b)`` (a row-major, b column-major; rowwise
scales: ``scale_a`` [M, 1] and ``scale_b`` [1, N], fp32, bf16 output):

- forward: a = x8 [M, in], b = w8.t() [in, out] (column-major because w8 is row-major),
  scale_a = sx [M, 1], scale_b = sw [1, out];
- input gradient: the weight scale sits on the reduction dimension (out), where rowwise scaling
  has none, so it is folded into dY first: dY @ W = (dY * sw) @ w8. a = (dY * sw) quantized per
  row [M, out] with its scale [M, 1], b = w8 [out, in] column-major, which is the row-major copy
  ``w8.t().contiguous()`` seen transposed (made in the backward, so the weight is held once),
  scale_b = ones [1, in].

On a CPU (the tests) the same quantized values are dequantized and multiplied in fp32: the
reference path, with FP8's rounding error but not its kernel; ``CPU_KERNEL`` runs PyTorch's CPU
``_scaled_mm`` instead, with the operands laid out as for the CUDA kernel.
"""

from __future__ import annotations

from typing import Any, Optional

E4M3_MAX = 448.0
# PyTorch's CPU build has a _scaled_mm too; the tests switch it on to check the layouts and scales
# the CUDA kernel is given (the fast loop never trains FP8 on a CPU)
CPU_KERNEL = False
MIN_CAPABILITY = (8, 9)  # Ada (L4, L40S), Hopper (H100, H200), Blackwell


def will_run(device: Any) -> bool:
    """Whether the fast loop will hold its frozen base weights in FP8 here: asked (RAWTUNE_FP8=1)
    and possible on ``device``. The memory plan and the loop's choice ask this."""
    from .. import env

    return env.get("RAWTUNE_FP8") == "1" and why_not(device) is None


def why_not(device: Any) -> Optional[str]:
    """Why FP8 base weights cannot run on ``device`` (None when they can)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return "FP8 needs a CUDA card"
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}) has no FP8 "
                f"tensor cores (8.9 or newer: L4, L40S, H100, H200, Blackwell)")
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this PyTorch ({torch.__version__}) has no FP8 matmul"
    return None


def _quantize(x: Any, dim: int) -> tuple:
    """(x8, scale) with x ~= scale * x8, one fp32 scale per slice along ``dim`` (amax -> 448)."""
    import torch

    amax = x.abs().amax(dim=dim, keepdim=True).float()
    scale = torch.clamp(amax, min=1e-12) / E4M3_MAX
    x8 = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8.contiguous(), scale.contiguous()  # (_scaled_mm wants a row-major first operand)


def quantize_weight(w: Any) -> tuple:
    """(w8 [out, in] float8_e4m3fn row-major, sw [out] fp32): one scale per output channel."""
    w8, scale = _quantize(w.detach(), dim=1)
    return w8.contiguous(), scale.reshape(-1).contiguous()


def quantize_rows(x: Any) -> tuple:
    """(x8 [M, K], sx [M, 1] fp32) for a 2-D activation: one scale per row."""
    return _quantize(x, dim=1)


def dequantize(w8: Any, sw: Any) -> Any:
    """The fp32 weight a (w8, sw) pair stands for."""
    return w8.float() * sw.reshape(-1, 1)


def _matmul(a8: Any, sa: Any, b8_t: Any, sb: Any, out_dtype: Any) -> Any:
    """(sa * a8) @ (b8_t * sb) with a8 [M, K] row-major, b8_t [K, N] column-major, sa [M, 1], sb [1, N]."""
    import torch

    if a8.is_cuda or CPU_KERNEL:
        return torch._scaled_mm(a8, b8_t, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return ((a8.float() * sa) @ (b8_t.float() * sb)).to(out_dtype)


def function() -> Any:
    """The autograd Function: ``apply(x, w8, sw)`` is y = x @ W^T, with dX from the same w8."""
    import torch

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w8, sw):
            shape = x.shape
            x8, sx = quantize_rows(x.reshape(-1, shape[-1]))
            y = _matmul(x8, sx, w8.t(), sw.reshape(1, -1), x.dtype)
            ctx.save_for_backward(w8, sw)
            ctx.shape = shape
            return y.reshape(*shape[:-1], w8.shape[0])

        @staticmethod
        def backward(ctx, dy):
            w8, sw = ctx.saved_tensors
            g8, sg = quantize_rows(dy.reshape(-1, dy.shape[-1]).float() * sw.reshape(1, -1))
            ones = torch.ones(1, w8.shape[1], device=dy.device, dtype=torch.float32)
            dx = _matmul(g8, sg, w8.t().contiguous().t(), ones, dy.dtype)
            return dx.reshape(ctx.shape), None, None

    return _Fn


_FN: list = []


def linear(x: Any, w8: Any, sw: Any) -> Any:
    """y = x @ W^T for W ~= sw[:, None] * w8, differentiable in x (W is frozen)."""
    if not _FN:
        _FN.append(function())
    return _FN[0].apply(x, w8, sw)
