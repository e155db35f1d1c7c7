"""The family registry: everything rawtune knows about each model family, one module per family.

Every other module asks this package, never a table of its own: the GGUF writer (architecture,
hyperparameters, tensor transforms), training (LoRA targets, fused projections, embeddings that
must stay tied, fast-loop and Unsloth support, checks refused before training), the planner
(shapes of known models), Compare (end-of-turn tokens), the app's model list and the README's
family and model tables (``python -m rawtune.families --readme`` rewrites them; a test fails when
they differ).

Adding a family
---------------
1. Write ``rawtune/families/<name>.py`` with a module docstring and a module-level
   ``FAMILY = Family(...)`` (types in :mod:`rawtune.families.base`): its HF architectures and
   ``model_type`` values, the :class:`~.base.Gguf` declaration (llama.cpp architecture, the
   tensors each block requires, hooks for hparams, checks, transforms and tensors the gguf name
   map lacks), :class:`~.base.Lora` targets per layer kind (with the reason for them),
   :class:`~.base.Training` support, :class:`~.base.Template` facts, :class:`~.base.Embeddings`,
   a ``refuse`` check for what llama.cpp cannot run, known Hub ids as :class:`~.base.KnownModel`,
   and any pre-tokenizer it brings in ``PRE_TOKENIZERS`` (split regexes -> llama.cpp name).
   Modules are found by scanning this package: no list to edit. Modules without ``FAMILY`` are
   helpers (:mod:`.base` the types, :mod:`.hooks` hooks several families share, :mod:`.readme`
   the README tables); names starting with ``_`` are not scanned.
2. Add its tiny test model to ``tests/families.py``; run the family tests.
3. ``python -m rawtune.families --readme`` to regenerate the README tables.

Hooks import ``gguf`` (or numpy) inside their bodies, so importing the registry stays light.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace
from functools import lru_cache
from typing import Any, Optional

from .base import BASE_PRE_TOKENIZERS, GENERIC_TARGETS, Family, KnownModel, TextStack

__all__ = ["Family", "KnownModel", "all_families", "family_named", "family_for_arch", "family_for_config",
           "known_models", "known_model", "gated_prefixes", "planner_shape", "planner_keys", "end_of_turn_tokens",
           "pre_tokenizers", "merges_applied", "lora_targets", "lora_parameters", "supported_text", "refusal",
           "text_stack_of"]


@lru_cache(maxsize=1)
def _registry() -> tuple[tuple[Family, ...], dict[str, Any]]:
    """Every family module of this package (those that define FAMILY), sorted by ``order``, and
    the modules themselves (for their PRE_TOKENIZERS)."""
    found: list[Family] = []
    modules: dict[str, Any] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue  # __main__ (the README command) and private helpers
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family is None:
            continue
        if not isinstance(family, Family) or family.name != info.name:
            raise TypeError(f"{module.__name__}.FAMILY must be a Family named {info.name!r}")
        models = tuple(replace(m, family=family.name) for m in family.models)
        found.append(replace(family, models=models))
        modules[family.name] = module
    found.sort(key=lambda f: (f.order, f.name))
    _check_unique(found)
    return tuple(found), modules


def _check_unique(families: list[Family]) -> None:
    """An HF architecture or a Hub id belongs to one family only."""
    seen: dict[str, str] = {}
    for fam in families:
        for key in fam.hf_architectures + tuple(m.repo.lower() for m in fam.models):
            if key in seen:
                raise TypeError(f"{key} is declared by both {seen[key]} and {fam.name}")
            seen[key] = fam.name


def all_families() -> tuple[Family, ...]:
    """Every registered family, in ``order``."""
    return _registry()[0]


def family_named(name: str) -> Family:
    """The family called ``name`` (KeyError when there is none)."""
    for fam in all_families():
        if fam.name == name:
            return fam
    raise KeyError(name)


def family_for_arch(hf_arch: str) -> Optional[Family]:
    """The family of an HF architecture class name, or None."""
    return next((f for f in all_families() if hf_arch in f.hf_architectures), None)


def text_stack_of(config: dict[str, Any]) -> Optional[TextStack]:
    """How to take the text model out of a multimodal checkpoint a family trains as text, or None."""
    names = set(config.get("architectures") or [])
    return next((f.text_stack for f in all_families() if f.text_stack and names & set(f.text_stack.wrappers)), None)


def family_for_config(config: dict[str, Any]) -> Optional[Family]:
    """The family of a parsed config.json: by its ``architectures``, else its ``model_type``; or None."""
    for name in config.get("architectures") or []:
        fam = family_for_arch(name)
        if fam is not None:
            return fam
    if config.get("architectures"):
        return None
    kind = config.get("model_type")
    return next((f for f in all_families() if kind in f.model_types), None)


def known_models(listed_only: bool = True) -> tuple[KnownModel, ...]:
    """The known Hub models, family by family (``listed_only``: those the app offers)."""
    return tuple(m for f in all_families() for m in f.models if m.listed or not listed_only)


def known_model(repo: Optional[str]) -> Optional[KnownModel]:
    """The known model of a Hub id (exact, case-insensitive), listed or not, or None."""
    wanted = (repo or "").strip().lower()
    return next((m for m in known_models(listed_only=False) if m.repo.lower() == wanted), None)


def _planner_key(repo: str) -> str:
    """A model id as the planner CLI accepts it: no owner, lower case, no 'meta-' and no '-instruct'."""
    return repo.rsplit("/", 1)[-1].lower().replace("meta-", "").removesuffix("-instruct")


def planner_keys() -> list[str]:
    """The short ids ``python -m rawtune.train.plan`` knows shapes for."""
    return list(dict.fromkeys(_planner_key(m.repo) for m in known_models(False) if m.dims))


# A planner shape carries the model card's parameter count under this key, so the planner can count
# what its dense formula misses (experts, per-layer embeddings, hybrid layers) for a known id.
CARD_PARAMS = "rawtune_card_params"


def planner_shape(model_id: str) -> dict[str, Any]:
    """config.json fields of a known model id ({} when unknown); the owner and '-Instruct' are ignored."""
    key = _planner_key(model_id)
    for m in known_models(listed_only=False):
        if m.dims and _planner_key(m.repo) == key:
            d = m.dims
            return {"model_type": family_named(m.family).model_types[0], "hidden_size": d.hidden,
                    "intermediate_size": d.intermediate, "num_hidden_layers": d.layers,
                    "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "vocab_size": d.vocab,
                    "tie_word_embeddings": d.tied, "hidden_act": "silu", CARD_PARAMS: m.params}
    return {}


def gated_prefixes() -> tuple[str, ...]:
    """Hub id prefixes (owner/, or owner/name-start) whose repos of a family are all gated."""
    return tuple(dict.fromkeys(p for f in all_families() for p in f.gated_owners))


def end_of_turn_tokens() -> tuple[str, ...]:
    """Every family's end-of-turn tokens (Compare stops at whichever the tokenizer has)."""
    return tuple(dict.fromkeys(t for f in all_families() for t in f.template.end_of_turn))


def pre_tokenizers() -> dict[tuple[str, ...], str]:
    """Split-regex sequences -> llama.cpp pre-tokenizer name, from every family module's PRE_TOKENIZERS."""
    out: dict[tuple[str, ...], str] = dict(BASE_PRE_TOKENIZERS)
    for module in _registry()[1].values():
        out.update(getattr(module, "PRE_TOKENIZERS", {}))
    return out


def merges_applied() -> dict[str, str]:
    """Pre-tokenizer name -> the one llama.cpp uses when the tokenizer applies merges to whole words
    (tokenizer.json ``ignore_merges`` false), from every family module's MERGES_APPLIED."""
    out: dict[str, str] = {}
    for module in _registry()[1].values():
        out.update(getattr(module, "MERGES_APPLIED", {}))
    return out


def lora_targets(family: Optional[Family], requested: list[str], module_names: set[str],
                 preset: Optional[str] = None) -> list[str]:
    """The requested LoRA targets spelled as this model names them.

    A name the model has passes through; a split name of a fused projection selects the fused
    module; a generic name (Llama's projections) of a kind the family names differently selects
    the family's modules of that kind; the preset's extra kinds are added. Unknown families and
    names the model lacks pass through unchanged (training then says which are missing).
    """
    if family is not None and family.lora.targets is not None:
        return family.lora.targets(list(requested), set(module_names), preset)
    lora = family.lora if family is not None else None
    out: list[str] = []
    for name in requested:
        picked = [name]
        if name not in module_names and lora is not None and lora.parameters and _kind_of(name) not in lora.kinds:
            continue  # a kind the family holds as bare parameters (lora_parameters), not modules
        if name not in module_names and lora is not None:
            fused = next((f for f, parts in lora.fused.items() if name in parts and f in module_names), None)
            kind = next((k for k, names in GENERIC_TARGETS.items() if name in names), None)
            if fused is not None:
                picked = [fused]
            elif kind is not None and any(n in module_names for n in lora.kinds.get(kind, ())):
                picked = [n for n in lora.kinds[kind] if n in module_names]
        out += [n for n in picked if n not in out]
    if lora is not None and preset:
        for kind in lora.presets.get(preset, ()):
            out += [n for n in lora.kinds.get(kind, ()) if n in module_names and n not in out]
    return out


def _kind_of(name: str) -> Optional[str]:
    """The layer kind a generic target name (Llama's projections) stands for, or None."""
    return next((k for k, names in GENERIC_TARGETS.items() if name in names), None)


def lora_parameters(family: Optional[Family], preset: Optional[str] = None) -> list[str]:
    """Parameter names PEFT adapts directly (``target_parameters``) for this family and preset ([] for none)."""
    if family is None:
        return []
    params = family.lora.parameters
    return list(params.get(preset or "", params.get("*", ())))


def supported_text() -> str:
    """The families GGUF export supports, for error messages: 'label (HF architecture); ...'."""
    return "; ".join(f"{f.label} ({', '.join(f.hf_architectures)})" for f in all_families() if f.gguf)


def refusal(config: dict[str, Any], vocab: frozenset) -> Optional[str]:
    """Why llama.cpp could not run this checkpoint (the family's ``refuse`` check), or None."""
    fam = family_for_config(config)
    if fam is None or fam.refuse is None:
        return None
    return fam.refuse(config, vocab)
