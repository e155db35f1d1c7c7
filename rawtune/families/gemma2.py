"""Gemma 2: GELU MLP, (1 + w) RMSNorms before and after attention and MLP, soft-capping, sliding/full layers.

llama.cpp's ``gemma2`` has no separate output matrix (one shared embedding: training keeps the
embeddings frozen and tied), always soft-caps attention and final logits, and scales queries by
1/sqrt(head_dim) (1/sqrt(hidden/heads) at the 27B's 46 layers): checkpoints that differ are
refused. Norm weights are written + 1. Unsloth's compiled Gemma 2 layer fails (see
``unsloth_fails``), so ``auto`` trains it with PEFT. The chat template refuses system messages:
rawtune folds the system text into the first user turn, as Gemma 3's template does.
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError
from .base import LLAMA_BLOCKS, Config, Embeddings, Family, Gguf, Shape, Template, Training
from .hooks import gemma_attention_scale, layer_types, swa_pattern


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Sliding window and pattern (every 2nd layer global), both soft-caps."""
    swa_pattern(writer, config, layer_types(config, shape, default_every=2))
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def check(config: Config, shape: Shape) -> None:
    """Query scaling as llama.cpp's; both soft-caps present."""
    gemma_attention_scale(config, shape, big_layers=46)
    # llama.cpp's gemma2 always soft-caps both (default 50 and 30); a config without them cannot be expressed.
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not config.get(key):
            raise ExportError(f"Gemma 2 without {key}: llama.cpp's gemma2 always applies it, so this checkpoint "
                              f"would run differently there")


FAMILY = Family(
    name="gemma2",
    label="Gemma 2",
    hf_architectures=("Gemma2ForCausalLM",),
    model_types=("gemma2",),
    order=50,
    tokenizer="SentencePiece (Gemma)",
    gguf=Gguf("GEMMA2", norm_offset=1.0, hparams=hparams, check=check,
              blocks=LLAMA_BLOCKS + ("ATTN_POST_NORM", "FFN_POST_NORM")),
    embeddings=Embeddings(shared=True),
    training=Training(unsloth_fails="Unsloth's compiled Gemma 2 layer stops with an Inductor assertion "
                                    "(Unsloth 2026.10.9, torch 2.11, H200)"),
    template=Template(end_of_turn=("<end_of_turn>",), system="folded into the first user turn"),
    gated_owners=("google/gemma-",),
    notes="embeddings stay tied (llama.cpp has no separate output matrix)",
)
