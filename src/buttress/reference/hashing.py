"""Pure-Python twin of ``buttress._hash``: the same API, hashing through ``xxhash``.

The key-encoding rule is documented once, in ``buttress._hash``; this module
implements the same rule in plain Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import xxhash

from buttress._keys import as_key_array

__all__ = ["as_key_array", "encode_key", "hash_key", "xxh64", "xxh64_many"]

_UINT64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)


def xxh64(data: Any, seed: Any = 0) -> int:
    """Return the XXH64 hash of ``data`` (bytes-like or str, UTF-8) as an int."""
    seed = _check_seed(seed)
    if isinstance(data, int) and not isinstance(data, bool):
        raise TypeError("xxh64 takes bytes-like or str; use hash_key() for int keys")
    return xxhash.xxh64_intdigest(encode_key(data), seed)


def hash_key(key: Any, seed: Any = 0) -> int:
    """Return the XXH64 hash of ``key`` encoded by the key-encoding rule."""
    return xxhash.xxh64_intdigest(encode_key(key), _check_seed(seed))


def encode_key(key: Any) -> bytes:
    """Return the bytes that the key-encoding rule gives for ``key``."""
    if isinstance(key, bool):
        raise TypeError("bool is not a supported key type (use int or str explicitly)")
    # str.encode and the buffer, not key.encode() or bytes(key): a subclass's
    # encode() or __bytes__ must not change the key (hashing reads the buffer)
    if isinstance(key, str):
        return str.encode(key, "utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return memoryview(key).tobytes()
    if isinstance(key, (int, np.integer)):
        value = int(key)
        if value < _INT64_MIN or value > _UINT64_MAX:
            raise OverflowError(f"int key {value} does not fit in int64 or uint64")
        return (value & _UINT64_MAX).to_bytes(8, "little")
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, bytes-like or int"
    )


def xxh64_many(keys: Any, seed: Any = 0) -> np.ndarray:
    """Hash many keys at once; returns a ``numpy.ndarray`` of uint64.

    A null (Arrow input) has no hash: ``ValueError``, as in the native module.
    """
    seed = _check_seed(seed)
    values = list(iter_key_values(keys, "xxh64_many"))
    nulls = sum(value is None for value in values)
    if nulls:
        raise ValueError(f"xxh64_many: the keys hold {nulls} null(s), which have no hash; "
                         f"drop them first (pyarrow.compute.drop_null, Series.drop_nulls)")
    return np.fromiter((xxhash.xxh64_intdigest(encode_key(value), seed) for value in values),
                       dtype=np.uint64, count=len(values))


def iter_key_values(keys: Any, caller: str = "insert_many/contains_many") -> Iterator[Any]:
    """The keys of a batch as Python values, ``None`` for a null (columnar input only).

    Reads every input the native module reads, by the same rules, through
    numpy's ``tolist()`` and pyarrow's ``to_pylist()``.
    """
    array = as_key_array(keys)
    if array is not None:
        if array.dtype.kind == "u":
            raw = array.astype("<u8").tobytes()
            yield from (int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))
        elif array.dtype.kind == "T":  # StringDType: a missing value is not a str
            yield from (value if isinstance(value, str) else None for value in array.tolist())
        else:
            if array.dtype.kind == "U" and array.size:
                _check_code_points(array)
            yield from array.tolist()  # 'S' and 'U': numpy strips the trailing NULs here
        return
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{caller} take(s) a collection of keys, not a single "
                        f"{type(keys).__name__} key")
    chunks = _arrow_chunks(keys)
    if chunks is None:
        for value in keys:
            if value is None:  # a null in a column; in a list, a key of no supported type
                encode_key(value)  # raises the key rule's TypeError
            yield value
        return
    for chunk in chunks:
        yield from chunk.to_pylist()


def _arrow_chunks(keys: Any) -> list[Any] | None:
    """The Arrow chunks of ``keys`` (a one-column table gives its column), or None."""
    if isinstance(keys, (list, tuple)) or not (
        hasattr(keys, "__arrow_c_stream__") or hasattr(keys, "__arrow_c_array__")
    ):
        return None
    # As the native reader: a producer that cannot export (the export call
    # raises) falls back to the Python-keys path; once exported, an error
    # reading the data is the caller's (falling back then would iterate a
    # half-read stream and silently insert nothing).
    try:
        import pyarrow as pa

        exported: _ExportedStream | _ExportedArray = (
            _ExportedStream(keys.__arrow_c_stream__()) if hasattr(keys, "__arrow_c_stream__")
            else _ExportedArray(keys.__arrow_c_array__()))
    except (ImportError, TypeError, ValueError, NotImplementedError):
        if hasattr(keys, "__iter__"):
            return None
        raise
    if isinstance(exported, _ExportedStream):
        try:
            column = pa.chunked_array(exported)
        except pa.ArrowException as exc:
            raise ValueError(f"the Arrow stream failed while reading it: {exc}") from exc
        chunks, column_type = column.chunks, column.type
    else:
        chunks = [pa.array(exported)]
        column_type = chunks[0].type
    if pa.types.is_struct(column_type) and column_type.num_fields == 1:
        if any(chunk.null_count for chunk in chunks):  # field(0) would show the hidden rows
            raise ValueError("a table-like Arrow struct with null rows is not a key column")
        column_type = column_type.field(0).type
        chunks = [chunk.field(0) for chunk in chunks]
    if isinstance(column_type, pa.BaseExtensionType):
        # The C data interface carries an extension type (arrow.uuid, ...) as
        # its storage plus metadata, and the native reader reads the storage.
        column_type = column_type.storage_type
        chunks = [chunk.storage for chunk in chunks]
    supported = (pa.types.is_integer, pa.types.is_string, pa.types.is_large_string,
                 pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary,
                 pa.types.is_null, pa.types.is_string_view, pa.types.is_binary_view)
    # a dictionary-encoded column is read as its values (to_pylist decodes it)
    value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    if not any(check(value_type) for check in supported):
        raise TypeError(f"unsupported Arrow key type {column_type}: keys must be integers "
                        f"(int8..uint64), string, large_string, string_view, binary, "
                        f"large_binary, binary_view or fixed_size_binary, or a dictionary of "
                        f"those; cast the column first")
    return chunks


class _ExportedStream:
    """The capsule one ``__arrow_c_stream__`` call returned, for pyarrow to read."""

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.capsule


class _ExportedArray:
    """The capsules one ``__arrow_c_array__`` call returned, for pyarrow to read."""

    def __init__(self, capsules: Any) -> None:
        self.capsules = capsules

    def __arrow_c_array__(self, requested_schema: Any = None) -> Any:
        return self.capsules


def _check_code_points(array: np.ndarray) -> None:
    """Refuse what numpy cannot turn into str (tolist() would raise SystemError)."""
    code_points = array.view(np.uint32)
    bad = np.flatnonzero(code_points > 0x10FFFF)
    if bad.size:
        per_element = array.dtype.itemsize // 4
        raise ValueError(f"'U' array element {int(bad[0]) // per_element} holds "
                         f"{int(code_points[bad[0]]):#x}, which is not a Unicode code point")


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed > _UINT64_MAX:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    return seed
