"""gpt-oss (``GptOssForCausalLM``): mixture of experts, attention sinks, sliding/full attention alternating.

What rawtune does with it, and why (from transformers 5.17's modeling file and the llama.cpp
that llama-cpp-python 0.3.36 vendors):

- Checkpoints (openai/gpt-oss-20b: hidden 2880, 24 layers, 64 query / 8 KV heads of width 64,
  32 experts of width 2880, 4 per token, window 128 on every other layer starting with the
  first, YaRN RoPE factor 32 over 4096 positions, base 150000, untied, o200k "harmony"
  tokenizer). OpenAI's upload stores the experts in MXFP4 (``*_blocks``/``*_scales``), which
  rawtune's streamed merge and GGUF writer do not read: such a checkpoint is refused before
  training, pointing to a bf16 upload.
- HF experts are 3-D parameters, transposed against ``nn.Linear``: ``gate_up_proj [E, hidden,
  2*ffn]`` with gate and up INTERLEAVED on the last axis (gate = ``[..., ::2]``, up =
  ``[..., 1::2]``), ``down_proj [E, ffn, hidden]``, biases per expert. llama.cpp's layout is
  stacked ``ffn_gate_exps``/``ffn_up_exps`` ``[E, ffn, hidden]`` and ``ffn_down_exps`` ``[E,
  hidden, ffn]``: the writer transposes and splits by those strides, biases the same way
  (llama.cpp's own converter repacks MXFP4 originals without dequantizing and writes bf16
  experts as floats; rawtune writes the merged experts as floats, quantized afterwards).
- llama.cpp's ``gpt-oss`` hard-codes the clamped SwiGLU (alpha 1.702, limit 7.0), as transformers
  does; the router's softmax over the top-k logits is its SOFTMAX_WEIGHT gating; sinks are
  ``attn_sinks.weight`` per head; the post-attention norm is ``attn_post_norm``.
- llama.cpp always rounds YaRN's correction range to whole dimensions (floor/ceil), while the
  published config says ``truncate: false``: llama.cpp's rotary frequencies then differ from
  transformers' in the ramp dimensions (measured on the tiny model: 1.2e-2 relative against
  2e-6 with ``truncate: true``). Exported all the same: it is how llama.cpp runs every gpt-oss.
- LoRA: attention q/k/v/o as modules, and the experts' two stacked matrices through PEFT's
  ``target_parameters`` (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), as PEFT's
  gpt-oss recipe does; Unsloth's gpt-oss notebooks also adapt attention and the expert
  projections. The router stays frozen, so routing is unchanged. Llama's MLP names in the
  settings select the experts. rawtune's Unsloth path adapts modules only: ``auto`` trains
  gpt-oss with PEFT. With ``--load-in-4bit`` (CUDA) bitsandbytes quantizes the linear layers;
  the experts stay 16-bit (see ``hf_loop.prepare_stacked_experts_kbit``).
- Chat: the published template writes today's date and a system preamble into every prompt,
  which rawtune's Ollama translation cannot express: export writes the completion template and
  says so.
"""

from __future__ import annotations

from typing import Any, Optional

from .base import Config, Family, Gguf, KnownModel, Lora, Shape, Template, TensorOut, Training
from .granitehybrid import llama_cpp_version
from .hooks import layer_types, refusals, swa_pattern

LAYER_PREFIX = "model.layers."


def why_not(config: Config) -> Optional[str]:
    """What the llama.cpp rawtune runs cannot run as transformers does (one line), or None."""
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant == "mxfp4":
        return ("this gpt-oss checkpoint stores its experts in MXFP4, which rawtune's merge and GGUF writer do not "
                "read; train its bf16 upload (e.g. unsloth/gpt-oss-20b-BF16)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if str(rope.get("rope_type") or rope.get("type") or "default") not in ("yarn", "default"):
        return f"the llama.cpp of {llama_cpp_version()} runs gpt-oss with YaRN or plain RoPE, not {rope.get('rope_type')}"
    return None


refuse, check = refusals(why_not)  # before training, and again at export


def hparams(writer: Any, config: Config, shape: Shape) -> None:
    """Experts, the sliding window and which layers use it, YaRN's keys."""
    import gguf

    writer.add_expert_count(int(config["num_local_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(int(config["intermediate_size"]))
    swa_pattern(writer, config, layer_types(config, shape, default_every=2))
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if str(rope.get("rope_type") or rope.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))


def split_gate_up(array: Any, part: int) -> Any:
    """gate (part 0) or up (part 1) of HF's interleaved gate_up: gate = [..., ::2], up = [..., 1::2]."""
    return array[..., part::2]


def tensors(hf_name: str, dims: tuple[int, ...], config: Config, shape: Shape) -> Optional[list[TensorOut]]:
    """Experts in llama.cpp's stacked layout (transposed, gate/up apart), biases as floats, sinks renamed."""
    if not hf_name.startswith(LAYER_PREFIX):
        return None
    bid, rest = hf_name[len(LAYER_PREFIX):].split(".", 1)
    blk = f"blk.{bid}."
    if rest == "self_attn.sinks":
        return [TensorOut(blk + "attn_sinks.weight", dims)]
    if rest == "mlp.experts.gate_up_proj":  # [experts, hidden, 2 * ffn] -> two [experts, ffn, hidden]
        n_exp, hidden, both = dims
        return [TensorOut(blk + f"ffn_{kind}_exps.weight", (n_exp, both // 2, hidden),
                          lambda a, p=part: split_gate_up(a, p).transpose(0, 2, 1))
                for part, kind in ((0, "gate"), (1, "up"))]
    if rest == "mlp.experts.gate_up_proj_bias":
        return [TensorOut(blk + f"ffn_{kind}_exps.bias", (dims[0], dims[1] // 2),
                          lambda a, p=part: split_gate_up(a, p), f32=True)
                for part, kind in ((0, "gate"), (1, "up"))]
    if rest == "mlp.experts.down_proj":  # [experts, ffn, hidden] -> [experts, hidden, ffn]
        return [TensorOut(blk + "ffn_down_exps.weight", (dims[0], dims[2], dims[1]), lambda a: a.transpose(0, 2, 1))]
    if rest == "mlp.experts.down_proj_bias":
        return [TensorOut(blk + "ffn_down_exps.bias", dims, f32=True)]
    return None


FAMILY = Family(
    name="gptoss",
    label="gpt-oss",
    hf_architectures=("GptOssForCausalLM",),
    model_types=("gpt_oss",),
    order=200,
    tokenizer="byte-level BPE (o200k harmony)",
    gguf=Gguf("GPT_OSS", rope_types=("default", "yarn"), check=check, hparams=hparams, tensors=tensors,
              blocks=("ATTN_NORM", "ATTN_POST_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_SINKS",
                      "FFN_GATE_INP", "FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP"),
              bias=("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE_INP", "FFN_GATE_EXP", "FFN_UP_EXP",
                    "FFN_DOWN_EXP")),
    lora=Lora(kinds={"attention": ("q_proj", "k_proj", "v_proj", "o_proj")},
              parameters={"*": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")},
              why="attention modules; the experts' stacked matrices through PEFT's target_parameters (PEFT's "
                  "gpt-oss recipe); the router stays frozen"),
    training=Training(fast_loop=False, unsloth=False,
                      unsloth_fails="rawtune's Unsloth path adapts modules only; gpt-oss's experts need PEFT's "
                                    "target_parameters"),
    template=Template(end_of_turn=("<|end|>",)),  # <|return|> (the last answer's end) is EOS
    refuse=refuse,
    models=(
        KnownModel("openai/gpt-oss-20b", 21e9, listed=False),
        KnownModel("unsloth/gpt-oss-20b-BF16", 21e9, listed=False),
    ),
    notes="the MXFP4 originals are refused (train the bf16 upload)",
)
