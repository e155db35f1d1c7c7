"""LFM2 and LFM2.5 (Liquid AI, dense): gated short-convolution blocks beside GQA attention blocks.

Each layer is either a short-convolution block (``conv``: ``in_proj`` makes three gates B, C and
x from the hidden state, a depthwise causal convolution of ``conv_L_cache`` taps runs over B*x, C
gates the result, ``out_proj`` maps it back) or an attention block with RMS norms on each head of
q and k (its output projection is also called ``out_proj``); every layer has a SwiGLU MLP named
``w1`` (gate), ``w3`` (up), ``w2`` (down). The last norm is ``embedding_norm``.

llama.cpp's ``lfm2`` tells the kinds apart by a per-layer KV head count (0 for convolution
layers), writes the final norm as ``token_embd_norm`` and wants the convolution kernel as a 2-D
``[hidden, taps]`` matrix (HF stores ``[hidden, 1, taps]``). The MLP width it reads is the
auto-adjusted one (2/3 of ``block_ff_dim``, times the multiplier, rounded up to
``block_multiple_of``), computed here as transformers does. It has no convolution biases:
checkpoints with ``conv_bias`` are refused before training.

LoRA: Liquid AI's own fine-tuning recipe (leap-finetune's LFM2 default) and Unsloth's LFM2
notebooks put adapters on every projection of both block kinds: q/k/v/out_proj of attention,
in_proj/out_proj of the convolution blocks and w1/w2/w3 of the MLPs. The convolution kernel
itself (3 taps per channel) and the norms are left out: they are not linear layers, and three
taps per channel leave nothing for a low-rank update to compress. The generic (Llama) names the
presets use map onto these: o_proj -> out_proj, gate_proj -> w1, up_proj -> w3, down_proj -> w2,
and every preset adds the convolution kind.
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import ExportError
from .base import Config, Dims, Family, Gguf, KnownModel, Lora, Shape, Template, Training
from .hooks import refusals

LLAMA_CPP = "llama.cpp of llama-cpp-python 0.3.36"
# Generic (Llama) projection names -> LFM2's names for the same matrices.
RENAMED = {"o_proj": ("out_proj",), "gate_proj": ("w1",), "up_proj": ("w3",), "down_proj": ("w2",)}
KINDS = {"attention": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("w1", "w3", "w2"),
         "conv": ("in_proj", "out_proj")}
PRESET_KINDS = {"quick": ("conv",), "standard": ("conv",), "thorough": ("conv",)}


def layer_kinds(config: Config) -> list[str]:
    """Per layer: "conv" or "full_attention" (older configs list the attention layers as full_attn_idxs)."""
    types = config.get("layer_types")
    n = int(config["num_hidden_layers"])
    if not types:
        idxs = config.get("full_attn_idxs")
        idxs = range(n) if idxs is None else idxs
        types = ["full_attention" if i in set(idxs) else "conv" for i in range(n)]
    if len(types) != n:
        raise ExportError(f"config.json lists {len(types)} layer_types for {n} layers; re-save the model")
    return list(types)


def ff_dim(config: Config) -> int:
    """The MLP width the weights have: block_ff_dim (intermediate_size), auto-adjusted as LFM2 does."""
    width = int(config.get("block_ff_dim") or config["intermediate_size"])
    if config.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = config.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            width = int(multiplier * width)
            step = int(config.get("block_multiple_of", 256))
            width = step * ((width + step - 1) // step)
    return width


def why_not(config: Config) -> Optional[str]:
    """Why llama.cpp's lfm2 could not run this checkpoint, or None."""
    if config.get("conv_bias"):
        return (f"LFM2 with convolution biases (conv_bias true) cannot be run by {LLAMA_CPP} (its lfm2 has no "
                f"convolution bias tensors); pick an LFM2 checkpoint without them")
    unknown = sorted(set(layer_kinds(config)) - {"conv", "full_attention"})
    if unknown:
        return f"LFM2 layer types {unknown} are not run by {LLAMA_CPP} (it runs conv and full_attention layers)"
    return None


refuse, check = refusals(why_not)  # before training, and again at export


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Per-layer KV heads (0: convolution layer), the convolution's taps, the adjusted MLP width, the norm eps."""
    kinds = layer_kinds(config)
    writer.add_head_count_kv([shape.n_head_kv if kind != "conv" else 0 for kind in kinds])
    writer.add_feed_forward_length(ff_dim(config))
    writer.add_layer_norm_rms_eps(float(config.get("norm_eps", 1e-5)))
    writer.add_shortconv_l_cache(int(config.get("conv_L_cache", 3)))


def tensors(hf_name: str, dims: tuple[int, ...], config: Config, shape: Shape) -> Optional[list[Any]]:
    """The convolution kernel as llama.cpp's 2-D float32 [hidden, taps] matrix; everything else by the name map."""
    import gguf

    from .base import TensorOut

    if not hf_name.endswith(".conv.conv.weight"):
        return None
    bid = int(hf_name.split(".layers.", 1)[1].split(".", 1)[0])
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.SHORTCONV_CONV].format(bid=bid) + ".weight"
    # Stored float32 even in F16 files: llama.cpp's convolution reads only float32 kernels.
    return [TensorOut(name, (dims[0], dims[-1]), convert=lambda a: a.reshape(a.shape[0], a.shape[-1]), f32=True)]


def required(config: Config, shape: Shape) -> set[str]:
    """Per layer kind: the convolution's three tensors or attention's six; and the final norm."""
    import gguf

    def name(kind: str, bid: Optional[int] = None) -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + ".weight"

    conv = ("SHORTCONV_CONV", "SHORTCONV_INPROJ", "SHORTCONV_OUTPROJ")
    attn = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_Q_NORM", "ATTN_K_NORM")
    need = {name("TOKEN_EMBD_NORM")}
    for i, kind in enumerate(layer_kinds(config)):
        need |= {name(k, i) for k in (conv if kind == "conv" else attn)}
    return need


def targets(requested: list[str], module_names: set[str], preset: Optional[str]) -> list[str]:
    """Requested names spelled as LFM2 names them (see the module docstring), plus the preset's convolution kind."""
    out: list[str] = []
    for name in requested:
        picked = (name,) if name in module_names else RENAMED.get(name, (name,))
        out += [n for n in picked if n not in out]
    for kind in PRESET_KINDS.get(preset or "", ()):
        out += [n for n in KINDS[kind] if n in module_names and n not in out]
    return out


def _dims(hidden: int, ff: int, layers: int, heads: int) -> Dims:
    return Dims(hidden, ff, layers, heads, 8, 65536, True)


FAMILY = Family(
    name="lfm2",
    label="LFM2, LFM2.5 (dense)",
    hf_architectures=("Lfm2ForCausalLM",),
    model_types=("lfm2",),
    order=120,
    tokenizer="byte-level BPE (Llama 3 split, BOS added)",
    gguf=Gguf("LFM2", blocks=("ATTN_NORM", "FFN_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN"), rope_types=("default",),
              hparams=hparams, check=check, tensors=tensors, required=required,
              skip_common=("head_count_kv", "feed_forward_length", "layer_norm_rms_eps")),
    lora=Lora(kinds=KINDS, presets=PRESET_KINDS, targets=targets,
              why="Liquid AI's leap-finetune LFM2 default and Unsloth's LFM2 notebooks: every projection of "
                  "attention, convolution (in_proj, out_proj) and MLP (w1, w2, w3) blocks"),
    training=Training(fast_loop=False, unsloth=True),
    template=Template(end_of_turn=("<|im_end|>",)),
    refuse=refuse,
    models=(
        # Parameter counts from the model cards (embeddings counted once: tied); MLP widths are the
        # auto-adjusted ones the weights have.
        KnownModel("LiquidAI/LFM2-350M", 354e6, instruct=True, dims=_dims(1024, 4608, 16, 16)),
        KnownModel("LiquidAI/LFM2-700M", 742e6, instruct=True, dims=_dims(1536, 6912, 16, 24)),
        KnownModel("LiquidAI/LFM2-1.2B", 1.17e9, instruct=True, dims=_dims(2048, 8192, 16, 32)),
        KnownModel("LiquidAI/LFM2-2.6B", 2.57e9, instruct=True, dims=_dims(2048, 10752, 30, 32), listed=False),
        KnownModel("LiquidAI/LFM2.5-1.2B-Base", 1.17e9),
        KnownModel("LiquidAI/LFM2.5-1.2B-Instruct", 1.17e9, instruct=True),
    ),
    notes="convolution biases (conv_bias) refused; LFM2 MoE (Lfm2MoeForCausalLM) and the VL models not covered",
)
