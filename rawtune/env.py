"""Every ``RAWTUNE_*`` environment variable, declared once: name, default and what it does.

Modules read these variables only through :func:`get` (an undeclared name is a programming error,
raised at once), and ``docs/environment.md`` is generated from :data:`VARIABLES`
(``python -m rawtune.env --write``; ``tests/test_env.py`` fails when the file and the declarations
differ, or when a module reads a ``RAWTUNE_`` variable some other way).

``default`` is what :func:`get` returns when the variable is unset or empty. ``shared_default``
is the limit a shared app (a Space, or ``app.py --share``) applies when the variable is unset;
elsewhere an unset limit means no limit, and ``0`` turns a limit off everywhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Variable:
    """One environment variable rawtune reads."""

    name: str
    group: str  # the docs table it is listed in
    doc: str  # one line: what it does and the values it takes
    default: Optional[str] = None  # what get() returns when it is unset or empty
    shared_default: Optional[float] = None  # a limit's value on a shared app when unset


SHARED = "Shared app (a Space or app.py --share): limits and permissions"
APP = "App and paths"
TRAINING = "Training engine (for benchmarks and troubleshooting)"
TESTS = "Tests"

VARIABLES: tuple[Variable, ...] = (
    Variable("RAWTUNE_SHARED", SHARED, "`1`: treat the app as shared, like a Space (`app.py --share` sets it)"),
    Variable("RAWTUNE_ALLOW_OWNER_TOKEN", SHARED,
             "`1`: visitors without a token use the Space's own `HF_TOKEN` (only for a private single-user Space)"),
    Variable("RAWTUNE_ALLOW_SERVER_PATHS", SHARED, "`1`: the dataset and model boxes accept paths on the server"),
    Variable("RAWTUNE_MAX_UPLOAD_MB", SHARED, "largest upload in MB (also Gradio's `max_file_size`)",
             shared_default=50),
    Variable("RAWTUNE_MAX_CHARS", SHARED, "most characters read from one source; reading stops there",
             shared_default=20_000_000),
    Variable("RAWTUNE_MAX_TRAIN_MINUTES", SHARED, "GPU minutes per training turn; training then stops with a "
             "checkpoint", shared_default=20),
    Variable("RAWTUNE_MAX_TRAIN_STEPS", SHARED, "most optimizer steps per training (a longer plan is cut)",
             shared_default=2000),
    Variable("RAWTUNE_MAX_MODEL_GB", SHARED, "largest Hub model download in GB, checked on the repo's file list "
             "before anything is downloaded (the app's model list tops out near 8 GB)", shared_default=10),
    Variable("RAWTUNE_MAX_DISK_MB", SHARED, "disk budget in MB for the uploads and runs of all sessions; the oldest "
             "closed sessions are deleted first to make room", shared_default=20_000),
    Variable("RAWTUNE_MAX_GPU_PER_VISITOR", SHARED, "places in the GPU line one visitor (signed-in user, else "
             "address) may hold, whatever their number of tabs", shared_default=1),
    Variable("RAWTUNE_MAX_LOADS_PER_VISITOR", SHARED, "data loads one visitor may run at once", shared_default=2),
    Variable("RAWTUNE_GPU_SLOTS", SHARED, "GPU jobs that run at once; raise it only where each gets a GPU of its "
             "own (ZeroGPU, several GPUs)", default="1"),
    Variable("RAWTUNE_RUN_TTL_HOURS", SHARED, "age in hours after which closed sessions' folders are deleted",
             default="24"),
    Variable("RAWTUNE_RUNS", APP, "folder of the app's session folders and run directories", default="runs"),
    Variable("RAWTUNE_DEFAULT_MODEL", APP, "the model the app's model box starts with (default: the offline "
             "SmolLM2-135M-Instruct)"),
    Variable("RAWTUNE_LOGIN_BUTTON", APP, "`1`: show Sign in with Hugging Face off a Space (Gradio then mocks it "
             "with this machine's own Hub login)"),
    Variable("RAWTUNE_CACHE", APP, "folder for downloaded and converted models (default `~/.cache/rawtune`)"),
    Variable("RAWTUNE_SEGMENT_SECONDS", APP, "training seconds per GPU call in segmented (ZeroGPU) runs; `0`: "
             "one unlimited segment (default on ZeroGPU: what the planner leaves of a call, else unlimited)"),
    Variable("RAWTUNE_JOB_CONFIG", APP, "set by `rawtune run --on-hf-jobs` in the job it starts: the run's YAML "
             "settings, which the job's command writes to a file and runs (never the token: that is the job's "
             "`HF_TOKEN` secret)"),
    Variable("RAWTUNE_ZERO_GPU", APP, "`1`: behave as on a ZeroGPU Space (no torch.compile, segmented training)"),
    Variable("RAWTUNE_GPUS", TRAINING, "`all` or a number: train data-parallel on that many GPUs of this machine "
             "through torchrun (without CUDA: CPU processes); unset: one process (`app.py` sets `all`)"),
    Variable("RAWTUNE_DIST_TIMEOUT_HOURS", TRAINING, "how long data-parallel ranks wait for rank 0 (its data stage, "
             "its checkpoints)", default="6"),
    Variable("RAWTUNE_GPU_MEMORY_GIB", TRAINING, "plan training for a cap of this many GiB on "
             "rawtune's own allocations instead of the card's memory (a shared card; the CUDA context lies "
             "outside it): the fastest setting whose predicted peak leaves 0.5 GiB or 3 % of the cap free"),
    Variable("RAWTUNE_FASTLOOP", TRAINING, "`0`: train in the Hugging Face Trainer instead of rawtune's compiled "
             "loop", default="1"),
    Variable("RAWTUNE_UNSLOTH_LOOP", TRAINING, "`trainer`: keep Unsloth's model in the Trainer instead of "
             "rawtune's loop", default="fast"),
    Variable("RAWTUNE_COMPILE", TRAINING, "`0`: no torch.compile in the fast loop", default="1"),
    Variable("RAWTUNE_COMPILE_MODE", TRAINING, "torch.compile's mode for the fast loop's layer: default, "
             "reduce-overhead (CUDA graphs), max-autotune or max-autotune-no-cudagraphs"),
    Variable("RAWTUNE_FUSED_LORA", TRAINING, "`0`: unfused LoRA projections in the fast loop", default="1"),
    Variable("RAWTUNE_FP8", TRAINING, "`1`: hold the fast loop's frozen base weights in FP8 (e4m3, per-channel "
             "scales) and run their matmuls in FP8 on cards of compute capability 8.9+ (elsewhere bf16, with a "
             "log line); the memory plan then puts the flattened fast loop, the only one that holds FP8 weights, "
             "first at any model size", default="0"),
    Variable("RAWTUNE_ARTIFACTS", TESTS, "folder where the browser test saves its screenshots (`.ci/run` sets it)"),
    Variable("RAWTUNE_SDPA", TRAINING, "pin the fast loop's attention kernel: cudnn, flash, efficient or math "
             "(default: PyTorch's choice)"),
)
BY_NAME = {v.name: v for v in VARIABLES}


def declared(name: str) -> Variable:
    """The declaration of ``name``; a KeyError names the file to add it to."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not declared in rawtune/env.py") from None


def get(name: str) -> Optional[str]:
    """The variable's value with surrounding spaces stripped, else its declared default."""
    default = declared(name).default
    value = os.environ.get(name, "").strip()
    return value or default


def flag(name: str) -> bool:
    """True for 1/true/yes/on."""
    return (get(name) or "").lower() in ("1", "true", "yes", "on")


def markdown() -> str:
    """docs/environment.md, generated from :data:`VARIABLES`."""
    lines = ["# Environment variables", "",
             "Generated from `rawtune/env.py` by `python -m rawtune.env --write`; a test checks that this file "
             "matches.", "Command-line flags and YAML keys are listed by `rawtune COMMAND --help`.", ""]
    for group in dict.fromkeys(v.group for v in VARIABLES):
        lines += [f"## {group}", "", "| variable | default | what it does |", "|---|---|---|"]
        for v in (v for v in VARIABLES if v.group == group):
            default = v.default if v.default is not None else "unset"
            if v.shared_default is not None:
                default = f"{v.shared_default:,g} on a shared app, else no limit"
            lines.append(f"| `{v.name}` | {default} | {v.doc} |")
        lines.append("")
    return "\n".join(lines)


DOC = Path(__file__).resolve().parents[1] / "docs" / "environment.md"

if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(markdown(), encoding="utf-8")
    else:
        print(markdown(), end="")
