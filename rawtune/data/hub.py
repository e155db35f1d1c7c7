"""The Hugging Face Hub layer: tokens, reading Hub datasets, and pushing a run as one repo.

- Tokens come from :mod:`rawtune.hubauth` (which also decides whether the machine's own token
  may be used); a ``False`` token means "send none", and is passed on to the clients as such.
- :func:`load_hub_rows` reads a Hub dataset with the real ``datasets.load_dataset`` (config,
  split, revision, token, streaming) and turns each way that can fail into a distinct message.
- :func:`push_run` uploads a run's GGUFs, Ollama files, adapter, scrubbed ``run.json`` and a
  generated model card in a single commit, so a failed upload never leaves a half-filled repo.

The endpoint (``hubauth.endpoint``) is read from ``HF_ENDPOINT`` at call time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from .errors import DataError, HubError, StageMissing
from .hubauth import Token, endpoint, is_repo_id, login_hint, resolve_token
from .ollama import FILES as OLLAMA_FILES
from .rundir import RunDir, scrub
from .settings import DataSettings, PushSettings



# ---------------------------------------------------------------- messages


def _safe(text: Any) -> str:
    """An error text with anything token-like masked, for messages we build from client errors."""
    return scrub(str(text).splitlines()[0] if str(text) else "")


# ---------------------------------------------------------------- pulling datasets


def _source_label(settings: DataSettings) -> str:
    parts = [f"split {settings.split}"]
    if settings.dataset_config:
        parts.insert(0, f"config {settings.dataset_config}")
    if settings.revision:
        parts.append(f"revision {settings.revision}")
    if settings.streaming:
        parts.append("streaming")
    return f"Hub dataset {settings.dataset} ({', '.join(parts)})"


def _configs_of(spec: str, settings: DataSettings, token: Token) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(spec, revision=settings.revision, token=token))
    except Exception:  # only used to improve a message; the original error is reported anyway
        return []


def _splits_of(spec: str, settings: DataSettings, token: Token) -> list[str]:
    """Split names from the dataset's data files (no download needed)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(spec, settings.dataset_config, revision=settings.revision,
                                                token=token)
        if builder.config.data_files:
            return list(builder.config.data_files)
        return list(builder.info.splits or [])
    except Exception:  # only used to improve a message
        return []


def _listed(message: str) -> list[str]:
    """Names listed in a datasets error message such as "... Available: ['en', 'fr']"."""
    match = re.search(r"\[([^\]]*)\]", message)
    return re.findall(r"'([^']*)'", match.group(1)) if match else []


def _gated(spec: str, token: Token) -> HubError:
    page = f"{endpoint()}/datasets/{spec}"
    if not token:
        return HubError(f"dataset {spec} is gated and no token was given: accept its terms at {page} "
                        f"while logged in, then {login_hint(token)} with that account's token")
    return HubError(f"dataset {spec} is gated and this token has no access yet: accept its terms at "
                    f"{page} with the account the token belongs to (or pass a token with access)")


def _not_found(spec: str, token: Token) -> HubError:
    if not token:
        return HubError(f"dataset {spec} was not found on the Hub, or it is private and no token was "
                        f"given: check the id, or {login_hint(token)} with a token that can read it")
    return HubError(f"dataset {spec} was not found on the Hub, or this token has no access to it: check "
                    "the id, or pass a token with access to it (a private dataset needs its owner's "
                    "or an org member's token)")


def _bad_revision(spec: str, revision: Optional[str]) -> DataError:
    return DataError(f"dataset {spec} has no revision {revision!r}: pass a branch, tag or commit that "
                     "exists with --revision (or leave it out for main)")


def _bad_token(spec: str) -> HubError:
    return HubError(f"the Hub rejected the token while reading dataset {spec} (invalid or expired); "
                    f"create a new one at {endpoint()}/settings/tokens and pass it again")


def _check_access(spec: str, settings: DataSettings, token: Token) -> None:
    """Ask the Hub whether the dataset, the revision and access exist before loading.

    ``datasets`` falls back to its local cache when the Hub says "not found", which would hide
    a missing token or a revoked access behind stale data; an unreachable Hub is left to it.
    """
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    import datasets.config

    # Ask the endpoint datasets.load_dataset will use (read by datasets when it was imported).
    api = HfApi(endpoint=datasets.config.HF_ENDPOINT, token=token)
    try:
        api.auth_check(spec, repo_type="dataset")
        if settings.revision:
            api.dataset_info(spec, revision=settings.revision)
    except GatedRepoError:
        raise _gated(spec, token) from None
    except RepositoryNotFoundError:
        raise _not_found(spec, token) from None
    except RevisionNotFoundError:
        raise _bad_revision(spec, settings.revision) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise _bad_token(spec) from None
        if status == 403:
            raise _gated(spec, token) from None
        # Other answers (5xx, an endpoint a mirror lacks) are left for load_dataset to report.
    except (OfflineModeIsEnabled, OSError, httpx.HTTPError):
        return  # unreachable or offline: load_dataset may still serve its cache, or explain


def _hub_error(exc: Exception, settings: DataSettings, token: Token) -> Exception:
    """Translate what datasets/huggingface_hub raised into one clear rawtune error."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError

    spec = str(settings.dataset)
    text = str(exc)
    page = f"{endpoint()}/datasets/{spec}"
    if isinstance(exc, DatasetNotFoundError) or "DatasetNotFound" in type(exc).__name__:
        if "gated" in text:
            return _gated(spec, token)
        if "Revision" in text:
            return _bad_revision(spec, settings.revision)
        return _not_found(spec, token)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return _bad_token(spec)
        if status == 403:
            return HubError(f"no access to dataset {spec}: pass a token with access to it, or accept its "
                            f"terms at {page}")
        return HubError(f"reading dataset {spec} from the Hub failed ({_safe(exc)})")
    if isinstance(exc, ValueError):
        if "Config name is missing" in text or "BuilderConfig" in text:
            configs = _listed(text) or _configs_of(spec, settings, token)
            listed = ", ".join(configs) or "(none found)"
            if settings.dataset_config:
                return DataError(f"dataset {spec} has no configuration {settings.dataset_config!r}; "
                                 f"its configurations are: {listed}; pick one with --dataset-config")
            return DataError(f"dataset {spec} has several configurations: {listed}; pick one with "
                             "--dataset-config")
        if "split" in text.lower():
            splits = _listed(text) or _splits_of(spec, settings, token)
            return DataError(f"dataset {spec} has no split {settings.split!r}; its splits are: "
                             f"{', '.join(splits) or '(none found)'}; pick one with --split")
    if isinstance(exc, ConnectionError) or "Couldn't reach" in text:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return HubError(f"cannot read Hub dataset {spec}: offline mode is on (HF_HUB_OFFLINE); unset it, "
                            "or give a local file or folder with --dataset")
        return HubError(f"cannot reach the Hub at {endpoint()} to read dataset {spec}: check the network "
                        "connection, or give a local file or folder with --dataset")
    if "DataFilesNotFound" in type(exc).__name__ or "EmptyDataset" in type(exc).__name__:
        return DataError(f"dataset {spec} has no data files rawtune can read ({_safe(exc)}); it needs "
                         "Parquet, JSON(L), CSV or text files")
    return DataError(f"could not read dataset {spec} from the Hub: {type(exc).__name__}: {_safe(exc)}")


def _guarded(rows: Iterable[dict], settings: DataSettings, token: Token) -> Iterator[dict]:
    """Yield rows, turning errors raised while streaming into rawtune errors too."""
    try:
        yield from rows
    except (DataError, HubError):
        raise
    except Exception as exc:  # network and format errors surface lazily when streaming
        raise _hub_error(exc, settings, token) from None


def load_hub_rows(settings: DataSettings, token: Token = None) -> tuple[Iterable[dict], str]:
    """Open a Hub dataset with ``datasets.load_dataset``; return its rows (lazy) and a label.

    With ``settings.streaming`` nothing is downloaded up front: rows are read as they are consumed,
    so the data stage's ``max_documents`` stops the download early. ``token=False`` reads
    anonymously (never with the machine's own token); ``None`` may use the machine's token.
    """
    spec = str(settings.dataset or "")
    if not is_repo_id(spec):
        raise DataError(f"--dataset {spec!r} is neither a local file or folder nor a Hub dataset id like user/name")
    import datasets

    token = resolve_token(token)  # the same token datasets would pick up, so messages are accurate
    _check_access(spec, settings, token)
    try:
        loaded = datasets.load_dataset(spec, settings.dataset_config, split=settings.split,
                                       revision=settings.revision, token=token, streaming=settings.streaming)
    except (DataError, HubError):
        raise
    except Exception as exc:  # datasets raises many types; each is mapped to one clear message
        raise _hub_error(exc, settings, token) from None
    return _guarded(loaded, settings, token), _source_label(settings)


# ---------------------------------------------------------------- pushing a run


def write_error(repo: str) -> HubError:
    return HubError(f"this token cannot write to {repo}; create a token with write access "
                    f"({endpoint()}/settings/tokens) for an account that owns {repo.split('/')[0]} or "
                    "belongs to it, then pass it with --token or HF_TOKEN")


def _check_can_write(api: Any, repo: str, log: Callable[[str], None]) -> str:
    """Fail early with a clear message when the token is read-only; return the user name."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = api.whoami()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError("the Hub rejected this token (invalid or expired); create a new one with write "
                           f"access at {endpoint()}/settings/tokens") from None
        raise HubError(f"could not check the token with the Hub at {endpoint()} ({_safe(exc)})") from None
    except Exception as exc:  # connection errors, offline mode
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise HubError("cannot push: offline mode is on (HF_HUB_OFFLINE); unset it and push again") from None
        raise HubError(f"cannot reach the Hub at {endpoint()} ({type(exc).__name__}); check the network "
                       "connection and retry the push") from None
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
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from . import __version__
    from .card import quant_of, render

    repo = str(settings.repo or "").strip()
    if not is_repo_id(repo):
        raise HubError(f"--repo {repo or '(missing)'!r}: give the Hub model repo as user/name, e.g. alice/my-model")
    record = run.load()
    if not record:
        raise StageMissing(f"{run.path} is not a rawtune run directory (no run.json)")
    files = collect_files(run)
    token = resolve_token(token)  # False (a visitor without a token) stays False: never the machine's
    if not token:
        raise HubError(f"pushing to {repo} needs a Hugging Face token with write access: {login_hint(token)}")

    api = HfApi(endpoint=endpoint(), token=token, library_name="rawtune", library_version=__version__)
    _check_can_write(api, repo, log)
    public = _public_record(record)
    paths = sorted(files) + ["run.json", "README.md"]
    card = render(public, repo, paths)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
    operations.append(CommitOperationAdd("run.json", (json.dumps(public, indent=2) + "\n").encode()))
    operations.append(CommitOperationAdd("README.md", card.encode()))
    total = sum(f.stat().st_size for f in files.values())
    log(f"[push] uploading {len(operations)} files ({total / 1e6:.1f} MB) to {repo} in one commit")
    try:
        url = api.create_repo(repo, repo_type="model", private=settings.private, exist_ok=True)
        before = api.repo_info(repo, repo_type="model")
        private = bool(before.private)
        if settings.private and not private:
            # The repo existed and is public: pushing would publish what was asked to stay private.
            raise HubError(f"{repo} already exists and is public, but --private was asked: make it private "
                           f"in its settings ({endpoint()}/{repo}/settings) or push without --private")
        info = api.create_commit(
            repo, operations, repo_type="model",
            commit_message=f"rawtune: {run.path.name}",
            commit_description="GGUF quants, Ollama template/params, LoRA adapter, run record and model card.",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise write_error(repo) from None
        raise HubError(f"pushing to {repo} failed ({_safe(exc)}); nothing was committed, so retrying the "
                       "push is safe") from None
    except (OSError, RuntimeError, ValueError) as exc:
        # Raised while uploading file contents, before the commit that would make them visible.
        raise HubError(f"uploading to {repo} failed ({type(exc).__name__}: {_safe(exc)}); nothing was "
                       "committed, so retrying the push is safe") from None
    except httpx.HTTPError as exc:
        raise HubError(f"the connection to {endpoint()} failed while pushing to {repo} ({type(exc).__name__}); "
                       "a push is a single commit, so retrying it is safe") from None

    repo_url = str(url).rstrip("/") or f"{endpoint()}/{repo}"
    hub = {"repo": repo, "url": repo_url, "commit": info.oid, "private": private,
           "files": [op.path_in_repo for op in operations]}
    run.update(hub=hub)
    quants = [q for q in (quant_of(p) for p in files if p.endswith(".gguf")) if q]
    if info.oid == before.sha:
        log("[push] nothing changed since the last push: the repo is already up to date")
    log(f"[push] {repo_url} (commit {str(info.oid)[:10]})")
    for q in quants:
        log(f"[push] ollama run hf.co/{repo}:{q}")
    return hub
