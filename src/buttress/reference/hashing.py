"""Pure-Python twin of ``buttress._hash``: the same API, hashing through ``xxhash``.

The key-encoding rule is documented once, in ``buttress._hash``; this module
implements the same rule in plain Python.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, (int, np.integer)):
        value = int(key)
        if value < _INT64_MIN or value > _UINT64_MAX:
            raise OverflowError(f"int key {value} does not fit in int64 or uint64")
        return (value & _UINT64_MAX).to_bytes(8, "little")
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, bytes-like or int"
    )


def xxh64_many(keys: Any, seed: Any = 0) -> np.ndarray:
    """Hash many keys at once; returns a ``numpy.ndarray`` of uint64."""
    seed = _check_seed(seed)
    array = as_key_array(keys)
    items: Iterable[Any]
    if array is None:
        if isinstance(keys, (str, bytes, bytearray, memoryview)):
            raise TypeError("xxh64_many takes a collection of keys, not a single key")
        items = [encode_key(k) for k in keys]
    elif array.dtype.kind == "u":
        raw = array.astype("<u8").tobytes()
        items = [raw[i : i + 8] for i in range(0, len(raw), 8)]
    else:
        items = array.tolist()  # numpy strips the trailing NUL padding here
    return np.fromiter(
        (xxhash.xxh64_intdigest(item, seed) for item in items), dtype=np.uint64
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed > _UINT64_MAX:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    return seed
