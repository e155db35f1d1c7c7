"""The tensor table of a GGUF file (name, type, shape, where its bytes are), read without the metadata.

gguf-py's ``GGUFReader`` parses every metadata value into numpy views, one per array element:
for a 49k-token vocabulary that is about 600,000 small objects and 4-5 s of a 2-core machine per
file, and export read each quantized file several times (its tensor types, the re-quantization's
offsets). Here the metadata is stepped over by its lengths alone (the format: a header, the
key/value pairs, then one record per tensor, then the data at the file's alignment), and only the
tensor records are kept. ``tests/test_imatrix.py`` checks the table against ``GGUFReader``'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Sizes of the fixed-width metadata value types, by GGUF's type code (string = 8, array = 9).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_ALIGNMENT_KEY = "general.alignment"
# Real files keep their metadata and tensor records in a few MB (a 152k-token vocabulary included).
MAX_RECORD_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ggml_type: int  # GGML type code (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # as GGUF stores it: the row length first
    data_offset: int  # absolute offset of the first byte in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    def values(self, path: Path) -> np.ndarray:
        """Float tensors (F32, F16, BF16) as float32 rows ``[-1, shape[0]]``, memory-mapped from ``path``."""
        from gguf import GGMLQuantizationType as T

        kind = T(self.ggml_type)
        if kind not in (T.F32, T.F16, T.BF16):
            raise ValueError(f"{self.name}: type {kind.name} is not a float type")
        stored = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[kind]
        raw = np.memmap(path, dtype=stored, mode="r", offset=self.data_offset,
                        shape=(self.n_bytes // np.dtype(stored).itemsize,))
        if kind == T.BF16:  # the high half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32).reshape(-1, self.shape[0])


class _NeedMore(Exception):
    """The records run past the bytes read so far."""


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        end = self.pos + struct.calcsize(fmt)
        if end > len(self.data):
            raise _NeedMore
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos = end
        return out

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.data):
            raise _NeedMore

    def string(self) -> str:
        (length,) = self.take("<Q")
        start = self.pos
        self.skip(length)
        return self.data[start:self.pos].decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.skip(_FIXED[kind])
        elif kind == _STRING:
            self.skip(self.take("<Q")[0])
        elif kind == _ARRAY:
            item, count = self.take("<IQ")
            if item in _FIXED:
                self.skip(_FIXED[item] * count)
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown metadata type {kind}")


def read_index(path: Path) -> list[TensorEntry]:
    """Every tensor's record, in file order. Raises ValueError for a file that is not a GGUF
    (v2/v3), whose records are cut short, or whose tensors run past its end."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        # The metadata and tensor records sit before the data: read growing prefixes until they fit.
        want = 1 << 22
        while True:
            handle.seek(0)
            data = handle.read(want)
            try:
                return _parse(_Cursor(data), n_tensors, n_kv, size)
            except _NeedMore:
                if len(data) >= size:
                    raise ValueError("the metadata or tensor records are cut short (truncated file)") from None
                if want >= MAX_RECORD_BYTES:  # a length field gone wrong must not read a whole 8B file into memory
                    raise ValueError(f"metadata and tensor records larger than {MAX_RECORD_BYTES >> 20} MiB "
                                     "(a damaged length field)") from None
                want *= 4


def _parse(cur: _Cursor, n_tensors: int, n_kv: int, size: int) -> list[TensorEntry]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur.pos = 24
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        (kind,) = cur.take("<I")
        if key == _ALIGNMENT_KEY and kind == 4:
            (alignment,) = cur.take("<I")
        else:
            cur.skip_value(kind)
    records = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.take("<I")
        shape = cur.take(f"<{n_dims}Q")
        kind, offset = cur.take("<IQ")
        records.append((name, kind, tuple(int(d) for d in shape), offset))
    start = -(-cur.pos // alignment) * alignment
    entries = []
    for name, kind, shape, offset in records:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        if start + offset + n_bytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated)")
        entries.append(TensorEntry(name, kind, shape, start + offset, n_bytes))
    return entries
