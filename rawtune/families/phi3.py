"""Phi-3, Phi-3.5 mini and Phi-4 mini: fused qkv_proj and gate_up_proj, partial RoPE (Phi-4 mini), LongRoPE.

llama.cpp's ``phi3`` reads the fused matrices as they are, the LongRoPE long and short factors
as tensors and the original context as a key; it needs head_dim x heads = hidden size. A
Phi-3-architecture model whose vocabulary lacks ``<|end|>`` is not refused: llama.cpp 0.3.36
loads, scores and tokenizes such a model's GGUFs like any other (measured, SentencePiece and
o200k vocabularies: ``tests/test_families.py``). LoRA: the preset's split names select the
fused modules (LoRA on the fused matrix covers the same weights). Tokenizers: SentencePiece
(Phi-3, Phi-3.5), byte-level BPE with the o200k split (Phi-4 mini, llama.cpp's "gpt-4o").
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from .base import Config, Family, Gguf, KnownModel, Lora, Shape, Template
from .hooks import longrope, longrope_tensors

# o200k (GPT-4o; Phi-4 mini): case-aware letter runs, contractions attached, '/' kept after punctuation.
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(GPT4O_REGEX,): "gpt-4o"}
END_OF_TURN = "<|end|>"


def check(config: Config, shape: Shape) -> None:
    """llama.cpp's phi3 sizes attention from the hidden size."""
    if shape.head_dim * shape.n_head != shape.n_embd:
        raise ExportError("Phi-3 with head_dim * heads != hidden_size cannot be run by llama.cpp's phi3")


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """LongRoPE's original context and attention factor.

    llama.cpp picks the long factors when the context it runs with exceeds the original one;
    transformers picks them by sequence length: the same for prompts shorter than the context.
    """
    settings = longrope(config)
    if settings:
        writer.add_rope_scaling_orig_ctx_len(settings["orig"])
        writer.add_rope_scaling_attn_factors(settings["attn_factor"])


FAMILY = Family(
    name="phi3",
    label="Phi-3/Phi-3.5/Phi-4-mini",
    hf_architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    order=70,
    tokenizer="SentencePiece (Phi-3), byte-level BPE (Phi-4 mini, o200k)",
    gguf=Gguf("PHI3", check=check, hparams=hparams, rope_types=("default", "longrope", "su"),
              blocks=("ATTN_NORM", "ATTN_QKV", "ATTN_OUT", "FFN_NORM", "FFN_UP", "FFN_DOWN"),
              extra_tensors=longrope_tensors),
    lora=Lora(kinds={"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
              fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
              why="the fused matrices hold the same weights as the split projections"),
    template=Template(end_of_turn=(END_OF_TURN,)),
    models=(KnownModel("microsoft/Phi-4-mini-instruct", 3.84e9, instruct=True),),
)
