"""Granite 3.x and Granite 4.0 micro (dense): Llama's layer with embedding, residual, attention and logit multipliers.

llama.cpp's ``granite`` reads the four multipliers as keys; Q/K are permuted like Llama's.
The fast loop applies the multipliers. Chat: role markers, each turn closed by EOS.
"""

from __future__ import annotations

from typing import Any

from .base import Config, Family, Gguf, KnownModel, Shape, Training
from .hooks import no_permute_partial
from .llama import fast_loop_check


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Granite's four multipliers."""
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))


FAMILY = Family(
    name="granite",
    label="Granite 3.x dense",
    hf_architectures=("GraniteForCausalLM",),
    model_types=("granite",),
    order=90,
    tokenizer="byte-level BPE",
    gguf=Gguf("GRANITE", permute_qk=True, check=no_permute_partial, hparams=hparams),
    training=Training(fast_loop=True, fast_loop_check=fast_loop_check),
    models=(
        KnownModel("ibm-granite/granite-3.3-2b-base", 2.53e9),
        KnownModel("ibm-granite/granite-3.3-2b-instruct", 2.53e9, instruct=True),
        KnownModel("ibm-granite/granite-4.0-micro-base", 3.4e9),
        KnownModel("ibm-granite/granite-4.0-micro", 3.4e9, instruct=True),
    ),
)
