"""The one table of GGUF quant types rawtune knows: names, llama.cpp ftypes, bounds and order.

Every other module asks this table instead of keeping its own list: the spelling in file names,
run.json and the UI (``label``), the ``--quant`` value (``key``), the ``llama_ftype`` llama.cpp's
quantizer takes, the perplexity increase over the merged model above which a file is reported
as a conversion bug, whether the training text's statistics change the file (an importance
matrix, or error compensation with H matrices) and whether the type is only made with one (IQ4_XS: without a matrix it has no edge over Q4_K_M). ``exportable`` types are
the ones ``rawtune export`` writes; the others are only recognised in file names (model cards of
repos that hold files rawtune did not make).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import ExportError


@dataclass(frozen=True)
class Quant:
    label: str  # as in file names, run.json and the UI: Q4_K_M
    ftype: Optional[int]  # llama.cpp's llama_ftype (llama.h); None: written by rawtune's own writer
    bound_pct: Optional[float]  # perplexity increase over the merged model that counts as a bug
    imatrix: bool  # the training text's statistics change the file (importance, or H's error compensation)
    exportable: bool  # `rawtune export --quant` can write it
    needs_imatrix: bool = False  # export refuses it without an importance matrix

    @property
    def key(self) -> str:
        """The ``--quant`` spelling: q4_k_m."""
        return self.label.lower()


# In the order files are listed (cards, the UI, the Modelfile's first choice): smallest first.
TABLE: tuple[Quant, ...] = (
    # The bounds are far above llama.cpp's usual few percent on purpose: small models (width not
    # a multiple of 256) fall back to 32-wide blocks for most tensors (IQ4_XS to IQ4_NL, Q4_K to
    # Q5_0, Q5_K to Q5_1, Q6_K to Q8_0) and lose more; the tiny test models have extreme weights.
    Quant("IQ4_XS", 30, 10.0, True, True, needs_imatrix=True),
    Quant("Q4_K_M", 15, 8.0, True, True),
    Quant("Q5_K_M", 17, 4.0, True, True),
    Quant("Q6_K", 18, 2.0, True, True),
    # Q8_0's rounding ignores an importance matrix, but error compensation with H changes it: on the
    # quick start its mean KLD went from 0.00449 to 0.00351 at the same size (docs/benchmarks.md).
    Quant("Q8_0", 7, 1.0, True, True),
    Quant("F16", None, 0.5, False, True),
    Quant("BF16", None, None, False, False),
    Quant("F32", None, None, False, False),
)
BY_LABEL = {q.label: q for q in TABLE}
ORDER = [q.label for q in TABLE]
# `--quant` values rawtune export takes, in table order.
EXPORTABLE = [q.key for q in TABLE if q.exportable]
EXPORTABLE_LABELS = [q.label for q in TABLE if q.exportable]
DEFAULT = ["q4_k_m", "q8_0"]

_LABEL_RE = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(ORDER) + r")(?![A-Za-z0-9])", re.IGNORECASE)


def get(name: str) -> Quant:
    """The table row for a label or --quant value (any case); KeyError when unknown."""
    return BY_LABEL[name.upper()]


def label_of(name: str) -> Optional[str]:
    """Label of an exportable --quant value (``q4_k_m`` -> ``Q4_K_M``); None when not exportable."""
    quant = BY_LABEL.get(name.upper())
    return quant.label if quant and quant.exportable else None


def labels_for(values: Iterable[str]) -> list[str]:
    """The labels of ``--quant`` values, in the order given, without repeats: THE check of --quant.

    Settings validation and the export stage both call it, so a bad value reads the same from
    the CLI, a YAML file, the app or a direct ``export_run``.
    """
    labels = []
    for value in values:
        label = label_of(str(value).strip())
        if label is None:
            raise ExportError(f"--quant: unknown quant type {str(value).strip().lower()!r}; "
                              f"use some of {', '.join(EXPORTABLE)}")
        labels.append(label)
    if not labels:
        raise ExportError("--quant is empty; name at least one of " + ", ".join(EXPORTABLE))
    return list(dict.fromkeys(labels))


def file_name(stem: str, label: str) -> str:
    """The GGUF file name for a quant: ``stem.Q4_K_M.gguf``."""
    return f"{stem}.{get(label).label}.gguf"


def label_of_file(filename: str) -> Optional[str]:
    """The quant label a GGUF file name carries (``name.Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    match = _LABEL_RE.search(filename)
    return match.group(1).upper() if match else None


def sort_key(label: str) -> int:
    """Position in the table (unknown labels last)."""
    return ORDER.index(label) if label in ORDER else len(ORDER)
