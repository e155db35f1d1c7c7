"""The ``rawtune`` command line: a thin layer over :mod:`rawtune.pipeline` and the stages.

Every settings field is a flag (``max_steps`` -> ``--max-steps``) and a YAML key for
``rawtune run --config``. Errors a user can cause print one line and exit with code 1; Ctrl-C
exits with 130 (after training has saved its adapter and checkpoint). ``--resume`` starts from the
settings stored in the run's ``run.json``; flags given with it may only extend or re-time the run.

``--gpus N`` (train, run) starts the same command again in N processes through torchrun, without
``--gpus``; under any launcher (torchrun, accelerate launch) rank 0 runs the whole pipeline and
the other ranks join it for the training stage only (:func:`rawtune.train.follow`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any, Optional, Sequence

from . import __version__, quants
from .errors import ConfigError, RawtuneError
from .rundir import RunDir, scrub
from .settings import (SECTIONS, RunSettings, apply, docs, flag, from_dict, load_yaml, resume_settings,
                       section_class, settings_fields)

COMMANDS = {
    "train": "read a dataset, train a LoRA adapter and measure held-out perplexity",
    "data": "only read, clean, pack and split a dataset into a run directory",
    "eval": "held-out perplexity of the base and tuned model of a run",
    "merge": "merge a run's adapter into the base (HF folder in DIR/merged)",
    "export": "write GGUF files (" + ", ".join(quants.EXPORTABLE) + ") and the Ollama files for a run",
    "push": "upload a run's GGUFs, Ollama files and model card to a Hub repo",
    "run": "run the stages of a YAML config (every flag is also a YAML key)",
}
STAGES_OF = {"train": ["data", "train", "eval"], "data": ["data"]}


# The argparse type of each value kind (bool fields are --flag/--no-flag; lists are comma-separated text).
ARG_TYPES = {"int": int, "float": float, "str": str, "list": str}


def add_settings_flags(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """Add one flag per settings field of the given sections, typed and documented by the field's
    metadata (defaults come from the settings)."""
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        for f in settings_fields(section_class(section)):
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["doc"])
            if f.metadata["kind"] == "bool":
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            else:
                group.add_argument(flag(f.name), type=ARG_TYPES[f.metadata["kind"]], metavar=f.name.upper(),
                                   **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rawtune", description="Raw text in, an Ollama-pullable model out.")
    parser.add_argument("--version", action="version", version=f"rawtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("train", "data", "run"):
            top = docs(RunSettings)
            p.add_argument("--out", dest="out", default=argparse.SUPPRESS, help=top["out"])
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
        if name in ("train", "run"):
            for key in ("report_to", "trackio_space"):
                p.add_argument(flag(key), dest=key, default=argparse.SUPPRESS, metavar=key.upper(),
                               help=docs(RunSettings)[key])
            p.add_argument("--gpus", type=int, default=None, metavar="N",
                           help="train data-parallel on N GPUs of this machine: runs this command again through "
                                "torchrun in N processes (without CUDA: N CPU processes, for tests)")
        if name in ("train", "data", "run", "push"):
            p.add_argument("--token", default=None,
                           help="Hugging Face token (default: HF_TOKEN or the hf CLI login); never stored")
    return parser


def _token(args: argparse.Namespace) -> Optional[str]:
    from .hubauth import resolve_token

    return resolve_token(getattr(args, "token", None), allow_ambient=True)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "config", "run_dir", "token", "gpus"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _settings_for(args: argparse.Namespace) -> RunSettings:
    given = _overrides(args)
    config = load_yaml(args.config) if args.command == "run" else {}
    if _resuming(config, given):
        settings = _resume_base(config, given)
    else:
        settings = apply(RunSettings(), config, origin=f"{args.config}:") if config else RunSettings()
    if args.command != "run":
        settings.stages = STAGES_OF[args.command]
    if _resuming(config, given):
        return resume_settings(settings, given, origin="flag")
    return apply(settings, given, origin="flag")


def _resuming(config: dict, given: dict) -> bool:
    value = given.get("resume", config.get("resume", False))
    return value is True or str(value).lower() in ("true", "yes", "1")


def _resume_base(config: dict, given: dict) -> RunSettings:
    """The stored settings of the run being resumed, checked against the YAML keys given."""
    out = given.get("out") or config.get("out")
    if not out:
        raise ConfigError("--out: give the run directory to resume, e.g. --out runs/my-run")
    stored = RunDir(out).load().get("settings")
    if not stored:
        raise ConfigError(f"--resume: {out} holds no run to resume (no run.json); run without --resume")
    return resume_settings(from_dict(stored), config, origin="YAML")


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
    run_stage(args.command, settings, run, _token(args), None, None, print)  # holds the run's lock
    if args.command == "merge":
        print(run.merged_dir)


def _summary(record: dict) -> None:
    metrics = record.get("metrics", {})
    if "ppl_base" in metrics and "ppl_tuned" in metrics:
        print(f"held-out perplexity: {metrics['ppl_base']:.3f} -> {metrics['ppl_tuned']:.3f}")


def relaunch_command(gpus: int, argv: Sequence[str]) -> tuple[list[str], dict]:
    """The torchrun command (and environment) that runs ``argv`` in ``gpus`` processes.

    ``--gpus`` is dropped, so the children do not launch again; a ``--token`` moves into the
    children's environment (``HF_TOKEN``) instead of their command lines.
    """
    rest, env, items = [], dict(os.environ), list(argv)
    while items:
        item = items.pop(0)
        if item == "--gpus" or item == "--token":
            value = items.pop(0) if items else ""
        elif item.startswith(("--gpus=", "--token=")):
            item, value = item.split("=", 1)
        else:
            rest.append(item)
            continue
        if item == "--token":
            env["HF_TOKEN"] = value
    from .train.launch import torchrun_command

    return torchrun_command(gpus, "rawtune.cli", rest), env


def _relaunch(gpus: int, argv: Sequence[str], out: Optional[str]) -> int:
    """Run this command again in ``gpus`` processes through torchrun; its exit code.

    torchrun passes a Ctrl-C on to its processes once more, which would abort them mid-step; so
    torchrun runs in its own session, and a first Ctrl-C here writes the run's STOP file instead
    (every process stops after the same step, rank 0 saves the adapter and a checkpoint); a second
    one is passed on to torchrun (abort).
    """
    from .settings import has_cuda
    from .train.distributed import world_size

    if world_size() > 1:
        raise ConfigError("--gpus: this process was already started by a launcher (WORLD_SIZE is set); drop --gpus")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give the number of GPUs to train on (1 or more)")
    if has_cuda():
        import torch

        if gpus > torch.cuda.device_count():
            raise ConfigError(f"--gpus {gpus}: this machine shows {torch.cuda.device_count()} GPU(s); "
                              "use at most that many")
    command, env = relaunch_command(gpus, argv)
    print(f"rawtune: training on {gpus} {'GPUs' if has_cuda() else 'CPU processes'} through torchrun", flush=True)
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            if interrupted and code == 0:
                print(f"rawtune: interrupted; the adapter and a checkpoint are saved: continue with "
                      f"`rawtune train --out {out} --resume --gpus {gpus}`", file=sys.stderr)
                return 130
            return code
        except KeyboardInterrupt:
            if interrupted or not out:
                proc.send_signal(signal.SIGINT)
            else:
                RunDir(out).stop_file.touch()
                print("rawtune: stopping after this step; the adapter and a checkpoint will be saved "
                      "(Ctrl-C again to abort)", file=sys.stderr, flush=True)
            interrupted = True


def _follow(args: argparse.Namespace) -> int:
    """Ranks other than 0 of a launched job: join rank 0's training stage (it runs the other stages)."""
    from .settings import validate
    from .train import follow

    settings = validate(_settings_for(args))
    if "train" in settings.stages and settings.out:
        follow(settings, RunDir(settings.out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rawtune`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("eval", "merge", "export", "push"):
            _run_on_dir(args)
            return 0
        if getattr(args, "gpus", None) is not None and args.gpus != 1:
            return _relaunch(args.gpus, sys.argv[1:] if argv is None else argv, _settings_for(args).out)
        from .train.distributed import rank

        if rank() > 0:
            return _follow(args)
        from .pipeline import run_pipeline

        stop = threading.Event()  # set by the first Ctrl-C during training
        record = run_pipeline(_settings_for(args), token=_token(args), stop=stop)
        _summary(record)
        out = record.get("settings", {}).get("out")
        print(f"run directory: {out}")
        if stop.is_set():
            print(f"rawtune: interrupted; the adapter and a checkpoint are saved: continue with "
                  f"`rawtune train --out {out} --resume`", file=sys.stderr)
            return 130
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
