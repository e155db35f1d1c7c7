"""Every setting rawtune takes, as dataclasses whose fields carry their own doc, kind and choices.

The same names are CLI flags (``max_steps`` is ``--max-steps``) and YAML keys, flat: each name
belongs to exactly one section. Each field's metadata (``doc``, ``kind``, ``choices``, ``form``,
set through :func:`setting`) is what the CLI's flags and help, the YAML parser and the app's
form are built from, so a new field appears everywhere by being declared once. :func:`validate`
is the one place that checks values, and its messages name the flag and the fix. Presets fill
the training fields a user left unset.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from . import quants
from .errors import ConfigError
from .hubauth import is_repo_id

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
STAGES = ["data", "train", "eval", "merge", "export", "push"]
QUANTS = quants.EXPORTABLE  # the --quant values, from the one quant table
PRESET_NAMES = ["quick", "standard", "thorough"]
# What a field's value is: how the CLI, YAML and the app's form read it.
KINDS = ("str", "int", "float", "bool", "list")
NUMBER_KINDS = ("int", "float")


@dataclass(frozen=True)
class Bounds:
    """The finite range a number setting takes, written as an interval: ``[1, 1024]`` includes
    both ends, ``(0, 1)`` neither, ``[0, 1)`` its low end only."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        match = re.fullmatch(r"\s*([\[(])\s*([-+0-9.e]+)\s*,\s*([-+0-9.e]+)\s*([\])])\s*", text)
        if not match:
            raise ValueError(f"bounds must be an interval like '[1, 1024]' or '(0, 1)', not {text!r}")
        low, high = float(match.group(2)), float(match.group(3))
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"bounds {text!r} must be finite, low below high")
        return cls(low, high, match.group(1) == "(", match.group(4) == ")")

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in words, for messages: ``from 1 to 1024``, ``above 0 and below 1``."""
        low = f"{'above' if self.low_open else 'from'} {_number(self.low)}"
        high = f"{'below' if self.high_open else 'up to'} {_number(self.high)}"
        return f"{low} {'and' if self.low_open else 'to'} {high}".replace("to up to", "to")

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")


def _number(value: float) -> str:
    """A bound as it reads best: whole numbers without a point (1000000, not 1e+06)."""
    return str(int(value)) if value.is_integer() else repr(value)


def setting(default: Any = None, doc: str = "", kind: str = "str", choices: Optional[list[str]] = None,
            factory: Optional[Callable[[], Any]] = None, form: bool = True, bounds: Optional[str] = None) -> Any:
    """A settings field with its metadata: ``doc`` (one line, the flag's help), ``kind`` (one of
    :data:`KINDS`), ``choices`` (the values it takes, where it is a choice), ``form`` (False
    for fields the app sets through an input of its own, not the generated form) and, for numbers,
    ``bounds`` (the interval its values must lie in, e.g. ``"[1, 1024]"``: every number has finite
    bounds, so no CLI flag, YAML key or form box can ask for an absurd or infinite value)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if (kind in NUMBER_KINDS) != (bounds is not None):
        raise ValueError("a number setting needs bounds, and only a number setting takes them")
    meta = {"doc": doc, "kind": kind, "choices": list(choices) if choices else None, "form": form,
            "bounds": Bounds.parse(bounds) if bounds else None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSettings:
    """Where the raw text comes from and how it is cleaned, packed and split."""

    dataset: Optional[str] = setting(None, "Hub dataset id, or a local file/folder (jsonl, csv, txt, parquet, md)")
    dataset_config: Optional[str] = setting(None, "Hub dataset configuration (subset) name")
    split: str = setting("train", "Hub dataset split to read")
    revision: Optional[str] = setting(None, "Hub dataset revision: branch, tag or commit")
    streaming: bool = setting(False, "stream a Hub dataset instead of downloading it whole", "bool")
    max_documents: Optional[int] = setting(None, "stop reading after this many documents (any source)", "int",
                                           bounds="[1, 1000000000]")
    text_column: Optional[str] = setting(None, "column holding the text; default 'text', else the longest "
                                               "string column")
    split_blank_lines: bool = setting(False, "split .txt/.md files into documents at blank lines", "bool")
    min_chars: int = setting(20, "drop documents shorter than this many characters after stripping", "int",
                             bounds="[0, 1000000]")
    dedupe: bool = setting(True, "drop exact duplicate documents", "bool")
    heldout_fraction: float = setting(0.05, "share of documents held out for perplexity, never trained on", "float",
                                      bounds="(0, 0.5)")
    piece_tokens: Optional[int] = setting(
        None, "a document too long to hold out whole is cut in pieces of this many tokens and only its last "
              "pieces are held out (default: --seq-len; 0: never cut)", "int", bounds="[0, 1048576]")
    min_heldout_blocks: int = setting(4, "hold out at least this many blocks", "int", bounds="[1, 100000]")


@dataclass
class TrainSettings:
    """The base model and the LoRA recipe. Fields left as None come from the preset."""

    model: str = setting(DEFAULT_MODEL, "Hub model id, local HF folder, or local .gguf file", form=False)
    backend: str = setting("auto", "auto (unsloth where CUDA is available, else peft), unsloth or peft",
                           choices=["auto", "unsloth", "peft"])
    preset: str = setting("auto", "quick, standard or thorough: defaults for the fields below "
                                  "(auto: standard on CUDA, quick on CPU)", choices=["auto"] + PRESET_NAMES,
                          form=False)
    seq_len: Optional[int] = setting(None, "tokens per packed block", "int", bounds="[16, 131072]")
    lora_r: Optional[int] = setting(None, "LoRA rank", "int", bounds="[1, 1024]")
    lora_alpha: Optional[int] = setting(None, "LoRA alpha (scale is alpha/r, or alpha/sqrt(r) with rsLoRA)", "int",
                                      bounds="[1, 4096]")
    lora_dropout: Optional[float] = setting(None, "dropout on the LoRA input", "float", bounds="[0, 1)")
    use_rslora: Optional[bool] = setting(None, "rank-stabilised LoRA scaling", "bool")
    target_modules: Optional[list[str]] = setting(None, "projections that get LoRA adapters", "list",
                                                  choices=ALL_PROJECTIONS)
    train_embeddings: Optional[bool] = setting(None, "also train embed_tokens and lm_head (full weights)", "bool")
    embedding_learning_rate: Optional[float] = setting(None, "learning rate for embed_tokens/lm_head", "float",
                                                     bounds="(0, 1)")
    load_in_4bit: bool = setting(False, "load the base in 4-bit (QLoRA; CUDA and bitsandbytes only)", "bool")
    gradient_checkpointing: Optional[str] = setting(None, "auto, on, off or unsloth",
                                                    choices=["auto", "on", "off", "unsloth"])
    batch_size: Optional[int] = setting(None, "blocks per micro-batch", "int", bounds="[1, 4096]")
    grad_accum: Optional[int] = setting(None, "micro-batches per optimizer step", "int", bounds="[1, 4096]")
    epochs: Optional[float] = setting(None, "passes over the training blocks (ignored when max_steps is set)",
                                      "float", bounds="(0, 1000]")
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps", "int", bounds="[1, 10000000]")
    learning_rate: Optional[float] = setting(None, "peak learning rate for the LoRA weights", "float",
                                             bounds="(0, 1)")
    warmup_ratio: Optional[float] = setting(None, "share of steps spent warming up", "float", bounds="[0, 1)")
    lr_scheduler: Optional[str] = setting(None, "learning-rate schedule: cosine, linear or constant",
                                          choices=["cosine", "linear", "constant"])
    weight_decay: Optional[float] = setting(None, "AdamW weight decay", "float", bounds="[0, 1]")
    optimizer: str = setting("auto", "auto (fused AdamW on CUDA, 8-bit AdamW with 4-bit loading, AdamW on "
                             "CPU), adamw_8bit or adamw_torch", choices=["auto", "adamw_8bit", "adamw_torch"])
    seed: int = setting(3407, "random seed for data order and LoRA init", "int", bounds="[0, 4294967295]")
    save_steps: Optional[int] = setting(None, "write a resumable checkpoint every this many steps", "int",
                                         bounds="[1, 10000000]")
    eval_steps: Optional[int] = setting(None, "compute held-out loss every this many steps (0: only at the end)",
                                        "int", bounds="[0, 10000000]")
    eval_batches: int = setting(8, "held-out blocks used for each periodic eval", "int", bounds="[0, 10000]")
    logging_steps: Optional[int] = setting(None, "report progress every this many steps (auto: every step on a "
                                           "CPU, every 10th on a GPU)", "int", bounds="[1, 10000000]")
    resume: bool = setting(False, "continue from the newest checkpoint in the run directory", "bool", form=False)


@dataclass
class ExportSettings:
    """GGUF export: quantization and the files Ollama reads."""

    quant: list[str] = setting(doc="quant types to write", kind="list", choices=QUANTS,
                               factory=lambda: list(quants.DEFAULT))
    imatrix_blocks: int = setting(16, "training blocks for the importance matrix of k-quants and IQ4_XS (0: "
                                      "llama.cpp's plain quantization; IQ4_XS needs a matrix)", "int",
                                  bounds="[0, 100000]")
    name: Optional[str] = setting(None, "file name stem for the GGUFs (default: the run directory's name)")
    verify: bool = setting(True, "load each GGUF in llama.cpp and measure its perplexity", "bool")


@dataclass
class PushSettings:
    """Publishing to the Hugging Face Hub. The token is never stored."""

    repo: Optional[str] = setting(None, "Hub model repo to push to, as user/name")
    private: bool = setting(False, "create the repo as private", "bool")


@dataclass
class RunSettings:
    """A whole run: the run directory, the stages to run and every section above."""

    out: Optional[str] = setting(None, "run directory")
    stages: Optional[list[str]] = setting(None, "stages to run (default: all but merge; push only when --repo is given)",
                                          "list", choices=STAGES)
    report_to: str = setting("none", "experiment tracker: none, or trackio (loss, learning rate, held-out loss, "
                             "tokens/s, perplexities and per-file quant numbers, the run's name as trackio's run)",
                             choices=["none", "trackio"], form=False)
    trackio_space: Optional[str] = setting(None, "with --report-to trackio: also log to this Hugging Face Space "
                                           "(user/name, created private); default: trackio's local store only",
                                           form=False)
    checkpoint_repo: Optional[str] = setting(None, "also upload each complete checkpoint (with run.json and the "
                                             "data) to this private Hub model repo (user/name), so the run "
                                             "can continue after a restart with --resume-from-hub",
                                             form=False)
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


def settings_fields(cls: type) -> list[Field]:
    """The settings fields of one section (for ``RunSettings``: its own, not the sections)."""
    return [f for f in fields(cls) if not (cls is RunSettings and f.name in SECTIONS)]


def _require_metadata() -> None:
    """Every field must be declared with :func:`setting`: a field without its doc and kind
    would be missing from the CLI, YAML and the app, so it fails here, at import."""
    for cls in [RunSettings] + [section_class(s) for s in SECTIONS]:
        for f in settings_fields(cls):
            if f.metadata.get("kind") not in KINDS or not f.metadata.get("doc"):
                raise TypeError(f"{cls.__name__}.{f.name} has no doc and kind: declare it with setting(...)")


def docs(cls: type) -> dict[str, str]:
    """The one-line doc of each field of a settings section."""
    return {f.name: f.metadata["doc"] for f in settings_fields(cls)}


def section_class(section: Optional[str]) -> type:
    """The dataclass of a section name (``RunSettings`` for None, the top-level keys)."""
    return next(f.default_factory for f in fields(RunSettings) if f.name == section) if section else RunSettings


def field_of(name: str) -> Field:
    """The field behind a flat key (``max_steps`` -> ``TrainSettings.max_steps``)."""
    cls = section_class(section_of(name))
    return next(f for f in settings_fields(cls) if f.name == name)


def section_of(name: str) -> Optional[str]:
    """Which section owns a flat key (None for top-level keys such as ``out``)."""
    for section in SECTIONS:
        if name in {f.name for f in settings_fields(section_class(section))}:
            return section
    return None


def all_keys() -> list[str]:
    """Every flat key a YAML file or the CLI may set."""
    return [f.name for cls in [RunSettings] + [section_class(s) for s in SECTIONS] for f in settings_fields(cls)]


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
        setattr(target, norm, coerce_value(field_of(norm), value, origin))
    return settings


def _parse_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _parse_int(value: Any) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        return value  # validate refuses it with the field's bounds
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


# How a YAML or flag value of each numeric or boolean kind is read.
_PARSERS: dict[str, Callable[[Any], Any]] = {"bool": _parse_bool, "int": _parse_int, "float": float}


def coerce_value(f: Field, value: Any, origin: str) -> Any:
    """Convert a YAML or flag value to its field's kind, or say which key holds what kind of value."""
    kind = f.metadata["kind"]
    if value is None:
        return value
    if kind in ("str", "list"):
        return _text_value(f.name, value, origin, kind == "list")
    try:
        return _PARSERS[kind](value)
    except (TypeError, ValueError):
        wanted = "true or false" if kind == "bool" else "a number"
        raise ConfigError(f"{origin} key '{f.name}' ({flag(f.name)}) must be {wanted}, not {value!r}") from None


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


# ---------------------------------------------------------------- values from a form


def parse_number(value: Any, label: str, whole: bool) -> Optional[float | int]:
    """A number typed into a form box: empty means None; anything else must be a number."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be a number, not {value!r}") from None
    if not math.isfinite(number):  # validate names the field's bounds
        return number
    if whole and number != int(number):
        raise ConfigError(f"{label} must be a whole number, not {value}")
    return int(number) if whole else number


def tristate(f: Field) -> bool:
    """A bool field whose None means "the preset's value" (the form offers preset, on, off)."""
    return f.metadata["kind"] == "bool" and f.default is None


def form_value(f: Field, value: Any) -> Any:
    """A form input's value for field ``f``; None means "keep the default" (or the preset's value)."""
    kind = f.metadata["kind"]
    if kind in ("int", "float"):
        return parse_number(value, f.name.replace("_", " "), whole=kind == "int")
    if tristate(f):
        return None if value in (None, "", "preset") else value == "on"
    if kind == "bool":
        return bool(value)
    if kind == "list":
        return list(value) if value else None
    text = "" if value is None else str(value).strip()
    if not text or (text == "preset" and f.metadata["choices"]):
        return None
    return text


def from_form(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """A settings section from a form's values by field name (``fixed`` ones set as given); an
    empty input keeps the field's default, which for training fields means the preset's value."""
    known = {f.name: f for f in settings_fields(cls)}
    settings = cls(**fixed)
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"the form sent an unknown {cls.__name__} field {name!r}")
        parsed = form_value(known[name], value)
        if parsed is not None:
            setattr(settings, name, parsed)
    return settings


def train_from_form(model: str, preset: str, values: dict[str, Any], gpu: bool) -> TrainSettings:
    """TrainSettings from the app's form; an empty field means "the preset's value". ``auto`` is
    made concrete here (``gpu``: whether training will get a GPU), so the data stage and the
    training agree on the block length."""
    return from_form(TrainSettings, values, model=(model or "").strip() or DEFAULT_MODEL,
                     preset=concrete_preset(preset, gpu))


def form_fields(cls: Optional[type] = None) -> list[Field]:
    """The fields the app's generated form shows (those without an input of their own)."""
    return [f for f in settings_fields(cls or TrainSettings) if f.metadata["form"]]


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


GPU_LOGGING_STEPS = 10


def concrete_preset(preset: Optional[str], gpu: bool) -> str:
    """The preset ``auto`` (or none) stands for: ``standard`` where training gets a GPU, ``quick`` on a CPU."""
    if not preset or preset == "auto":
        return "standard" if gpu else "quick"
    return preset


def resolve_preset(train: TrainSettings) -> TrainSettings:
    """Return a copy of ``train`` with every None field filled from its preset."""
    if train.preset == "auto":
        train = dataclasses.replace(train, preset=concrete_preset("auto", has_cuda()))
    if train.preset not in PRESETS:
        raise ConfigError(f"--preset {train.preset!r} is unknown; use auto or one of {', '.join(PRESETS)}")
    resolved = dataclasses.replace(train)
    for key, value in PRESETS[train.preset].items():
        if getattr(resolved, key) is None:
            setattr(resolved, key, list(value) if isinstance(value, list) else value)
    if resolved.logging_steps is None:
        # Reporting a loss reads it back from the GPU: the Trainer then waits for the card every step,
        # and the card for the Trainer's Python between steps (3 % of a 1B step). A CPU step takes seconds.
        resolved.logging_steps = GPU_LOGGING_STEPS if has_cuda() else 1
    return resolved


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (imported here so `import rawtune` needs no torch)."""
    import torch

    return torch.cuda.is_available()


def free_gpu_memory() -> None:
    """Collect Python's garbage, then give the card's cached blocks back, so that what was just
    dropped (a model, a failed loader's leftovers) is free for the next loader or for llama.cpp."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(key)}: {message}")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value or [])


def choices(name: str) -> list[str]:
    """The values a choice field takes, from its metadata."""
    return list(field_of(name).metadata["choices"] or [])


def _one_of(name: str) -> str:
    """``a, b or c`` for a choice field's values."""
    values = choices(name)
    return ", ".join(values[:-1]) + " or " + values[-1]


def validate(settings: RunSettings) -> RunSettings:
    """Check every value once, fill presets, and return the resolved settings as a new object.

    The caller's settings are never changed. Each message names the flag at fault and what would fix it.
    """
    s = copy.deepcopy(settings)
    if not s.stages:
        # merge only when asked: export merges tensor by tensor while it writes the GGUF, and a merged
        # folder is a second full copy of the model on disk.
        s.stages = [st for st in STAGES if st != "merge" and (st != "push" or s.push.repo)]
    s.stages = [st.lower() for st in _as_list(s.stages)]
    for stage in s.stages:
        _check(stage in STAGES, "stages", f"unknown stage {stage!r}; use some of {', '.join(STAGES)}")
    s.report_to = str(s.report_to or "none").lower()
    _check(s.report_to in choices("report_to"), "report_to", f"use {_one_of('report_to')}")
    _validate_data(s.data)
    s.train = _validate_train(resolve_preset(s.train))
    s.export.quant = [quants.get(label).key for label in quants.labels_for(_as_list(s.export.quant))]
    _check_bounds(s.export)
    needing = [q.upper() for q in s.export.quant if quants.get(q).needs_imatrix]
    _check(s.export.imatrix_blocks > 0 or not needing, "imatrix_blocks",
           f"{', '.join(needing)} is only made with an importance matrix: use --imatrix-blocks 16 or more, "
           f"or leave {', '.join(needing).lower()} out of --quant")
    if "push" in s.stages:  # checked before any stage runs, so a long training does not end in a refused push
        _check(is_repo_id(s.push.repo), "repo", "give the Hub repo as user/name, e.g. alice/my-model")
    return s


def _validate_data(d: DataSettings) -> None:
    _check_bounds(d)


def _check_bounds(section: Any) -> None:
    """Every number of a settings section lies in the bounds its field declares (None: unset)."""
    for f in settings_fields(type(section)):
        bounds, value = f.metadata["bounds"], getattr(section, f.name)
        if bounds is None or value is None:
            continue
        whole = f.metadata["kind"] == "int"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (whole and not float(value).is_integer()) or value not in bounds:
            what = "a whole number" if whole else "a number"
            raise ConfigError(f"{flag(f.name)}: must be {what} {bounds.describe()}, not {value!r}")


def _validate_train(t: TrainSettings) -> TrainSettings:
    """Check the resolved training settings (``t`` is validate's own copy, changed in place)."""
    _check(t.backend in choices("backend"), "backend", f"use {_one_of('backend')}")
    t.target_modules = _as_list(t.target_modules)
    _check(bool(t.target_modules), "target_modules", f"name at least one of {', '.join(ALL_PROJECTIONS)}")
    if any(m in EMBEDDING_MODULES for m in t.target_modules):
        # embed_tokens/lm_head in the target list means "train them fully", as in Unsloth's recipe.
        t.target_modules = [m for m in t.target_modules if m not in EMBEDDING_MODULES]
        t.train_embeddings = True
    _check_bounds(t)
    if t.embedding_learning_rate is None:
        t.embedding_learning_rate = t.learning_rate / 10
    _check(t.lr_scheduler in choices("lr_scheduler"), "lr_scheduler", f"use {_one_of('lr_scheduler')}")
    _check(t.optimizer in choices("optimizer"), "optimizer", f"use {_one_of('optimizer')}")
    # True/False: YAML booleans stay accepted here (gradient_checkpointing: true).
    _check(str(t.gradient_checkpointing) in choices("gradient_checkpointing") + ["True", "False"],
           "gradient_checkpointing", f"use {_one_of('gradient_checkpointing')}")
    return t


# What a resumed run may change: how long it runs and how it reports, never what it learns from.
RESUME_MAY_CHANGE = {"out", "stages", "resume", "checkpoint_repo", "max_steps", "epochs", "save_steps", "eval_steps",
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


def from_dict(values: Any, origin: str = "run.json settings") -> RunSettings:
    """Rebuild settings from :func:`to_dict` output (as stored in run.json); a value of the wrong
    kind (an edited or damaged file) raises :class:`ConfigError` naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin} must be a JSON object of settings, not {type(values).__name__}; "
                          "restore run.json, or train again with another --out")
    s = RunSettings()
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{key}' must be a JSON object, not {type(value).__name__}; "
                                  "restore run.json, or train again with another --out")
            section = getattr(s, key)
            known = {f.name: f for f in settings_fields(type(section))}
            for name, item in value.items():
                if name in known:
                    setattr(section, name, coerce_value(known[name], item, origin))
        elif key in {f.name for f in settings_fields(RunSettings)}:
            setattr(s, key, coerce_value(field_of(key), value, origin))
    return s


_require_metadata()
