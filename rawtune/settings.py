"""Every setting rawtune takes, as dataclasses with one line of doc per field.

The same names are CLI flags (``max_steps`` is ``--max-steps``) and YAML keys, flat: each name
belongs to exactly one section. :func:`validate` is the one place that checks values, and its
messages name the flag and the fix. Presets fill the training fields a user left unset.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from . import quants
from .errors import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fused projections some families have instead of split ones (Phi-3, Phi-4-mini): a preset's split
# names select the fused module of such a model (rawtune.train.model_targets).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
STAGES = ["data", "train", "eval", "merge", "export", "push"]
QUANTS = quants.EXPORTABLE  # --quant values; the table itself is rawtune.quants
# How each quant type is spelled in GGUF file names, the UI and run.json.
QUANT_LABELS = {q: quants.get(q).label for q in QUANTS}


@dataclass
class DataSettings:
    """Where the raw text comes from and how it is cleaned, packed and split."""

    dataset: Optional[str] = None  # Hub dataset id, or a local file/folder (jsonl, csv, txt, parquet, md)
    dataset_config: Optional[str] = None  # Hub dataset configuration (subset) name
    split: str = "train"  # Hub dataset split to read
    revision: Optional[str] = None  # Hub dataset revision: branch, tag or commit
    streaming: bool = False  # stream a Hub dataset instead of downloading it whole
    max_documents: Optional[int] = None  # stop reading after this many documents (any source)
    text_column: Optional[str] = None  # column holding the text; default 'text', else the longest string column
    split_blank_lines: bool = False  # split .txt/.md files into documents at blank lines
    min_chars: int = 20  # drop documents shorter than this many characters after stripping
    dedupe: bool = True  # drop exact duplicate documents
    heldout_fraction: float = 0.05  # share of documents held out for perplexity, never trained on
    piece_tokens: Optional[int] = None  # a document too long to hold out whole is cut in pieces of this many tokens and only its last pieces are held out (default: --seq-len; 0: never cut)
    min_heldout_blocks: int = 4  # hold out at least this many blocks


@dataclass
class TrainSettings:
    """The base model and the LoRA recipe. Fields left as None come from the preset."""

    model: str = DEFAULT_MODEL  # Hub model id, local HF folder, or local .gguf file
    backend: str = "auto"  # auto (unsloth where CUDA is available, else peft), unsloth or peft
    preset: str = "auto"  # quick, standard or thorough: defaults for the fields below (auto: standard on CUDA, quick on CPU)
    seq_len: Optional[int] = None  # tokens per packed block
    lora_r: Optional[int] = None  # LoRA rank
    lora_alpha: Optional[int] = None  # LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rsLoRA)
    lora_dropout: Optional[float] = None  # dropout on the LoRA input
    use_rslora: Optional[bool] = None  # rank-stabilised LoRA scaling
    target_modules: Optional[list[str]] = None  # projections that get LoRA adapters
    train_embeddings: Optional[bool] = None  # also train embed_tokens and lm_head (full weights)
    embedding_learning_rate: Optional[float] = None  # learning rate for embed_tokens/lm_head
    load_in_4bit: bool = False  # load the base in 4-bit (QLoRA; CUDA and bitsandbytes only)
    gradient_checkpointing: Optional[str] = None  # auto, on, off or unsloth
    batch_size: Optional[int] = None  # blocks per micro-batch
    grad_accum: Optional[int] = None  # micro-batches per optimizer step
    epochs: Optional[float] = None  # passes over the training blocks (ignored when max_steps is set)
    max_steps: Optional[int] = None  # stop after this many optimizer steps
    learning_rate: Optional[float] = None  # peak learning rate for the LoRA weights
    warmup_ratio: Optional[float] = None  # share of steps spent warming up
    lr_scheduler: Optional[str] = None  # learning-rate schedule: cosine, linear or constant
    weight_decay: Optional[float] = None  # AdamW weight decay
    optimizer: str = "auto"  # auto (8-bit AdamW on CUDA, AdamW on CPU), adamw_8bit or adamw_torch
    seed: int = 3407  # random seed for data order and LoRA init
    save_steps: Optional[int] = None  # write a resumable checkpoint every this many steps
    eval_steps: Optional[int] = None  # compute held-out loss every this many steps (0: only at the end)
    eval_batches: int = 8  # held-out blocks used for each periodic eval
    logging_steps: int = 1  # report progress every this many steps
    resume: bool = False  # continue from the newest checkpoint in the run directory


@dataclass
class ExportSettings:
    """GGUF export: quantization and the files Ollama reads."""

    quant: list[str] = field(default_factory=lambda: list(quants.DEFAULT))  # quant types to write
    imatrix_blocks: int = 16  # training blocks for the importance matrix of k-quants (0: llama.cpp's plain quantization)
    name: Optional[str] = None  # file name stem for the GGUFs (default: the run directory's name)
    verify: bool = True  # load each GGUF in llama.cpp and measure its perplexity


@dataclass
class PushSettings:
    """Publishing to the Hugging Face Hub. The token is never stored."""

    repo: Optional[str] = None  # Hub model repo to push to, as user/name
    private: bool = False  # create the repo as private


@dataclass
class RunSettings:
    """A whole run: the run directory, the stages to run and every section above."""

    out: Optional[str] = None  # run directory
    stages: Optional[list[str]] = None  # stages to run (default: all; push only when --repo is given)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    push: PushSettings = field(default_factory=PushSettings)


SECTIONS = ("data", "train", "export", "push")

# Presets: "standard" is the seed recipe (continued pretraining with trained embeddings).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        seq_len=512, lora_r=16, lora_alpha=16, lora_dropout=0.0, use_rslora=False,
        target_modules=ALL_PROJECTIONS, train_embeddings=False, embedding_learning_rate=None,
        gradient_checkpointing="auto", batch_size=2, grad_accum=1, epochs=1.0,
        learning_rate=2e-4, warmup_ratio=0.05, lr_scheduler="cosine", weight_decay=0.0,
        save_steps=50, eval_steps=0,
    ),
    "standard": dict(
        seq_len=2048, lora_r=128, lora_alpha=64, lora_dropout=0.0, use_rslora=True,
        target_modules=ALL_PROJECTIONS, train_embeddings=True, embedding_learning_rate=5e-6,
        gradient_checkpointing="auto", batch_size=2, grad_accum=8, epochs=1.0,
        learning_rate=5e-5, warmup_ratio=0.1, lr_scheduler="cosine", weight_decay=0.0,
        save_steps=100, eval_steps=50,
    ),
    "thorough": dict(
        seq_len=2048, lora_r=256, lora_alpha=128, lora_dropout=0.0, use_rslora=True,
        target_modules=ALL_PROJECTIONS, train_embeddings=True, embedding_learning_rate=5e-6,
        gradient_checkpointing="auto", batch_size=2, grad_accum=8, epochs=3.0,
        learning_rate=5e-5, warmup_ratio=0.1, lr_scheduler="cosine", weight_decay=0.01,
        save_steps=100, eval_steps=50,
    ),
}


def field_docs(cls: type) -> dict[str, str]:
    """The one-line doc of each field, read from the comment beside it in this file."""
    import inspect

    docs: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", '"')):
            name = line.split(":", 1)[0].strip()
            docs[name] = line.split("#", 1)[1].strip()
    return docs


def section_of(name: str) -> Optional[str]:
    """Which section owns a flat key (None for top-level keys such as ``out``)."""
    for section in SECTIONS:
        cls = type(getattr(RunSettings(), section))
        if name in {f.name for f in fields(cls)}:
            return section
    return None


def all_keys() -> list[str]:
    """Every flat key a YAML file or the CLI may set."""
    top = [f.name for f in fields(RunSettings) if f.name not in SECTIONS]
    inner = [f.name for s in SECTIONS for f in fields(type(getattr(RunSettings(), s)))]
    return top + inner


def flag(name: str) -> str:
    """The CLI flag for a key: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def apply(settings: RunSettings, values: dict[str, Any], origin: str = "YAML") -> RunSettings:
    """Set flat keys on ``settings``; an unknown key raises with the closest valid names."""
    known = all_keys()
    for key, value in values.items():
        norm = str(key).replace("-", "_")
        if norm not in known:
            near = difflib.get_close_matches(norm, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown {origin} key '{key}'{hint}")
        section = section_of(norm)
        target = getattr(settings, section) if section else settings
        setattr(target, norm, coerce(type(target), norm, value, origin))
    return settings


def coerce(cls: type, name: str, value: Any, origin: str) -> Any:
    """Convert a value to its field's type, or say which key holds what kind of value."""
    annotation = str(next(f.type for f in fields(cls) if f.name == name))
    if value is None:
        return value
    if annotation.startswith(("str", "Optional[str")) or "list" in annotation:
        return _text_value(name, value, origin, "list" in annotation)
    try:
        if "bool" in annotation:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if "int" in annotation:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in annotation:
            return float(value)
    except (TypeError, ValueError):
        kind = "true or false" if "bool" in annotation else "a number"
        raise ConfigError(f"{origin} key '{name}' ({flag(name)}) must be {kind}, not {value!r}") from None
    return value


def _text_value(name: str, value: Any, origin: str, listing: bool) -> Any:
    """Text keys take text; a YAML number or bool is read as its text (``name: 2024``), a mapping is refused."""
    items = value if listing and isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (str, int, float)):  # bool is an int
            kind = "a comma-separated list" if listing else "text"
            raise ConfigError(f"{origin} key '{name}' ({flag(name)}) must be {kind}, not {value!r}")
    if listing and isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value lines")
    return loaded


def resolve_preset(train: TrainSettings) -> TrainSettings:
    """Return a copy of ``train`` with every None field filled from its preset."""
    if train.preset == "auto":
        train = dataclasses.replace(train, preset="standard" if has_cuda() else "quick")
    if train.preset not in PRESETS:
        raise ConfigError(f"--preset {train.preset!r} is unknown; use auto or one of {', '.join(PRESETS)}")
    resolved = dataclasses.replace(train)
    for key, value in PRESETS[train.preset].items():
        if getattr(resolved, key) is None:
            setattr(resolved, key, list(value) if isinstance(value, list) else value)
    return resolved


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (imported here so `import rawtune` needs no torch)."""
    import torch

    return torch.cuda.is_available()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(key)}: {message}")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value or [])


def validate(settings: RunSettings) -> RunSettings:
    """Check every value once, fill presets, and return the resolved settings.

    Each message names the flag at fault and what would fix it.
    """
    s = dataclasses.replace(settings)
    if not s.stages:
        s.stages = [st for st in STAGES if st != "push" or s.push.repo]
    s.stages = [st.lower() for st in _as_list(s.stages)]
    for stage in s.stages:
        _check(stage in STAGES, "stages", f"unknown stage {stage!r}; use some of {', '.join(STAGES)}")
    d = s.data
    _check(0.0 < d.heldout_fraction < 0.5, "heldout_fraction", "must be between 0 and 0.5, e.g. 0.05")
    _check(d.min_chars >= 0, "min_chars", "must be 0 or more")
    _check(d.min_heldout_blocks >= 1, "min_heldout_blocks", "must be at least 1")
    _check(d.max_documents is None or d.max_documents > 0, "max_documents", "must be positive")
    _check(d.piece_tokens is None or d.piece_tokens >= 0, "piece_tokens", "must be 0 (never cut) or more")
    t = s.train = resolve_preset(s.train)
    _check(t.backend in ("auto", "unsloth", "peft"), "backend", "use auto, unsloth or peft")
    _check(t.seq_len >= 16, "seq_len", "must be at least 16 tokens, e.g. 512 or 2048")
    _check(t.lora_r >= 1, "lora_r", "must be a positive rank, e.g. 16 or 128")
    _check(t.lora_alpha > 0, "lora_alpha", "must be positive, e.g. equal to --lora-r")
    _check(0.0 <= t.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    t.target_modules = _as_list(t.target_modules)
    _check(bool(t.target_modules), "target_modules", f"name at least one of {', '.join(ALL_PROJECTIONS)}")
    if any(m in EMBEDDING_MODULES for m in t.target_modules):
        # embed_tokens/lm_head in the target list means "train them fully", as in Unsloth's recipe.
        t.target_modules = [m for m in t.target_modules if m not in EMBEDDING_MODULES]
        t.train_embeddings = True
    _check(t.batch_size >= 1, "batch_size", "must be at least 1")
    _check(t.grad_accum >= 1, "grad_accum", "must be at least 1")
    _check(t.max_steps is None or t.max_steps >= 1, "max_steps", "must be at least 1")
    _check(t.epochs > 0, "epochs", "must be positive")
    _check(0 < t.learning_rate < 1, "learning_rate", "must be a small positive number, e.g. 5e-5")
    if t.embedding_learning_rate is None:
        t.embedding_learning_rate = t.learning_rate / 10
    _check(0 < t.embedding_learning_rate < 1, "embedding_learning_rate", "must be positive, e.g. 5e-6")
    _check(0 <= t.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1), e.g. 0.1")
    _check(t.lr_scheduler in ("cosine", "linear", "constant"), "lr_scheduler", "use cosine, linear or constant")
    _check(t.weight_decay >= 0, "weight_decay", "must be 0 or more")
    _check(t.optimizer in ("auto", "adamw_8bit", "adamw_torch"), "optimizer", "use auto, adamw_8bit or adamw_torch")
    _check(str(t.gradient_checkpointing) in ("auto", "on", "off", "unsloth", "True", "False"),
           "gradient_checkpointing", "use auto, on, off or unsloth")
    _check(t.save_steps >= 1, "save_steps", "must be at least 1")
    _check(t.eval_steps >= 0, "eval_steps", "must be 0 (only at the end) or more")
    e = s.export
    e.quant = [q.lower() for q in _as_list(e.quant)]
    for q in e.quant:
        _check(quants.label_of(q) is not None, "quant", f"unknown quant type {q!r}; use some of {', '.join(QUANTS)}")
    _check(e.imatrix_blocks >= 0, "imatrix_blocks", "must be 0 (no importance matrix) or more, e.g. 16")
    if "push" in s.stages:
        _check(bool(s.push.repo) and "/" in str(s.push.repo), "repo", "give the Hub repo as user/name")
    return s


# What a resumed run may change: how long it runs and how it reports, never what it learns from.
RESUME_MAY_CHANGE = {"out", "stages", "resume", "max_steps", "epochs", "save_steps", "eval_steps",
                     "eval_batches", "logging_steps", "backend", "gradient_checkpointing"}


def resume_settings(stored: RunSettings, given: dict[str, Any], origin: str = "flag") -> RunSettings:
    """The settings of a resumed run: the stored ones, with the given keys a resume may change.

    A given key that would change what the run learns from (the model and with it the tokenizer,
    --seq-len, the data, the LoRA recipe) is refused unless it equals the stored value.
    """
    wanted = apply(RunSettings(), given, origin=origin)
    for key in given:
        norm = str(key).replace("-", "_")
        section = section_of(norm)
        if section in ("export", "push") or norm in RESUME_MAY_CHANGE:
            continue
        before = getattr(getattr(stored, section) if section else stored, norm)
        after = getattr(getattr(wanted, section) if section else wanted, norm)
        if after != before and not (isinstance(before, list) and _as_list(after) == before):
            raise ConfigError(resume_refusal(norm, before, after))
    return apply(stored, given, origin=origin)


def resume_refusal(name: str, before: Any, after: Any) -> str:
    what = {"model": "model (and with it the tokenizer)", "seq_len": "block length"}.get(name, "setting")
    return (f"{flag(name)}: this run was trained with {name} {before!r}, not {after!r}; a resumed run keeps "
            f"its {what}. Drop {flag(name)} to resume, or start a new run with another --out")


def to_dict(settings: RunSettings) -> dict[str, Any]:
    """Settings as a plain dict for run.json (holds no secrets: no token field exists)."""
    return dataclasses.asdict(settings)


def from_dict(values: dict[str, Any]) -> RunSettings:
    """Rebuild settings from :func:`to_dict` output (as stored in run.json)."""
    s = RunSettings()
    for key, value in values.items():
        if key in SECTIONS:
            cls = type(getattr(s, key))
            known = {f.name for f in fields(cls)}
            setattr(s, key, cls(**{k: v for k, v in value.items() if k in known}))
        elif key in {f.name for f in fields(RunSettings)}:
            setattr(s, key, value)
    return s
