"""Llama 2, Llama 3 / 3.1 / 3.2, SmolLM and SmolLM2: the reference decoder every other family is told apart from.

llama.cpp's ``llama`` runs RoPE on interleaved pairs, so Q and K rows are permuted per head
(HF checkpoints use the rotate-half layout); Llama 3.1's frequency-dependent RoPE scaling is
written as ``rope_freqs.weight``. LoRA goes on the seven projections of each layer (attention
and MLP), the recipe of the LoRA paper's follow-ups and of Unsloth's defaults. Tokenizers:
SentencePiece (Llama 2), byte-level BPE with Llama 3's split (Llama 3.x) or with digits split
first (SmolLM/SmolLM2, llama.cpp's "smollm").
"""

from __future__ import annotations

from typing import Optional

from .base import DIGIT_REGEX, GPT2_REGEX, Config, Dims, Family, Gguf, KnownModel, Template, Training
from .hooks import llama3_rope_tensors, no_permute_partial

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's "smollm" runs \p{N} then the GPT-2 regex: SmolLM/StarCoder's Digits(individual_digits=True) + ByteLevel.
PRE_TOKENIZERS = {(DIGIT_REGEX, GPT2_REGEX): "smollm", (LLAMA3_REGEX,): "llama-bpe"}


def fast_loop_check(config: Config, seq_len: int) -> Optional[str]:
    """The fast loop's layer has no sliding window and no attention biases for this family."""
    arch = config.get("model_type")
    if config.get("use_sliding_window"):
        return f"sliding-window attention ({arch})"
    if config.get("attention_bias"):
        return f"attention biases ({arch})"
    return None


FAMILY = Family(
    name="llama",
    label="Llama 2/3/3.1/3.2, SmolLM/SmolLM2",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    order=10,
    tokenizer="SentencePiece (Llama 2) or byte-level BPE",
    gguf=Gguf("LLAMA", permute_qk=True, check=no_permute_partial, rope_types=("default", "linear", "llama3"),
              extra_tensors=llama3_rope_tensors),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    template=Template(end_of_turn=("<|eot_id|>", "<|im_end|>")),  # Llama 3.x headers; SmolLM2-Instruct ChatML
    gated_owners=("meta-llama/",),
    models=(
        KnownModel("HuggingFaceTB/SmolLM2-135M", 135e6, dims=Dims(576, 1536, 30, 9, 3, 49152, True)),
        KnownModel("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6, instruct=True),
        KnownModel("HuggingFaceTB/SmolLM2-360M", 362e6, dims=Dims(960, 2560, 32, 15, 5, 49152, True)),
        KnownModel("HuggingFaceTB/SmolLM2-360M-Instruct", 362e6, instruct=True),
        KnownModel("HuggingFaceTB/SmolLM2-1.7B", 1.71e9, dims=Dims(2048, 8192, 24, 32, 32, 49152, True), listed=False),
        KnownModel("meta-llama/Llama-3.2-1B", 1.24e9, gated=True, dims=Dims(2048, 8192, 16, 32, 8, 128256, True)),
        KnownModel("meta-llama/Llama-3.2-1B-Instruct", 1.24e9, gated=True, instruct=True),
        KnownModel("meta-llama/Llama-3.2-3B", 3.21e9, gated=True, dims=Dims(3072, 8192, 28, 24, 8, 128256, True)),
        KnownModel("meta-llama/Llama-3.2-3B-Instruct", 3.21e9, gated=True, instruct=True),
        KnownModel("meta-llama/Llama-3.1-8B", 8.03e9, gated=True, dims=Dims(4096, 14336, 32, 32, 8, 128256, False),
                   listed=False),
    ),
)
