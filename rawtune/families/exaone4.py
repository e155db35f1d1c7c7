"""EXAONE 4: RMSNorm after attention and MLP (OLMo 2's layer), RMSNorm over each head of q and k,
Llama 3.1's frequency-dependent RoPE scaling, and in the 32B a hybrid of three sliding-window
layers to one global layer whose attention has no RoPE at all.

The 1.2B has no sliding window (``sliding_window`` null: every layer global, every layer with
RoPE). The 32B has 64 layers, ``sliding_window`` 4096 and the pattern "LLLG".

The vendored llama.cpp's ``exaone4`` switches its sliding-window mode on by layer count alone:
with 64 layers it runs the sliding layers in the file's window with RoPE and the other layers
global without RoPE; with any other count it runs every layer global with RoPE. A checkpoint
whose sliding window does not fit that rule (a hybrid of another depth, a 64-layer model
without a window, a window with every layer global) would run differently there, and is refused
before training.

Tokenizer: byte-level BPE with the GPT-2 split (llama.cpp's "exaone4" pre-tokenizer is its GPT-2
one). LoRA targets: the standard attention and MLP projections (the layer has no other kind).
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import ExportError
from .base import Config, Dims, Family, Gguf, KnownModel, Shape, Template
from .hooks import llama3_rope_tensors, raise_if, refuse_by_check, swa_pattern
from .olmo3 import LLAMA_CPP

# llama.cpp's exaone4 runs the hybrid (sliding-window) graph for this layer count only.
HYBRID_LAYERS = 64


def _types(config: Config, n_layer: int) -> list[str]:
    """Per-layer attention kinds as transformers derives them ("LLLG" strings and every-n integers included)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    if config.get("sliding_window") is None:
        return ["full_attention"] * n_layer
    pattern = config.get("sliding_window_pattern") or 4
    if isinstance(pattern, str):
        return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(n_layer)]
    return ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layer)]


def why_not(config: Config) -> Optional[str]:
    """Why llama.cpp's exaone4 would run this checkpoint differently from transformers, or None."""
    n_layer = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    sliding = "sliding_attention" in _types(config, n_layer)
    if n_layer == HYBRID_LAYERS:
        if window is None or not sliding:
            return (f"EXAONE 4 with {n_layer} layers and no sliding-window layers: {LLAMA_CPP} runs every "
                    f"{HYBRID_LAYERS}-layer EXAONE 4 as the 32B's sliding-window hybrid")
        return None
    if window is not None and sliding:
        return (f"EXAONE 4 with sliding-window layers and {n_layer} layers: {LLAMA_CPP} runs the sliding/global "
                f"hybrid only for {HYBRID_LAYERS} layers (the 32B) and would run this one all global")
    if window is not None:
        return (f"EXAONE 4 with a sliding_window but every layer global: transformers leaves RoPE out of global "
                f"layers then, {LLAMA_CPP} does not (set sliding_window null in config.json if that is intended)")
    return None


def check(config: Config, shape: Shape) -> None:
    """Export: the same layout rule, and one RoPE setting for every layer that rotates."""
    raise_if(why_not(config))
    if shape.rope_dim != shape.head_dim:
        raise ExportError(f"EXAONE 4 with partial rotary embeddings: {LLAMA_CPP}'s exaone4 rotates whole heads")


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Sliding window and pattern for the hybrid; nothing else beyond the common keys."""
    types = _types(config, shape.n_layer)
    if config.get("sliding_window") is not None and "sliding_attention" in types:
        swa_pattern(writer, config, types)



refuse = refuse_by_check(check)  # the export check, run before training

FAMILY = Family(
    name="exaone4",
    label="EXAONE 4",
    hf_architectures=("Exaone4ForCausalLM",),
    model_types=("exaone4",),
    order=110,
    tokenizer="byte-level BPE (GPT-2 split)",
    gguf=Gguf("EXAONE4", hparams=hparams, check=check, rope_types=("default", "linear", "llama3"),
              extra_tensors=llama3_rope_tensors,
              blocks=("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM",
                      "FFN_GATE", "FFN_UP", "FFN_DOWN", "FFN_POST_NORM")),
    template=Template(end_of_turn=("[|endofturn|]",),
                      thinking="generation prompt with the empty <think> block (non-reasoning mode)"),
    refuse=refuse,
    models=(
        # Parameter counts from the configs (1.2B: tied 102400-token embedding counted once).
        KnownModel("LGAI-EXAONE/EXAONE-4.0-1.2B", 1.28e9, instruct=True,
                   dims=Dims(2048, 4096, 30, 32, 8, 102400, True)),
        KnownModel("LGAI-EXAONE/EXAONE-4.0-32B", 32.0e9, instruct=True,
                   dims=Dims(5120, 27392, 64, 40, 8, 102400, False), listed=False),
    ),
    notes=f"sliding-window hybrid only with {HYBRID_LAYERS} layers (the 32B), as llama.cpp's exaone4 runs it",
)
