"""OLMo 3: OLMo 2's layer (post-norms, q/k RMSNorm over the whole projection) with sliding-window layers.

Three sliding-window layers to one full-attention layer (``layer_types``; the window is 4096 in
the published 7B and 32B). The long-context checkpoints scale RoPE with YaRN on the
full-attention layers only; the sliding layers keep plain RoPE with the same base.

The vendored llama.cpp has no ``olmo3`` architecture: its converter writes OLMo 3 as ``olmo2``
with ``olmo2.attention.sliding_window`` and the per-layer ``sliding_window_pattern``, and its
``olmo2`` graph runs the sliding layers with unscaled RoPE (frequency scale 1, no YaRN ramp or
magnitude scale) and the others with the file's scaling, which is what transformers does. What
that graph cannot express is refused before training and before a file is written: a separate RoPE base for the
sliding layers (it uses one base for all), RoPE scaling on the sliding layers, and YaRN
variants llama.cpp computes differently (``truncate`` false, ``mscale``/``mscale_all_dim``).

Like OLMo 2, llama.cpp's loader requires ``output.weight``: a tied checkpoint gets the
embedding written as the output matrix too. Tokenizer: OLMo 2's cl100k (llama.cpp "dbrx").
LoRA targets: the standard attention and MLP projections (the layer has no other kind).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ExportError
from .base import Config, Dims, Embeddings, Family, Gguf, KnownModel, Shape, Template, rope_settings
from .hooks import layer_types, refuse_by_check, swa_pattern

# What rawtune runs GGUF files with; named in refusals.
LLAMA_CPP = "llama.cpp of llama-cpp-python 0.3.36"
OLMO2_BLOCKS = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM",
                "FFN_GATE", "FFN_UP", "FFN_DOWN", "FFN_POST_NORM")


def yarn_mscale(factor: float) -> float:
    """YaRN's default cos/sin magnitude scale, 0.1 ln(factor) + 1, which llama.cpp applies itself."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_check(rope: dict[str, Any], where: str) -> None:
    """YaRN settings llama.cpp computes differently from transformers."""
    if rope.get("truncate") is False:
        raise ExportError(f"{where} uses YaRN with truncate false; {LLAMA_CPP} always rounds the correction "
                          f"range, so this checkpoint would run with different RoPE there")
    if rope.get("mscale") or rope.get("mscale_all_dim"):
        raise ExportError(f"{where} uses YaRN with mscale/mscale_all_dim, which rawtune's GGUF writer does not "
                          f"express; export it with llama.cpp's own converter")
    if not rope.get("factor") or not rope.get("original_max_position_embeddings"):
        raise ExportError(f"{where} names YaRN without factor and original_max_position_embeddings; re-save the "
                          f"config with both")


def yarn_hparams(writer: Any, rope: dict[str, Any]) -> None:
    """YaRN: scaling type, factor, original context and ramp bounds; a cos/sin scale other than YaRN's
    default (which llama.cpp applies on its own) as the extra attention factor llama.cpp multiplies in."""
    import gguf

    factor = float(rope["factor"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast") or 32.0))
    writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow") or 1.0))
    attention = rope.get("attention_factor")
    if attention is not None and not math.isclose(float(attention), yarn_mscale(factor), rel_tol=1e-6):
        writer.add_rope_scaling_attn_factors(float(attention) / yarn_mscale(factor))


def _sliding_rope(config: Config) -> dict[str, Any]:
    """The sliding layers' RoPE parameters (transformers 5 keeps one set per layer type)."""
    params = (config.get("rope_parameters") or {}).get("sliding_attention")
    return dict(params) if isinstance(params, dict) else {}


def check(config: Config, shape: Shape) -> None:
    """What llama.cpp's olmo2 graph cannot express for OLMo 3."""
    types = layer_types(config, shape, default_every=4)
    full = rope_settings(config)
    if str(full.get("rope_type") or "default") == "yarn":
        yarn_check(full, "OLMo 3's full-attention RoPE")
    if "sliding_attention" not in types:
        return
    local = _sliding_rope(config)
    if str(local.get("rope_type") or "default") != "default":
        raise ExportError(f"OLMo 3 with {local['rope_type']} RoPE on its sliding-window layers: {LLAMA_CPP} runs "
                          f"them with plain RoPE")
    base = float(local.get("rope_theta", full.get("rope_theta", 10000.0)))
    if not math.isclose(base, float(full.get("rope_theta", 10000.0))):
        raise ExportError(f"OLMo 3 with RoPE base {base:g} on sliding layers and {full.get('rope_theta'):g} on full "
                          f"ones: {LLAMA_CPP}'s olmo2 uses one base for all layers")
    if not config.get("sliding_window"):
        raise ExportError("OLMo 3 config.json has sliding_attention layers but no sliding_window; re-save the model")


# The export check, run before training: a checkpoint olmo2's graph would run differently, or None.
refuse = refuse_by_check(check)


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Sliding window and its per-layer pattern (only when a layer slides), YaRN of the full layers."""
    types = layer_types(config, shape, default_every=4)
    if "sliding_attention" in types:
        swa_pattern(writer, config, types)
    rope = rope_settings(config)
    if str(rope.get("rope_type") or "default") == "yarn":
        yarn_hparams(writer, rope)


def _dims(hidden: int, intermediate: int, layers: int, heads: int, kv: int) -> Dims:
    return Dims(hidden, intermediate, layers, heads, kv, 100278, False)


SEVEN_B = _dims(4096, 11008, 32, 32, 32)  # multi-head attention
THIRTY_TWO_B = _dims(5120, 27648, 64, 40, 8)  # grouped-query attention

FAMILY = Family(
    name="olmo3",
    label="OLMo 3",
    hf_architectures=("Olmo3ForCausalLM",),
    model_types=("olmo3",),
    order=105,
    tokenizer="byte-level BPE (cl100k)",
    gguf=Gguf("OLMO2", hparams=hparams, check=check, rope_types=("default", "linear", "yarn"), blocks=OLMO2_BLOCKS),
    embeddings=Embeddings(output_when_tied=True),
    template=Template(end_of_turn=("<|im_end|>",)),
    refuse=refuse,
    models=(
        # Parameter counts from the configs (untied 100278-token embeddings counted twice).
        KnownModel("allenai/Olmo-3-1025-7B", 7.30e9, dims=SEVEN_B),
        KnownModel("allenai/Olmo-3-7B-Instruct", 7.30e9, instruct=True, dims=SEVEN_B),
        KnownModel("allenai/Olmo-3-7B-Think", 7.30e9, instruct=True, dims=SEVEN_B, listed=False),
        KnownModel("allenai/Olmo-3-1125-32B", 32.2e9, dims=THIRTY_TWO_B, listed=False),
        KnownModel("allenai/Olmo-3-32B-Think", 32.2e9, instruct=True, dims=THIRTY_TWO_B, listed=False),
    ),
    notes="written as llama.cpp's olmo2 with its sliding-window pattern; YaRN on full-attention layers only",
)
