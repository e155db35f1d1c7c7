"""Gemma 3, text models (270M, 1B): Gemma 2's layer with q/k norms, no attention soft-cap, 5 sliding : 1 global.

llama.cpp's ``gemma3`` reads the sliding layers' own RoPE base; it does not apply attention
soft-capping, bidirectional attention (the embedding models) or scaled RoPE on global layers
(the 4B+ multimodal models): those checkpoints are refused. Norm weights are written + 1.
The chat template folds a system message into the first user turn.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from .base import LLAMA_BLOCKS, Config, Family, Gguf, KnownModel, Shape, Template, rope_settings
from .hooks import gemma_attention_scale, layer_types, sliding_rope_theta, swa_pattern


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Sliding window, pattern (every 6th layer global), the sliding layers' RoPE base, the final soft-cap."""
    types = layer_types(config, shape, default_every=6)
    if config.get("sliding_window") and "sliding_attention" in types:
        swa_pattern(writer, config, types)
        local = sliding_rope_theta(config)
        if local is not None:
            writer.add_rope_freq_base_swa(local)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def check(config: Config, shape: Shape) -> None:
    """What llama.cpp's gemma3 cannot express."""
    gemma_attention_scale(config, shape, big_layers=62)
    if config.get("attn_logit_softcapping"):
        raise ExportError("Gemma 3 with attention soft-capping: llama.cpp's gemma3 does not apply it")
    if config.get("use_bidirectional_attention"):
        raise ExportError("bidirectional Gemma 3 (an embedding model) is not a causal LM; GGUF export covers causal LMs")
    if str(rope_settings(config).get("rope_type") or "default") != "default":
        raise ExportError("Gemma 3 with scaled RoPE on its global layers (the 4B+ multimodal models) is not "
                          "supported by rawtune's GGUF writer; supported: the text models without scaling (270M, 1B)")


FAMILY = Family(
    name="gemma3",
    label="Gemma 3 (text)",
    hf_architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    order=60,
    tokenizer="SentencePiece (Gemma)",
    gguf=Gguf("GEMMA3", norm_offset=1.0, hparams=hparams, check=check,
              blocks=LLAMA_BLOCKS + ("ATTN_POST_NORM", "FFN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM")),
    template=Template(end_of_turn=("<end_of_turn>",), system="folded into the first user turn"),
    gated_owners=("google/gemma-",),
    models=(
        KnownModel("google/gemma-3-270m", 268e6, gated=True),
        KnownModel("google/gemma-3-270m-it", 268e6, gated=True, instruct=True),
        KnownModel("google/gemma-3-1b-pt", 1.0e9, gated=True),
        KnownModel("google/gemma-3-1b-it", 1.0e9, gated=True, instruct=True),
    ),
    notes="text models without RoPE scaling (270M, 1B)",
)
