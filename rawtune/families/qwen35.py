"""Qwen3.5, dense sizes (0.8B-27B text stack): Gated DeltaNet linear attention beside gated full attention.

Three of every four layers (``layer_types``) are Gated DeltaNet linear attention:
``in_proj_qkv`` (queries, keys, values), a depthwise causal convolution over them, the gated
delta rule with per-head decay (``A_log``, ``dt_bias``, ``in_proj_a``) and write strength
(``in_proj_b``), an RMS norm gated by ``in_proj_z``, then ``out_proj``. The fourth is full
attention whose ``q_proj`` yields a query and a sigmoid output gate per head, with RMS norms on q
and k; a quarter of each head is rotated (interleaved MRoPE; text positions are the same on all
three sections, so it is plain RoPE for text). Every norm except the gated one multiplies by
(1 + w).

What llama.cpp's ``qwen35`` needs beyond the name map (its converter's transforms, rewritten):
norm weights + 1 (not the linear attention's gated norm), ``A_log`` written as -exp(A_log),
``dt_bias`` as the ``ssm_dt`` bias, the convolution kernel as a 2-D ``[channels, taps]`` matrix,
and with more value heads than key heads, the value heads reordered from grouped by key head
to tiled (rows of ``in_proj_qkv``'s value part, ``in_proj_z``, ``in_proj_a``/``_b``, ``A_log``,
``dt_bias``, the convolution's value channels; columns of ``out_proj``), which its broadcast
expects. Hyperparameters: the linear attention's sizes as ``ssm.*`` keys, which layers are
recurrent, and the MRoPE sections. llama.cpp takes one head size for keys and values of the
linear attention and no attention biases: other checkpoints are refused before training.

LoRA: besides the attention and MLP projections, the linear-attention layers' ``in_proj_qkv``,
``in_proj_z`` and ``out_proj``, the targets Axolotl's Qwen3.5 recipe adds for Gated DeltaNet and
that Unsloth's Qwen3.5 notebooks train. ``in_proj_a``/``in_proj_b`` (one output per value head:
decay and write-strength gates, narrower than a LoRA rank), the convolution, ``A_log`` and
``dt_bias`` are left out, as both recipes do: they are per-head scalars or 4-tap kernels, not
matrices a low-rank update helps.

Thinking: the Jinja template opens a ``<think>`` block in its generation prompt (thinking on by
default) and writes assistant turns after the last user message with their think block; the
measured Ollama template keeps that default.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import ExportError
from .base import Config, Dims, Family, Gguf, KnownModel, Lora, Shape, Template, TextStack, Training, rope_settings
from .hooks import raise_if, refusals

LLAMA_CPP = "llama.cpp of llama-cpp-python 0.3.36"
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(QWEN35_REGEX,): "qwen35"}
DEFAULT_MROPE = [11, 11, 10]  # transformers' default when rope_parameters names none
LINEAR = ("in_proj_qkv", "in_proj_z", "out_proj")
PRESET_KINDS = {"quick": ("linear_attention",), "standard": ("linear_attention",), "thorough": ("linear_attention",)}


def text_config(config: Config) -> Config:
    """The text model's settings (a multimodal checkpoint nests them under text_config)."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def layer_kinds(config: Config) -> list[str]:
    """Per layer: "linear_attention" or "full_attention" (older configs give only the interval)."""
    config = text_config(config)
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if not types:
        every = int(config.get("full_attention_interval") or 4)
        types = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ExportError(f"config.json lists {len(types)} layer_types for {n} layers; re-save the model")
    return list(types)


def mrope_sections(config: Config) -> list[int]:
    """The MRoPE sections (temporal, height, width), as llama.cpp's four-entry key."""
    sections = list(rope_settings(text_config(config)).get("mrope_section") or DEFAULT_MROPE)
    return (sections + [0, 0, 0, 0])[:4]


def why_not(config: Config) -> Optional[str]:
    """Why llama.cpp's qwen35 could not run this checkpoint, or None."""
    c = text_config(config)
    if int(c.get("linear_key_head_dim", 128)) != int(c.get("linear_value_head_dim", 128)):
        return (f"Qwen3.5 with linear-attention key and value heads of different sizes cannot be run by {LLAMA_CPP} "
                f"(its qwen35 takes one head size for both)")
    if int(c.get("linear_num_value_heads", 32)) % int(c.get("linear_num_key_heads", 16)):
        return "Qwen3.5 linear attention with value heads not a multiple of key heads is not run by " + LLAMA_CPP
    if c.get("attention_bias"):
        return f"Qwen3.5 with attention biases cannot be run by {LLAMA_CPP} (its qwen35 has no attention biases)"
    unknown = sorted(set(layer_kinds(c)) - {"linear_attention", "full_attention"})
    if unknown:
        return f"Qwen3.5 layer types {unknown} are not run by {LLAMA_CPP}"
    if str(rope_settings(c).get("rope_type") or "default") != "default":
        return f"Qwen3.5 with scaled RoPE is not supported by rawtune's GGUF writer for {LLAMA_CPP}"
    return None


def _check_sections(config: Config, shape: Shape) -> None:
    """Every rotated pair must take the text position in llama.cpp's interleaved MRoPE (its 4th
    position, 0 for text, would leave a pair unrotated where transformers rotates it)."""
    sections = mrope_sections(config)
    total = sum(sections)
    if not 0 < total <= shape.head_dim:
        raise ExportError(f"MRoPE sections {sections[:3]} do not fit a head of {shape.head_dim}")
    for pair in range(shape.rope_dim // 2):
        sector = pair % total
        if not any(sector % 3 == k and sector < 3 * sections[k] for k in range(3)):
            raise ExportError(f"MRoPE sections {sections[:3]} leave rotated pair {pair} to llama.cpp's extra "
                              f"position; this checkpoint would run differently there")


refuse = refusals(why_not)[0]  # before training: what llama.cpp's qwen35 cannot run


def check(config: Config, shape: Shape) -> None:
    """The same facts at export time, and the MRoPE sections."""
    raise_if(why_not(config))
    _check_sections(config, shape)


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """The linear attention's sizes (llama.cpp's ssm.* keys), the recurrent layers, the MRoPE sections."""
    c = text_config(config)
    kinds = layer_kinds(c)
    writer.add_ssm_conv_kernel(int(c.get("linear_conv_kernel_dim", 4)))
    writer.add_ssm_state_size(int(c.get("linear_key_head_dim", 128)))
    writer.add_ssm_group_count(int(c.get("linear_num_key_heads", 16)))
    writer.add_ssm_time_step_rank(int(c.get("linear_num_value_heads", 32)))
    writer.add_ssm_inner_size(int(c.get("linear_value_head_dim", 128)) * int(c.get("linear_num_value_heads", 32)))
    writer.add_array(f"{writer.arch}.attention.recurrent_layers", [k == "linear_attention" for k in kinds])
    writer.add_full_attention_interval(int(c.get("full_attention_interval") or 4))
    writer.add_rope_dimension_sections(mrope_sections(c))


def transform(hf_name: str, data: Any, shape: Shape) -> Any:
    """Zero-centred norms written as 1 + w (the linear attention's gated norm multiplies by w: unchanged)."""
    import numpy as np

    if hf_name.endswith("norm.weight") and ".linear_attn." not in hf_name:
        return data + np.float32(NORM_OFFSET)
    return data


NORM_OFFSET = 1.0  # HF multiplies by (1 + w), llama.cpp by w


def decay(a_log: Any) -> Any:
    """llama.cpp's ssm_a: the decay rate A as -exp(A_log), which it multiplies with softplus(alpha + dt)."""
    import numpy as np

    return -np.exp(a_log)


def _tiled(n: int, k_heads: int, per_k: int, head: int) -> Any:
    """Index order that turns value heads grouped by key head into tiled order (llama.cpp's broadcast)."""
    import numpy as np

    return np.arange(n).reshape(k_heads, per_k, head).transpose(1, 0, 2).reshape(n)


def _linear_convert(hf_name: str, c: Config) -> Callable[[Any], Any]:
    """The conversion of one linear-attention tensor: value heads tiled, A_log -> -exp, kernel 2-D."""
    import numpy as np

    k_heads, v_heads = int(c.get("linear_num_key_heads", 16)), int(c.get("linear_num_value_heads", 32))
    k_dim, v_dim = int(c.get("linear_key_head_dim", 128)), int(c.get("linear_value_head_dim", 128))
    per_k = v_heads // k_heads
    qk = 2 * k_heads * k_dim
    value_rows = _tiled(v_heads * v_dim, k_heads, per_k, v_dim)
    head_rows = _tiled(v_heads, k_heads, per_k, 1)
    leaf = hf_name.rsplit(".linear_attn.", 1)[1]

    def convert(a: Any) -> Any:
        if leaf == "conv1d.weight":
            a = a.reshape(a.shape[0], a.shape[-1])
        if per_k > 1:
            if leaf in ("in_proj_qkv.weight", "conv1d.weight"):
                a = np.concatenate([a[:qk], a[qk:][value_rows]])
            elif leaf == "in_proj_z.weight":
                a = a[value_rows]
            elif leaf in ("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias"):
                a = a[head_rows]
            elif leaf == "out_proj.weight":
                a = a[:, value_rows]
        return decay(a) if leaf == "A_log" else a
    return convert


def tensors(hf_name: str, dims: tuple[int, ...], config: Config, shape: Shape) -> Optional[list[Any]]:
    """Linear-attention tensors with their conversion and llama.cpp names; the rest by the name map."""
    import gguf

    from .base import TensorOut

    if ".linear_attn." not in hf_name or hf_name.endswith(".norm.weight"):
        return None
    name = hf_name.replace(".dt_bias", ".dt_proj.bias")
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, shape.n_layer)
    gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ExportError(f"tensor {hf_name} has no GGUF name for qwen35")
    kernel = hf_name.endswith("conv1d.weight")  # float32 even in F16 files: llama.cpp's convolution reads no other
    out_dims = (dims[0], dims[-1]) if kernel else tuple(dims)
    c = text_config(config)
    return [TensorOut(gguf_name, out_dims, convert=_linear_convert(hf_name, c), f32=kernel or None,
                      columns=_value_columns(c) if hf_name.endswith(".linear_attn.out_proj.weight") else None)]


def _value_columns(c: Config) -> Optional[Any]:
    """out_proj's input columns in llama.cpp's tiled value-head order (None: one value head per key head)."""
    k_heads, v_heads = int(c.get("linear_num_key_heads", 16)), int(c.get("linear_num_value_heads", 32))
    if v_heads == k_heads:
        return None
    v_dim = int(c.get("linear_value_head_dim", 128))
    return _tiled(v_heads * v_dim, k_heads, v_heads // k_heads, v_dim)


def required(config: Config, shape: Shape) -> set[str]:
    """Per layer kind: gated attention's tensors or the Gated DeltaNet's."""
    import gguf

    def name(kind: str, bid: int, suffix: str = ".weight") -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + suffix

    attn = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_Q_NORM", "ATTN_K_NORM")
    linear = ("ATTN_QKV", "ATTN_GATE", "SSM_CONV1D", "SSM_BETA", "SSM_ALPHA", "SSM_NORM", "SSM_OUT")
    need: set[str] = set()
    for i, kind in enumerate(layer_kinds(config)):
        if kind == "full_attention":
            need |= {name(k, i) for k in attn}
        else:
            need |= {name(k, i) for k in linear} | {name("SSM_DT", i, ".bias"), name("SSM_A", i, "")}
    return need


def _dims(hidden: int, ff: int, layers: int, heads: int, kv: int, tied: bool) -> Dims:
    return Dims(hidden, ff, layers, heads, kv, 248320, tied)


# The text stack's sizes (the 9B is transformers' Qwen3_5TextConfig default, the 27B from public
# training configs; the smaller ones from the published configs as reported, MLP widths approximate).
DIMS = {"0.8B": _dims(1024, 3584, 24, 8, 2, True), "2B": _dims(2048, 6144, 24, 8, 2, True),
        "4B": _dims(2560, 9216, 32, 16, 4, True), "9B": _dims(4096, 12288, 32, 16, 4, False),
        "27B": _dims(5120, 17408, 64, 24, 4, False)}


FAMILY = Family(
    name="qwen35",
    label="Qwen3.5 (dense)",
    hf_architectures=("Qwen3_5ForCausalLM",),
    model_types=("qwen3_5_text",),
    order=45,
    tokenizer="byte-level BPE (Qwen3.5 split)",
    gguf=Gguf("QWEN35", blocks=("ATTN_NORM", "ATTN_POST_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN"),
              rope_types=("default",), hparams=hparams, check=check, transform=transform, tensors=tensors,
              required=required),
    lora=Lora(kinds={"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                     "mlp": ("gate_proj", "up_proj", "down_proj"), "linear_attention": LINEAR},
              presets=PRESET_KINDS,
              why="Axolotl's Qwen3.5 recipe and Unsloth's Qwen3.5 notebooks: attention and MLP projections plus "
                  "the Gated DeltaNet's in_proj_qkv, in_proj_z and out_proj"),
    training=Training(fast_loop=False, unsloth=True),
    template=Template(end_of_turn=("<|im_end|>",),
                      thinking="the template's default: the generation prompt opens a <think> block; turns after "
                               "the last user message keep their think block"),
    refuse=refuse,
    # The Hub's Qwen3.5 models are vision-language checkpoints: rawtune trains and exports their text model.
    text_stack=TextStack(wrappers=("Qwen3_5ForConditionalGeneration",), architecture="Qwen3_5ForCausalLM",
                         prefix="model.language_model.", dropped=("model.visual.", "mtp.", "model.mtp.")),
    models=(
        # Parameter counts from the model cards and hosting listings (vision tower included: the Hub
        # repos are the multimodal checkpoints); each post-trained model has a Base release.
        KnownModel("Qwen/Qwen3.5-0.8B-Base", 0.9e9, dims=DIMS["0.8B"]),
        KnownModel("Qwen/Qwen3.5-0.8B", 0.9e9, instruct=True, dims=DIMS["0.8B"]),
        KnownModel("Qwen/Qwen3.5-2B-Base", 2e9, dims=DIMS["2B"]),
        KnownModel("Qwen/Qwen3.5-2B", 2e9, instruct=True, dims=DIMS["2B"]),
        KnownModel("Qwen/Qwen3.5-4B-Base", 4.5e9, dims=DIMS["4B"]),
        KnownModel("Qwen/Qwen3.5-4B", 4.5e9, instruct=True, dims=DIMS["4B"]),
        KnownModel("Qwen/Qwen3.5-9B-Base", 10e9, dims=DIMS["9B"], listed=False),
        KnownModel("Qwen/Qwen3.5-9B", 10e9, instruct=True, dims=DIMS["9B"], listed=False),
        KnownModel("Qwen/Qwen3.5-27B", 28e9, instruct=True, dims=DIMS["27B"], listed=False),
    ),
    notes="MoE sizes (Qwen3_5MoeForCausalLM, llama.cpp qwen35moe) not covered; checkpoints with different "
          "linear-attention key/value head sizes or attention biases refused",
)
