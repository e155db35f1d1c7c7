"""Qwen2 and Qwen2.5: Llama's layer with biases on q, k and v, RoPE in the NEOX layout.

llama.cpp's ``qwen2`` requires the three biases and runs no sliding window (a checkpoint that
switches it on is refused). The fast loop computes the biases. Chat: ChatML (``<|im_end|>``).
"""

from __future__ import annotations

from typing import Optional

from .base import Config, Dims, Family, Gguf, KnownModel, Template, Training
from .hooks import no_sliding_window

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(QWEN2_REGEX,): "qwen2"}


def fast_loop_check(config: Config, seq_len: int) -> Optional[str]:
    """Qwen2's attention biases are part of the fast loop's layer; a sliding window is not."""
    if config.get("use_sliding_window"):
        return f"sliding-window attention ({config.get('model_type')})"
    return None


FAMILY = Family(
    name="qwen2",
    label="Qwen2/Qwen2.5",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    order=30,
    tokenizer="byte-level BPE",
    gguf=Gguf("QWEN2", bias=("ATTN_Q", "ATTN_K", "ATTN_V"), check=no_sliding_window),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    template=Template(end_of_turn=("<|im_end|>",)),
    models=(
        KnownModel("Qwen/Qwen2.5-0.5B", 494e6, dims=Dims(896, 4864, 24, 14, 2, 151936, True)),
        KnownModel("Qwen/Qwen2.5-0.5B-Instruct", 494e6, instruct=True),
        KnownModel("Qwen/Qwen2.5-1.5B", 1.54e9, dims=Dims(1536, 8960, 28, 12, 2, 151936, True), listed=False),
        KnownModel("Qwen/Qwen2.5-3B", 3.09e9, dims=Dims(2048, 11008, 36, 16, 2, 151936, True), listed=False),
        KnownModel("Qwen/Qwen2.5-7B", 7.62e9, dims=Dims(3584, 18944, 28, 28, 4, 152064, False), listed=False),
    ),
)
