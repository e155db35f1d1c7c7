"""Tiny models and corpora built inside the tests, so nothing is downloaded.

``tiny_tokenizer`` trains a byte-level BPE (the GPT-2 pre-tokenizer, ChatML special tokens and a
ChatML chat template) on generated text in well under a second; ``tiny_model`` builds a llama- or
qwen2-family model of a few layers and a small width on top of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WORDS = ("the river carries bright stones past old mills while keepers of the lighthouse count "
         "ships and gulls over grey water near the harbour at dawn and dusk").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Repetitive but varied English-like sentences: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        words = [WORDS[(start + k) % len(WORDS)] for k in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def write_corpus(path: Path, documents: int = 120, seed: int = 0) -> Path:
    """A JSONL corpus in the seed's shape: {"text": ..., "metadata": {...}} per line."""
    rng = random.Random(seed)
    sents = sentences(documents * 4, seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(documents):
            text = " ".join(sents[i * 4:(i + 1) * 4]) + f" Entry {rng.randint(0, 9)}."
            handle.write(json.dumps({"text": text, "metadata": {"id": i, "source": "tiny"}}) + "\n")
    return path


def train_bpe(specials: list[str]):
    """A 400-token byte-level BPE (``tokenizers.Tokenizer``) trained on the generated sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(400) + ["Hello world! 123 numbers, punctuation; and more."], trainer)
    return tok


def tiny_tokenizer(path: Path) -> Path:
    """Train and save a small byte-level BPE tokenizer with ChatML special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHATML
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


def tiny_model(path: Path, tokenizer_dir: Path, arch: str = "llama", tie: bool = True,
               layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Build and save a randomly initialised llama- or qwen2-family model with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, rope_theta=10000.0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scramble_weights(model, seed: int, weight_std: float, norm_center: float = 1.0) -> None:
    """Large random weights, norms around ``norm_center`` and random biases, in place.

    Trained-looking spreads (unlike a fresh model's near-zero init) make export bugs show in the logits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.ndim == 1:
                p.copy_(norm_center + torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * weight_std)


def fast_loop_vs_peft(model, ids) -> tuple[float, dict]:
    """Loss and gradients of the fast loop's model against the PEFT ``model`` it was extracted from.

    Returns |loss difference| and, per trainable tensor, the relative error of its gradient.
    """
    import torch

    from rawtune.train import fast_loop

    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    fast = fast_loop.FastModel(fast_loop.extract(model, torch.float32), compile=False)
    labels = fast_loop.shifted_labels(ids, len(ids))
    loss = fast.loss(ids, labels, torch.tensor(float((labels >= 0).sum())))
    loss.backward()
    errors = {n: ((p.grad - ref_grads[n]).norm() / (ref_grads[n].norm() + 1e-12)).item()
              for n, p in model.named_parameters() if p.requires_grad}
    return abs(loss.item() - ref.item()), errors


def gguf_logits(path, tokens):
    """llama.cpp's logits for every position of ``tokens`` in the GGUF at ``path`` (fp32 KV cache)."""
    from rawtune.export import steps
    from rawtune.export.llama import load_llama

    llm = load_llama(path, n_ctx=128, logits_all=True, f32_cache=True)
    try:
        return steps.llama_logits(llm, tokens)
    finally:
        llm.close()
