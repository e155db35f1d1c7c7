"""The ``rawtune`` command line: a thin layer over :mod:`rawtune.pipeline` and the stages.

Every settings field is a flag (``max_steps`` -> ``--max-steps``) and a YAML key for
``rawtune run --config``. Errors a user can cause print one line and exit with code 1.
"""

from __future__ import annotations

import argparse
import sys
import threading
import traceback
from dataclasses import fields
from typing import Any, Optional, Sequence

from . import __version__
from .errors import ConfigError, RawtuneError
from .rundir import RunDir, scrub
from .settings import (SECTIONS, RunSettings, apply, field_docs, flag, from_dict, load_yaml)

COMMANDS = {
    "train": "read a dataset, train a LoRA adapter and measure held-out perplexity",
    "data": "only read, clean, pack and split a dataset into a run directory",
    "eval": "held-out perplexity of the base and tuned model of a run",
    "merge": "merge a run's adapter into the base (HF folder in DIR/merged)",
    "export": "write GGUF files (q4_k_m, q8_0, f16) and the Ollama files for a run",
    "push": "upload a run's GGUFs, Ollama files and model card to a Hub repo",
    "run": "run the stages of a YAML config (every flag is also a YAML key)",
}
STAGES_OF = {"train": ["data", "train", "eval"], "data": ["data"]}


def _parse_type(annotation: str) -> tuple[Any, bool]:
    """Map a field's annotation to (argparse type, is_bool)."""
    if "bool" in annotation:
        return None, True
    for name, cast in (("int", int), ("float", float)):
        if annotation.replace("Optional[", "").startswith(name):
            return cast, False
    return str, False


def add_settings_flags(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """Add one flag per settings field of the given sections (defaults come from the settings)."""
    for section in sections:
        cls = type(getattr(RunSettings(), section))
        group = parser.add_argument_group(f"{section} settings")
        docs = field_docs(cls)
        for f in fields(cls):
            cast, is_bool = _parse_type(str(f.type))
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=docs.get(f.name, ""))
            if is_bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            else:
                group.add_argument(flag(f.name), type=cast, metavar=f.name.upper(), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawtune", description="Raw text in, an Ollama-pullable model out.")
    parser.add_argument("--version", action="version", version=f"rawtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("train", "data", "run"):
            p.add_argument("--out", dest="out", default=argparse.SUPPRESS, help="run directory")
            if name == "run":
                p.add_argument("--config", required=True, help="YAML file of settings (flat keys)")
                p.add_argument("--stages", dest="stages", default=argparse.SUPPRESS,
                               help="comma-separated stages: data,train,eval,merge,export,push")
            add_settings_flags(p, SECTIONS if name == "run" else ("data", "train"))
        else:
            p.add_argument("run_dir", metavar="DIR", help="a run directory made by `rawtune train`")
            if name == "export":
                add_settings_flags(p, ("export",))
            if name == "push":
                add_settings_flags(p, ("push",))
        if name in ("train", "data", "run", "push"):
            p.add_argument("--token", default=None,
                           help="Hugging Face token (default: HF_TOKEN or the hf CLI login); never stored")
    return parser


def _token(args: argparse.Namespace) -> Optional[str]:
    from .hubauth import resolve_token

    return resolve_token(getattr(args, "token", None), allow_ambient=True)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "config", "run_dir", "token"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _settings_for(args: argparse.Namespace) -> RunSettings:
    settings = RunSettings()
    if args.command == "run":
        apply(settings, load_yaml(args.config), origin=f"{args.config}:")
    else:
        settings.stages = STAGES_OF[args.command]
    return apply(settings, _overrides(args), origin="flag")


def _stored_settings(run: RunDir) -> RunSettings:
    if not run.exists():
        raise ConfigError(f"{run.path} is not a run directory (no run.json); make one with `rawtune train`")
    return from_dict(run.load().get("settings", {}))


def _run_on_dir(args: argparse.Namespace) -> None:
    """eval/merge/export/push on an existing run directory."""
    from .pipeline import run_stage
    from .settings import validate

    run = RunDir(args.run_dir)
    settings = _stored_settings(run)
    apply(settings, _overrides(args), origin="flag")
    settings.stages = [args.command]
    settings = validate(settings)
    run_stage(args.command, settings, run, _token(args), None, None, print)
    if args.command == "merge":
        print(run.merged_dir)


def _summary(record: dict) -> None:
    metrics = record.get("metrics", {})
    if "ppl_base" in metrics and "ppl_tuned" in metrics:
        print(f"held-out perplexity: {metrics['ppl_base']:.3f} -> {metrics['ppl_tuned']:.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rawtune`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("eval", "merge", "export", "push"):
            _run_on_dir(args)
            return 0
        from .pipeline import run_pipeline

        record = run_pipeline(_settings_for(args), token=_token(args), stop=threading.Event())
        _summary(record)
        print(f"run directory: {record.get('settings', {}).get('out')}")
        return 0
    except RawtuneError as exc:
        print(scrub(f"rawtune: error: {exc}"), file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or a library's own error: its text may quote a token
        print(scrub("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rawtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
