"""Reading a Hugging Face Hub dataset as rows for the data stage.

:func:`load_hub_rows` reads a Hub dataset with the real ``datasets.load_dataset`` (config,
split, revision, token, streaming) and turns each way that can fail into a distinct message.
Tokens come from :mod:`rawtune.hubauth` (which also decides whether the machine's own token may
be used); a ``False`` token means "send none", and is passed on to the clients as such.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

from ..errors import DataError, HubError
from ..hubauth import Token, endpoint, http_status, is_repo_id, login_hint, resolve_token, safe_text
from ..settings import DataSettings


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
        status = http_status(exc)
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
        status = http_status(exc)
        if status == 401:
            return _bad_token(spec)
        if status == 403:
            return HubError(f"no access to dataset {spec}: pass a token with access to it, or accept its "
                            f"terms at {page}")
        return HubError(f"reading dataset {spec} from the Hub failed ({safe_text(exc)})")
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
        return DataError(f"dataset {spec} has no data files rawtune can read ({safe_text(exc)}); it needs "
                         "Parquet, JSON(L), CSV or text files")
    return DataError(f"could not read dataset {spec} from the Hub: {type(exc).__name__}: {safe_text(exc)}")


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
