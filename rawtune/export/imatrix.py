"""Importance-matrix quantization: weight each weight column by how much the user's text uses it.

Two halves:

- :func:`compute` runs the merged model forward and backward on a few training blocks and records,
  for every linear layer of every transformer block, a per-input-column importance keyed by the GGUF
  tensor name rawtune's writer gives that weight: the mean of x² over the tokens, each token weighted
  by how much the loss reacts to that layer's output there (the squared norm of the loss gradient
  with respect to the output). That is the diagonal Fisher estimate of a weight's cost,
  Σ_t g_ti² x_tj², summed over the rows i, since ggml takes one weight per column. llama.cpp's own
  imatrix tool weights every token alike (plain mean of x²). On the quick-start run this cut
  Q4_K_M's perplexity increase over the merged model to 0.73 × the unweighted default
  (plain mean of x²: 0.81 ×), on the same held-out tokens. The writer permutes the *rows* of Q and K
  for RoPE; their input columns stay where they were, so the matrix applies unchanged.
  The same pass records, per weight, the gradient-weighted second moment of its input,
  H = Σ_t w_t x_t x_tᵀ / Σ_t w_t (its diagonal is the importance above), where it fits
  :data:`HESSIAN_BUDGET_BYTES`.
- :func:`requantize` rewrites the tensors of a file that llama.cpp's ``llama_model_quantize`` has
  just written, one tensor at a time through ``ggml_quantize_chunk`` (llama-cpp-python's
  ``libggml-base``), from the float16 values of the F16 GGUF, with the same GGML type llama.cpp
  chose for that tensor. Without an importance matrix this reproduces llama.cpp's bytes exactly;
  with one, ggml searches each block's scales weighted by the importance of each column.
  (``llama_model_quantize_params.imatrix`` is a C++ map that ctypes cannot build, hence this route.)
- :func:`compensated` does more where a weight has its H: ggml quantizes one block-wide group of
  columns at a time, and the rounding error of each group is moved onto the columns not yet
  quantized, in the proportion that keeps the layer's output on the calibration tokens closest
  (the GPTQ update, here with ggml's block quantizer inside). On held-out text Q4_K_M's perplexity
  increase over the merged model fell to 0.30 x llama.cpp's plain file on Linux man pages, where the
  importance matrix alone reached 0.92 x (docs/benchmarks.md).

A tensor with no entry is quantized without weights: never with a matrix of ones, because any
matrix switches ggml from plain rounding to a weighted search, and all ones measured worse.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .statistics import HESSIAN_MAX_COLUMNS, Stats
from ..errors import ExportError

# Types stored as plain floats: llama.cpp copied them, there is nothing to re-quantize.
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# Types whose ggml rounding ignores the importance: only error compensation (an H matrix) changes them.
IMPORTANCE_IGNORED = {"Q8_0"}


@dataclass
class Imatrix:
    """Mean x² per input column for each GGUF weight name, and where it came from."""

    values: dict[str, np.ndarray]
    blocks: int
    tokens: int
    source: str
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    hessians: dict[str, np.ndarray] = field(default_factory=dict)  # gradient-weighted E[x xᵀ] per weight

    def summary(self) -> dict[str, Any]:
        """What run.json records (no values)."""
        return {"blocks": self.blocks, "tokens": self.tokens, "source": self.source,
                "entries": len(self.values), "hessians": len(self.hessians), "seconds": round(self.seconds, 2)}


def pick_blocks(blocks: np.ndarray, n: int, with_rest: bool = False) -> Any:
    """``n`` blocks spread evenly over the training blocks (the first ones are often one document).

    ``with_rest``: also return the blocks not picked (export checks the matrix on some of them).
    """
    if n <= 0 or not len(blocks):
        index = np.arange(0)
    elif n >= len(blocks):
        index = np.arange(len(blocks))
    else:
        index = np.unique(np.linspace(0, len(blocks) - 1, n).round().astype(int))
    if not with_rest:
        return blocks[index]
    rest = np.setdiff1d(np.arange(len(blocks)), index)
    return blocks[index], blocks[rest]


def _gguf_names(model: Any, config: dict[str, Any]) -> dict[str, str]:
    """HF module name -> the GGUF tensor its statistics are recorded under, for every linear layer
    inside the transformer blocks."""
    return {name: outs[0].name for name, outs in _gguf_outputs(model, config).items()}


def _gguf_outputs(model: Any, config: dict[str, Any]) -> dict[str, list]:
    """HF module name -> the GGUF tensors its weight becomes (TensorOuts: a name, and any column order
    the family's tensors hook gives it; several where the family splits one weight, like Granite
    4.0-H's fused gate/up, whose parts read the same input), for every linear layer in the blocks."""
    import gguf
    import torch

    from ..families.base import TensorOut, read_shape
    from .gguf_writer import family_of

    spec = family_of(config)[1].gguf
    tensor_map = gguf.get_tensor_name_map(spec.model_arch, int(config["num_hidden_layers"]))
    shape = read_shape(config)
    outs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            made = spec.tensors(name + ".weight", tuple(module.weight.shape), config, shape) if spec.tensors else None
            if not made:
                gguf_name = tensor_map.get_name(name + ".weight", try_suffixes=(".weight",))
                if gguf_name is None:
                    raise ExportError(f"no GGUF name for {name}.weight; the importance matrix cannot be mapped "
                                      f"(pass --imatrix-blocks 0 to export without one)")
                made = [TensorOut(gguf_name, tuple(module.weight.shape))]
            outs[name] = list(made)
    return outs


def _as_written(values: dict[str, Any], hessians: dict[str, Any], outs: dict[str, list]) -> tuple[dict, dict]:
    """The statistics keyed by every GGUF tensor they serve: copied to the tensors that share a split
    weight's input, and in each tensor's column order where the family's conversion moved columns
    (Qwen3.5's linear-attention out_proj: value heads tiled)."""
    by_value, by_hessian = {}, {}
    for tensors in outs.values():
        first = tensors[0].name
        for out in tensors:
            order = None if out.columns is None else np.asarray(out.columns)
            if first in values:
                by_value[out.name] = values[first] if order is None else values[first][order]
            if first in hessians:
                by_hessian[out.name] = hessians[first] if order is None else hessians[first][np.ix_(order, order)]
    return by_value, by_hessian


# Calibration blocks per layer call in the layer-by-layer pass: only one layer's activations are held,
# so four 512-token blocks cost little memory, and the larger matrix products took the quick start's
# pass from 83.9 s to 71.7 s on 2 cores side by side in one process (72.9 s and 70.6 s in two runs of
# the README's command: this machine's noise is of that size). The sums only change order.
LAYER_BATCH = 4


def compute(model_dir: Path, blocks: np.ndarray, source: str, batch_size: int = LAYER_BATCH, model: Any = None,
            device: Any = "cpu", spill_dir: Optional[Path] = None) -> Imatrix:
    """Gradient-weighted mean x² per input column of every block linear of the model in ``model_dir``,
    and the H matrices, one layer at a time on ``device`` (:mod:`.layerwise`).

    ``model``: the merged model already loaded (export loads it once for this and its perplexity
    check, and frees it); else it is loaded from ``model_dir`` in fp32. ``model_dir`` gives the config.
    ``spill_dir``: H matrices past the RAM budget go to files there.
    """
    import torch

    from .gguf_writer import read_json
    from .layerwise import collect_layerwise
    from ..models import load_causal_lm

    started = time.time()
    if model is None:
        model = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    model = model.eval()
    try:
        outs = _gguf_outputs(model, read_json(Path(model_dir) / "config.json"))
        values, hessians = collect_layerwise(model, {name: t[0].name for name, t in outs.items()}, blocks, device,
                                             batch_size, spill_dir=spill_dir)
        values, hessians = _as_written(values, hessians, outs)
    finally:
        del model
    return Imatrix(values, int(len(blocks)), int(blocks.size), source, time.time() - started, hessians=hessians)


# The H matrices are kept in float32 while the pass runs and during export. Weights with more input
# columns than HESSIAN_MAX_COLUMNS get the importance (diagonal) only. The whole-model pass
# (:func:`collect`) records them only on an fp32 model and within HESSIAN_BUDGET_BYTES: it holds
# every layer's activations at once. Export uses the layer-by-layer pass (:mod:`.layerwise`), which
# records them at every size (those past its RAM budget go to files).
HESSIAN_BUDGET_BYTES = 2 * 2**30


def hessian_names(modules: dict[str, Any], names: dict[str, str]) -> set[str]:
    """The GGUF names whose H is recorded: in model order, while the float32 matrices fit the budget."""
    import torch

    if any(p.dtype != torch.float32 for p in modules[""].parameters()):
        return set()
    chosen, total = set(), 0
    for module_name, key in names.items():
        cols = int(modules[module_name].in_features)
        if cols <= HESSIAN_MAX_COLUMNS and total + cols * cols * 4 <= HESSIAN_BUDGET_BYTES:
            chosen.add(key)
            total += cols * cols * 4
    return chosen


def collect(model: Any, names: dict[str, str], blocks: np.ndarray, batch_size: int = 1) -> tuple[dict, dict]:
    """Run ``blocks`` forward and backward through ``model`` (weights frozen); return the importances
    and the H matrices (:func:`hessian_names`), each keyed by GGUF name.

    The whole-model pass: export now uses :func:`rawtune.export.layerwise.collect_layerwise`, which
    gives the same numbers one layer at a time; this one stays as the reference it is tested against.

    Only the input embeddings carry a gradient into the network: no weight gradient is allocated.
    One block at a time by default: the backward pass keeps every layer's activations, and four
    512-token blocks of the 135M quick start took 6.6 GB against 2.2 GB for one, for the same
    matrix bit for bit.
    """
    import torch

    modules = dict(model.named_modules())
    stats = Stats(hessian_names(modules, names))
    handles = [modules[n].register_forward_hook(stats.hook(key)) for n, key in names.items()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in frozen:
        param.requires_grad_(False)
    embed = model.get_input_embeddings()
    try:
        for start in range(0, len(blocks), batch_size):
            ids = torch.as_tensor(np.asarray(blocks[start:start + batch_size], dtype=np.int64))
            inputs = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, labels=ids).loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in frozen:
            param.requires_grad_(flag)
    return stats.values(), stats.hessians()


# ---------------------------------------------------------------- ggml through ctypes


def _ggml() -> ctypes.CDLL:
    """llama-cpp-python's ggml base library with the functions used here typed."""
    from .llama import llama_cpp

    lib_dir = Path(llama_cpp().__file__).parent / "lib"
    found = sorted(p for p in lib_dir.glob("*ggml-base*") if p.suffix in (".so", ".dylib", ".dll"))
    if not found:
        raise ExportError(f"llama-cpp-python has no ggml-base library in {lib_dir.name}/; reinstall it "
                          f"(pip install --force-reinstall llama-cpp-python==0.3.36) or pass --imatrix-blocks 0")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    from gguf import GGMLQuantizationType

    for kind in GGMLQuantizationType:  # dequantize_row_<type>(blocks, floats, element count), where built
        function = getattr(lib, _dequantize_name(int(kind)), None)
        if function is not None:
            function.restype = None
            function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def dequantize_blocks(lib: ctypes.CDLL, blob: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """float32 values ``shape`` of ggml-quantized bytes ``blob``, by ggml's own ``dequantize_row_*``
    (gguf-py's numpy version took a quarter of the compensated rounding's time: ~5,000 calls on the
    quick start). Falls back to gguf-py where the library lacks the type's function."""
    name = _dequantize_name(ggml_type)
    function = getattr(lib, name, None)
    if function is None:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(np.asarray(blob, dtype=np.uint8), GGMLQuantizationType(ggml_type)).reshape(shape)
    data = np.ascontiguousarray(blob, dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    function(data.ctypes.data, out.ctypes.data, out.size)  # rows of whole blocks, back to back
    return out


def _dequantize_name(ggml_type: int) -> str:
    """ggml's function name for a type: ``dequantize_row_q4_K`` for Q4_K, ``..._iq4_xs`` for IQ4_XS."""
    from gguf import GGMLQuantizationType

    name = GGMLQuantizationType(ggml_type).name.lower()
    return "dequantize_row_" + (name[:-1] + "K" if name.endswith("_k") else name)


def quantize_tensor(lib: ctypes.CDLL, values: np.ndarray, ggml_type: int,
                    importance: Optional[np.ndarray], threads: int = 1) -> bytes:
    """Quantize a 2-D float32 ``[rows, cols]`` array to ``ggml_type`` (rows split over threads)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = values.shape
    row_size = lib.ggml_row_size(ggml_type, cols)
    out = np.empty(rows * row_size, dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if weights is not None and weights.shape != (cols,):
        raise ExportError(f"importance matrix of {weights.shape[0]} columns for a tensor of {cols}; "
                          f"this is a rawtune bug: export with --imatrix-blocks 0 meanwhile")
    w_ptr = None if weights is None else weights.ctypes.data
    step = max(1, -(-rows // max(1, threads)))

    def run(first: int) -> int:
        n = min(step, rows - first)
        # start counts elements; ggml writes the rows at dst + first * row_size itself.
        return lib.ggml_quantize_chunk(ggml_type, values.ctypes.data, out.ctypes.data,
                                       first * cols, n, cols, w_ptr)

    starts = list(range(0, rows, step))
    if len(starts) == 1:  # one chunk (the compensation's per-group calls): no pool to start
        written = run(0)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            written = sum(pool.map(run, starts))  # ctypes drops the GIL during each call
    if written != out.size:
        raise ExportError(f"ggml wrote {written} bytes for a tensor of {out.size}; export with --imatrix-blocks 0")
    return out.tobytes()


def requantize(f16_path: Path, quantized: Path, imatrix: Optional[Imatrix], threads: int = 1,
               only_weighted: bool = True, device: Any = None) -> tuple[int, int]:
    """Rewrite the quantized tensors of ``quantized`` (a llama.cpp output of ``f16_path``) in place.

    Each tensor keeps the type llama.cpp chose and its place in the file; its bytes come from
    ``ggml_quantize_chunk`` on the F16 values, weighted by the importance matrix where it has an
    entry, with the error compensation of :func:`compensated` where it also has an H matrix (its
    linear algebra on ``device`` when given, e.g. a GPU). ``only_weighted`` skips tensors without an
    entry (their bytes would not change). Tensors are made ``threads`` at a time, one thread each:
    ggml drops the GIL, and one 256-column group of a small model is too little work to split.
    Returns how many tensors were written, and how many of them with error compensation.
    """
    from .gguf_index import TensorEntry, read_index

    lib = _ggml()
    source = {t.name: t for t in read_index(f16_path)}
    values = imatrix.values if imatrix else {}
    hessians = imatrix.hessians if imatrix else {}
    def wanted(name: str, type_name: str) -> bool:
        """Float tensors are copies. With ``only_weighted`` a tensor is rewritten only where its
        bytes would change: it has an entry, and an H matrix too where ggml ignores the entry."""
        if type_name in FLOAT_TYPES:
            return False
        return not only_weighted or (name in values and (type_name not in IMPORTANCE_IGNORED or name in hessians))

    todo = [t for t in read_index(quantized) if wanted(t.name, t.type_name)]

    def make(target: TensorEntry) -> tuple[bytes, bool]:
        data = source[target.name].values(f16_path)
        h = hessians.get(target.name)
        if (h is not None and h.shape == (data.shape[1],) * 2
                and data.shape[1] % lib.ggml_blck_size(target.ggml_type) == 0):
            return compensated(lib, data, target.ggml_type, h, 1, device=device), True
        return quantize_tensor(lib, data, target.ggml_type, values.get(target.name), 1), False

    written = compensated_count = 0
    workers = max(1, threads)
    # A few tensors ahead at most: results wait in order, and a 7B file's would not fit in memory.
    chunks = [todo[i:i + 2 * workers] for i in range(0, len(todo), 2 * workers)]
    with open(quantized, "r+b") as handle, ThreadPoolExecutor(max_workers=workers) as pool:
        done = ((target, result) for chunk in chunks for target, result in zip(chunk, pool.map(make, chunk)))
        for target, (blob, was_compensated) in done:
            if len(blob) != target.n_bytes:
                raise ExportError(f"{target.name}: {len(blob)} bytes quantized, {target.n_bytes} in llama.cpp's "
                                  f"file; export with --imatrix-blocks 0")
            handle.seek(target.data_offset)
            handle.write(blob)
            written += 1
            compensated_count += was_compensated
    return written, compensated_count


def quantize_file(f16_path: Path, default_file: Path, dst: Path, imatrix: Imatrix,
                  threads: int = 1, device: Any = None) -> tuple[int, int]:
    """``dst``: llama.cpp's ``default_file`` with every tensor that has an entry re-quantized;
    (tensors written, of them compensated), as :func:`requantize` counts them."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(default_file, tmp)
    try:
        counts = requantize(f16_path, tmp, imatrix, threads, device=device)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return counts


# ---------------------------------------------------------------- error compensation (GPTQ)

# Added to H's diagonal, as a share of its mean, so that H is invertible (GPTQ's default).
DAMPING = 0.01


def compensated(lib: ctypes.CDLL, values: np.ndarray, ggml_type: int, h: np.ndarray, threads: int = 1,
                device: Any = None) -> bytes:
    """Quantize ``values`` ``[rows, cols]`` to ``ggml_type`` one block-wide group of columns at a
    time, moving each group's rounding error onto the columns still to come.

    With U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), the inverse of H over the columns from a
    group on is U's trailing block. Fixing group S at its quantized values Q_S then moves the
    remaining columns R by -(W_S - Q_S) U_SS⁻¹ U_SR, the least-squares best for the layer's output
    on the calibration tokens (GPTQ's update, per group instead of per column). ggml quantizes each
    group with its own block format, its scales searched under the diagonal of (U_SSᵀU_SS)⁻¹: the
    cost of each column's error once the later columns compensate it. The bytes of the groups, put
    side by side, are the rows' bytes, because every group is a whole number of blocks.

    ``device`` (a torch device, e.g. a GPU): the inverse, the Cholesky factor and the updates in
    torch there, in float64 as here; ggml still quantizes each group on the CPU.
    """
    if device is not None:
        return _compensated_torch(lib, values, ggml_type, h, threads, device)
    w = np.array(values, dtype=np.float64)
    rows, cols = w.shape
    width = int(lib.ggml_blck_size(ggml_type))
    import torch

    upper = damped_factor(torch.tensor(np.asarray(h), dtype=torch.float64), torch.from_numpy(w)).numpy()
    parts = []
    for start in range(0, cols, width):
        group = slice(start, start + width)
        u_inv = np.linalg.inv(upper[group, group])
        importance = np.einsum("ij,ij->i", u_inv, u_inv)  # diag((U_SSᵀU_SS)⁻¹) = diag(U_SS⁻¹ U_SS⁻ᵀ)
        blob = np.frombuffer(quantize_tensor(lib, w[:, group], ggml_type, importance, threads), dtype=np.uint8)
        blob = blob.reshape(rows, -1)
        if start + width < cols:
            error = w[:, group] - dequantize_blocks(lib, blob, ggml_type, (rows, width))
            w[:, start + width:] -= (error @ u_inv) @ upper[group, start + width:]
        parts.append(blob)
    return np.concatenate(parts, axis=1).tobytes()


def _compensated_torch(lib: ctypes.CDLL, values: np.ndarray, ggml_type: int, h: np.ndarray, threads: int,
                       device: Any) -> bytes:
    """:func:`compensated` with its linear algebra in torch on ``device``."""
    import torch

    _linalg_ready(device)
    w = torch.as_tensor(np.asarray(values), dtype=torch.float64, device=device).clone()
    rows, cols = w.shape
    width = int(lib.ggml_blck_size(ggml_type))
    upper = damped_factor(torch.tensor(np.asarray(h), dtype=torch.float64, device=device), w)
    parts = []
    for start in range(0, cols, width):
        end = start + width
        u_inv = torch.linalg.inv(upper[start:end, start:end])
        importance = (u_inv * u_inv).sum(1).cpu().numpy()
        group = w[:, start:end].cpu().numpy()
        blob = np.frombuffer(quantize_tensor(lib, group, ggml_type, importance, threads), dtype=np.uint8)
        blob = blob.reshape(rows, -1)
        if end < cols:
            error = torch.as_tensor(group - dequantize_blocks(lib, blob, ggml_type, (rows, width)), device=device)
            w[:, end:] -= (error @ u_inv) @ upper[start:end, end:]
        parts.append(blob)
    return np.concatenate(parts, axis=1).tobytes()


_LINALG_LOCK = threading.Lock()
_LINALG_READY: set = set()


def _linalg_ready(device: Any) -> None:
    """Run torch's linear algebra once on ``device`` under a lock before tensors are compensated in
    parallel threads: CUDA's solver library is loaded lazily on the first call, and two threads making
    that first call together fail with "lazy wrapper should be called at most once" (seen on an H100
    at 1B)."""
    import torch

    key = str(device)
    with _LINALG_LOCK:
        if key in _LINALG_READY:
            return
        h = torch.eye(2, dtype=torch.float64, device=device) * 2
        torch.linalg.inv(upper_inverse_factor(h))
        _LINALG_READY.add(key)


def damped_factor(h: Any, w: Any) -> Any:
    """U with UᵀU = (H + damping)⁻¹, for float64 torch tensors ``h`` (changed in place) and ``w``.
    Columns no calibration token reached get H's diagonal 1 and are zeroed in ``w``, so H stays
    invertible and their weights, which no input ever multiplies, cost nothing."""
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMPING * float(h.diagonal().mean()))
    return upper_inverse_factor(h)


def upper_inverse_factor(h: Any) -> Any:
    """The upper-triangular U with UᵀU = H⁻¹ (float64 torch tensor ``h``, symmetric positive definite).

    With P the reversal of rows and columns and L the Cholesky factor of PHP, U = P L⁻¹ P: one
    factorisation and one triangular solve (about 2n³/3 operations) instead of inverting H and then
    factoring the inverse (7n³/3): at 1536 columns (down_proj) 0.15 s against 0.42 s on 2 cores, the
    largest single cost of the compensated rounding before.
    """
    import torch

    lower = torch.linalg.cholesky(torch.flip(h, (0, 1)))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))
