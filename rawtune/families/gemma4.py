"""Gemma 4, text (``Gemma4ForCausalLM``): sliding/full layers with different head widths, per-layer
input embeddings (PLE), key/value sharing across the last layers, plain-weight RMSNorms.

What is new against Gemma 3, and how llama.cpp's ``gemma4`` (llama-cpp-python 0.3.36) takes it:

- full-attention layers have their own head width (``global_head_dim``, 512 against 256) and,
  when keys double as values (``attention_k_eq_v``, the 31B), their own KV head count: written as
  ``key_length``/``key_length_swa`` and a per-layer ``head_count_kv`` array;
- full layers rotate a quarter of each head ("proportional" RoPE, frequencies over the whole
  head width): llama.cpp rotates the whole head with per-pair frequency factors
  (``rope_freqs.weight``), 1e30 for the pairs that must not turn;
- values pass an RMSNorm without weight, queries are scaled by 1 (after their RMSNorm) in both
  transformers and llama.cpp: the Gemma 2/3 query-scaling quirk (``query_pre_attn_scalar``,
  which llama.cpp's gemma2/3 hard-code) does not exist here, so nothing is refused for it;
- the small models (E2B, E4B) add a per-layer token embedding and projection to every layer
  (``hidden_size_per_layer_input``), share the keys and values of the last non-shared layer of
  each kind with the last ``num_kv_shared_layers`` layers, and double those layers' MLP width
  (``use_double_wide_mlp``): written as ``embedding_length_per_layer_input``,
  ``attention.shared_kv_layers`` and a per-layer ``feed_forward_length`` array;
- norm weights are used as they are (no 1 + w, unlike Gemma 2/3); ``layer_scalar`` is written
  as ``layer_output_scale``.

Refused before training: the mixture-of-experts model (26B A4B: rawtune's writer does not write
Gemma 4's expert layout) and bidirectional attention (not a causal LM). The Hub's Gemma 4
checkpoints are ``Gemma4ForConditionalGeneration`` (text with vision/audio towers); rawtune trains
and exports the text model, ``Gemma4ForCausalLM``: the known ids below are for the planner.

Tokenizer: SentencePiece-style BPE with byte fallback, written as llama.cpp's ``llama``
vocabulary like Gemma 2/3. LoRA targets: attention and MLP projections, as Unsloth's Gemma
recipes choose them (the per-layer-embedding gate and projection stay frozen); the shared-KV
layers have no k/v projections, so those carry LoRA on the layers that compute keys.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import ExportError
from .base import Config, Dims, Family, Gguf, KnownModel, Shape, Template, TensorOut, rope_settings
from .hooks import raise_if, refuse_by_check, swa_pattern
from .olmo3 import LLAMA_CPP

# gguf.MODEL_TENSOR names every Gemma 4 layer has (k/v: not in shared-KV layers; PLE: small models).
BLOCKS = ("ATTN_NORM", "ATTN_Q", "ATTN_Q_NORM", "ATTN_OUT", "ATTN_POST_NORM", "FFN_NORM", "FFN_GATE", "FFN_UP",
          "FFN_DOWN", "FFN_POST_NORM")
# The frequency factor llama.cpp divides a pair's angle by so that it does not turn (as its converter writes).
NO_TURN = 1e30


def types(config: Config, n_layer: int) -> list[str]:
    """Per-layer attention kinds (transformers: 5 sliding : 1 full when the config names none)."""
    found = list(config.get("layer_types") or [])
    if not found:
        found = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)]
    if len(found) != n_layer:
        raise ExportError(f"config.json lists {len(found)} layer_types for {n_layer} layers; re-save the model")
    return found


def _full_layer_value(config: Config, key: str) -> Optional[int]:
    """A full-attention layer's override in ``per_layer_config`` (how transformers saves global sizes)."""
    kinds = config.get("layer_types") or []
    for index, values in (config.get("per_layer_config") or {}).items():
        if str(index).isdigit() and int(index) < len(kinds) and kinds[int(index)] == "full_attention":
            if isinstance(values, dict) and key in values:
                return int(values[key])
    return None


def global_head_dim(config: Config) -> int:
    """The head width of full-attention layers."""
    return int(config.get("global_head_dim") or _full_layer_value(config, "head_dim") or config["head_dim"])


def kv_heads(config: Config, kinds: list[str]) -> list[int]:
    """KV heads per layer: full layers take ``num_global_key_value_heads`` where keys are values."""
    swa = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    full = _full_layer_value(config, "num_key_value_heads")
    if full is None and config.get("attention_k_eq_v"):
        full = config.get("num_global_key_value_heads")
    return [swa if kind == "sliding_attention" else int(full or swa) for kind in kinds]


def _rope(config: Config, kind: str) -> dict[str, Any]:
    params = (config.get("rope_parameters") or {}).get(kind)
    return dict(params) if isinstance(params, dict) else {}


def why_not(config: Config) -> Optional[str]:
    """Why rawtune cannot export this Gemma 4 checkpoint for llama.cpp, or None (checked before training)."""
    if config.get("enable_moe_block"):
        return ("Gemma 4 with mixture-of-experts layers (26B A4B): rawtune's GGUF writer does not write Gemma 4's "
                "expert layout; train a dense Gemma 4 (E2B, E4B, 31B)")
    if config.get("use_bidirectional_attention"):
        return f"Gemma 4 with bidirectional attention is not a causal LM; {LLAMA_CPP} runs Gemma 4 causally"
    ple = int(config.get("hidden_size_per_layer_input") or 0)
    if ple and int(config.get("vocab_size_per_layer_input") or config["vocab_size"]) != int(config["vocab_size"]):
        return (f"Gemma 4 whose per-layer embedding has another vocabulary size than the model: {LLAMA_CPP} "
                f"reads both with one vocabulary")
    return None


def check(config: Config, shape: Shape) -> None:
    """What llama.cpp's gemma4 graph cannot express."""
    raise_if(why_not(config))
    sliding, full = _rope(config, "sliding_attention"), _rope(config, "full_attention")
    if str(sliding.get("rope_type") or "default") != "default" or float(sliding.get("partial_rotary_factor", 1)) != 1:
        raise ExportError(f"Gemma 4 with scaled or partial RoPE on sliding layers: {LLAMA_CPP} rotates them plainly")
    if str(full.get("rope_type") or "default") not in ("default", "proportional"):
        raise ExportError(f"Gemma 4 with {full['rope_type']} RoPE on full layers: rawtune's writer covers the "
                          f"published proportional RoPE")
    if config.get("attention_bias"):
        raise ExportError(f"Gemma 4 with attention biases: {LLAMA_CPP}'s gemma4 has none")


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Head widths and KV heads per layer kind, RoPE of each kind, window, PLE width, shared KV layers,
    double-wide MLPs, the final soft-cap (the common keys among these are in ``skip_common``)."""
    kinds = types(config, shape.n_layer)
    head, head_full = int(config["head_dim"]), global_head_dim(config)
    writer.add_key_length(head_full)
    writer.add_value_length(head_full)
    writer.add_key_length_swa(head)
    writer.add_value_length_swa(head)
    writer.add_rope_dimension_count(head_full)  # the whole head, pairs that must not turn get NO_TURN
    writer.add_rope_dimension_count_swa(head)
    writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention").get("rope_theta", 10000.0)))
    heads_kv = kv_heads(config, kinds)
    writer.add_head_count_kv(heads_kv if len(set(heads_kv)) > 1 else heads_kv[0])
    swa_pattern(writer, config, kinds)
    shared = int(config.get("num_kv_shared_layers") or 0)
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(int(config.get("hidden_size_per_layer_input") or 0))
    n_ff = int(config["intermediate_size"])
    if config.get("use_double_wide_mlp") and shared:
        writer.add_feed_forward_length([n_ff * 2 if i >= shape.n_layer - shared else n_ff
                                        for i in range(shape.n_layer)])
    else:
        writer.add_feed_forward_length(n_ff)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def rope_tensors(config: Config, shape: Shape, rope_type: str) -> dict[str, Any]:
    """``rope_freqs.weight`` for the full layers: proportional RoPE turns the first quarter of the pairs
    (at frequencies over the whole head width, divided by ``factor``), the others not at all."""
    import numpy as np

    full = _rope(config, "full_attention") or rope_settings(config)
    head_full = global_head_dim(config)
    turning = head_full // 2
    if str(full.get("rope_type") or "default") == "proportional":
        turning = int(float(full.get("partial_rotary_factor", 1.0)) * head_full // 2)
    factor = float(full.get("factor", 1.0))
    values = [factor] * turning + [NO_TURN] * (head_full // 2 - turning)
    return {"rope_freqs.weight": np.asarray(values, dtype=np.float32)}


def tensors(hf_name: str, dims: tuple[int, ...], config: Config, shape: Shape) -> Optional[list[TensorOut]]:
    """``layer_scalar`` (a buffer without ``.weight``) under llama.cpp's ``layer_output_scale.weight``."""
    if not hf_name.endswith(".layer_scalar"):
        return None
    import gguf

    layer = int(hf_name.split(".layers.")[1].split(".")[0])
    kind = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.LAYER_OUT_SCALE].format(bid=layer)
    return [TensorOut(kind + ".weight", dims)]


def required(config: Config, shape: Shape) -> set[str]:
    """Per-layer tensors beyond :data:`BLOCKS`: keys (and their norm) where a layer computes them, PLE."""
    import gguf

    def name(kind: str, bid: Optional[int] = None) -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + ".weight"

    shared = int(config.get("num_kv_shared_layers") or 0)
    need = {name(kind, i) for i in range(shape.n_layer - shared) for kind in ("ATTN_K", "ATTN_K_NORM")}
    if int(config.get("hidden_size_per_layer_input") or 0):
        need |= {name("PER_LAYER_TOKEN_EMBD"), name("PER_LAYER_MODEL_PROJ"), name("PER_LAYER_PROJ_NORM")}
        need |= {name(kind, i) for i in range(shape.n_layer)
                 for kind in ("PER_LAYER_INP_GATE", "PER_LAYER_PROJ", "PER_LAYER_POST_NORM")}
    return need



refuse = refuse_by_check(check)  # the export check, run before training

FAMILY = Family(
    name="gemma4",
    label="Gemma 4 (text)",
    hf_architectures=("Gemma4ForCausalLM",),
    model_types=("gemma4_text",),
    order=65,
    tokenizer="SentencePiece-style BPE (Gemma 4)",
    gguf=Gguf("GEMMA4", hparams=hparams, check=check, rope_types=("default", "proportional"),
              extra_tensors=rope_tensors, required=required, tensors=tensors, blocks=BLOCKS,
              skip_common=("key_length", "value_length", "rope_dimension_count", "head_count_kv",
                           "feed_forward_length")),
    template=Template(end_of_turn=("<turn|>",), thinking="generation prompt with the empty thought channel"),
    refuse=refuse,
    models=(
        # Text-model parameter counts computed from the published configs (tied embeddings counted once,
        # the per-layer embedding table included). Planner entries: the Hub checkpoints are multimodal.
        KnownModel("google/gemma-4-E2B-it", 4.63e9, instruct=True, listed=False,
                   dims=Dims(1536, 6144, 35, 8, 1, 262144, True)),
        KnownModel("google/gemma-4-31B-it", 30.7e9, instruct=True, listed=False,
                   dims=Dims(5376, 21504, 60, 32, 16, 262144, True)),
    ),
    notes="text model (Gemma4ForCausalLM); mixture-of-experts 26B A4B refused",
)
