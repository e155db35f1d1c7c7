"""Reading raw documents: local files and folders (JSONL, JSON, CSV, TSV, Parquet, TXT, Markdown)
or, through :mod:`rawtune.data.hub`, a Hub dataset.

Every reader streams and applies the caps while it reads (``max_documents`` and the shared
app's character cap), so nothing past them is loaded; a text column is chosen from the first
rows when none is given, and each way a file can be wrong is one ``DataError`` naming it.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import DataError
from ..settings import DataSettings

TABULAR = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
PLAIN = {".txt", ".md", ".markdown"}
SUPPORTED = TABULAR | PLAIN
SNIFF_ROWS = 200


@dataclass
class Documents:
    """Raw documents read from a source, before cleaning."""

    texts: list[str]
    column: Optional[str]  # chosen text column (None for plain-text files)
    column_reason: str  # why that column was chosen
    columns: list[str] = field(default_factory=list)  # all columns seen
    source: str = ""  # what was read, for the report


def _not_utf8(path: Path, byte: int, offset: int) -> DataError:
    return DataError(
        f"{path.name} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); "
        f"convert it first, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix[1:]}`"
    )


def _read_text(path: Path, max_chars: Optional[int] = None) -> str:
    """The file's text; with ``max_chars``, at most that many characters are read from disk."""
    with path.open("rb") as handle:
        # UTF-8 takes at most 4 bytes a character, so this many bytes always hold max_chars.
        raw = handle.read(max_chars * 4 + 4 if max_chars else -1)
        whole = max_chars is None or not handle.read(1)
    try:
        text = raw.decode("utf-8-sig") if whole else _decode_head(raw)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, raw[exc.start], exc.start) from None
    return text[:max_chars] if max_chars else text


def _decode_head(raw: bytes) -> str:
    """Decode the start of a longer file, where the last character may be cut in two."""
    import codecs

    return codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=False)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, read line by line rather than all at once."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, raw[exc.start], offset + exc.start) from None
            offset += len(raw)
            yield number, line


def _too_big(path: Path, what: str, cap: int) -> DataError:
    return DataError(f"{path.name}: {what} is larger than this app reads from one source "
                     f"({cap:,} characters); use a smaller file, or JSONL/Parquet so it can be read in parts")


def _jsonl_rows(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    """Rows of a JSON Lines file, one line at a time (or of a JSON array, when it fits the cap)."""
    if path.suffix == ".json" and _starts_with_bracket(path):
        if max_chars and path.stat().st_size > max_chars * 4:
            raise _too_big(path, "the JSON array", max_chars)
        text = _read_text(path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        yield from (r if isinstance(r, dict) else {"text": r} for r in rows)
        return
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}, line {number}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        yield row if isinstance(row, dict) else {"text": row}


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _csv_rows(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    """Rows of a CSV/TSV file read as a stream; a row with more fields than the header is an error."""
    csv.field_size_limit(max_chars or (1 << 30))
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            for row in reader:
                extra = row.pop(None, None)  # DictReader puts surplus fields under the key None
                if extra is not None:
                    raise DataError(
                        f"{path.name}, line {reader.line_num}: {len(reader.fieldnames or []) + len(extra)} fields "
                        f"but the header has {len(reader.fieldnames or [])}; quote fields that contain "
                        f"{'tabs' if delimiter == chr(9) else 'commas'} (\"like, this\")")
                yield row
        except csv.Error as exc:
            if max_chars and "field larger than field limit" in str(exc):
                raise _too_big(path, f"the field on line {reader.line_num + 1}", max_chars) from None
            raise DataError(f"{path.name}, line {reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc.object[exc.start], exc.start) from None


def _parquet_rows(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    """Rows of a Parquet file, a batch at a time.

    Parquet compresses well, so a tiny file can hold hundreds of MB of text: each row group's
    uncompressed size (from the footer, nothing decoded yet) is checked against the character cap
    before it is read, and reading stops once the cap is used up.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None
    budget = max_chars * 4 if max_chars else None  # bytes: a character takes 1 to 4
    for index in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(index).total_byte_size
        if budget is not None and size > budget:
            if index == 0:
                raise _too_big(path, f"row group {index} ({size / 2**20:.0f} MB uncompressed)", max_chars)
            return  # what was read so far is the sample the cap allows
        if budget is not None:
            budget -= size
        try:
            for batch in parquet.iter_batches(batch_size=256, row_groups=[index]):
                yield from batch.to_pylist()
        except Exception as exc:
            raise DataError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None


def _plain_docs(path: Path, split_blank_lines: bool, max_chars: Optional[int] = None) -> list[str]:
    text = _read_text(path, max_chars)
    if not split_blank_lines:
        return [text]
    import re

    return [part for part in re.split(r"\n\s*\n", text)]


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(
            f"dataset {path} not found: give a local file or folder, or a Hub dataset id like user/name"
        )
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED:
            raise DataError(
                f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(sorted(SUPPORTED))}"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    if not files:
        raise DataError(f"{path} holds no {', '.join(sorted(SUPPORTED))} files")
    return files


def _rows_of(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, max_chars)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, max_chars)
    return _parquet_rows(path, max_chars)


# ---------------------------------------------------------------- choosing the text column


def choose_column(rows: list[dict], wanted: Optional[str]) -> tuple[str, str, list[str]]:
    """Pick the text column: the one asked for, else ``text``, else the longest string column."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if wanted:
        if wanted not in columns:
            raise DataError(
                f"--text-column {wanted!r} not found; columns are: {', '.join(columns) or '(none)'}"
            )
        return wanted, "asked for with --text-column", columns
    if "text" in columns:
        return "text", "named 'text'", columns
    lengths = {c: 0 for c in columns}
    for row in rows:
        for c in columns:
            if isinstance(row.get(c), str):
                lengths[c] += len(row[c])
    best = max(lengths, key=lengths.get) if lengths else None
    if not best or lengths[best] == 0:
        raise DataError(
            f"no text column found; columns are: {', '.join(columns) or '(none)'}; "
            "pick one with --text-column NAME"
        )
    return best, "the string column with the most characters", columns


def _sniff(rows: Iterator[dict], max_chars: Optional[int]) -> list[dict]:
    """The first rows, to choose the column from: SNIFF_ROWS of them, fewer once they hold
    ``max_chars`` characters (a few huge rows must not all be held at once)."""
    head: list[dict] = []
    chars = 0
    for row in rows:
        head.append(row)
        chars += sum(len(v) for v in row.values() if isinstance(v, str))
        if len(head) >= SNIFF_ROWS or (max_chars is not None and chars >= max_chars):
            break
    return head


def rows_to_documents(rows: Iterable[dict], wanted: Optional[str], source: str,
                      limit: Optional[int] = None, max_chars: Optional[int] = None) -> Documents:
    """Choose the text column from the first rows, then take that column from every row.

    Rows are pulled only as needed: reading stops after ``limit`` documents or ``max_chars``
    characters (the last document is cut there), so a stream is never read further.
    """
    iterator = iter(rows)
    head = _sniff(iterator, max_chars)
    if not head:
        raise DataError(f"{source} is empty: no rows to read")
    column, reason, columns = choose_column(head, wanted)
    texts: list[str] = []
    chars = 0
    for row in itertools.chain(head, iterator):
        if (limit is not None and len(texts) >= limit) or (max_chars is not None and chars >= max_chars):
            break
        value = row.get(column)
        text = value if isinstance(value, str) else ("" if value is None else str(value))
        if max_chars is not None:
            text = text[:max_chars - chars]
        chars += len(text)
        texts.append(text)
    return Documents(texts, column, reason, columns, source)


def is_local(spec: str) -> bool:
    """A dataset spec is local when it exists on disk or looks like a path, not user/name."""
    path = Path(spec).expanduser()
    return path.exists() or spec.startswith((".", "/", "~")) or path.suffix.lower() in SUPPORTED


def read_documents(settings: DataSettings, token: Any = None) -> Documents:
    """Read raw documents from the configured source (no cleaning yet).

    ``max_documents`` and the character cap (:func:`rawtune.space.max_chars`) apply while
    reading, so nothing past them is loaded or downloaded.
    """
    from ..space import max_chars

    if not settings.dataset:
        raise DataError("no dataset given: pass --dataset with a file, folder or Hub id (user/name)")
    spec = str(settings.dataset)
    cap = max_chars()
    if not is_local(spec):
        from .hub import load_hub_rows

        rows, source = load_hub_rows(settings, token=token)
        return rows_to_documents(rows, settings.text_column, source, settings.max_documents, cap)
    files = _local_files(Path(spec).expanduser())
    plain = [f for f in files if f.suffix.lower() in PLAIN]
    tabular = [f for f in files if f.suffix.lower() in TABULAR]
    texts: list[str] = []
    left = cap
    for f in plain:
        if left is not None and left <= 0:
            break
        texts.extend(_plain_docs(f, settings.split_blank_lines, left))
        left = cap - sum(map(len, texts)) if cap is not None else None
    if not tabular:
        if settings.text_column:
            raise DataError(f"--text-column {settings.text_column!r} was given, but {spec} holds only plain text files")
        limit = settings.max_documents
        return Documents(texts[:limit] if limit else texts, None, "plain text files", [], spec)
    rows = (row for f in tabular for row in _rows_of(f, cap))
    docs = rows_to_documents(rows, settings.text_column, spec, settings.max_documents, left)
    docs.texts = texts + docs.texts
    return docs
