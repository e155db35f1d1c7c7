"""rawtune's own Hugging Face folder -> GGUF (F16 or F32) writer, built on the ``gguf`` package.

llama.cpp's converter script is not a dependency: it lives in a git checkout, imports torch
helpers of its own and (through a PyPI repackaging) replaces the official ``gguf`` package. This
module covers the families of :mod:`rawtune.families` that declare a ``Gguf`` (their
architecture, required tensors, hyperparameter and tensor hooks) and fails with a clear
:class:`ExportError` for anything else, or for a checkpoint of a known family that uses a
feature llama.cpp's architecture cannot express, instead of writing a file that loads but
generates garbage. Tensor names come from the gguf package's per-architecture maps (or the
family's tensors hook). The tensors come from a :class:`TensorSource`
(a saved folder, or the streamed merge of a base and an adapter): the tensor infos are written
from the shapes first, then each tensor's data as it arrives, so memory holds one tensor.

What llama.cpp needs beyond the weights, and why:

- architectures llama.cpp runs with RoPE on interleaved pairs (``permute_qk``) get their Q and K
  projections permuted per head, since HF checkpoints use the "rotate half" layout; the others
  run in the NEOX layout and are written unchanged;
- RMSNorms that multiply by (1 + w) where llama.cpp multiplies by w (``norm_offset``) are written + 1;
- per-family hyperparameters and extra tensors through the family's hooks;
- byte-level BPE tokenizers need ``tokenizer.ggml.pre``, the name of the regex pre-tokenizer
  llama.cpp must use to split text the way the HF tokenizer does. It is read from the structure
  of ``tokenizer.json`` (not by hashing sample output), so an unknown structure fails loudly;
- SentencePiece-style tokenizers are written as llama.cpp's
  ``llama`` vocabulary, with scores that reproduce the BPE merge order.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .. import families
from ..errors import ExportError
from ..families.base import DIGIT_REGEX, DIGITS_REGEX, GPT2_REGEX, Family, Shape, TensorOut, read_shape, rope_settings

# Sequence of split regexes -> the llama.cpp pre-tokenizer that applies the same splits, and the
# names that change when a tokenizer applies merges to whole words: what the families declare.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = families.pre_tokenizers()
MERGES_APPLIED: dict[str, str] = families.merges_applied()
PRE_TOKENIZER_TEXT = "the splits of llama.cpp's " + ", ".join(dict.fromkeys(PRE_TOKENIZERS.values())) + " pre-tokenizers"

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


def vocab_tokens(tok: dict[str, Any]) -> frozenset:
    """Every token text of a parsed tokenizer.json (model vocabulary and added tokens)."""
    vocab = tok.get("model", {}).get("vocab", {})
    texts = vocab if isinstance(vocab, dict) else [entry[0] for entry in vocab]  # Unigram: [text, score] pairs
    return frozenset(texts) | {a["content"] for a in tok.get("added_tokens", [])}


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


def family_of(config: dict[str, Any]) -> tuple[str, Family]:
    """The HF architecture class and its registered family, refused when GGUF export does not cover it."""
    names = config.get("architectures") or []
    for name in names:
        family = families.family_for_arch(name)
        if family is not None and family.gguf is not None:
            return name, family
    raise ExportError(
        f"GGUF export does not support the architecture {', '.join(names) or config.get('model_type', '?')}; "
        f"supported: {families.supported_text()}. Train on one of those, or convert this model with llama.cpp's own tools"
    )


def hf_architecture(config: dict[str, Any]) -> tuple[str, str]:
    """The HF architecture class and the llama.cpp architecture it maps to."""
    name, family = family_of(config)
    return name, family.gguf.name


def extra_tensors(config: dict[str, Any], family: Family, shape: Shape, rope_type: str) -> dict[str, np.ndarray]:
    """Tensors llama.cpp reads that the checkpoint does not hold (the family's hook: RoPE factors)."""
    hook = family.gguf.extra_tensors
    return hook(config, shape, rope_type) if hook else {}


# ---------------------------------------------------------------- writer


def _write_hparams(writer: Any, config: dict[str, Any], family: Family, shape: Shape, ftype: str) -> str:
    """The hyperparameters every family shares, then the family's own; returns the RoPE type."""
    import gguf

    rope = rope_settings(config)
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type not in family.gguf.rope_types:
        raise ExportError(f"RoPE scaling type {rope_type!r} is not supported by rawtune's GGUF writer for "
                          f"{family.label} (supported: {', '.join(family.gguf.rope_types)})")
    common: dict[str, Callable[[], Any]] = {  # GGUFWriter.add_<name> -> its value (read only when written)
        "context_length": lambda: int(config.get("max_position_embeddings") or 2048),
        "embedding_length": lambda: shape.n_embd,
        "feed_forward_length": lambda: int(config["intermediate_size"]),
        "block_count": lambda: shape.n_layer,
        "head_count": lambda: shape.n_head,
        "head_count_kv": lambda: shape.n_head_kv,
        "key_length": lambda: shape.head_dim,
        "value_length": lambda: shape.head_dim,
        "rope_dimension_count": lambda: shape.rope_dim,
        "rope_freq_base": lambda: float(rope.get("rope_theta", 10000.0)),
        "layer_norm_rms_eps": lambda: float(config.get("rms_norm_eps", 1e-6)),
        "vocab_size": lambda: shape.vocab_size,
    }
    for key, value in common.items():
        if key not in family.gguf.skip_common:  # the family's hparams hook writes these itself
            getattr(writer, f"add_{key}")(value())
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
    if family.gguf.hparams:
        family.gguf.hparams(writer, config, shape)
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


def transform_tensor(hf_name: str, data: np.ndarray, spec: Any, shape: Shape) -> np.ndarray:
    """The family's weight changes (``spec``: its :class:`~rawtune.families.base.Gguf`): RoPE row
    order for llama-layout archs, Gemma's norm offset, then the family's own transform hook."""
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_rope(data, shape.n_head)
    elif spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_rope(data, shape.n_head_kv)
    if spec.norm_offset and hf_name.endswith("norm.weight"):
        data = data + np.float32(spec.norm_offset)
    if spec.transform is not None:
        data = spec.transform(hf_name, data, shape)
    return data


def _skipped(hf_name: str, shape: Shape) -> bool:
    """Tensors a checkpoint may hold that the GGUF leaves out."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # recomputed by llama.cpp from the rope settings
    return shape.tied and hf_name == "lm_head.weight"  # the embedding is written in its place (or shared)


@dataclass(frozen=True)
class Planned:
    """One tensor of the GGUF: the HF tensor it comes from, its GGUF name, shape, stored dtype and,
    for tensors a family hook makes, the hook's conversion (else the standard transform)."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype written
    convert: Optional[Callable[[Any], np.ndarray]] = None
    inputs: tuple[str, ...] = ()  # every HF tensor it is made from, when several (hf_name: the last read)


def _outputs(hf_name: str, dims: tuple[int, ...], tensor_map: Any, hf_arch: str, family: Family,
             config: dict[str, Any], shape: Shape) -> list[TensorOut]:
    """The GGUF tensors one HF tensor becomes: the family's tensors hook, else the name map's one name
    (plus output.weight from a tied embedding where llama.cpp requires it)."""
    if family.gguf.tensors is not None:
        made = family.gguf.tensors(hf_name, dims, config, shape)
        if made is not None:
            return made
    gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ExportError(f"tensor {hf_name} has no GGUF name for {hf_arch}; this checkpoint holds "
                          f"weights rawtune's writer does not know (supported: {families.supported_text()})")
    out = [TensorOut(gguf_name, dims)]
    if shape.tied and family.embeddings.output_when_tied and gguf_name == "token_embd.weight":
        out.append(TensorOut("output.weight", dims))
    return out


def _plan_tensors(specs: list[tuple[str, tuple[int, ...]]], hf_arch: str, family: Family, shape: Shape,
                  float_type: Any, config: Optional[dict[str, Any]] = None) -> list[Planned]:
    """The GGUF tensors, in file order, from names and shapes alone (the standard transforms keep shapes;
    a family's tensors hook states the shapes its conversions give)."""
    import gguf

    tensor_map = gguf.get_tensor_name_map(family.gguf.model_arch, shape.n_layer)
    order = {name: i for i, (name, _) in enumerate(specs)}
    planned: list[Planned] = []
    waiting: dict[str, list[Planned]] = {}  # tensors made from several: placed after their last input
    for hf_name, dims in specs:
        if _skipped(hf_name, shape):
            continue
        for out in _outputs(hf_name, tuple(dims), tensor_map, hf_arch, family, config or {}, shape):
            # 1-D tensors (norms, biases) stay float32, as llama.cpp expects for them.
            f32 = len(out.shape) == 1 if out.f32 is None else out.f32
            dtype = np.dtype(np.float32 if f32 else float_type)
            if not out.inputs:
                planned.append(Planned(hf_name, out.name, tuple(out.shape), dtype, out.convert))
                continue
            inputs = tuple(dict.fromkeys((hf_name,) + tuple(out.inputs)))
            missing = [n for n in inputs if n not in order]
            if missing:
                raise ExportError(f"{out.name} is made from {', '.join(missing)}, which the checkpoint does not hold")
            last = max(inputs, key=order.__getitem__)
            waiting.setdefault(last, []).append(Planned(last, out.name, tuple(out.shape), dtype, out.convert, inputs))
        planned += waiting.pop(hf_name, [])
    return planned


def _write_tensor_data(writer: Any, planned: list[Planned], arrays: Iterator[tuple[str, np.ndarray]],
                       family: Family, shape: Shape, known: Optional[set[str]] = None) -> None:
    """Each tensor's data as it arrives, in the order of the infos already written: one HF tensor in
    memory at a time (the GGUF tensors made from it are consecutive), plus the inputs a tensor made
    from several waits for."""
    expected = iter(planned)
    want = next(expected, None)
    announced = {p.hf_name for p in planned}
    uses = Counter(name for p in planned for name in p.inputs if name != p.hf_name)  # reads still to come
    held: dict[str, np.ndarray] = {}
    for hf_name, data in arrays:
        if known is not None and hf_name not in known:
            raise ExportError(f"internal: the tensor stream gave {hf_name}, which was not announced")
        if uses[hf_name]:
            held[hf_name] = data
        if hf_name not in announced:
            continue  # left out, or only an input of a later tensor
        if want is None or want.hf_name != hf_name:
            raise ExportError(f"internal: the tensor stream gave {hf_name} {tuple(data.shape)} where "
                              f"{want.hf_name if want else 'nothing'} {want.shape if want else ''} was announced")
        while want is not None and want.hf_name == hf_name:
            if want.inputs:
                out = want.convert({name: held.get(name, data) if name != hf_name else data for name in want.inputs})
            elif want.convert:
                out = want.convert(data)
            else:
                out = transform_tensor(hf_name, data, family.gguf, shape)
            if tuple(out.shape) != want.shape:
                raise ExportError(f"internal: {hf_name} gave {want.gguf_name} {tuple(out.shape)} where "
                                  f"{want.shape} was announced")
            writer.write_tensor_data(np.ascontiguousarray(out, dtype=want.dtype))
            for name in want.inputs:
                if name != hf_name:
                    uses[name] -= 1
                    if not uses[name]:
                        held.pop(name, None)
            want = next(expected, None)
        del data
    if want is not None:
        raise ExportError(f"internal: the tensor stream ended before {want.hf_name}")


def required_tensors(family: Family, shape: Shape, config: Optional[dict[str, Any]] = None) -> set[str]:
    """The tensor names llama.cpp will not load the architecture without."""
    import gguf

    def name(kind: str, bid: Optional[int] = None, suffix: str = "weight") -> str:
        return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + "." + suffix

    spec = family.gguf
    output = not shape.tied or family.embeddings.output_when_tied
    need = {name("TOKEN_EMBD"), name("OUTPUT_NORM")} | ({name("OUTPUT")} if output else set())
    for i in range(shape.n_layer):
        need |= {name(kind, i) for kind in spec.blocks} | {name(kind, i, "bias") for kind in spec.bias}
    if spec.required is not None:
        need |= spec.required(config or {}, shape)
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
    hf_arch, family = family_of(config)
    arch = family.gguf.name
    shape = family.gguf.shape(config) if family.gguf.shape else read_shape(config)
    if family.gguf.check:
        family.gguf.check(config, shape)
    if family.embeddings.shared and not shape.tied:
        raise ExportError(f"llama.cpp's {arch} has no separate output matrix, but this {family.label} model has "
                          f"untied embeddings (tie_word_embeddings false, e.g. after training the embeddings): "
                          f"train it with LoRA only (train_embeddings false) to export it")
    if config.get("attention_bias") and family.gguf.permute_qk:
        log(f"[export] note: {arch} model with attention biases; biases are written and permuted like Q/K")
    tok_json = read_json(model_dir / "tokenizer.json")
    refused = families.refusal(config, vocab_tokens(tok_json))
    if refused:
        raise ExportError(refused)
    source = tensors or folder_tensors(model_dir)
    planned = _plan_tensors(source.specs, hf_arch, family, shape, np.float16 if ftype == "f16" else np.float32, config)

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
        extras = extra_tensors(config, family, shape, rope_type)  # small: held until their turn at the end
        for t in planned:
            writer.add_tensor_info(t.gguf_name, t.shape, t.dtype, math.prod(t.shape) * t.dtype.itemsize)
        for extra_name, data in extras.items():
            writer.add_tensor_info(extra_name, data.shape, data.dtype, data.nbytes)
        seen = {t.gguf_name for t in planned} | set(extras)
        _check_complete(seen, required_tensors(family, shape, config))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, planned, source.arrays, family, shape, {n for n, _ in source.specs})
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
