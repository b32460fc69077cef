"""Numpy key input, normalised once for the native core and its pure-Python twin.

Shared by ``buttress._hash`` (and through it the Bloom filter) and
``buttress.reference.hashing``, so both read numpy keys by the same rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_key_array"]


def as_key_array(keys: Any) -> np.ndarray | None:
    """Normalise numpy key input to a C-contiguous uint64, 'S', 'U' or StringDType array.

    Integer arrays of any width and byte order become uint64 holding each
    value's 8-byte encoding; 'S' (bytes) and 'U' (str, hashed as UTF-8) arrays
    are returned contiguous ('U' in native byte order), StringDType arrays
    (numpy 2, kind 'T') as they are.  Anything that is not a numpy array gives
    None (the caller then treats ``keys`` as a sequence of Python keys, or as
    Arrow data).  Float, bool, object and other
    numpy arrays raise ``TypeError``: a silent cast would hash different keys
    than the caller meant.  A masked array with masked elements raises
    ``ValueError`` (its hidden values are not keys).
    """
    if not isinstance(keys, np.ndarray):
        return None
    if isinstance(keys, np.ma.MaskedArray):
        # The values under a mask are whatever the array holds there: hashing
        # them would insert keys the caller marked as missing.
        masked = int(np.ma.count_masked(keys))
        if masked:
            raise ValueError(f"the key array has {masked} masked element(s), which are not "
                             f"keys: pass keys.compressed() to leave them out")
        keys = keys.data
    if keys.ndim != 1:
        raise TypeError(f"key arrays must be one-dimensional, got shape {keys.shape}")
    kind = keys.dtype.kind
    if kind == "i":
        return np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64)
    if kind == "u":
        return np.ascontiguousarray(keys, dtype=np.uint64)
    if kind == "S":
        return np.ascontiguousarray(keys)
    if kind == "U":
        # The native core reads UCS-4 code points in this machine's byte order:
        # a byte-swapped array would hash other characters (or none at all).
        return np.ascontiguousarray(keys, dtype=keys.dtype.newbyteorder("="))
    if kind == "T":
        return keys
    raise TypeError(
        f"unsupported key array dtype {keys.dtype}: use an integer, bytes ('S'), str ('U') "
        f"or StringDType array, or a list of str/bytes/int keys"
    )
