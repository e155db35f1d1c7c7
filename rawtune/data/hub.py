"""Reading a Hugging Face Hub dataset as rows for the data stage.

:func:`load_hub_rows` lists the dataset repo's files through the Hub API at one commit, picks the
configuration's and split's data files among them (the card's ``configs`` patterns, else the
Hub's file-name conventions), and hands ``datasets.load_dataset`` only those files, as
``hf://datasets/<id>@<commit>/<path>`` URLs. A card can therefore never widen the set: an entry
that is an absolute path, a URL or climbs out of the repo with ``..`` is refused with one line
before anything is read, and patterns only match files of the repo. Each way that can fail reads
as a distinct message. Tokens come from :mod:`rawtune.hubauth` (which also decides whether the
machine's own token may be used); a ``False`` token means "send none", and is passed on to the
clients as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from ..errors import DataError, HubError
from ..hubauth import Token, endpoint, http_status, is_repo_id, login_hint, resolve_token, safe_text
from ..rundir import scrub
from ..settings import DataSettings

# Data files read from a Hub dataset, by suffix (a compression suffix may follow it).
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".txt": "text", ".arrow": "arrow"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
# The Hub's split conventions: data/<split>-00000-of-00001.<ext>, else split words in names.
SHARDED = re.compile(r"^data/([A-Za-z0-9_]+)-\d{5}-of-\d{5}[^/]*$")
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}


def _source_label(settings: DataSettings) -> str:
    parts = [f"split {settings.split}"]
    if settings.dataset_config:
        parts.insert(0, f"config {settings.dataset_config}")
    if settings.revision:
        parts.append(f"revision {settings.revision}")
    if settings.streaming:
        parts.append("streaming")
    return f"Hub dataset {settings.dataset} ({', '.join(parts)})"


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


@dataclass
class HubFiles:
    """One commit of a dataset repo: its id, the commit, its file paths and its card's metadata."""

    spec: str
    sha: str
    paths: list[str]
    card: dict


def _unreachable(spec: str) -> HubError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return HubError(f"cannot read Hub dataset {spec}: offline mode is on (HF_HUB_OFFLINE); unset it, "
                        "or give a local file or folder with --dataset")
    return HubError(f"cannot reach the Hub at {endpoint()} to read dataset {spec}: check the network "
                    "connection, or give a local file or folder with --dataset")


def list_repo(spec: str, settings: DataSettings, token: Token) -> HubFiles:
    """Ask the Hub for access, the revision's commit, its files and its card, in that order.

    Everything later reads this one commit, so a push to the repo meanwhile changes nothing.
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
        info = api.dataset_info(spec, revision=settings.revision or None)
        paths = api.list_repo_files(spec, repo_type="dataset", revision=info.sha)
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
        raise HubError(f"reading dataset {spec} from the Hub failed ({safe_text(exc)})") from None
    except (OfflineModeIsEnabled, OSError, httpx.HTTPError):
        raise _unreachable(spec) from None
    card = info.card_data.to_dict() if info.card_data is not None else {}
    return HubFiles(spec, str(info.sha), list(paths), card if isinstance(card, dict) else {})


# ---------------------------------------------------------------- which files of the repo


def _format_of(path: str) -> Optional[str]:
    """The reader for a data file by its suffix (after any compression suffix), or None."""
    name = path.lower()
    for suffix in COMPRESSION:
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "__")) for part in path.split("/"))


def outside_repo(entry: str) -> bool:
    """True for a card entry naming something outside the repo: a URL (any scheme), an absolute,
    home or drive path, or a path that climbs with ``..``."""
    text = entry.strip().replace("\\", "/")
    return ("://" in text or ":" in text.split("/")[0] or text.startswith(("/", "~"))
            or ".." in text.split("/"))


def _glob(pattern: str) -> re.Pattern:
    """A card pattern as fsspec reads it: ``**`` crosses folders, ``*`` and ``?`` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out, i = out + "[" + body.replace("\\", "\\\\") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _matching(pattern: str, paths: list[str], data_dir: str) -> list[str]:
    """The repo files a card pattern names (a folder names the files under it)."""
    pattern = re.sub(r"^(\./)+", "", pattern.strip())
    full = f"{data_dir}/{pattern}" if data_dir else pattern
    exact, below = _glob(full.rstrip("/")), _glob(full.rstrip("/") + "/**")
    return [p for p in paths if exact.match(p) or below.match(p)]


def _as_list(value: Any, spec: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"dataset {spec}'s card has a data_files entry that is not a path or a list of paths "
                    f"({str(value)[:80]!r}): fix the card's configs, or pick another dataset")


def _card_patterns(config: dict, spec: str) -> dict[str, list[str]]:
    """{split: [patterns]} of one card configuration (empty: no data_files given)."""
    data_files = config.get("data_files")
    if data_files is None:
        return {}
    if isinstance(data_files, dict):
        return {str(split): _as_list(value, spec) for split, value in data_files.items()}
    if isinstance(data_files, list) and data_files and all(isinstance(d, dict) for d in data_files):
        out: dict[str, list[str]] = {}
        for item in data_files:
            out.setdefault(str(item.get("split") or "train"), []).extend(_as_list(item.get("path"), spec))
        return out
    return {"train": _as_list(data_files, spec)}


def _outside_error(spec: str, entry: str) -> DataError:
    return DataError(f"dataset {spec}'s card names {scrub(entry)[:120]!r} as its data, which is not a file of "
                     "the dataset repo; rawtune reads only the repo's own files: give paths relative to the "
                     "repo in the card's configs, or pick another dataset")


def _pick_config(files: HubFiles, wanted: Optional[str]) -> dict:
    """The card configuration asked for (or the only or default one); {} for a card without any."""
    configs = [c for c in (files.card.get("configs") or []) if isinstance(c, dict)]
    names = [str(c.get("config_name") or "default") for c in configs]
    listed = ", ".join(names) or "default"
    if wanted and wanted not in (names or ["default"]):
        raise DataError(f"dataset {files.spec} has no configuration {wanted!r}; its configurations are: "
                        f"{listed}; pick one with --dataset-config")
    if not configs:
        return {}
    if wanted:
        return configs[names.index(wanted)]
    chosen = [c for c in configs if c.get("default") is True] or [c for c, n in zip(configs, names) if n == "default"]
    if len(configs) == 1 or chosen:
        return (chosen or configs)[0]
    raise DataError(f"dataset {files.spec} has several configurations: {listed}; pick one with --dataset-config")


def _split_order(splits: dict[str, list[str]]) -> dict[str, list[str]]:
    known = list(SPLIT_WORDS)
    names = sorted(splits, key=lambda s: (known.index(s) if s in known else len(known), s))
    return {name: sorted(set(splits[name])) for name in names if splits[name]}


def _inferred_splits(paths: list[str], data_dir: str) -> dict[str, list[str]]:
    """Splits by the Hub's file-name conventions: ``data/<split>-00000-of-00001.*``, else split
    words in file or folder names, else everything is ``train``."""
    inside = [p for p in paths if not data_dir or p.startswith(data_dir + "/")]
    relative = {p: p[len(data_dir) + 1:] if data_dir else p for p in inside}
    sharded: dict[str, list[str]] = {}
    for path, rel in relative.items():
        match = SHARDED.match(rel)
        if match:
            sharded.setdefault(match.group(1), []).append(path)
    if sharded:
        return sharded
    found: dict[str, list[str]] = {}
    for path, rel in relative.items():
        words = set(re.split(r"[-._ 0-9/]+", rel.lower()))
        split = next((s for s, keys in SPLIT_WORDS.items() if words & set(keys)), None)
        if split:
            found.setdefault(split, []).append(path)
    return found or ({"train": inside} if inside else {})


def data_files(files: HubFiles, settings: DataSettings) -> dict[str, list[str]]:
    """{split: [repo paths]} for the configuration asked for, each path a data file of the repo.

    A card entry outside the repo is refused before anything is read; patterns are matched only
    against the repo's own file list, so they can select files of the repo, never add any.
    """
    config = _pick_config(files, settings.dataset_config)
    data_dir = str(config.get("data_dir") or "").strip()
    patterns = _card_patterns(config, files.spec)
    for entry in [data_dir] + [p for pats in patterns.values() for p in pats]:
        if entry and outside_repo(entry):
            raise _outside_error(files.spec, entry)
    data_dir = re.sub(r"^(\./)+", "", data_dir).strip("/")
    readable = [p for p in files.paths if _format_of(p) and not _hidden(p)]
    if not patterns:
        return _split_order(_inferred_splits(readable, data_dir))
    return _split_order({split: [p for pat in pats for p in _matching(pat, readable, data_dir)]
                         for split, pats in patterns.items()})


def _reader(paths: list[str], spec: str, split: str) -> tuple[str, dict]:
    """The ``datasets`` packaged reader for one split's files, and its options."""
    formats = sorted({str(_format_of(p)) for p in paths})
    if len(formats) > 1:
        raise DataError(f"dataset {spec}'s split {split} mixes file formats ({', '.join(formats)}); rawtune reads "
                        "one format per split: pick another configuration or split")
    return ("csv", {"sep": "\t"}) if formats[0] == "tsv" else (formats[0], {})


def _url(files: HubFiles, path: str) -> str:
    """The hf:// URL of one repo file at the listed commit, glob characters escaped (datasets
    reads data_files as patterns)."""
    escaped = re.sub(r"([*?\[])", r"[\1]", path)
    return f"hf://datasets/{files.spec}@{files.sha}/{escaped}"


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
    if isinstance(exc, ValueError) and "split" in text.lower():
        return DataError(f"dataset {spec}: the split {settings.split!r} cannot be read ({safe_text(exc)}); give "
                         "a split name such as train with --split")
    if isinstance(exc, ConnectionError) or "Couldn't reach" in text:
        return _unreachable(spec)
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
    files = list_repo(spec, settings, token)
    splits = data_files(files, settings)
    split = settings.split.split("[", 1)[0]
    if not splits:
        raise DataError(f"dataset {spec} has no data files rawtune can read; it needs Parquet, JSON(L), CSV or "
                        "text files")
    if split not in splits:
        raise DataError(f"dataset {spec} has no split {split!r}; its splits are: {', '.join(splits)}; pick one "
                        "with --split")
    reader, options = _reader(splits[split], spec, split)
    try:
        loaded = datasets.load_dataset(reader, data_files={split: [_url(files, p) for p in splits[split]]},
                                       split=settings.split, token=token, streaming=settings.streaming, **options)
    except (DataError, HubError):
        raise
    except Exception as exc:  # datasets raises many types; each is mapped to one clear message
        raise _hub_error(exc, settings, token) from None
    return _guarded(loaded, settings, token), _source_label(settings)
