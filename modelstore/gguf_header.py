"""A bounded walk over a GGUF header, before gguf-py's ``GGUFReader`` ever sees the file.

``GGUFReader`` trusts the counts a header claims: a 169-byte file saying it holds an array of
2**62 elements made it loop and allocate without bound (the importer grew to 7 GB; the daemon
was OOM-killed through ``/api/create`` and ``/api/show``). This walk reads the same layout
(``https://github.com/ggml-org/ggml/blob/master/docs/gguf.md``) with every count and length
checked against the bytes left in the file *before* anything is read or allocated, and caps
what turns into Python objects per item (string arrays, tensors), so metadata reading has a
memory bound whatever the file says. It keeps nothing: it only says whether the header is sane.
gguf-py has no such check (its reader trusts a header that claims a 2^62-element array, and
loops and allocates without bound), hence this module.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from modelstore.errors import ImportSourceError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = frozenset({2, 3})
MAX_ITEMS = 4_000_000
"""Most metadata keys, array items (a vocabulary or merges list) or tensors a header may hold:
the largest vocabularies have ~256k tokens and ~500k merges; gguf-py makes objects per item."""
MAX_STRING_ITEMS = 1 << 20
"""Strings in all metadata arrays together. gguf-py makes ~1.6 KB of Python and numpy objects
per string, so this bounds what reading the metadata costs (a 16 MB file of 2M empty strings
drove ``/api/create`` to 3.3 GB); the largest real vocabularies (~262k tokens, plus ~500k BPE
merges) stay well within it."""
MAX_STRING_BYTES = 64 << 20
"""Longest single string (a chat template is a few KiB)."""
MAX_ARRAY_DEPTH = 4
MAX_DIMENSIONS = 8
"""GGML tensors have at most 4 dimensions; a little slack for newer formats."""
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value types -> bytes: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64 (8 string, 9 array)."""


class _Cursor:
    """A position in the file that never moves past its end."""

    def __init__(self, handle: BinaryIO, size: int, endian: str) -> None:
        self.handle = handle
        self.size = size
        self.endian = endian
        self.position = handle.tell()
        self.strings = 0
        """Strings in metadata arrays so far (``MAX_STRING_ITEMS``)."""

    def need(self, count: int, what: str) -> None:
        if count < 0 or count > self.size - self.position:
            raise _Bad(f"{what} claims {count} bytes but the file has {self.size - self.position}")

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.position += count
        self.handle.seek(self.position)

    def unsigned(self, width: int, what: str) -> int:
        self.need(width, what)
        data = self.handle.read(width)
        self.position += width
        return struct.unpack(f"{self.endian}{'I' if width == 4 else 'Q'}", data)[0]


class _Bad(Exception):
    """A header that is not what it claims; turned into ``ImportSourceError`` at the edge."""


def _count(cursor: _Cursor, what: str, minimum_item_bytes: int) -> int:
    count = cursor.unsigned(8, f"{what} count")
    if count > MAX_ITEMS:
        raise _Bad(f"{what} count {count} is over the limit of {MAX_ITEMS}")
    cursor.need(count * minimum_item_bytes, f"{count} {what}")
    return count


def _string(cursor: _Cursor, what: str) -> None:
    length = cursor.unsigned(8, f"{what} length")
    if length > MAX_STRING_BYTES:
        raise _Bad(f"{what} of {length} bytes is over the limit of {MAX_STRING_BYTES}")
    cursor.skip(length, what)


def _value(cursor: _Cursor, kind: int, depth: int = 0) -> None:
    if kind in _SCALAR_SIZES:
        cursor.skip(_SCALAR_SIZES[kind], "a value")
    elif kind == _STRING:
        _string(cursor, "a string")
    elif kind == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Bad(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item_kind = cursor.unsigned(4, "an array type")
        if item_kind in _SCALAR_SIZES:
            count = _count(cursor, "array items", _SCALAR_SIZES[item_kind])
            cursor.skip(count * _SCALAR_SIZES[item_kind], "array items")
            return
        count = _count(cursor, "array items", 8 if item_kind == _STRING else 12)
        if item_kind == _STRING:
            cursor.strings += count
            if cursor.strings > MAX_STRING_ITEMS:
                raise _Bad(
                    f"its metadata arrays hold over {MAX_STRING_ITEMS} strings (no model's "
                    "vocabulary is that large)"
                )
        for _ in range(count):
            _value(cursor, item_kind, depth + 1)
    else:
        raise _Bad(f"unknown value type {kind}")


def _walk(handle: BinaryIO, size: int) -> None:
    if handle.read(4) != MAGIC:
        raise _Bad("bad magic")
    raw_version = handle.read(4)
    if len(raw_version) != 4:
        raise _Bad("truncated header")
    endian = "<"
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        endian, version = ">", struct.unpack(">I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"unsupported GGUF version {struct.unpack('<I', raw_version)[0]}")
    cursor = _Cursor(handle, size, endian)
    tensors = cursor.unsigned(8, "tensor count")
    if tensors > MAX_ITEMS:
        raise _Bad(f"tensor count {tensors} is over the limit of {MAX_ITEMS}")
    keys = _count(cursor, "metadata keys", 8 + 4 + 1)
    for _ in range(keys):
        _string(cursor, "a metadata key")
        _value(cursor, cursor.unsigned(4, "a value type"))
    cursor.need(tensors * (8 + 4 + 8 + 4 + 8), f"{tensors} tensor descriptions")
    for _ in range(tensors):
        _string(cursor, "a tensor name")
        dimensions = cursor.unsigned(4, "a tensor's dimension count")
        if dimensions > MAX_DIMENSIONS:
            raise _Bad(f"a tensor with {dimensions} dimensions")
        cursor.skip(8 * dimensions + 4 + 8, "a tensor description")


def check_gguf_header(path: Path, display_name: str | None = None) -> None:
    """Raise ``ImportSourceError`` unless ``path``'s GGUF header is consistent with its size.

    Reads only the header, a bounded number of small reads; ``display_name`` names the file
    in the message (never a server path).
    """
    name = display_name or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            _walk(handle, size)
    except _Bad as exc:
        raise ImportSourceError(f"{name} is not a valid GGUF file: {exc}") from None
    except OSError as exc:
        raise ImportSourceError(f"{name} cannot be read: {exc.strerror}") from None
