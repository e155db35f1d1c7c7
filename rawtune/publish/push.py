"""Pushing a run to the Hugging Face Hub as one model repo, in one commit.

:func:`push_run` uploads a run's GGUFs, Ollama files, adapter, scrubbed ``run.json`` and a
generated model card (:mod:`rawtune.publish.card`) in a single commit, so a failed upload never
leaves a half-filled repo. The endpoint (``hubauth.endpoint``) is read from ``HF_ENDPOINT`` at
call time; the token from :mod:`rawtune.hubauth`, never the machine's own for a visitor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import HubError, StageMissing
from ..export.ollama import FILES as OLLAMA_FILES
from ..quants import label_of_file
from ..hubauth import Token, endpoint, http_status, hub_error, is_repo_id, login_hint, resolve_token, safe_text
from ..rundir import RunDir, scrub
from ..settings import PushSettings


# What the app's Sign-in grants (README's hf_oauth_scopes): repos it creates, nothing it did not.
OAUTH_PREFIX = "hf_oauth_"


def write_error(repo: str, token: Token = None, user: str = "") -> HubError:
    """Why a push to ``repo`` was refused, and the way out that fits the kind of token: a signed-in
    visitor's own namespace refuses only the repos the app did not create."""
    if isinstance(token, str) and token.startswith(OAUTH_PREFIX) and repo.split("/")[0] == user:
        return HubError(f"signing in with Hugging Face lets this app create new repos and write only to the "
                        f"repos it created (scope contribute-repos, never full write access), and {repo} is "
                        "not one of them; push to a new repo name, or paste a write token that can write to "
                        f"{repo} ({endpoint()}/settings/tokens) in the token box")
    return HubError(f"this token cannot write to {repo}; create a token with write access "
                    f"({endpoint()}/settings/tokens) for an account that owns {repo.split('/')[0]} or "
                    "belongs to it, then pass it with --token or HF_TOKEN")


def _check_can_write(api: Any, repo: str, log: Callable[[str], None]) -> str:
    """Fail early with a clear message when the token is read-only; return the user name."""
    try:
        info = api.whoami()
    except Exception as exc:  # HTTP answers, connection errors, offline mode: one mapping
        rejected = ("the Hub rejected this token (invalid or expired); create a new one with write "
                    f"access at {endpoint()}/settings/tokens")
        raise hub_error(exc, "checking the token before a push", "then retry the push", rejected) from None
    access = (info.get("auth") or {}).get("accessToken") or {}
    # A classic read token can never write; fine-grained and OAuth tokens are judged by the Hub
    # itself (its 403 is turned into the same message below).
    if access.get("role") == "read":
        raise write_error(repo)
    user = info.get("name", "?")
    log(f"[push] logged in as {user}")
    return user


def _public_record(record: dict[str, Any]) -> dict[str, Any]:
    """run.json as published: no secrets, no previous push record, no local absolute paths."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")) and len(value) > 1:
            return Path(value).name  # a local path says nothing useful to others and may reveal a name
        return value

    public = {k: v for k, v in scrub(record).items() if k != "hub"}
    return clean(public)


ADAPTER_CONFIG = "adapter/adapter_config.json"


def adapter_config(path: Path, upstream: Any) -> bytes:
    """The adapter's config as published: ``base_model_name_or_path`` is the base's Hub id, so
    PEFT finds the base anywhere, and never the folder it was trained from on this machine (a
    cache or home path); null for a base that has no Hub id."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StageMissing(f"{path.name} in the run's adapter folder is not readable JSON: train again, "
                           "or restore the adapter") from None
    config["base_model_name_or_path"] = upstream if is_repo_id(upstream) else None
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def collect_files(run: RunDir) -> dict[str, Path]:
    """Repo path -> local file for everything a push uploads (not the card or run.json)."""
    gguf_dir = run.gguf_dir
    ggufs = sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []
    if not ggufs:
        raise StageMissing(f"{run.path} has no GGUF files in {gguf_dir.name}/: run `rawtune export {run.path}` "
                           "first (or add export to --stages)")
    files: dict[str, Path] = {p.name: p for p in ggufs}
    for name in OLLAMA_FILES:
        if (gguf_dir / name).is_file():
            files[name] = gguf_dir / name
    if run.adapter_dir.is_dir():
        for path in sorted(p for p in run.adapter_dir.rglob("*") if p.is_file()):
            files["adapter/" + path.relative_to(run.adapter_dir).as_posix()] = path
    return files


def push_run(run: RunDir, settings: PushSettings, token: Token = None,
             log: Callable[[str], None] = print) -> dict:
    """Create (or update) ``settings.repo`` with this run in one commit; record and return ``hub``.

    The repo root gets the GGUFs, ``template``, ``params``, ``system`` (if any) and ``Modelfile``
    (what ``ollama run hf.co/<repo>:Q4_K_M`` reads), plus ``adapter/``, a scrubbed ``run.json``
    and a generated ``README.md``. Pushing again makes one new commit.
    """
    repo = str(settings.repo or "").strip()
    if not is_repo_id(repo):
        raise HubError(f"--repo {repo or '(missing)'!r}: give the Hub model repo as user/name, e.g. alice/my-model")
    # Held while the files are read and uploaded: an export of this run in another task (the app)
    # could otherwise replace a GGUF halfway through its upload.
    with run.lock():
        return _push(run, repo, settings, token, log)


def _push(run: RunDir, repo: str, settings: PushSettings, token: Token, log: Callable[[str], None]) -> dict:
    from huggingface_hub import HfApi

    from .. import __version__

    record = run.load()
    if not record:
        raise StageMissing(f"{run.path} is not a rawtune run directory (no run.json)")
    files = collect_files(run)
    token = resolve_token(token)  # False (a visitor without a token) stays False: never the machine's
    if not token:
        raise HubError(f"pushing to {repo} needs a Hugging Face token with write access: {login_hint(token)}")
    api = HfApi(endpoint=endpoint(), token=token, library_name="rawtune", library_version=__version__)
    user = _check_can_write(api, repo, log)
    operations = _operations(files, _public_record(record), repo)
    total = sum(f.stat().st_size for f in files.values())
    log(f"[push] uploading {len(operations)} files ({total / 1e6:.1f} MB) to {repo} in one commit")
    url, before, info = _commit(api, repo, settings.private, operations, f"rawtune: {run.path.name}",
                                lambda: write_error(repo, token, user))
    repo_url = str(url).rstrip("/") or f"{endpoint()}/{repo}"
    hub = {"repo": repo, "url": repo_url, "commit": info.oid, "private": bool(before.private),
           "files": [op.path_in_repo for op in operations]}
    run.update(hub=hub)
    if info.oid == before.sha:
        log("[push] nothing changed since the last push: the repo is already up to date")
    log(f"[push] {repo_url} (commit {str(info.oid)[:10]})")
    for q in [q for q in (label_of_file(p) for p in files if p.endswith(".gguf")) if q]:
        log(f"[push] ollama run hf.co/{repo}:{q}")
    return hub


def _operations(files: dict[str, Path], public: dict[str, Any], repo: str) -> list:
    """The commit's files: the run's files, the public run.json and the model card."""
    from huggingface_hub import CommitOperationAdd

    from .card import render

    card = render(public, repo, sorted(files) + ["run.json", "README.md"])
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()
                  if p != ADAPTER_CONFIG]
    if ADAPTER_CONFIG in files:
        config = adapter_config(files[ADAPTER_CONFIG], (public.get("model") or {}).get("upstream_id"))
        operations.append(CommitOperationAdd(ADAPTER_CONFIG, config))
    operations.append(CommitOperationAdd("run.json", (json.dumps(public, indent=2) + "\n").encode()))
    operations.append(CommitOperationAdd("README.md", card.encode()))
    return operations


def _commit(api: Any, repo: str, private: bool, operations: list, message: str,
            refused: Callable[[], HubError]) -> tuple[Any, Any, Any]:
    """Create the repo if needed and make the one commit; (repo url, repo info before, commit info)."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        before = api.repo_info(repo, repo_type="model")
        if private and not before.private:
            # The repo existed and is public: pushing would publish what was asked to stay private.
            raise HubError(f"{repo} already exists and is public, but --private was asked: make it private "
                           f"in its settings ({endpoint()}/{repo}/settings) or push without --private")
        info = api.create_commit(
            repo, operations, repo_type="model", commit_message=message,
            commit_description="GGUF quants, Ollama template/params, LoRA adapter, run record and model card.",
        )
    except HfHubHTTPError as exc:
        if http_status(exc) in (401, 403):
            raise refused() from None
        raise HubError(f"pushing to {repo} failed ({safe_text(exc)}); nothing was committed, so retrying the "
                       "push is safe") from None
    except (OSError, RuntimeError, ValueError) as exc:
        # Raised while uploading file contents, before the commit that would make them visible.
        raise HubError(f"uploading to {repo} failed ({type(exc).__name__}: {safe_text(exc)}); nothing was "
                       "committed, so retrying the push is safe") from None
    except httpx.HTTPError as exc:
        raise HubError(f"the connection to {endpoint()} failed while pushing to {repo} ({type(exc).__name__}); "
                       "a push is a single commit, so retrying it is safe") from None
    return url, before, info
