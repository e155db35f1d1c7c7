"""The data stage: raw text in, packed token blocks and a held-out split out.

Sources are a Hub dataset id (read through :mod:`rawtune.hub` with the real ``datasets``
loader) or a local file/folder (JSONL, JSON, CSV, TSV, TXT, Markdown, Parquet). Documents are
stripped, filtered by length, deduplicated, tokenized with EOS appended, split at document level
into train and held-out, and packed into fixed-length blocks saved as ``.npy`` arrays.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .errors import DataError
from .rundir import RunDir
from .settings import DataSettings

TABULAR = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
PLAIN = {".txt", ".md", ".markdown"}
SUPPORTED = TABULAR | PLAIN
# How many rows are sampled to guess the text column.
SNIFF_ROWS = 200


@dataclass
class Documents:
    """Raw documents read from a source, before cleaning."""

    texts: list[str]
    column: Optional[str]  # chosen text column (None for plain-text files)
    column_reason: str  # why that column was chosen
    columns: list[str] = field(default_factory=list)  # all columns seen
    source: str = ""  # what was read, for the report


@dataclass
class DataReport:
    """What the data stage did, stored in run.json under ``data``."""

    source: str
    column: Optional[str]
    column_reason: str
    documents_read: int
    documents_kept: int
    dropped_empty: int
    dropped_short: int
    dropped_duplicate: int
    train_documents: int
    heldout_documents: int
    train_tokens: int
    heldout_tokens: int
    train_blocks: int
    heldout_blocks: int
    seq_len: int
    tokens_dropped_by_packing: int
    documents_cut: int = 0  # documents whose head is trained on and whose tail is held out

    def summary(self) -> str:
        dropped = self.dropped_empty + self.dropped_short + self.dropped_duplicate
        cut = f"; {self.documents_cut} long document cut: its tail is held out" if self.documents_cut else ""
        return (
            f"{self.source}: column {self.column or '(plain text)'} ({self.column_reason}); "
            f"{self.documents_kept}/{self.documents_read} documents kept "
            f"({dropped} dropped: {self.dropped_empty} empty, {self.dropped_short} short, "
            f"{self.dropped_duplicate} duplicate); {self.train_tokens:,} train tokens in "
            f"{self.train_blocks} blocks of {self.seq_len}, {self.heldout_blocks} held-out blocks{cut}"
        )


# ---------------------------------------------------------------- reading local files


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
    from .space import max_chars

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


# ---------------------------------------------------------------- cleaning, tokenizing, packing


def clean(texts: Iterable[str], min_chars: int, dedupe: bool) -> tuple[list[str], dict[str, int]]:
    """Strip, drop empty/short documents and exact duplicates; count what was dropped."""
    kept: list[str] = []
    seen: set[bytes] = set()
    counts = {"documents_read": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate": 0}
    for text in texts:
        counts["documents_read"] += 1
        text = text.strip()
        if not text:
            counts["dropped_empty"] += 1
            continue
        if len(text) < min_chars:
            counts["dropped_short"] += 1
            continue
        if dedupe:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                counts["dropped_duplicate"] += 1
                continue
            seen.add(digest)
        kept.append(text)
    return kept, counts


def tokenize(texts: list[str], tokenizer: Any, batch: int = 256) -> list[list[int]]:
    """Token ids of each document with EOS appended (and BOS first where the model uses one)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; rawtune appends EOS to every document")
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    out: list[list[int]] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            out.append(([bos] if bos is not None else []) + list(ids) + [eos])
    return out


def pack(docs: list[list[int]], seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents and cut them into full blocks; return blocks and leftover tokens."""
    flat = np.fromiter((t for d in docs for t in d), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len), int(len(flat) - n * seq_len)


def split_documents(docs: list[list[int]], fraction: float, min_tokens: int, seed: int,
                    piece_tokens: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Hold out whole documents (a seeded shuffle) until both the share and the minimum are met.

    The document that would overshoot is cut in pieces of ``piece_tokens`` (0: never cut) and only
    as many of its last pieces as are needed are held out: one book or one long dump can then be
    trained on, and its held-out part stays one contiguous tail, never interleaved with training text.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for d in docs)
    need = max(int(total * fraction), min_tokens)
    held: dict[int, list[int]] = {}
    train_part: dict[int, list[int]] = {}
    got = 0
    for i in order:
        if got >= need:
            break
        doc = docs[i]
        cut = _tail_cut(len(doc), need - got, piece_tokens)
        if cut > 0:
            train_part[i] = doc[:cut]
        held[i] = doc[cut:]
        got += len(held[i])
    train = [train_part.get(i, d) for i, d in enumerate(docs) if i not in held or i in train_part]
    return train, [held[i] for i in sorted(held)]


def _tail_cut(length: int, wanted: int, piece_tokens: int) -> int:
    """Where to cut a document so its last whole pieces cover ``wanted`` tokens (0: hold it all out)."""
    if piece_tokens <= 0 or length <= wanted:
        return 0
    pieces = -(-wanted // piece_tokens)
    return max(length - pieces * piece_tokens, 0)


def prepare(settings: DataSettings, tokenizer: Any, seq_len: int, run: RunDir,
            seed: int = 3407, token: Optional[str] = None,
            log: Callable[[str], None] = print) -> DataReport:
    """Run the whole data stage and write ``data/train.npy`` and ``data/heldout.npy``."""
    docs = read_documents(settings, token=token)
    log(f"[data] read {len(docs.texts)} documents from {docs.source}; text column: "
        f"{docs.column or '(plain text)'} ({docs.column_reason})")
    kept, counts = clean(docs.texts, settings.min_chars, settings.dedupe)
    if not kept:
        raise DataError(
            f"nothing left after cleaning {docs.source}: {counts['documents_read']} documents read, "
            f"{counts['dropped_empty']} empty, {counts['dropped_short']} shorter than --min-chars "
            f"{settings.min_chars}; lower --min-chars or check --text-column"
        )
    ids = tokenize(kept, tokenizer)
    total = sum(len(d) for d in ids)
    min_held = settings.min_heldout_blocks * seq_len
    if total < min_held + seq_len:
        raise DataError(
            f"corpus too small: {total} tokens after cleaning, but one training block plus "
            f"{settings.min_heldout_blocks} held-out blocks of --seq-len {seq_len} need "
            f"{min_held + seq_len}; add text or lower --seq-len"
        )
    piece = seq_len if settings.piece_tokens is None else settings.piece_tokens
    train_docs, held_docs = split_documents(ids, settings.heldout_fraction, min_held, seed, piece)
    train_blocks, train_left = pack(train_docs, seq_len)
    held_blocks, held_left = pack(held_docs, seq_len)
    if len(train_blocks) == 0:
        hint = " or let long documents be cut (drop --piece-tokens 0)" if piece == 0 else ""
        raise DataError(f"no full training block of --seq-len {seq_len} is left after the held-out split; "
                        f"add text or lower --seq-len / --heldout-fraction{hint}")
    run.data_dir.mkdir(parents=True, exist_ok=True)
    np.save(run.data_dir / "train.npy", train_blocks)
    np.save(run.data_dir / "heldout.npy", held_blocks)
    report = DataReport(
        source=docs.source, column=docs.column, column_reason=docs.column_reason,
        documents_kept=len(kept), train_documents=len(train_docs), heldout_documents=len(held_docs),
        train_tokens=int(train_blocks.size), heldout_tokens=int(held_blocks.size),
        train_blocks=len(train_blocks), heldout_blocks=len(held_blocks), seq_len=seq_len,
        tokens_dropped_by_packing=train_left + held_left,
        documents_cut=len(train_docs) + len(held_docs) - len(ids), **counts,
    )
    run.update(data=asdict(report))
    log(f"[data] {report.summary()}")
    return report


def load_blocks(run: RunDir, which: str) -> np.ndarray:
    """Load ``train`` or ``heldout`` blocks written by :func:`prepare`."""
    path = run.data_dir / f"{which}.npy"
    if not path.is_file():
        raise DataError(f"{path} is missing: run the data stage first (`rawtune train` does it)")
    return np.load(path)


def preview(settings: DataSettings, n: int = 5, token: Optional[str] = None) -> dict[str, Any]:
    """Read a source and report its column choice, cleaning counts and first documents (for the UI)."""
    docs = read_documents(settings, token=token)
    kept, counts = clean(docs.texts, settings.min_chars, settings.dedupe)
    return {
        "source": docs.source, "column": docs.column, "column_reason": docs.column_reason,
        "columns": docs.columns, "documents_kept": len(kept), "characters": sum(map(len, kept)),
        "first": kept[:n], **counts,
    }
