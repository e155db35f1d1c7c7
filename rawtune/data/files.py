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
    # A one-byte code page cannot be told from the bytes alone (UTF-16/32 are refused before
    # reading, by _check_not_utf16): say how to find it rather than guess one.
    return DataError(f"{path.name} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); convert it from its "
                     f"encoding first (`file -i {path.name}` guesses it), e.g. for Windows text "
                     f"`iconv -f CP1252 -t UTF-8 {path.name} > fixed.{path.suffix[1:]}`")


def _check_not_utf16(path: Path) -> None:
    """Refuse UTF-16/32 text before reading it, naming its encoding: without a byte-order mark its
    zero bytes are valid UTF-8, so it would otherwise be read as text full of NUL characters."""
    encoding = _utf16_or_32(path)
    if encoding:
        raise DataError(f"{path.name} is {encoding} text, not UTF-8; convert it first with "
                        f"`iconv -f {encoding} -t UTF-8 {path.name} > fixed.{path.suffix[1:]}`")


def _utf16_or_32(path: Path) -> str:
    """The UTF-16/32 encoding a file is in, from its byte-order mark or its zero bytes ('' if neither)."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            return name  # iconv reads the byte order from the mark
    # Without a mark: mostly-ASCII text in UTF-16 has a zero in every other byte.
    even, odd = head[0::2], head[1::2]
    if len(head) >= 4 and odd.count(0) > len(odd) / 3 and even.count(0) < len(even) / 10:
        return "UTF-16LE"
    if len(head) >= 4 and even.count(0) > len(even) / 3 and odd.count(0) < len(odd) / 10:
        return "UTF-16BE"
    return ""


def _read_text(path: Path, max_chars: Optional[int] = None) -> str:
    """The file's text; with ``max_chars``, at most that many characters are read from disk."""
    _check_not_utf16(path)
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
    _check_not_utf16(path)
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
        except RecursionError:
            raise _too_deep(path, 1) from None
        yield from (r if isinstance(r, dict) else {"text": r} for r in rows)
        return
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}, line {number}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        except RecursionError:  # Python's parser recurses once per level of nesting
            raise _too_deep(path, number) from None
        yield row if isinstance(row, dict) else {"text": row}


def _too_deep(path: Path, line: int) -> DataError:
    return DataError(f"{path.name}, line {line}: JSON nested too deeply to read; each line must be one JSON "
                     "object with the text in a field (like {\"text\": \"...\"})")


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _csv_rows(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    """Rows of a CSV/TSV file read as a stream; a row with more fields than the header is an error."""
    csv.field_size_limit(max_chars or (1 << 30))
    delimiter = "\t" if path.suffix == ".tsv" else ","
    _check_not_utf16(path)
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


# Parquet is read in batches of about this many bytes (the footer's row size, a hint only), and
# turned into Python rows in slices of at most this many bytes of text (what was really decoded).
PARQUET_BATCH_BYTES = 8 * 2**20


def _parquet_rows(path: Path, max_chars: Optional[int] = None) -> Iterator[dict]:
    """Rows of a Parquet file, a slice at a time, with memory bounded by what is really decoded.

    Parquet compresses well, so a tiny file can hold gigabytes of text. A dictionary-encoded column
    is worse: one long value and many rows that name it decode to value x rows, while the footer
    counts the value once. So text columns are read as dictionaries (as stored: the long value
    once), each batch's decoded size is measured row by row, rows become Python objects in slices
    of at most :data:`PARQUET_BATCH_BYTES`, and each slice's real size is charged against the
    character cap (4 bytes a character), reading stops once it is used up. A row group whose
    footer already claims more than is left is not decoded at all.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        parquet = pq.ParquetFile(path, read_dictionary=_text_columns(parquet.schema_arrow))
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None
    budget = max_chars * 4 if max_chars else None  # bytes: a character takes 1 to 4
    for index in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(index)
        if budget is not None and group.total_byte_size > budget:
            if index == 0:
                raise _too_big(path, f"row group {index} ({group.total_byte_size / 2**20:.0f} MB uncompressed)",
                               max_chars)
            return  # what was read so far is the sample the cap allows
        rows = max(1, min(1024, PARQUET_BATCH_BYTES * group.num_rows // max(group.total_byte_size, 1)))
        try:
            for batch in parquet.iter_batches(batch_size=rows, row_groups=[index]):
                for sliced, size in _decoded_slices(batch):
                    yield from sliced
                    if budget is not None:
                        budget -= size
                        if budget <= 0:
                            return
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None


def _text_columns(schema: Any) -> list[str]:
    """The top-level string and binary columns: read as dictionaries, they stay as small as stored."""
    return [f.name for f in schema if _is_text(f.type)]


def _is_text(arrow_type: Any) -> bool:
    import pyarrow as pa

    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    return any(kind(arrow_type) for kind in kinds)


def _decoded_slices(batch: Any) -> Iterator[tuple[list[dict], int]]:
    """(rows as dicts, their decoded bytes) for consecutive slices of at most PARQUET_BATCH_BYTES
    (at least one row), sized before any Python string is made."""
    import numpy as np

    total = np.cumsum(_row_bytes(batch))
    start = 0
    while start < batch.num_rows:
        before = int(total[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(total, before + PARQUET_BATCH_BYTES, side="right")))
        yield batch.slice(start, end - start).to_pylist(), int(total[end - 1]) - before
        start = end


def _row_bytes(batch: Any) -> Any:
    """Bytes each row takes once decoded: its text and binary values' lengths (a dictionary column's
    looked up through its indices), and other columns' share of their buffers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        if pa.types.is_dictionary(column.type) and _is_text(column.type.value_type):
            lengths = pc.take(pc.binary_length(column.dictionary), column.indices)
        elif _is_text(column.type):
            lengths = pc.binary_length(column)
        else:
            sizes += column.nbytes // max(batch.num_rows, 1)
            continue
        sizes += pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return sizes


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
