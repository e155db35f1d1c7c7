"""Qwen3.5 mixture-of-experts sizes (35B-A3B and larger): refused before training.

llama.cpp runs them (``qwen35moe``), but rawtune's GGUF writer does not write their expert
tensors (256 routed experts and a shared expert per layer, merged into llama.cpp's stacked
layout), and their size puts them past the cards rawtune plans for. A run is refused before any
training time is spent, with the dense sizes named instead.
"""

from __future__ import annotations

from typing import Optional

from .base import Config, Family

REFUSAL = ("Qwen3.5 mixture-of-experts models (35B-A3B and larger, Qwen3_5Moe*) are not supported by rawtune: "
           "its GGUF writer does not write their experts in llama.cpp's qwen35moe layout; use a dense Qwen3.5 "
           "(Qwen/Qwen3.5-0.8B to 27B)")


def refuse(config: Config, vocab: frozenset) -> Optional[str]:
    """Every checkpoint of the family: see :data:`REFUSAL`."""
    return REFUSAL


FAMILY = Family(
    name="qwen35moe",
    label="Qwen3.5 (MoE)",
    hf_architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    order=46,
    tokenizer="byte-level BPE (Qwen3.5 split)",
    refuse=refuse,
    notes="refused before training: expert tensors not written by rawtune's GGUF writer",
)
