"""Checkpoints kept on the Hub, so a run survives a Space restart (its disk is wiped then).

With ``--checkpoint-repo user/name`` each complete checkpoint is also uploaded to that private model
repo, with what a resume needs: ``checkpoints/checkpoint-N/`` (only the newest one is kept there),
``run.json`` (it never holds a token) and ``data/train.npy`` + ``data/heldout.npy``. A README whose
metadata carries the tag :data:`TAG` marks the repo, so :func:`list_runs` finds a user's runs.

The upload runs in a background thread while training goes on: one upload at a time, and the
newest complete checkpoint wins (one written during an upload replaces any older one waiting). A
failed upload logs one line and training continues. Only the process of rank 0 uploads.

``rawtune train --out DIR --resume-from-hub user/name`` calls :func:`download` and then resumes
as ``--resume`` does. ``python -m rawtune.hubckpt --list`` prints the user's resumable runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError, HubError, RawtuneError
from .hubauth import Token, hub_error, is_repo_id, login_hint, resolve_token, safe_text, user_name
from .rundir import RunDir, scrub

TAG = "rawtune-checkpoints"
DATA_FILES = ("data/train.npy", "data/heldout.npy")
STAGING = ".hub-upload"  # hard links of the checkpoint being uploaded: rotation may delete the original
POLL_S = 2.0  # how often the uploader looks for a new complete checkpoint
CARD = f"""---
tags:
- {TAG}
---
# rawtune checkpoints

The newest checkpoint of a rawtune training run, kept here so the run can continue after a
restart: `rawtune train --out DIR --resume-from-hub {{repo}}`.
"""


def repo_for(user: str, run_name: str) -> str:
    """The checkpoint repo a signed-in visitor's run gets: ``user/rawtune-ckpt-<run>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.") or "run"
    return f"{user}/rawtune-ckpt-{name}"[:96]


def keep_by_default(shared: bool) -> bool:
    """The app's checkbox starts ticked on a shared app (a Space), whose disk a restart wipes; it
    takes effect only for a visitor with a token (:func:`repo_for_app`)."""
    return bool(shared)


def repo_for_app(keep: bool, token: Token, run_name: str) -> Optional[str]:
    """The checkpoint repo of an app run: in the signed-in visitor's namespace when ``keep`` and a
    token are there, else None (nothing is uploaded without the visitor's own token)."""
    if not keep or not isinstance(token, str):
        return None
    user = user_name(token, "finding your Hub user name for the checkpoint repo",
                     "try again, or untick \"Keep checkpoints on the Hub\"")
    return repo_for(user, run_name)


def check(repo: Optional[str], token: Token) -> None:
    """Refuse a checkpoint repo that cannot work, before any stage runs."""
    if not repo:
        return
    if not is_repo_id(repo):
        raise ConfigError(f"--checkpoint-repo {repo!r}: give a model repo id as user/name, e.g. alice/my-run-ckpt")
    if not isinstance(token, str):
        raise ConfigError(f"--checkpoint-repo {repo} needs a Hugging Face token that can create that repo: "
                          f"{login_hint(token)}")


# ---------------------------------------------------------------- upload


def upload(run: RunDir, checkpoint: Path, repo: str, token: str) -> None:
    """Upload one complete checkpoint (and run.json, the data once, the card once) as one commit;
    older checkpoints in the repo are deleted in the same commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    api.create_repo(repo, private=True, exist_ok=True)
    present = set(api.list_repo_files(repo))
    ops: list[Any] = [CommitOperationAdd(f"checkpoints/{checkpoint.name}/{f.relative_to(checkpoint).as_posix()}",
                                         str(f)) for f in sorted(checkpoint.rglob("*")) if f.is_file()]
    ops.append(CommitOperationAdd("run.json", _run_record(run)))
    ops += [CommitOperationAdd(name, str(run.path / name)) for name in DATA_FILES if name not in present]
    if "README.md" not in present:
        ops.append(CommitOperationAdd("README.md", CARD.format(repo=repo).encode()))
    old = {p.split("/")[1] for p in present if p.startswith("checkpoints/checkpoint-")}
    ops += [CommitOperationDelete(f"checkpoints/{name}/") for name in sorted(old - {checkpoint.name})]
    api.create_commit(repo, ops, commit_message=f"rawtune {checkpoint.name}")


def _run_record(run: RunDir) -> bytes:
    """run.json as uploaded: scrubbed once more, so no token-looking text can leave the machine."""
    import json

    return (json.dumps(scrub(run.load()), indent=2, default=str) + "\n").encode()


def _stage(run: RunDir, checkpoint: Path) -> Path:
    """Hard links (copies where links fail) of a checkpoint in a hidden folder: the training may
    delete the original while it is uploading (it keeps only the newest few)."""
    staged = run.path / STAGING / checkpoint.name
    shutil.rmtree(run.path / STAGING, ignore_errors=True)
    shutil.copytree(checkpoint, staged, copy_function=_link_or_copy)
    return staged


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


class Uploader:
    """Uploads each new complete checkpoint of ``run`` in a thread; :meth:`close` uploads the last one."""

    def __init__(self, run: RunDir, repo: str, token: str, log: Callable[[str], None], poll_s: float = POLL_S):
        self.run, self.repo, self._token, self.log, self.poll_s = run, repo, token, log, poll_s
        done = run.checkpoints()  # what a resumed run already had (and uploaded) is not uploaded again
        self.uploaded = _step(done[-1]) if done else -1
        self.failures = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rawtune-hub-checkpoints", daemon=True)

    def start(self) -> "Uploader":
        self._thread.start()
        return self

    def close(self) -> None:
        """Upload the newest checkpoint not yet uploaded, then stop (waits for the upload)."""
        self._closing.set()
        self._thread.join()
        shutil.rmtree(self.run.path / STAGING, ignore_errors=True)

    def _loop(self) -> None:
        while True:
            closing = self._closing.wait(self.poll_s)
            self.upload_newest()
            if closing:
                return

    def upload_newest(self) -> bool:
        """Upload the newest complete checkpoint if it is newer than the last uploaded; True if it was."""
        found = self.run.checkpoints()
        if not found or _step(found[-1]) <= self.uploaded:
            return False
        newest = found[-1]
        try:
            staged = _stage(self.run, newest)
            upload(self.run, staged, self.repo, self._token)
        except Exception as exc:  # any failure: one line, training goes on, the next checkpoint retries
            self.failures += 1
            self.log(f"[hub-checkpoints] uploading {newest.name} to {self.repo} failed "
                     f"({type(exc).__name__}: {safe_text(exc)}); training goes on")
            self.uploaded = _step(newest)  # latest wins: no retry of this one, the next is newer
            return False
        self.uploaded = _step(newest)
        self.log(f"[hub-checkpoints] {newest.name} uploaded to {self.repo} (private)")
        return True


class uploading:
    """``with uploading(repo, run, token, log):`` around the training stage; nothing without a repo,
    and nothing in a process other than rank 0."""

    def __init__(self, repo: Optional[str], run: RunDir, token: Token, log: Callable[[str], None]):
        main = int(os.environ.get("RANK", "0") or 0) == 0
        self.uploader = Uploader(run, repo, token, log) if repo and main and isinstance(token, str) else None

    def __enter__(self) -> Optional[Uploader]:
        return self.uploader.start() if self.uploader else None

    def __exit__(self, *exc: Any) -> None:
        if self.uploader:
            self.uploader.close()


# ---------------------------------------------------------------- resume and list


def download(repo: str, out: str | os.PathLike, token: Token, log: Callable[[str], None] = print) -> RunDir:
    """Fetch a checkpoint repo's newest checkpoint, run.json and data into the new run directory ``out``."""
    from huggingface_hub import snapshot_download

    if not is_repo_id(repo):
        raise ConfigError(f"--resume-from-hub {repo!r}: give the checkpoint repo as user/name")
    run = RunDir(out)
    if run.run_file.exists():
        raise ConfigError(f"--resume-from-hub: {run.path} already holds a run; give a new --out "
                          "(or continue it with --resume)")
    try:
        snapshot_download(repo, local_dir=str(run.path), token=token,
                          allow_patterns=["run.json", "data/*", "checkpoints/*"])
    except Exception as exc:
        raise hub_error(exc, f"downloading the checkpoints of {repo}", "check the repo id and your token",
                        f"the Hub rejected the token for {repo}; {login_hint(token)}") from None
    shutil.rmtree(run.path / ".cache", ignore_errors=True)  # the client's download bookkeeping
    found = run.checkpoints()
    if not found or not run.run_file.is_file() or not all((run.path / f).is_file() for f in DATA_FILES):
        raise HubError(f"{repo} holds no complete rawtune checkpoint (run.json, data/ and checkpoints/); "
                       "pick a repo from `python -m rawtune.hubckpt --list`")
    log(f"[hub-checkpoints] downloaded {found[-1].name} of {repo} into {run.path}")
    return run


def list_runs(token: Token) -> list[dict[str, Any]]:
    """The signed-in user's repos that hold rawtune checkpoints: ``{repo, modified}``, newest first."""
    from huggingface_hub import HfApi

    if not isinstance(token, str):
        raise ConfigError(f"listing your checkpoint repos needs your Hugging Face token: {login_hint(token)}")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
        models = list(api.list_models(author=user, filter=TAG))
    except Exception as exc:
        raise hub_error(exc, "listing your checkpoint repos", "try again",
                        f"the Hub rejected the token; {login_hint(token)}") from None
    found = [{"repo": m.id, "modified": str(m.last_modified or "")} for m in models]
    return sorted(found, key=lambda r: r["modified"], reverse=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rawtune.hubckpt --list [--token T]``: print the resumable runs, one repo a line."""
    parser = argparse.ArgumentParser(prog="python -m rawtune.hubckpt", description=main.__doc__)
    parser.add_argument("--list", action="store_true", required=True, help="list your checkpoint repos")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or the hf login)")
    args = parser.parse_args(argv)
    try:
        for item in list_runs(resolve_token(args.token)):
            print(item["repo"])
    except RawtuneError as exc:
        print(scrub(f"rawtune: error: {exc}"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
