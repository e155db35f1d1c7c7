"""gpt-oss (``GptOssForCausalLM``): mixture of experts, attention sinks, sliding/full attention alternating.

Not yet supported: refused before training (one line, below). What was learned for the work
that remains, from transformers 5.17's modeling file and the llama.cpp that llama-cpp-python
0.3.36 vendors:

- Checkpoints (openai/gpt-oss-20b: hidden 2880, 24 layers, 64 query / 8 KV heads of width 64,
  32 experts of width 2880, 4 per token, window 128 on every other layer starting with the
  first, YaRN RoPE factor 32 over 4096 positions, base 150000, untied, o200k "harmony"
  tokenizer) ship the experts in MXFP4 (``*_blocks``/``*_scales``); transformers dequantizes them
  to bf16 when it has no MXFP4 kernel.
- HF experts are 3-D parameters, transposed against ``nn.Linear``: ``gate_up_proj [E, hidden,
  2*ffn]`` with gate and up INTERLEAVED on the last axis (gate = ``[..., ::2]``, up =
  ``[..., 1::2]``), ``down_proj [E, ffn, hidden]``, biases per expert. llama.cpp's converter
  transposes them and splits gate/up by those strides into ``ffn_gate_exps``/``ffn_up_exps``
  (``[E, ffn, hidden]``), biases the same way; the MXFP4 originals are repacked as GGML MXFP4
  without dequantizing, bf16 experts are written as floats (with a warning).
- llama.cpp's ``gpt-oss`` hard-codes the clamped SwiGLU (alpha 1.702, limit 7.0), as transformers
  does; the router's softmax over the top-k logits is its SOFTMAX_WEIGHT gating; sinks are
  ``attn_sinks.weight`` per head; the post-attention norm is ``attn_post_norm``.
- llama.cpp always rounds YaRN's correction range to whole dimensions (floor/ceil), while the
  published config says ``truncate: false``: llama.cpp's rotary frequencies differ slightly
  from transformers' in the ramp dimensions, so the logits-parity tolerance must be measured.
- LoRA: attention q/k/v/o as modules; the experts through PEFT's ``target_parameters``
  (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), the targets of PEFT's own gpt-oss
  example and of Unsloth's gpt-oss notebooks (which add the expert projections to attention);
  the router stays frozen so routing is unchanged. Loading in 4 bits is CUDA-only.
"""

from __future__ import annotations

from typing import Optional

from .base import Config, Family, KnownModel, Lora, Template, Training
from .granitehybrid import llama_cpp_version


def refuse(config: Config, vocab: frozenset) -> Optional[str]:
    """Refused before any training time is spent."""
    return ("gpt-oss is not yet supported by rawtune (LoRA on its experts, its 4-bit loading and GGUF export in "
            f"the expert layout of the llama.cpp of {llama_cpp_version()} are not written); train another family")


FAMILY = Family(
    name="gptoss",
    label="gpt-oss",
    hf_architectures=("GptOssForCausalLM",),
    model_types=("gpt_oss",),
    order=200,
    tokenizer="byte-level BPE (o200k harmony)",
    gguf=None,
    lora=Lora(kinds={"attention": ("q_proj", "k_proj", "v_proj", "o_proj")},
              why="attention modules; the experts (3-D parameters) would need PEFT's target_parameters"),
    training=Training(fast_loop=False, unsloth=False, unsloth_fails="refused before training"),
    template=Template(end_of_turn=("<|end|>", "<|return|>")),
    refuse=refuse,
    models=(
        KnownModel("openai/gpt-oss-20b", 21e9, listed=False),
        KnownModel("openai/gpt-oss-120b", 117e9, listed=False),
    ),
    notes="refused before training: expert LoRA, 4-bit loading and the expert GGUF layout are not written yet",
)
