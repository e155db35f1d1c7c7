"""Tiny random models of every model family rawtune supports, each with its family's tokenizer.

``build_family(name, path)`` writes a Hugging Face folder (config, safetensors, tokenizer, chat
template) for one family in ``FAMILIES`` (or a variant in ``VARIANTS``, e.g. Phi-4 mini): the family's real config class and architecture name,
a few layers of a small width, and a tokenizer trained in well under a second that has the
STRUCTURE of the family's tokenizer (pre-tokenizer, normalizer, byte fallback, special tokens,
BOS handling). Nothing is downloaded.

The sizes are chosen so that the features that make a family different are exercised: Qwen3 and
Gemma 3 have a head width times head count different from the hidden size (as the real ones do),
Gemma 2/3 alternate sliding-window and full-attention layers with a window shorter than the test
texts, SmolLM3 has a layer without RoPE, Phi-3 rotates only part of each head, Llama 3 carries
its frequency-dependent RoPE scaling, Granite has all four of its multipliers.

Chat templates: when ``tests/data/templates/<family>.jinja`` exists it is used (those files say
where they come from); otherwise the short templates below are used. They were written for these
tests in the turn format of each family's published template (role markers, turn ends), not
copied from a model repository, and they leave out tool calls, dates and other extras.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tiny import sentences

TEMPLATE_DIR = Path(__file__).parent / "data" / "templates"

# Pre-tokenizer regexes as the families' tokenizer.json files spell them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5: Qwen2's split with combining marks kept inside letter runs (llama.cpp's "qwen35").
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Text with what tokenizers disagree on: digits, whitespace runs, non-Latin scripts, emoji.
MIXED_TEXT = ("In 2024, 12345 people paid $3.50 each.\n\n  It's   done!\tTabs\t\tand  spaces   \n"
              "Привет, мир! Γειά σου κόσμε. 你好，世界。こんにちは 안녕하세요 مرحبا بالعالم नमस्ते "
              "Emoji: 🎉🚀 👍🏽 ❤️ café naïve 1,000,000 3.14159 x=42; y==7 <tag> end.")
# Training text for the tiny tokenizers: English-like sentences plus some of the scripts above,
# so multi-byte characters get merges; emoji and most CJK stay unseen (byte fallback / bytes).
EXTRA_TRAINING = ["Привет мир, привет всем. Γειά σου κόσμε.", "In 2024 and 1999 we paid 12345 and 3.50.",
                  "Hello world! 123 numbers, punctuation; and more.", "  indented   text\n\n\tand tabs",
                  "你好 世界 你好"] * 10

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Turn format of Llama 3.x Instruct (header ids around the role, <|eot_id|> after each turn).
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Turn format of Gemma 2/3 instruct: no system role (a system message is prefixed to the first user
# turn), 'assistant' is called 'model'.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Turn format of Phi-3 / Phi-3.5 instruct.
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
                 "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
                 "{{ eos_token }}{% endif %}")
# Turn format of Phi-4 mini instruct (the Phi-3 markers without newlines).
PHI4_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
# Turn format of Mistral Instruct v0.1-v0.3 ([INST] ... [/INST], no system role).
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
                    "{% endfor %}")
# Turn format of Granite 3.x instruct (role markers, end of text after each turn).
GRANITE_TEMPLATE = ("{% for message in messages %}{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + "
                    "message['content'] + '<|end_of_text|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}")
# Turn format of OLMo 2 instruct (Tulu style: <|user|>/<|assistant|> lines, EOS after replies).
OLMO2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + "
                  "message['content'] + '\n' }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# OLMo 3 Instruct's turn format (ChatML); the published template also writes a default system prompt and
# function-calling blocks, which this stand-in, written for these tests, leaves out.
OLMO3_TEMPLATE = CHATML
# EXAONE 4's turn format ([|role|] markers, [|endofturn|] after each turn, as transformers' EXAONE 4
# docstring shows a rendered conversation) with the non-reasoning generation prompt: an empty think
# block. Written for these tests; the published template also handles tools and reasoning turns.
EXAONE4_TEMPLATE = ("{% for message in messages %}{{ '[|' + message['role'] + '|]\n' + message['content'] + "
                    "'[|endofturn|]\n' }}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '[|assistant|]\n<think>\n\n</think>\n\n' }}{% endif %}")
# Gemma 4's turn format (<|turn>role ... <turn|>, 'assistant' called 'model', system as its own turn) with
# the generation prompt's empty thought channel (thinking off, the published template's default). Written
# for these tests; the published template (tools, images, thinking) is not one rawtune translates.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n<|channel>thought\n<channel|>' }}{% endif %}")
# Qwen3: ChatML, and an empty think block before the answer when generating (the published template
# emits one when thinking is off); thinking content itself is not modelled here.
QWEN3_TEMPLATE = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n\n</think>\n\n'")

# Turn format of gpt-oss's "harmony" (written for these tests): <|start|>role<|message|>text<|end|>, the
# assistant's answer on the final channel, a system message as the developer's instructions; the
# published template's reasoning channels, tools and its own default system message are left out.
HARMONY_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'system' %}{{ '<|start|>developer<|message|># Instructions\\n\\n' + "
    "message['content'] + '<|end|>' }}{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}")


@dataclass
class Tokenizer:
    """The structure of a family's tokenizer."""

    kind: str  # "bpe" (byte-level) or "spm" (SentencePiece-style BPE with byte fallback)
    specials: list[str]
    bos: Optional[str]
    eos: str
    add_bos: bool
    pad: Optional[str] = None
    split_regex: Optional[str] = None  # bpe: Split regex before ByteLevel(use_regex=False)
    digits: bool = False  # bpe: Digits(individual) + ByteLevel(use_regex=True) (StarCoder/Granite)
    nfc: bool = False  # bpe: NFC normalizer (Qwen)
    ignore_merges: bool = False  # bpe: whole words found in the vocab are taken as one token (Llama 3)
    spm_style: str = "gemma"  # spm: "gemma" (no space prefix) or "llama" (Llama 2 / Phi-3 / Mistral)
    unk: str = "<unk>"


@dataclass
class Family:
    arch: str  # the HF architecture class
    config: str  # the HF config class
    tokenizer: Tokenizer
    template: str
    tied: bool  # what the family's small models do
    settings: dict[str, Any] = field(default_factory=dict)


# Llama 3.1+ ships reserved special tokens with no pad token declared; Unsloth pads with
# <|finetune_right_pad_id|> from among them (a vocabulary without a spare token makes it refuse).
LLAMA3_TOK = Tokenizer("bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>", "<|finetune_right_pad_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                       add_bos=True,
                       split_regex=LLAMA3_REGEX, ignore_merges=True)
# Qwen's real vocabularies also hold <|fim_pad|> among their special tokens; Unsloth pads with such
# a token when the declared pad is the EOS (Qwen2.5 base) and refuses a tokenizer without one.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]

FAMILY_SPECS: dict[str, Family] = {
    # Llama 3.2 1B/3B: tied embeddings, llama3 RoPE scaling (old context shortened so it shows in 48 tokens).
    "llama3": Family("LlamaForCausalLM", "LlamaConfig", LLAMA3_TOK, LLAMA3_TEMPLATE, True, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Mistral 7B v0.x: the Llama 2 SentencePiece tokenizer, untied.
    "mistral": Family("MistralForCausalLM", "MistralConfig", Tokenizer(
        "spm", ["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", add_bos=True, spm_style="llama"),
        MISTRAL_TEMPLATE, False, dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen2.5 0.5B: q/k/v biases, tied.
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", Tokenizer(
        "bpe", QWEN_SPECIALS, bos=None, eos="<|endoftext|>", add_bos=False, pad="<|endoftext|>",
        split_regex=QWEN2_REGEX, nfc=True), CHATML, True, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen3 0.6B: q/k RMS norms, head_dim * heads != hidden, tied.
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3Config", Tokenizer(
        "bpe", QWEN_SPECIALS + ["<think>", "</think>"], bos=None, eos="<|im_end|>", add_bos=False,
        pad="<|endoftext|>", split_regex=QWEN2_REGEX, nfc=True), QWEN3_TEMPLATE, True, dict(
        head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Gemma 2 2B: sliding window on every other layer, attention and final logit soft-capping.
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config", Tokenizer(
        "spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], bos="<bos>", eos="<eos>", add_bos=True,
        pad="<pad>"), GEMMA_TEMPLATE, True, dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Gemma 3 270M/1B (text): q/k norms, 5 local : 1 global (here 1 : 1), separate local RoPE base.
    "gemma3": Family("Gemma3ForCausalLM", "Gemma3TextConfig", Tokenizer(
        "spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], bos="<bos>", eos="<end_of_turn>", add_bos=True,
        pad="<pad>"), GEMMA_TEMPLATE, True, dict(
        head_dim=32, query_pre_attn_scalar=32, sliding_window=8, hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    # Gemma 4 E2B (text): head width 32 on sliding layers and 64 on full ones (256/512 in the E2B), 4:1
    # grouped-query attention (8:1 there), the last half of the layers reusing the keys and values of the
    # first half's last layer of each kind with double-wide MLPs (20 of 35 there), per-layer input embeddings
    # (width 1/4 of the hidden size; 256/1536 there), proportional RoPE on a quarter of the full layers'
    # heads, final soft-cap 30, tied. 2 sliding : 1 full instead of 4 : 1, so that both halves hold both
    # kinds in 6 layers (10 layers amplify llama.cpp's F32 rounding past the shared tolerance: 2.3e-4).
    "gemma4": Family("Gemma4ForCausalLM", "Gemma4TextConfig", Tokenizer(
        "spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], bos="<bos>", eos="<turn|>", add_bos=True,
        pad="<pad>"), GEMMA4_TEMPLATE, True, dict(
        intermediate_size=256, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=8,
        hidden_size_per_layer_input=16, num_kv_shared_layers=3, use_double_wide_mlp=True,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}})),
    # Gemma 4 31B's layout (text): keys double as values on full layers (no v_proj there) with fewer KV heads
    # (16 and 4 of 32 heads there, 2 and 1 of 4 here), no per-layer embeddings, no shared KV, 5 sliding : 1
    # full. Built by name (tests/test_families_attn.py).
    "gemma4dense": Family("Gemma4ForCausalLM", "Gemma4TextConfig", Tokenizer(
        "spm", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], bos="<bos>", eos="<turn|>", add_bos=True,
        pad="<pad>"), GEMMA4_TEMPLATE, True, dict(
        intermediate_size=256, num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True,
        head_dim=32, global_head_dim=64, sliding_window=8, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}})),
    # Phi-3 mini / Phi-4 mini layout: fused qkv and gate_up, partial rotary (Phi-4 mini rotates 3/4).
    "phi3": Family("Phi3ForCausalLM", "Phi3Config", Tokenizer(
        "spm", ["<unk>", "<s>", "</s>"], bos="<s>", eos="<|end|>", add_bos=False, pad="<|endoftext|>",
        spm_style="llama"), PHI3_TEMPLATE, False, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})),
    # SmolLM3 3B: the Llama 3 tokenizer with ChatML turns; every 4th layer has no RoPE.
    "smollm3": Family("SmolLM3ForCausalLM", "SmolLM3Config", Tokenizer(
        "bpe", LLAMA3_TOK.specials + ["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", add_bos=False,
        split_regex=LLAMA3_REGEX, ignore_merges=True), CHATML, True, dict(
        no_rope_layer_interval=4, rope_parameters={"rope_type": "default", "rope_theta": 2000000.0})),
    # Granite 3.x dense: StarCoder-style tokenizer (single digits + GPT-2 byte level), four multipliers
    # (attention 1/head_dim as in Granite 3.x, residual and logit values of the 2B model).
    "granite": Family("GraniteForCausalLM", "GraniteConfig", Tokenizer(
        "bpe", ["<|end_of_text|>", "<fim_pad>", "<|start_of_role|>", "<|end_of_role|>"], bos=None,
        eos="<|end_of_text|>",
        add_bos=False, pad="<|end_of_text|>", digits=True), GRANITE_TEMPLATE, True, dict(
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # OLMo 2 1B: norms after attention and MLP (no pre-norms), q/k norms over the whole projection;
    # a cl100k-style tokenizer (the Llama 3 regex, merges applied in order).
    "olmo2": Family("Olmo2ForCausalLM", "Olmo2Config", Tokenizer(
        "bpe", ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"], bos="<|endoftext|>",
        eos="<|endoftext|>", add_bos=False, pad="<|pad|>", split_regex=LLAMA3_REGEX), OLMO2_TEMPLATE, False, dict(
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # Granite 4.0-H dense (350M / 1B ratios): Mamba-2 layers beside NoPE attention layers (one attention
    # layer here, every distinct kind present), Granite's multipliers (attention 1/head_dim, the 1B's
    # residual and logit values), the shared MLP 8/3 of the width, Mamba expansion 2 with one group and
    # heads of head width 16; a small chunk so HF's chunked scan passes state between chunks within 48
    # tokens. The cl100k tokenizer (merges applied: llama.cpp's "dbrx"), Granite's turn markers.
    "granitehybrid": Family("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", Tokenizer(
        "bpe", ["<|end_of_text|>", "<|pad|>", "<|start_of_role|>", "<|end_of_role|>"], bos="<|end_of_text|>",
        eos="<|end_of_text|>", add_bos=False, pad="<|pad|>", split_regex=LLAMA3_REGEX), GRANITE_TEMPLATE, True, dict(
        layer_types=["mamba", "attention", "mamba", "mamba"], intermediate_size=170, shared_intermediate_size=170,
        num_local_experts=0, num_experts_per_tok=0, position_embedding_type=None,
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=32, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=16, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
        logits_scaling=6.0)),
    # gpt-oss-20b's ratios: query width 2x the hidden size (head_dim set apart from it), 8 query heads per KV
    # head, one expert of every 8 active, experts as wide as the hidden size, sliding window on every
    # other layer starting with the first (here shorter than the test texts), YaRN as published (factor
    # 32 over 4096 positions, base 150000, betas 32/1) except ``truncate``: the published false keeps
    # YaRN's correction range fractional, llama.cpp always rounds it to whole dimensions, so only true
    # is what llama.cpp computes (test_families_ssm_moe measures the published setting); attention
    # biases, untied; the o200k "harmony" tokenizer's structure and turn markers.
    "gptoss": Family("GptOssForCausalLM", "GptOssConfig", Tokenizer(
        "bpe", ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|start|>", "<|message|>", "<|end|>",
                "<|channel|>", "<|call|>", "<|constrain|>"], bos="<|startoftext|>", eos="<|return|>", add_bos=False,
        pad="<|endoftext|>", split_regex=GPT4O_REGEX), HARMONY_TEMPLATE, False, dict(
        num_attention_heads=8, num_key_value_heads=1, head_dim=16, intermediate_size=64, num_local_experts=16,
        num_experts_per_tok=2, sliding_window=8, attention_bias=True, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": True})),
    # OLMo 3 7B: OLMo 2's layer, 3 sliding-window layers : 1 full (window shorter than the test texts),
    # multi-head attention as in the 7B, YaRN on the full layers only (factor 8 as published; the
    # original context shortened to 64 so the frequency ramp shows in 48 tokens).
    "olmo3": Family("Olmo3ForCausalLM", "Olmo3Config", Tokenizer(
        "bpe", ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"], bos="<|endoftext|>",
        eos="<|endoftext|>", add_bos=False, pad="<|pad|>", split_regex=LLAMA3_REGEX), OLMO3_TEMPLATE, False, dict(
        num_key_value_heads=4, rms_norm_eps=1e-6, sliding_window=8,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                         "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 64,
                                            "attention_factor": 1.2079441541679836, "beta_fast": 32.0,
                                            "beta_slow": 1.0}})),
    # EXAONE 4.0 1.2B: post-norms, per-head q/k norms, every layer global with RoPE (no sliding window),
    # 4:1 grouped-query attention, tied, Llama 3.1 RoPE scaling (factor 16 as published, original context
    # shortened to 64 so it shows in 48 tokens).
    "exaone4": Family("Exaone4ForCausalLM", "Exaone4Config", Tokenizer(
        "bpe", ["[PAD]", "[BOS]", "[|endoftext|]", "[UNK]", "[|system|]", "[|user|]", "[|assistant|]",
                "[|endofturn|]", "<think>", "</think>"], bos="[BOS]", eos="[|endofturn|]", add_bos=False,
        pad="[PAD]"), EXAONE4_TEMPLATE, True, dict(
        num_key_value_heads=1, sliding_window=None, layer_types=["full_attention"] * 4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # EXAONE 4.0 32B's layout: 64 layers (the only depth llama.cpp runs as the hybrid), "LLLG" (three
    # sliding-window layers with RoPE, one global layer without), untied. Narrow, and built by name only
    # (tests/test_families_attn.py): 64 layers are slow for the shared family tests.
    "exaone4hybrid": Family("Exaone4ForCausalLM", "Exaone4Config", Tokenizer(
        "bpe", ["[PAD]", "[BOS]", "[|endoftext|]", "[UNK]", "[|system|]", "[|user|]", "[|assistant|]",
                "[|endofturn|]", "<think>", "</think>"], bos="[BOS]", eos="[|endofturn|]", add_bos=False,
        pad="[PAD]"), EXAONE4_TEMPLATE, False, dict(
        num_key_value_heads=1, sliding_window=8, sliding_window_pattern="LLLG",
        layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 16,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Phi-4 mini: the Phi-3 architecture with an o200k byte-level tokenizer, tied embeddings and
    # LongRoPE (short factors at these lengths). A variant: not in FAMILIES, built by name.
    "phi4mini": Family("Phi3ForCausalLM", "Phi3Config", Tokenizer(
        "bpe", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], bos=None, eos="<|end|>",
        add_bos=False, pad="<|endoftext|>", split_regex=GPT4O_REGEX), PHI4_TEMPLATE, True, dict(
        original_max_position_embeddings=4096, max_position_embeddings=131072,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "original_max_position_embeddings": 4096,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})),
    # LFM2 350M/1.2B: gated short-convolution blocks beside GQA attention with q/k norms (here
    # conv, conv, attention, conv: both kinds, convolution first as in the real layer pattern);
    # the Llama 3 split with BOS added, tied. The MLP width is auto-adjusted as the real configs do
    # (block_ff_dim 6656 -> 2/3, rounded up to the multiple: 4608 for 1024 wide, 4.5x; here 416 -> 288).
    "lfm2": Family("Lfm2ForCausalLM", "Lfm2Config", Tokenizer(
        "bpe", ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|startoftext|>",
        eos="<|im_end|>", add_bos=True, pad="<|pad|>", split_regex=LLAMA3_REGEX, ignore_merges=True),
        CHATML, True, dict(
        intermediate_size=416, block_auto_adjust_ff_dim=True, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
        conv_L_cache=3, norm_eps=1e-5, layer_types=["conv", "conv", "full_attention", "conv"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen3.5 dense (0.8B-27B text stack): Gated DeltaNet linear attention on 3 of 4 layers, gated full
    # attention (q_proj twice as wide: query and gate per head) with q/k norms on the 4th; head_dim * heads
    # = 2 x hidden and a quarter of each head rotated (interleaved MRoPE, text positions), zero-centred
    # (1 + w) norms; linear attention with twice as many value heads as key heads (as the 9B, so the
    # value-head reordering llama.cpp needs is exercised). Tied, as the small sizes.
    "qwen35": Family("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", Tokenizer(
        "bpe", QWEN_SPECIALS + ["<think>", "</think>"], bos=None, eos="<|im_end|>", add_bos=False,
        pad="<|endoftext|>", split_regex=QWEN35_REGEX, nfc=True), QWEN3_TEMPLATE, True, dict(
        head_dim=32, intermediate_size=192, rms_norm_eps=1e-6, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True})),
}
VARIANTS = ["phi4mini"]
# Models built by name in a family's own test file only (too slow for every family test).
BY_NAME = ["exaone4hybrid", "gemma4dense"]
FAMILIES = [name for name in FAMILY_SPECS if name not in VARIANTS + BY_NAME]
# Chat tokens every SentencePiece family adds on top of its base vocabulary.
SPM_CHAT_TOKENS = {"gemma2": ["<start_of_turn>", "<end_of_turn>"], "gemma3": ["<start_of_turn>", "<end_of_turn>"],
                   "gemma4": ["<|turn>", "<turn|>", "<|channel>", "<channel|>"],
                   "gemma4dense": ["<|turn>", "<turn|>", "<|channel>", "<channel|>"],
                   "phi3": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "mistral": []}


def _training_text() -> list[str]:
    return sentences(400) + EXTRA_TRAINING


def _bpe_tokenizer(spec: Tokenizer):
    """A byte-level BPE with the family's pre-tokenizer, normalizer and merge behaviour."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    if spec.split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    elif spec.digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    if spec.ignore_merges:
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = HFTokenizer.from_str(json.dumps(data))
    return tok


def _spm_vocab(spec: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-style vocabulary: specials, the 256 <0xNN> byte-fallback pieces, then merges
    trained on '▁'-marked words (SentencePiece never merges across a word start)."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, trainers

    probe = HFTokenizer(models.BPE())
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    probe.train_from_iterator(_training_text(), trainers.BpeTrainer(vocab_size=420, special_tokens=[]))
    trained = json.loads(probe.to_str())["model"]
    vocab: dict[str, int] = {}
    for text in spec.specials + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[text] = len(vocab)
    for text, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return vocab, merges


def _spm_tokenizer(spec: Tokenizer, chat_tokens: list[str]):
    """The family's transformers tokenizer class on that vocabulary, as transformers 5 builds it when it
    loads the real model: GemmaTokenizer (no space prefix) or LlamaTokenizer (Llama 2, Mistral, Phi-3:
    a '▁' before the text only, not after special tokens)."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    vocab, merges = _spm_vocab(spec)
    cls = GemmaTokenizer if spec.spm_style == "gemma" else LlamaTokenizer
    extra = {"pad_token": spec.pad} if spec.pad else {}
    if spec.spm_style == "gemma":
        extra["mask_token"] = "<mask>"
    tok = cls(vocab=vocab, merges=merges, unk_token=spec.unk, bos_token=spec.bos, eos_token=spec.eos,
              add_bos_token=spec.add_bos, add_eos_token=False, **extra)
    if chat_tokens:
        tok.add_special_tokens({"additional_special_tokens": chat_tokens})
    if spec.eos not in tok.get_vocab():
        raise ValueError(f"{spec.eos} is not in the vocabulary")
    return tok


def build_tokenizer(name: str, path: Path):
    """Train and save the family's tiny tokenizer (with its chat template) into ``path``."""
    from transformers import PreTrainedTokenizerFast

    family = FAMILY_SPECS[name]
    spec = family.tokenizer
    if spec.kind == "bpe":
        fast = PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(spec), bos_token=spec.bos,
                                       eos_token=spec.eos, pad_token=spec.pad, add_bos_token=spec.add_bos,
                                       add_eos_token=False)
    else:
        fast = _spm_tokenizer(spec, SPM_CHAT_TOKENS[name])
    fast.chat_template = chat_template(name)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


# Families whose test-data template file has another name (Granite 4.0-H ships the Granite 4.0 template),
# and those whose test model uses the stand-in above although the file exists: gpt-oss's published
# template (tests/data/templates/gptoss.jinja) writes the current date and a system preamble into
# every prompt, which rawtune's Ollama translation cannot express (test_families_ssm_moe checks it
# falls back to the completion template).
TEMPLATE_FILES = {"granitehybrid": "granite4"}
STAND_IN_TEMPLATES = {"gptoss"}


def chat_template(name: str) -> str:
    """The family's chat template: the shared test-data file when there is one, else the one above."""
    shared = TEMPLATE_DIR / f"{TEMPLATE_FILES.get(name, name)}.jinja"
    if shared.is_file() and name not in STAND_IN_TEMPLATES:
        return shared.read_text(encoding="utf-8")
    return FAMILY_SPECS[name].template


def family_config(name: str, tokenizer, *, tied: Optional[bool] = None, layers: Optional[int] = None,
                  hidden: int = 64):
    """The family's HF config for a tiny model on ``tokenizer``."""
    import transformers

    family = FAMILY_SPECS[name]
    settings = dict(family.settings)
    n_layers = layers or len(settings.get("layer_types", [])) or 4
    values = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5,
                  tie_word_embeddings=family.tied if tied is None else tied,
                  eos_token_id=tokenizer.convert_tokens_to_ids(family.tokenizer.eos),
                  bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    values.update(settings)
    if family.config == "Gemma4TextConfig":  # its per-layer embedding table has one row per token too
        values["vocab_size_per_layer_input"] = values["vocab_size"]
    config = getattr(transformers, family.config)(**values)
    config.architectures = [family.arch]
    return config


def build_family(name: str, path: Path, *, tied: Optional[bool] = None, seed: int = 0) -> Path:
    """Write a tiny random model of family ``name`` (see ``FAMILIES``) with its tokenizer into ``path``.

    ``tied`` overrides whether the output head shares the embedding matrix (default: what the
    family's small models do).
    """
    import torch
    import transformers

    if name not in FAMILY_SPECS:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    path = Path(path)
    tokenizer = build_tokenizer(name, path)
    config = family_config(name, tokenizer, tied=tied)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_SPECS[name].arch)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_without_end(name: str, path: Path) -> Path:
    """A Phi-3-architecture model (``phi3`` or ``phi4mini``) whose vocabulary lacks ``<|end|>``: EOS is
    ``</s>`` (SentencePiece) or ``<|endoftext|>`` (o200k) instead."""
    import dataclasses

    spec = FAMILY_SPECS[name]
    chat = SPM_CHAT_TOKENS.get(name)
    tok = spec.tokenizer
    FAMILY_SPECS[name] = dataclasses.replace(spec, tokenizer=dataclasses.replace(
        tok, eos="</s>" if tok.kind == "spm" else "<|endoftext|>", specials=[t for t in tok.specials if t != "<|end|>"]))
    if chat is not None:
        SPM_CHAT_TOKENS[name] = [t for t in chat if t != "<|end|>"]
    try:
        return build_family(name, path)
    finally:
        FAMILY_SPECS[name] = spec
        if chat is not None:
            SPM_CHAT_TOKENS[name] = chat
