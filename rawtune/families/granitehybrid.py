"""Granite 4.0 hybrid (Granite-4.0-H): Mamba-2 layers beside a few attention layers, Granite's multipliers.

Each layer is either a Mamba-2 mixer or attention (``layer_types``: ``mamba``/``attention``, which
transformers 5 reads as ``linear_attention``/``full_attention``), followed by a dense SwiGLU MLP
(``shared_mlp``: gate and up fused in ``input_linear``) and, in the MoE sizes, routed experts.
Attention uses no position embedding at all (NoPE): the Mamba layers carry the order.

llama.cpp's ``granitehybrid`` tells the layer kinds apart by ``attention.head_count_kv``, an
array with 0 for every Mamba layer; it reads the four Granite multipliers as keys, runs RoPE
only when ``rope.scaling.finetuned`` is true (false here), and takes the Mamba tensors in its
own shapes: ``A = -exp(A_log)`` and ``D`` as ``[heads, 1]``, the depthwise convolution without
its middle axis, the gated norm as ``[groups, inner / groups]``, ``dt_bias`` as ``ssm_dt.bias``.
The fused ``input_linear`` is split into ``ffn_gate`` (first half) and ``ffn_up``. What that
architecture cannot express is refused before training: an expansion other than 2 (llama.cpp
asserts it), more than one group (HF normalises the gated output over all groups at once,
llama.cpp per group), projection biases in the mixer (no such tensors), a clamped time step
(llama.cpp does not clamp), RoPE on the attention layers (llama.cpp's converter switches RoPE
off for every hybrid Granite). The MoE sizes (H-Tiny, H-Small) are refused: rawtune's writer
does not yet write their expert tensors.

LoRA targets. Attention: q/k/v/o. MLP: the shared MLP's ``input_linear`` and ``output_linear``
(what Llama's gate/up/down names select here) -- Unsloth's Granite 4.0 notebook targets exactly
attention plus ``shared_mlp.input_linear``/``output_linear``, and that is the ``quick`` preset.
Mamba: ``in_proj`` and ``out_proj``, the two projections of the mixer, which is what PEFT's and
transformers' Mamba examples adapt (the convolution, ``A_log``, ``D`` and ``dt_bias`` are a few
thousand values per layer and stay frozen). With 9 of every 10 layers Mamba, leaving the mixer
out adapts only the attention layers' sequence mixing, so ``standard`` and ``thorough`` add it.
Caveat, read in transformers 5.17's code (not yet measured on a GPU): when transformers finds the
``mamba_ssm`` fused kernel, its training forward multiplies by ``out_proj.weight`` directly, so a
LoRA on ``out_proj`` gets no gradient there (``in_proj`` is unaffected); the plain PyTorch path,
which runs without that kernel (CPU; GPU without it), applies both. A ``gpu`` test checks it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..errors import ExportError
from .base import Config, Dims, Family, Gguf, KnownModel, Lora, Shape, Template, TensorOut, Training
from .hooks import refusals

# transformers 5 renames the checkpoint's layer kinds; both spellings mean the same layer.
ATTENTION_KINDS = ("attention", "full_attention")
MAMBA_KINDS = ("mamba", "linear_attention")
LAYER_RE_PREFIX = "model.layers."


def layer_kinds(config: Config) -> list[str]:
    """'attention' or 'mamba' per layer, from ``layer_types`` (or its old name ``layers_block_type``)."""
    n_layer = int(config["num_hidden_layers"])
    types = config.get("layer_types") or config.get("layers_block_type") or ["mamba"] * n_layer
    if len(types) != n_layer:
        raise ExportError(f"config.json lists {len(types)} layer_types for {n_layer} layers; re-save the model")
    out = []
    for kind in types:
        if kind in ATTENTION_KINDS:
            out.append("attention")
        elif kind in MAMBA_KINDS:
            out.append("mamba")
        else:
            raise ExportError(f"Granite 4.0-H layer type {kind!r} is neither Mamba nor attention")
    return out


def _mamba(config: Config) -> dict[str, int]:
    """The Mamba-2 sizes as transformers derives them."""
    hidden = int(config["hidden_size"])
    inner = int(config.get("mamba_expand", 2)) * hidden
    heads = int(config.get("mamba_n_heads", 128))
    head_dim = config.get("mamba_d_head", "auto")
    head_dim = inner // heads if head_dim in (None, "auto") else int(head_dim)
    return {"inner": inner, "heads": heads, "head_dim": head_dim, "groups": int(config.get("mamba_n_groups", 1)),
            "state": int(config.get("mamba_d_state", 256)), "conv": int(config.get("mamba_d_conv", 4))}


def llama_cpp_version() -> str:
    """The llama.cpp rawtune runs, named by the llama-cpp-python release that vendors it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llama-cpp-python {version('llama-cpp-python')}"
    except PackageNotFoundError:
        return "llama-cpp-python (not installed)"


def _number(value: Any) -> float:
    """A config.json number; transformers 5 saves infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def why_not(config: Config) -> Optional[str]:
    """Why llama.cpp's granitehybrid would run this checkpoint differently (one line), or None."""
    where = f"the llama.cpp of {llama_cpp_version()} (granitehybrid)"
    if int(config.get("num_local_experts") or 0) > 0:
        return ("the Granite 4.0-H mixture-of-experts sizes (H-Tiny, H-Small) are not yet exported by rawtune's GGUF "
                "writer; train a dense size (granite-4.0-h-350m, -h-1b, -h-micro)")
    if int(config.get("mamba_expand", 2)) != 2:
        return f"{where} supports a Mamba expansion of 2 only (this checkpoint: {config.get('mamba_expand')})"
    if int(config.get("mamba_n_groups", 1)) != 1:
        return f"{where} normalises the Mamba output per group, transformers over all {config['mamba_n_groups']} groups"
    if config.get("mamba_proj_bias"):
        return f"{where} has no biases on the Mamba in/out projections (mamba_proj_bias true)"
    limit = [_number(v) for v in config.get("time_step_limit") or (0.0, math.inf)]
    if limit[0] != 0.0 or not math.isinf(limit[1]):
        return f"{where} does not clamp the Mamba time step (time_step_limit {limit})"
    if config.get("position_embedding_type") == "rope" and "mamba" in layer_kinds(config):
        return f"{where} runs the attention layers of a hybrid without RoPE, but this checkpoint uses RoPE"
    if config.get("attention_bias"):
        return f"{where} reads no Q/K/V biases (attention_bias true)"
    return None


refuse, check = refusals(why_not)  # before training, and again at export


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Granite's multipliers, the Mamba-2 sizes, and head_count_kv 0 on Mamba layers (how llama.cpp tells them)."""
    m = _mamba(config)
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))
    writer.add_ssm_conv_kernel(m["conv"])
    writer.add_ssm_state_size(m["state"])
    writer.add_ssm_group_count(m["groups"])
    writer.add_ssm_inner_size(m["inner"])
    writer.add_ssm_time_step_rank(m["heads"])  # llama.cpp's name for the number of Mamba heads
    writer.add_rope_scaling_finetuned(False)  # granitehybrid's switch for RoPE: off (NoPE attention)
    kinds = layer_kinds(config)
    writer.add_head_count_kv([shape.n_head_kv if k == "attention" else 0 for k in kinds])
    # The dense MLP is the shared one: its width, not intermediate_size, is the FFN length llama.cpp allocates.
    writer.add_feed_forward_length(int(config.get("shared_intermediate_size") or config["intermediate_size"]))


def _block(hf_name: str) -> Optional[tuple[int, str]]:
    """(layer index, rest of the name) of a per-layer tensor."""
    if not hf_name.startswith(LAYER_RE_PREFIX):
        return None
    bid, rest = hf_name[len(LAYER_RE_PREFIX):].split(".", 1)
    return int(bid), rest


def a_from_log(a_log: Any) -> Any:
    """Mamba's state decay as llama.cpp takes it: A = -exp(A_log) (HF stores the logarithm)."""
    import numpy as np

    return -np.exp(a_log)


def tensors(hf_name: str, dims: tuple[int, ...], config: Config, shape: Shape) -> Optional[list[TensorOut]]:
    """Mamba tensors in llama.cpp's shapes and the fused shared MLP split in two; others by the name map."""
    found = _block(hf_name)
    if found is None:
        return None
    bid, rest = found
    blk = f"blk.{bid}."
    if rest == "shared_mlp.input_linear.weight":
        half = dims[0] // 2
        return [TensorOut(blk + "ffn_gate.weight", (half, dims[1]), lambda a: a[:half]),
                TensorOut(blk + "ffn_up.weight", (half, dims[1]), lambda a: a[half:])]
    if rest == "shared_mlp.output_linear.weight":
        return [TensorOut(blk + "ffn_down.weight", dims)]
    heads = dims[0] if rest in ("mamba.A_log", "mamba.D", "mamba.dt_bias") else 0
    if rest == "mamba.A_log":
        return [TensorOut(blk + "ssm_a", (heads, 1), lambda a: a_from_log(a).reshape(heads, 1), f32=True)]
    if rest == "mamba.D":
        return [TensorOut(blk + "ssm_d", (heads, 1), lambda a: a.reshape(heads, 1), f32=True)]
    if rest == "mamba.dt_bias":
        return [TensorOut(blk + "ssm_dt.bias", dims, f32=True)]
    if rest == "mamba.conv1d.weight":  # [channels, 1, kernel] depthwise -> [channels, kernel]
        return [TensorOut(blk + "ssm_conv1d.weight", (dims[0], dims[2]), lambda a: a.reshape(dims[0], dims[2]),
                          f32=True)]
    if rest == "mamba.norm.weight":
        groups = _mamba(config)["groups"]
        return [TensorOut(blk + "ssm_norm.weight", (groups, dims[0] // groups),
                          lambda a: a.reshape(groups, dims[0] // groups), f32=True)]
    return None


def required(config: Config, shape: Shape) -> set[str]:
    """Per-layer tensors by kind: the Mamba mixer's or attention's."""
    need: set[str] = set()
    for i, kind in enumerate(layer_kinds(config)):
        names = (("ssm_in.weight", "ssm_conv1d.weight", "ssm_dt.bias", "ssm_a", "ssm_d", "ssm_norm.weight",
                  "ssm_out.weight") if kind == "mamba" else
                 ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"))
        need |= {f"blk.{i}.{n}" for n in names}
    return need


def fast_loop_check(config: Config, seq_len: int) -> Optional[str]:
    return "Mamba-2 layers (granitehybrid)"


FAMILY = Family(
    name="granitehybrid",
    label="Granite 4.0-H (hybrid Mamba-2, dense sizes)",
    hf_architectures=("GraniteMoeHybridForCausalLM",),
    model_types=("granitemoehybrid",),
    order=95,
    tokenizer="byte-level BPE (cl100k)",
    gguf=Gguf("GRANITE_HYBRID", blocks=("ATTN_NORM", "FFN_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN"),
              check=check, hparams=hparams, tensors=tensors, required=required,
              skip_common=("head_count_kv", "feed_forward_length")),
    lora=Lora(kinds={"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("input_linear", "output_linear"),
                     "mamba": ("in_proj", "out_proj")},
              presets={"standard": ("mamba",), "thorough": ("mamba",)},
              why="Unsloth's notebook: attention + shared MLP (quick); PEFT's Mamba recipes add in_proj/out_proj"),
    training=Training(fast_loop=False, fast_loop_check=fast_loop_check,
                      unsloth_fails="Unsloth's Granite 4.0-H path stops in a matmul of float32 by bfloat16 weights "
                                    "(measured on an H100 with unsloth 2026.10.9)"),
    template=Template(),  # each turn closes with EOS, which is a stop already
    refuse=refuse,
    models=(
        # Parameter counts as IBM's model cards give them; dims from the published configs (attention heads,
        # KV heads of the attention layers, the shared MLP width).
        KnownModel("ibm-granite/granite-4.0-h-350m-base", 340e6, dims=Dims(768, 2048, 32, 12, 4, 100352, True)),
        KnownModel("ibm-granite/granite-4.0-h-350m", 340e6, instruct=True),
        KnownModel("ibm-granite/granite-4.0-h-1b-base", 1.5e9, dims=Dims(1536, 4096, 40, 12, 4, 100352, True)),
        KnownModel("ibm-granite/granite-4.0-h-1b", 1.5e9, instruct=True),
        KnownModel("ibm-granite/granite-4.0-h-micro-base", 3.2e9, listed=False),
        KnownModel("ibm-granite/granite-4.0-h-micro", 3.2e9, instruct=True, listed=False),
    ),
    notes="dense sizes only: the MoE sizes (H-Tiny, H-Small) are refused before training",
)
