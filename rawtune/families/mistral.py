"""Mistral 7B (v0.1-v0.3): Llama's layer, with a sliding window in v0.1.

llama.cpp runs it as ``llama`` (Q/K permuted per head like Llama). The fast loop computes it
when the sliding window is not shorter than the training blocks (then attention is the same).
"""

from __future__ import annotations

from typing import Optional

from .base import Config, Family, Gguf, Training
from .hooks import no_permute_partial
from .llama import fast_loop_check as llama_fast_loop_check


def fast_loop_check(config: Config, seq_len: int) -> Optional[str]:
    """Llama's checks, plus a sliding window shorter than the blocks (the fast loop attends to all of them)."""
    arch = config.get("model_type")
    if config.get("use_sliding_window"):
        return f"sliding-window attention ({arch})"
    if config.get("sliding_window") and config["sliding_window"] < seq_len:
        return f"a sliding window of {config['sliding_window']} tokens, shorter than --seq-len ({arch})"
    return llama_fast_loop_check(config, seq_len)


FAMILY = Family(
    name="mistral",
    label="Mistral",
    hf_architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    order=20,
    tokenizer="SentencePiece",
    gguf=Gguf("LLAMA", permute_qk=True, check=no_permute_partial),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
)
