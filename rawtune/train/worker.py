"""One process of a data-parallel training that :func:`rawtune.train.train` started itself.

A caller that trains in its own process (the app, a Python script) gets all the machine's GPUs
with ``RAWTUNE_GPUS=all`` (or a number): :func:`rawtune.train.train` then starts
``python -m torch.distributed.run ... -m rawtune.train.worker SETTINGS_FILE RUN_DIR`` and waits.
Every worker trains (:mod:`.distributed`); rank 0 writes the run directory as usual and prints its
log lines, progress events and errors on stdout, one tagged line each, which the caller turns back
into its own ``log`` and ``callback`` calls. The caller asks for a stop with the run's STOP file.
"""

from __future__ import annotations

import json
import sys

from .launch import ERROR, EVENT, LOG


def _say(tag: str, text: str) -> None:
    print(tag + text.replace("\n", " "), flush=True)


def main(argv: list[str]) -> int:
    """Train as one rank of the job the launcher set up; rank 0 reports on stdout."""
    from ..errors import RawtuneError
    from ..rundir import RunDir, scrub
    from ..settings import from_dict
    from . import follow, train
    from .distributed import rank

    settings_file, run_dir = argv
    with open(settings_file, encoding="utf-8") as handle:
        settings = from_dict(json.load(handle))
    run = RunDir(run_dir)
    if rank() > 0:
        follow(settings, run)
        return 0
    try:
        train(settings, run, callback=lambda event: _say(EVENT, json.dumps(event)),
              log=lambda line: _say(LOG, str(line)))
    except RawtuneError as exc:
        _say(ERROR, scrub(str(exc)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
