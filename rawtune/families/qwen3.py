"""Qwen3 (dense): Qwen2's layer without biases, with RMSNorm over each head of q and k before RoPE.

llama.cpp's ``qwen3`` requires the q/k norms. Thinking: the generation prompt is the template's
default (the model may think), a final assistant turn gets the template's empty ``<think>``
block, and the Go template keeps earlier assistant turns as given where the Jinja template
strips their ``<think>`` parts.
"""

from __future__ import annotations

from .base import LLAMA_BLOCKS, Family, Gguf, KnownModel, Template, Training
from .hooks import no_sliding_window
from .llama import fast_loop_check

FAMILY = Family(
    name="qwen3",
    label="Qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    order=40,
    tokenizer="byte-level BPE",
    gguf=Gguf("QWEN3", check=no_sliding_window, blocks=LLAMA_BLOCKS + ("ATTN_Q_NORM", "ATTN_K_NORM")),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    template=Template(end_of_turn=("<|im_end|>",),
                      thinking="default generation prompt; a final assistant turn gets the empty `<think>` block; "
                               "earlier turns kept as given"),
    models=(
        KnownModel("Qwen/Qwen3-0.6B-Base", 0.6e9),
        KnownModel("Qwen/Qwen3-0.6B", 0.6e9, instruct=True),
        KnownModel("Qwen/Qwen3-1.7B-Base", 1.7e9),
        KnownModel("Qwen/Qwen3-1.7B", 1.7e9, instruct=True),
    ),
)
