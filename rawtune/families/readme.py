"""The README's family and model tables, generated from the registry.

The tables sit between marker comments (``<!-- families:start -->`` ... ``<!-- families:end -->``,
``<!-- models:start -->`` ... ``<!-- models:end -->``); :func:`rewrite` replaces what is between
them, so ``python -m rawtune.families --readme`` keeps the README true and a test compares.
"""

from __future__ import annotations

import re

from . import all_families, known_models
from .base import Family

MARKERS = ("families", "models")


def size_text(params: float) -> str:
    """A parameter count as model cards write it: 135M, 1.24B."""
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def cell(text: str) -> str:
    """Table cell text: a '|' (as in <|end|>) would end the cell in GitHub's tables."""
    return text.replace("|", "\\|")


def chat_text(f: Family) -> str:
    """The family's template facts in a few words: end of turn, system messages, thinking."""
    t = f.template
    parts = [f"turn ends with `{'`, `'.join(t.end_of_turn)}`" if t.end_of_turn else "turn ends with EOS"]
    if t.system != "own turn":
        parts.append(f"system {t.system}")
    if t.thinking:
        parts.append(f"thinking: {t.thinking}")
    return "; ".join(parts)


def families_table() -> str:
    """One row per family: HF architectures, llama.cpp architecture, tokenizer, training support, notes."""
    rows = ["| family | HF architecture | llama.cpp | tokenizer | chat template | fast loop | Unsloth | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for f in all_families():
        archs = ", ".join(f"`{a}`" for a in f.hf_architectures)
        cpp = f"`{f.gguf.name}`" if f.gguf else "export refused"
        unsloth = ("PEFT (Unsloth fails)" if f.training.unsloth_fails else "yes") if f.training.unsloth else "no"
        rows.append(f"| {cell(f.label)} | {archs} | {cpp} | {cell(f.tokenizer or '-')} | {cell(chat_text(f))} | "
                    f"{'yes' if f.training.fast_loop else 'no'} | {unsloth} | {cell(f.notes or '-')} |")
    return "\n".join(rows)


def models_table() -> str:
    """One row per model the app lists: Hub id, family, size, base or instruct, gated."""
    rows = ["| Hub id | family | size | kind | gated |", "|---|---|---|---|---|"]
    for m in known_models():
        rows.append(f"| `{m.repo}` | {m.family} | {size_text(m.params)} | {'instruct' if m.instruct else 'base'} | "
                    f"{'yes' if m.gated else 'no'} |")
    return "\n".join(rows)


def rewrite(text: str) -> str:
    """``text`` (the README) with the generated tables between their markers (each marker pair must exist)."""
    tables = {"families": families_table(), "models": models_table()}
    for key in MARKERS:
        pattern = re.compile(rf"(<!-- {key}:start -->).*?(<!-- {key}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the README has no <!-- {key}:start --> ... <!-- {key}:end --> markers")
        text = pattern.sub(lambda m: m.group(1) + "\n" + tables[key] + "\n" + m.group(2), text, count=1)
    return text
