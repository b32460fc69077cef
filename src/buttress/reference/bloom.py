"""Pure-Python twin of ``buttress.BloomFilter``: the same class over pure-Python kernels.

Everything but the kernels (validation, sizing, persistence, set operations,
statistics) is the one Python layer in ``buttress.bloom``; this module only
replaces the native core with :class:`PythonCore`, which follows the layouts
described in ``buttress._bloom`` step by step and hashes through the
``xxhash`` package.  The tests check both give the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from buttress.bloom import BloomFilterBase
from buttress.reference import hashing

__all__ = ["BloomFilter", "PythonCore"]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_CLASSIC, _SPLIT_BLOCK = 0, 1
# Apache Parquet's split block Bloom filter salts.
_SALT = (0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D,
         0x705495C7, 0x2DF1424B, 0x9EFC4947, 0x5C6BFB31)


class PythonCore:
    """The kernels of :class:`BloomFilter`, one Python loop at a time."""

    _bytes: memoryview | None = None

    def _bind(self, buffer: np.ndarray, layout: int, modulus: int, num_hashes: int) -> None:
        self._bytes = buffer.data  # item access on a memoryview is plain ints
        self._writable = bool(buffer.flags.writeable)
        self._layout_code = layout
        self._probe_modulus = modulus
        self._probe_count = num_hashes

    def _unbind(self) -> None:
        self._bytes = None
        self._writable = False

    def __contains__(self, key: Any) -> bool:
        return self._lookup(hashing.hash_key(key))

    def _insert_one(self, key: Any) -> None:
        self._store(hashing.hash_key(key))

    def _insert_many(self, keys: Any, threads: int = 1) -> int:
        # threads: accepted for the same signature; the twin runs one loop
        hashes = [h for h in self._hashes(keys) if h is not None]  # nulls are not keys
        for h in hashes:
            self._store(h)
        return len(hashes)

    def _contains_many(self, keys: Any, threads: int = 1) -> np.ndarray:
        return np.array([h is not None and self._lookup(h) for h in self._hashes(keys)],
                        dtype=np.bool_)

    def _count_ones(self) -> int:
        return int.from_bytes(self._view(), "little").bit_count()

    # ------------------------------------------------------------------ probing

    def _bit_positions(self, h: int) -> list[int]:
        """The bit numbers (bit b is bit b % 8 of byte b // 8) that key hash ``h`` sets."""
        if self._layout_code == _SPLIT_BLOCK:
            block = ((h >> 32) * self._probe_modulus) >> 32
            x = h & _MASK32
            # word i of the block gets bit (x * SALT[i]) >> 27 (32-bit product);
            # words are little-endian, so word bit b is bit b of the word's bytes
            return [block * 256 + 32 * i + (((x * salt) & _MASK32) >> 27)
                    for i, salt in enumerate(_SALT)]
        m = self._probe_modulus
        x = (h * m) >> 64
        y = 1 + ((((h << 32) | (h >> 32)) & _MASK64) * (m - 1) >> 64)
        positions = []
        for _ in range(self._probe_count):
            positions.append(x)
            x = (x + y) % m
        return positions

    def _store(self, h: int) -> None:
        data = self._view()
        if not self._writable:
            raise ValueError("this BloomFilter is read-only")
        for bit in self._bit_positions(h):
            data[bit >> 3] |= 1 << (bit & 7)

    def _lookup(self, h: int) -> bool:
        data = self._view()
        return all(data[bit >> 3] >> (bit & 7) & 1 for bit in self._bit_positions(h))

    def _view(self) -> memoryview:
        if self._bytes is None:
            raise ValueError("this BloomFilter has no bit array (closed or not initialised)")
        return self._bytes

    @staticmethod
    def _hashes(keys: Any) -> list[int | None]:
        """Each key's hash, ``None`` for a null (columnar input)."""
        return [None if value is None else hashing.hash_key(value)
                for value in hashing.iter_key_values(keys)]


class BloomFilter(BloomFilterBase, PythonCore):
    """Pure-Python twin of :class:`buttress.BloomFilter` (same API, same bits)."""

    _checksum_hash = staticmethod(hashing.xxh64)
