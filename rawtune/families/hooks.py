"""Hooks several families share: config checks, sliding-window hparams, RoPE factor tensors.

Each is a plain function with the signature its :class:`~rawtune.families.base.Gguf` field
names; families combine them in their own modules. ``gguf`` and numpy are imported inside.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from ..errors import ExportError
from .base import Config, Shape, read_shape, rope_settings


def no_sliding_window(config: Config, shape: Shape) -> None:
    """Qwen/OLMo 2/SmolLM3 checkpoints can switch on sliding attention, which their llama.cpp architecture lacks."""
    if config.get("use_sliding_window") and config.get("sliding_window"):
        raise ExportError("the model uses sliding-window attention (use_sliding_window true), which llama.cpp runs "
                          "as full attention for this architecture; set use_sliding_window false or export elsewhere")


def no_permute_partial(config: Config, shape: Shape) -> None:
    """Partial rotary embeddings cannot be permuted into llama.cpp's interleaved layout by rawtune."""
    if shape.rope_dim != shape.head_dim:
        raise ExportError("partial rotary embeddings in a llama-layout model are not supported by the GGUF writer")


def layer_types(config: Config, shape: Shape, default_every: int) -> list[str]:
    """Per-layer attention kinds: config.json's layer_types, or (older configs) its sliding-window
    pattern, every n-th layer global, as transformers derives them."""
    types = config.get("layer_types") or []
    if not types:
        every = int(config.get("sliding_window_pattern") or default_every)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(shape.n_layer)]
    if len(types) != shape.n_layer:
        raise ExportError(f"config.json lists {len(types)} layer_types for {shape.n_layer} layers; re-save the model")
    return types


def swa_pattern(writer: Any, config: Config, types: list[str]) -> None:
    """Sliding window size and which layers use it."""
    writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def sliding_rope_theta(config: Config) -> Optional[float]:
    """The RoPE base of sliding-window layers where it differs per layer type (Gemma 3)."""
    local = (config.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict) and "rope_theta" in local:
        return float(local["rope_theta"])
    return float(config["rope_local_base_freq"]) if "rope_local_base_freq" in config else None


def gemma_attention_scale(config: Config, shape: Shape, big_layers: int) -> None:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer count)."""
    scalar = float(config.get("query_pre_attn_scalar") or shape.head_dim)
    expected = shape.n_embd / shape.n_head if shape.n_layer == big_layers else shape.head_dim
    if not math.isclose(scalar, expected):
        raise ExportError(f"query_pre_attn_scalar is {scalar:g} but llama.cpp scales Gemma attention by "
                          f"1/sqrt({expected:g}); this checkpoint would run with different attention in llama.cpp")


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> Any:
    """Per-frequency scale factors of Llama 3.1's 'llama3' RoPE, stored as ``rope_freqs.weight``."""
    import numpy as np

    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_rope_tensors(config: Config, shape: Shape, rope_type: str) -> dict[str, Any]:
    """``rope_freqs.weight`` for Llama 3.1's 'llama3' RoPE scaling (an ``extra_tensors`` hook)."""
    if rope_type != "llama3":
        return {}
    return {"rope_freqs.weight": llama3_rope_factors(rope_settings(config), shape.head_dim)}


def longrope(config: Config) -> Optional[dict[str, Any]]:
    """LongRoPE settings (Phi-3.5 mini, Phi-4 mini: per-frequency factors, short and long context)."""
    rope = rope_settings(config)
    if str(rope.get("rope_type") or "").lower() not in ("longrope", "su"):
        return None
    orig = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings"))
    factor = float(rope.get("factor") or int(config["max_position_embeddings"]) / orig)
    # The same cos/sin scale transformers applies (its default when the config names none).
    attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
    return {"orig": orig, "attn_factor": float(attn), "long": rope["long_factor"], "short": rope["short_factor"]}


def longrope_tensors(config: Config, shape: Shape, rope_type: str) -> dict[str, Any]:
    """The long and short RoPE factor tensors of LongRoPE (an ``extra_tensors`` hook)."""
    import gguf
    import numpy as np

    settings = longrope(config) if rope_type in ("longrope", "su") else None
    if not settings:
        return {}
    out = {}
    for key, kind in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
        factors = np.asarray(settings[key], dtype=np.float32)
        if factors.shape != (shape.rope_dim // 2,):
            raise ExportError(f"rope {key}_factor has {factors.size} values; llama.cpp needs one per rotated "
                              f"pair ({shape.rope_dim // 2})")
        out[gguf.TENSOR_NAMES[kind] + ".weight"] = factors
    return out


def raise_if(reason: Optional[str]) -> None:
    """Export time: a family's refusal reason (None: nothing to refuse) as one ExportError."""
    if reason:
        raise ExportError(reason)


def refusals(why_not: Callable[[Config], Optional[str]]) -> tuple[Callable, Callable]:
    """A family's ``refuse`` (before training) and export ``check`` hooks from one function that
    names what llama.cpp cannot run (or returns None)."""
    def refuse(config: Config, vocab: frozenset) -> Optional[str]:
        return why_not(config)

    def check(config: Config, shape: Shape) -> None:
        raise_if(why_not(config))

    return refuse, check


def refuse_by_check(check: Callable[[Config, Shape], None]) -> Callable[[Config, frozenset], Optional[str]]:
    """A ``refuse`` hook that runs the family's export ``check`` before training: its message, or None."""
    def refuse(config: Config, vocab: frozenset) -> Optional[str]:
        try:
            check(config, read_shape(config))
        except ExportError as exc:
            return str(exc)
        return None

    return refuse
