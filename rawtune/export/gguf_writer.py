"""rawtune's own Hugging Face folder -> GGUF (F16 or F32) writer, built on the ``gguf`` package.

llama.cpp's converter script is not a dependency: it lives in a git checkout, imports torch
helpers of its own and (through a PyPI repackaging) replaces the official ``gguf`` package. This
module covers the families in :data:`FAMILIES` (Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 text, Phi-3/Phi-4-mini, SmolLM3, Granite 3.x dense, OLMo 2) and fails with
a clear :class:`ExportError` for anything else, or for a checkpoint of a known family that uses a
feature llama.cpp's architecture cannot express, instead of writing a file that loads but
generates garbage. Tensor names come from the gguf package's per-architecture maps; what is
model-specific is one table row per family. The tensors come from a :class:`TensorSource`
(a saved folder, or the streamed merge of a base and an adapter): the tensor infos are written
from the shapes first, then each tensor's data as it arrives, so memory holds one tensor.

What llama.cpp needs beyond the weights, and why:

- architectures llama.cpp runs with RoPE on interleaved pairs (llama, granite, smollm3) get their
  Q and K projections permuted per head, since HF checkpoints use the "rotate half" layout; the
  others (qwen2/3, gemma2/3, phi3, olmo2) run in the NEOX layout and are written unchanged;
- Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w: Gemma norm weights are written + 1;
- per-family hyperparameters: sliding-window size and per-layer pattern, soft-capping, the RoPE
  base of local layers (Gemma), Granite's four multipliers, partial rotary dimensions (Phi);
- byte-level BPE tokenizers need ``tokenizer.ggml.pre``, the name of the regex pre-tokenizer
  llama.cpp must use to split text the way the HF tokenizer does. It is read from the structure
  of ``tokenizer.json`` (not by hashing sample output), so an unknown structure fails loudly;
- SentencePiece-style tokenizers (Llama 2, Mistral, Phi-3, Gemma) are written as llama.cpp's
  ``llama`` vocabulary, with scores that reproduce the BPE merge order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..errors import ExportError

# Pre-tokenizer regexes as they appear in tokenizer.json (or implied by ByteLevel(use_regex=True)).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGIT_REGEX = r"\p{N}"  # tokenizers' Digits(individual_digits=True)
DIGITS_REGEX = r"\p{N}+"  # tokenizers' Digits(individual_digits=False)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (GPT-4o; Phi-4 mini): case-aware letter runs, contractions attached, '/' kept after punctuation.
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Sequence of split regexes -> the llama.cpp pre-tokenizer that applies the same splits.
# (llama.cpp's "smollm" runs \p{N} then the GPT-2 regex, which is what SmolLM/StarCoder's
# Digits(individual_digits=True) + ByteLevel sequence does.)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (GPT2_REGEX,): "gpt-2",
    (DIGIT_REGEX, GPT2_REGEX): "smollm",
    (LLAMA3_REGEX,): "llama-bpe",
    (QWEN2_REGEX,): "qwen2",
    (GPT4O_REGEX,): "gpt-4o",
}
# The same regex, for tokenizers that apply their merges even to words found whole in the vocabulary
# (tokenizer.json's ignore_merges false): llama.cpp's "llama-bpe" takes such words whole, its
# "dbrx" (the cl100k split OLMo 2 uses) applies the merges, as HF does.
MERGES_APPLIED = {"llama-bpe": "dbrx"}
PRE_TOKENIZER_TEXT = ("GPT-2 byte-level, SmolLM/StarCoder/Granite (digits + byte-level), Llama 3/SmolLM3, "
                      "OLMo 2 (cl100k), Qwen2/Qwen3, Phi-4 mini (o200k)")

# Normalizers that do not change ordinary text (NFC is what Qwen2 ships; llama.cpp skips it too).
HARMLESS_NORMALIZERS = {None, "NFC"}


@dataclass
class Vocab:
    """A tokenizer as GGUF stores it."""

    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)
    pre: Optional[str]  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: Optional[list[float]] = None  # SentencePiece piece scores
    add_space_prefix: bool = False  # SentencePiece: prepend '▁' to the text, as HF does


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: the model folder must hold a Hugging Face "
                          f"config and a fast tokenizer (tokenizer.json)") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); re-save the model with save_pretrained") from None


# ---------------------------------------------------------------- tokenizer


def _split_steps(pre: Optional[dict[str, Any]]) -> tuple[list[str], bool]:
    """The split regexes a tokenizer.json pre-tokenizer applies, and whether it is byte-level."""
    if pre is None:
        return [], False
    kind = pre.get("type")
    if kind == "Sequence":
        regexes: list[str] = []
        byte_level = False
        for step in pre.get("pretokenizers", []):
            more, bl = _split_steps(step)
            regexes += more
            byte_level = byte_level or bl
        return regexes, byte_level
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ExportError("the tokenizer's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp "
                              "cannot reproduce; export a model whose tokenizer.json has add_prefix_space false")
        return ([GPT2_REGEX] if pre.get("use_regex", True) else []), True
    if kind == "Digits":
        return [DIGIT_REGEX if pre.get("individual_digits") else DIGITS_REGEX], False
    if kind == "Split":
        pattern = pre.get("pattern", {})
        if "Regex" not in pattern or pre.get("invert") or pre.get("behavior") not in ("Isolated", None):
            raise ExportError(f"the tokenizer uses a Split pre-tokenizer ({json.dumps(pre)[:200]}) that llama.cpp "
                              f"cannot reproduce; supported pre-tokenizers: {PRE_TOKENIZER_TEXT}")
        return [pattern["Regex"]], False
    raise ExportError(f"the tokenizer's pre-tokenizer type {kind!r} has no llama.cpp equivalent; "
                      f"supported pre-tokenizers: {PRE_TOKENIZER_TEXT}")


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer.json."""
    regexes, byte_level = _split_steps(tokenizer_json.get("pre_tokenizer"))
    if not byte_level:
        raise ExportError("the tokenizer is not byte-level BPE (no ByteLevel pre-tokenizer); GGUF export "
                          f"supports byte-level BPE tokenizers with these pre-tokenizers: {PRE_TOKENIZER_TEXT}")
    name = PRE_TOKENIZERS.get(tuple(regexes))
    if name is None:
        shown = " then ".join(repr(r[:60]) for r in regexes) or "(none)"
        raise ExportError(f"the tokenizer splits text with {shown}, which rawtune cannot map to a llama.cpp "
                          f"pre-tokenizer (supported: {PRE_TOKENIZER_TEXT}); tokenization in llama.cpp/Ollama "
                          f"would differ from training")
    if not (tokenizer_json.get("model") or {}).get("ignore_merges", False):
        name = MERGES_APPLIED.get(name, name)
    normalizer = tokenizer_json.get("normalizer") or {}
    kinds = [n.get("type") for n in normalizer.get("normalizers", [])] if normalizer.get("type") == "Sequence" \
        else [normalizer.get("type")]
    bad = [k for k in kinds if k not in HARMLESS_NORMALIZERS]
    if bad:
        raise ExportError(f"the tokenizer normalizes text with {', '.join(map(str, bad))}, which llama.cpp does "
                          f"not do for byte-level BPE; export is not supported for this tokenizer")
    return name


def _looks_special(text: str) -> bool:
    # Same convention llama.cpp uses: <|...|> tokens are control tokens even if not flagged special.
    return text.startswith("<|") and text.endswith("|>")


def is_sentencepiece(tok: dict[str, Any]) -> bool:
    """A SentencePiece-style tokenizer (Llama 2, Mistral): byte-fallback BPE on '▁'-marked spaces."""
    model = tok.get("model", {})
    text = json.dumps({"n": tok.get("normalizer"), "p": tok.get("pre_tokenizer")})
    spaces = "Metaspace" in text or "\\u2581" in text  # the space mark, as json.dumps escapes it
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and spaces and '"ByteLevel"' not in text


def _prepends_space(tok: dict[str, Any]) -> bool:
    """Whether the HF tokenizer puts '▁' before the text (Prepend normalizer or Metaspace)."""
    text = json.dumps({"n": tok.get("normalizer"), "p": tok.get("pre_tokenizer")})
    if '"Prepend"' in text:
        return True
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(st.get("type") == "Metaspace" and st.get("prepend_scheme", "always") != "never"
               and st.get("add_prefix_space", True) for st in steps)


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((a, b))
    return pairs


def read_sentencepiece_vocab(tok: dict[str, Any], vocab_size: int) -> Vocab:
    """A SentencePiece vocabulary for llama.cpp's 'llama' tokenizer, from tokenizer.json alone.

    llama.cpp merges the adjacent pair whose result has the highest score, so each merged token
    scores minus the rank of the merge that makes it: the HF BPE merge order. (transformers 5
    does not save tokenizer.model with the merged model, so the scores cannot come from there.)
    """
    import gguf

    model = tok["model"]
    vocab: dict[str, int] = model.get("vocab", {})
    rank: dict[str, int] = {}
    for k, (a, b) in enumerate(_merge_pairs(model)):
        rank.setdefault(a + b, k)
    by_id: dict[int, tuple[str, float, int]] = {}
    unk = model.get("unk_token")
    for text, i in vocab.items():
        kind = gguf.TokenType.NORMAL
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        elif text == unk:
            kind = gguf.TokenType.UNKNOWN
        by_id[int(i)] = (text, -float(rank[text]) if text in rank else 0.0, int(kind))
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        special = added.get("special") or _looks_special(added["content"])
        kind = gguf.TokenType.UNKNOWN if added["content"] == unk else (
            gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        by_id[i] = (added["content"], 0.0, int(kind))
    _check_fits(by_id, vocab_size)
    missing = (f"[PAD{i}]", -1000.0, int(gguf.TokenType.UNUSED))
    rows = [by_id.get(i, (f"[PAD{i}]",) + missing[1:]) for i in range(vocab_size)]
    return Vocab("llama", None, [r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows],
                 _prepends_space(tok))


def _check_fits(by_id: dict[int, Any], vocab_size: int) -> None:
    """Every token id must have an embedding row (rows past the tokenizer become padding)."""
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} "
                          f"embedding rows; resize the embeddings before exporting")


def read_vocab(tok: dict[str, Any], vocab_size: int) -> Vocab:
    """Tokens and token types from a parsed tokenizer.json, padded to the model's embedding rows."""
    import gguf

    if is_sentencepiece(tok):
        return read_sentencepiece_vocab(tok, vocab_size)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"the tokenizer model is {model.get('type')!r}; GGUF export supports byte-level BPE "
                          f"tokenizers ({PRE_TOKENIZER_TEXT}) and SentencePiece-style BPE (Llama 2, Mistral)")
    pre = detect_pre_tokenizer(tok)
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        by_id[i] = added["content"]
        special = added.get("special") or _looks_special(added["content"])
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    _check_fits(by_id, vocab_size)
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(int(types[i]))
        else:  # embedding rows beyond the tokenizer (padding to a multiple of 64, etc.)
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    return Vocab("gpt2", pre, tokens, token_types)


def _post_processor_adds(tok: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds a special token before (BOS) / after (EOS) single texts."""
    post = tok.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single", [])
            first = "SpecialToken" in single[0] if single else False
            last = "SpecialToken" in single[-1] if single else False
            return first, last
    return False, False


# ---------------------------------------------------------------- tensors


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF 'rotate half' Q/K rows -> llama.cpp's interleaved RoPE pairs, per head."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"{model_dir} has no model.safetensors: save the merged model with "
                      f"save_pretrained(safe_serialization=True)")


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor in the folder's safetensors files as float32 numpy arrays (bf16 included)."""
    import torch
    from safetensors import safe_open

    for path in _safetensor_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                yield name, tensor.to(torch.float32).numpy()


@dataclass
class TensorSource:
    """The model's tensors as the writer takes them: every name and shape up front (for the tensor
    infos at the head of the file), then the arrays, one at a time, in the same order."""

    specs: list[tuple[str, tuple[int, ...]]]  # (HF name, shape) in the order ``arrays`` yields them
    arrays: Iterator[tuple[str, np.ndarray]]  # (HF name, float32 array)


def folder_tensors(model_dir: Path) -> TensorSource:
    """The tensors of a saved HF folder: shapes from the safetensors headers, arrays read one by one."""
    from safetensors import safe_open

    specs = []
    for path in _safetensor_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as handle:
            specs += [(name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys()]
    return TensorSource(specs, iter_hf_tensors(Path(model_dir)))


def _rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE parameters from either transformers 5 (``rope_parameters``) or 4 (``rope_theta``/``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency scale factors of Llama 3.1's 'llama3' RoPE, stored as ``rope_freqs.weight``."""
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _sliding_rope_theta(config: dict[str, Any]) -> Optional[float]:
    """The RoPE base of sliding-window layers where it differs per layer type (Gemma 3)."""
    local = (config.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict) and "rope_theta" in local:
        return float(local["rope_theta"])
    return float(config["rope_local_base_freq"]) if "rope_local_base_freq" in config else None


# ---------------------------------------------------------------- families
#
# Everything model-specific lives in FAMILIES: which llama.cpp architecture runs the HF class,
# how its weights must be changed, which hyperparameters it needs beyond the common ones and
# which tensors llama.cpp refuses to load without. Tensor names come from the gguf package's
# maps for that architecture.


@dataclass(frozen=True)
class Shape:
    """The sizes every family shares, read once from config.json."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    rope_dim: int  # rotated dimensions per head (partial rotary: fewer than head_dim)
    vocab_size: int
    tied: bool


@dataclass(frozen=True)
class Family:
    """How one HF architecture becomes one llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name (lower case is llama.cpp's name)
    label: str  # the models this covers, for messages
    permute_qk: bool = False  # llama.cpp runs RoPE on interleaved pairs (its NORM rope type)
    norm_offset: float = 0.0  # HF RMSNorm multiplies by (1 + w): write w + 1
    blocks: tuple[str, ...] = ("ATTN_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_NORM", "FFN_GATE",
                               "FFN_UP", "FFN_DOWN")  # gguf.MODEL_TENSOR names llama.cpp requires per block
    bias: tuple[str, ...] = ()  # per-block biases llama.cpp requires
    rope_types: tuple[str, ...] = ("default", "linear")
    must_tie: bool = False  # llama.cpp has no separate output matrix for this architecture
    hparams: Optional[Callable[[Any, dict[str, Any], Shape], None]] = None
    check: Optional[Callable[[dict[str, Any], Shape], None]] = None

    @property
    def model_arch(self) -> Any:
        import gguf

        return getattr(gguf.MODEL_ARCH, self.arch)


def _no_sliding_window(config: dict[str, Any], shape: Shape) -> None:
    """Qwen/OLMo 2/SmolLM3 checkpoints can switch on sliding attention, which their llama.cpp architecture lacks."""
    if config.get("use_sliding_window") and config.get("sliding_window"):
        raise ExportError("the model uses sliding-window attention (use_sliding_window true), which llama.cpp runs "
                          "as full attention for this architecture; set use_sliding_window false or export elsewhere")


def _gemma_attention_scale(config: dict[str, Any], shape: Shape, big_layers: int) -> None:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B layer count)."""
    scalar = float(config.get("query_pre_attn_scalar") or shape.head_dim)
    expected = shape.n_embd / shape.n_head if shape.n_layer == big_layers else shape.head_dim
    if not math.isclose(scalar, expected):
        raise ExportError(f"query_pre_attn_scalar is {scalar:g} but llama.cpp scales Gemma attention by "
                          f"1/sqrt({expected:g}); this checkpoint would run with different attention in llama.cpp")


def _layer_types(config: dict[str, Any], shape: Shape, default_every: int) -> list[str]:
    """Per-layer attention kinds: config.json's layer_types, or (older configs) its sliding-window
    pattern, every n-th layer global, as transformers derives them."""
    types = config.get("layer_types") or []
    if not types:
        every = int(config.get("sliding_window_pattern") or default_every)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(shape.n_layer)]
    if len(types) != shape.n_layer:
        raise ExportError(f"config.json lists {len(types)} layer_types for {shape.n_layer} layers; re-save the model")
    return types


def _swa_pattern(writer: Any, config: dict[str, Any], types: list[str]) -> None:
    """Sliding window size and which layers use it."""
    writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma2_hparams(writer: Any, config: dict[str, Any], shape: Shape) -> None:
    _swa_pattern(writer, config, _layer_types(config, shape, default_every=2))
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _gemma2_check(config: dict[str, Any], shape: Shape) -> None:
    _gemma_attention_scale(config, shape, big_layers=46)
    # llama.cpp's gemma2 always soft-caps both (default 50 and 30); a config without them cannot be expressed.
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not config.get(key):
            raise ExportError(f"Gemma 2 without {key}: llama.cpp's gemma2 always applies it, so this checkpoint "
                              f"would run differently there")


def _gemma3_hparams(writer: Any, config: dict[str, Any], shape: Shape) -> None:
    types = _layer_types(config, shape, default_every=6)
    if config.get("sliding_window") and "sliding_attention" in types:
        _swa_pattern(writer, config, types)
        local = _sliding_rope_theta(config)
        if local is not None:
            writer.add_rope_freq_base_swa(local)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _gemma3_check(config: dict[str, Any], shape: Shape) -> None:
    _gemma_attention_scale(config, shape, big_layers=62)
    if config.get("attn_logit_softcapping"):
        raise ExportError("Gemma 3 with attention soft-capping: llama.cpp's gemma3 does not apply it")
    if config.get("use_bidirectional_attention"):
        raise ExportError("bidirectional Gemma 3 (an embedding model) is not a causal LM; GGUF export covers causal LMs")
    if str(_rope_settings(config).get("rope_type") or "default") != "default":
        raise ExportError("Gemma 3 with scaled RoPE on its global layers (the 4B+ multimodal models) is not "
                          "supported by rawtune's GGUF writer; supported: the text models without scaling (270M, 1B)")


def _granite_hparams(writer: Any, config: dict[str, Any], shape: Shape) -> None:
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))


def _smollm3_check(config: dict[str, Any], shape: Shape) -> None:
    # llama.cpp's smollm3 skips RoPE on every 4th layer, the published models' layout; anything else differs.
    _no_sliding_window(config, shape)
    want = [int((i + 1) % 4 != 0) for i in range(shape.n_layer)]
    have = config.get("no_rope_layers")
    if have is None:  # transformers derives the list from the interval
        every = int(config.get("no_rope_layer_interval") or 4)
        have = [int((i + 1) % every != 0) for i in range(shape.n_layer)]
    if [int(x) for x in have] != want:
        raise ExportError(f"SmolLM3 layers without RoPE are {have}; llama.cpp's smollm3 leaves out RoPE on every "
                          f"4th layer only ({want}), so this checkpoint would run differently")


def _longrope(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """LongRoPE settings (Phi-3.5 mini, Phi-4 mini: per-frequency factors, short and long context)."""
    rope = _rope_settings(config)
    if str(rope.get("rope_type") or "").lower() not in ("longrope", "su"):
        return None
    orig = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings"))
    factor = float(rope.get("factor") or int(config["max_position_embeddings"]) / orig)
    # The same cos/sin scale transformers applies (its default when the config names none).
    attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
    return {"orig": orig, "attn_factor": float(attn), "long": rope["long_factor"], "short": rope["short_factor"]}


def _phi3_hparams(writer: Any, config: dict[str, Any], shape: Shape) -> None:
    # llama.cpp picks the long factors when the context it runs with exceeds the original one;
    # transformers picks them by sequence length: the same for prompts shorter than the context.
    longrope = _longrope(config)
    if longrope:
        writer.add_rope_scaling_orig_ctx_len(longrope["orig"])
        writer.add_rope_scaling_attn_factors(longrope["attn_factor"])


def extra_tensors(config: dict[str, Any], shape: Shape, rope_type: str) -> dict[str, np.ndarray]:
    """Tensors llama.cpp reads that the checkpoint does not hold: RoPE frequency factors."""
    import gguf

    if rope_type == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(_rope_settings(config), shape.head_dim)}
    longrope = _longrope(config) if rope_type in ("longrope", "su") else None
    if not longrope:
        return {}
    out = {}
    for key, kind in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
        factors = np.asarray(longrope[key], dtype=np.float32)
        if factors.shape != (shape.rope_dim // 2,):
            raise ExportError(f"rope {key}_factor has {factors.size} values; llama.cpp needs one per rotated "
                              f"pair ({shape.rope_dim // 2})")
        out[gguf.TENSOR_NAMES[kind] + ".weight"] = factors
    return out


def _phi3_check(config: dict[str, Any], shape: Shape) -> None:
    if shape.head_dim * shape.n_head != shape.n_embd:
        raise ExportError("Phi-3 with head_dim * heads != hidden_size cannot be run by llama.cpp's phi3")


def _no_permute_partial(config: dict[str, Any], shape: Shape) -> None:
    if shape.rope_dim != shape.head_dim:
        raise ExportError("partial rotary embeddings in a llama-layout model are not supported by the GGUF writer")


LLAMA_LIKE = dict(permute_qk=True, check=_no_permute_partial)
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", "Llama 2/3/3.1/3.2, SmolLM/SmolLM2", rope_types=("default", "linear", "llama3"),
                               **LLAMA_LIKE),
    "MistralForCausalLM": Family("LLAMA", "Mistral", **LLAMA_LIKE),
    "Qwen2ForCausalLM": Family("QWEN2", "Qwen2/Qwen2.5", bias=("ATTN_Q", "ATTN_K", "ATTN_V"), check=_no_sliding_window),
    "Qwen3ForCausalLM": Family("QWEN3", "Qwen3", check=_no_sliding_window,
                               blocks=Family.blocks + ("ATTN_Q_NORM", "ATTN_K_NORM")),
    "Gemma2ForCausalLM": Family("GEMMA2", "Gemma 2", norm_offset=1.0, must_tie=True, hparams=_gemma2_hparams,
                                check=_gemma2_check, blocks=Family.blocks + ("ATTN_POST_NORM", "FFN_POST_NORM")),
    "Gemma3ForCausalLM": Family("GEMMA3", "Gemma 3 (text)", norm_offset=1.0, hparams=_gemma3_hparams,
                                check=_gemma3_check, blocks=Family.blocks + (
                                    "ATTN_POST_NORM", "FFN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM")),
    "Phi3ForCausalLM": Family("PHI3", "Phi-3/Phi-3.5/Phi-4-mini", check=_phi3_check, hparams=_phi3_hparams,
                              rope_types=("default", "longrope", "su"),
                              blocks=("ATTN_NORM", "ATTN_QKV", "ATTN_OUT", "FFN_NORM", "FFN_UP", "FFN_DOWN")),
    "SmolLM3ForCausalLM": Family("SMOLLM3", "SmolLM3", permute_qk=True, check=_smollm3_check),
    "GraniteForCausalLM": Family("GRANITE", "Granite 3.x dense", hparams=_granite_hparams, **LLAMA_LIKE),
    "Olmo2ForCausalLM": Family("OLMO2", "OLMo 2", check=_no_sliding_window,
                               blocks=("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "ATTN_POST_NORM", "ATTN_Q_NORM",
                                       "ATTN_K_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN", "FFN_POST_NORM")),
}
SUPPORTED_ARCHITECTURES = {name: fam.arch.lower() for name, fam in FAMILIES.items()}
SUPPORTED_TEXT = "; ".join(f"{fam.label} ({name})" for name, fam in FAMILIES.items())


def hf_architecture(config: dict[str, Any]) -> tuple[str, str]:
    """The HF architecture class and the llama.cpp architecture it maps to."""
    names = config.get("architectures") or []
    for name in names:
        if name in FAMILIES:
            return name, FAMILIES[name].arch.lower()
    raise ExportError(
        f"GGUF export does not support the architecture {', '.join(names) or config.get('model_type', '?')}; "
        f"supported: {SUPPORTED_TEXT}. Train on one of those, or convert this model with llama.cpp's own tools"
    )


def read_shape(config: dict[str, Any]) -> Shape:
    n_head = int(config["num_attention_heads"])
    n_embd = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    partial = float(_rope_settings(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    return Shape(n_layer=int(config["num_hidden_layers"]), n_head=n_head,
                 n_head_kv=int(config.get("num_key_value_heads") or n_head), n_embd=n_embd, head_dim=head_dim,
                 rope_dim=int(head_dim * partial), vocab_size=int(config["vocab_size"]),
                 tied=bool(config.get("tie_word_embeddings", False)))


# ---------------------------------------------------------------- writer


def _write_hparams(writer: Any, config: dict[str, Any], family: Family, shape: Shape, ftype: str) -> str:
    """The hyperparameters every family shares, then the family's own; returns the RoPE type."""
    import gguf

    rope = _rope_settings(config)
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type not in family.rope_types:
        raise ExportError(f"RoPE scaling type {rope_type!r} is not supported by rawtune's GGUF writer for "
                          f"{family.label} (supported: {', '.join(family.rope_types)})")
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(shape.n_layer)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.rope_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
    if family.hparams:
        family.hparams(writer, config, shape)
    return rope_type


def _write_vocab(writer: Any, model_dir: Path, tok_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Tokens, merges or scores, special token ids, BOS/EOS flags and the chat template."""
    import gguf

    vocab = read_vocab(tok_json, vocab_size)
    add_bos, add_eos = _post_processor_adds(tok_json)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # SpecialVocab reads merges, special token ids and the chat template (incl. chat_template.jinja).
    bpe = vocab.model == "gpt2"
    special = gguf.SpecialVocab(model_dir, load_merges=bpe, n_vocab=vocab_size)
    if bpe and not special.merges:
        raise ExportError(f"{model_dir / 'tokenizer.json'} has no BPE merges; cannot write the tokenizer")
    special.add_special_token = {}  # written explicitly below, from the HF post-processor
    special.add_to_gguf(writer, quiet=True)
    # Explicit flags: llama.cpp's defaults for gpt2-style vocabularies differ by pre-tokenizer.
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    return {"tokenizer": vocab.model, "pre_tokenizer": vocab.pre, "add_bos": add_bos,
            "chat_template": special.chat_template is not None}


def transform_tensor(hf_name: str, data: np.ndarray, family: Family, shape: Shape) -> np.ndarray:
    """The family's weight changes: RoPE row order for llama-layout archs, Gemma's norm offset."""
    if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_rope(data, shape.n_head)
    elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_rope(data, shape.n_head_kv)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        data = data + np.float32(family.norm_offset)
    return data


def _skipped(hf_name: str, shape: Shape) -> bool:
    """Tensors a checkpoint may hold that the GGUF leaves out."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # recomputed by llama.cpp from the rope settings
    return shape.tied and hf_name == "lm_head.weight"  # llama.cpp reuses token_embd when output.weight is absent


@dataclass(frozen=True)
class Planned:
    """One tensor of the GGUF: where it comes from, its GGUF name, shape and stored dtype."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype written


def _plan_tensors(specs: list[tuple[str, tuple[int, ...]]], hf_arch: str, family: Family, shape: Shape,
                  float_type: Any) -> list[Planned]:
    """The GGUF tensors, in file order, from names and shapes alone (the family's transforms keep shapes)."""
    import gguf

    tensor_map = gguf.get_tensor_name_map(family.model_arch, shape.n_layer)
    planned = []
    for hf_name, dims in specs:
        if _skipped(hf_name, shape):
            continue
        gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name} has no GGUF name for {hf_arch}; this checkpoint holds "
                              f"weights rawtune's writer does not know (supported: {SUPPORTED_TEXT})")
        # 1-D tensors (norms, biases) stay float32, as llama.cpp expects for them.
        planned.append(Planned(hf_name, gguf_name, tuple(dims), np.dtype(np.float32 if len(dims) == 1 else float_type)))
    return planned


def _write_tensor_data(writer: Any, planned: list[Planned], arrays: Iterator[tuple[str, np.ndarray]],
                       family: Family, shape: Shape) -> None:
    """Each tensor's data as it arrives, in the order of the infos already written: one in memory at a time."""
    expected = iter(planned)
    for hf_name, data in arrays:
        if _skipped(hf_name, shape):
            continue
        want = next(expected, None)
        if want is None or want.hf_name != hf_name or tuple(data.shape) != want.shape:
            raise ExportError(f"internal: the tensor stream gave {hf_name} {tuple(data.shape)} where "
                              f"{want.hf_name if want else 'nothing'} {want.shape if want else ''} was announced")
        writer.write_tensor_data(np.ascontiguousarray(transform_tensor(hf_name, data, family, shape), dtype=want.dtype))
        del data
    left = next(expected, None)
    if left is not None:
        raise ExportError(f"internal: the tensor stream ended before {left.hf_name}")


def required_tensors(family: Family, shape: Shape) -> set[str]:
    """The tensor names llama.cpp will not load the architecture without."""
    import gguf

    def name(kind: str, bid: Optional[int] = None, suffix: str = "weight") -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + "." + suffix

    need = {name("TOKEN_EMBD"), name("OUTPUT_NORM")} | (set() if shape.tied else {name("OUTPUT")})
    for i in range(shape.n_layer):
        need |= {name(kind, i) for kind in family.blocks} | {name(kind, i, "bias") for kind in family.bias}
    return need


def convert(model_dir: str | Path, out_path: str | Path, ftype: str = "f16", name: Optional[str] = None,
            license: Optional[str] = None, log: Callable[[str], None] = print,
            tensors: Optional[TensorSource] = None) -> dict[str, Any]:
    """Write the HF model in ``model_dir`` as one GGUF file (``ftype`` f16 or f32).

    ``tensors``: where the weights come from (default: the folder's safetensors files); the
    folder then only needs config.json and the tokenizer. The tensor infos are written first,
    then each tensor's data as it arrives, so memory holds one tensor, not the model.
    Returns a small report: architecture, pre-tokenizer, tensor count and bytes written.
    """
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if ftype not in ("f16", "f32"):
        raise ExportError(f"GGUF conversion writes f16 or f32, not {ftype!r}; quantize the f16 file instead")
    config = read_json(model_dir / "config.json")
    hf_arch, arch = hf_architecture(config)
    family = FAMILIES[hf_arch]
    shape = read_shape(config)
    if family.check:
        family.check(config, shape)
    if family.must_tie and not shape.tied:
        raise ExportError(f"llama.cpp's {arch} has no separate output matrix, but this {family.label} model has "
                          f"untied embeddings (tie_word_embeddings false, e.g. after training the embeddings): "
                          f"train it with LoRA only (train_embeddings false) to export it")
    if config.get("attention_bias") and family.permute_qk:
        log(f"[export] note: {arch} model with attention biases; biases are written and permuted like Q/K")
    tok_json = read_json(model_dir / "tokenizer.json")
    source = tensors or folder_tensors(model_dir)
    planned = _plan_tensors(source.specs, hf_arch, family, shape, np.float16 if ftype == "f16" else np.float32)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        if license:
            writer.add_license(license)
        rope_type = _write_hparams(writer, config, family, shape, ftype)
        vocab = _write_vocab(writer, model_dir, tok_json, shape.vocab_size)
        extras = extra_tensors(config, shape, rope_type)  # small: held until their turn at the end
        for t in planned:
            writer.add_tensor_info(t.gguf_name, t.shape, t.dtype, math.prod(t.shape) * t.dtype.itemsize)
        for extra_name, data in extras.items():
            writer.add_tensor_info(extra_name, data.shape, data.dtype, data.nbytes)
        seen = {t.gguf_name for t in planned} | set(extras)
        _check_complete(seen, required_tensors(family, shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, planned, source.arrays, family, shape)
        for data in extras.values():
            writer.write_tensor_data(data)
    finally:
        writer.close()
    tmp.replace(out_path)
    return {"architecture": arch, "hf_architecture": hf_arch, "tensors": len(seen),
            "bytes": out_path.stat().st_size, "tied_embeddings": shape.tied, **vocab}


def _check_complete(seen: set[str], need: set[str]) -> None:
    """Fail when a tensor llama.cpp needs is missing (a missing one only shows up at load time)."""
    missing = sorted(need - seen)
    if missing:
        raise ExportError(f"the model is missing {len(missing)} tensors llama.cpp needs "
                          f"(e.g. {', '.join(missing[:4])}); the model's safetensors files are incomplete: fetch the base "
                          f"model again (or, for a merged folder, re-run `rawtune merge`)")
