"""Bloom filters over a native core, a Parquet-compatible layout, and a lookup guard.

A Bloom filter answers "is this key possibly in the set?" in a few
nanoseconds and a few bits per key: *no* is always right, *maybe* is wrong
with a small, tunable probability (the false-positive rate).  Deleting keys is
not possible; rebuild the filter instead.

>>> bf = BloomFilter.for_capacity(1_000_000, fp_rate=0.01, layout="split_block")
>>> bf.insert("user:42")
>>> "user:42" in bf
True
>>> bf.contains_many(np.arange(3))        # numpy bool array, GIL released
array([False, False, False])

Two layouts:

``split_block`` (recommended)
    The Apache Parquet split block Bloom filter, bit for bit: every key touches
    one 32-byte block, so a lookup is one cache miss.  ``bitset()`` is a valid
    Parquet bitset and :meth:`BloomFilter.from_bitset` reads one.
``classic``
    ``num_hashes`` bits anywhere in the array by double hashing: slightly fewer
    bits per key for the same false-positive rate, k cache misses per key.

Keys are str, bytes-like or int, hashed once with XXH64 by the project's one
key-encoding rule (``docs/hashing.md``), so a filter gives the same bits in
every process, on every machine, and in the pure-Python twin
``buttress.reference.BloomFilter``.

Thread safety: lookups never lock (bits only ever go from 0 to 1, so a
reader racing a writer can at worst miss a key whose insert has not returned
yet).  Writers (insert, insert_many, |=, &=, clear) hold one lock per filter,
so inserts from several threads never lose bits; the native batch kernels
release the GIL while they hold it.  Snapshots (save, to_bytes, bitset, flush,
close) hold it too, so a file's checksum matches its bits.  Processes sharing a file opened with
``mode="r+"`` must agree on a single writer.

The layer in this module (validation, persistence, set operations, sizing,
statistics) is shared by the native filter and its twin; only the kernels
differ (``buttress._bloom`` or the pure-Python core in
``buttress.reference.bloom``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Generic, TypeVar

import numpy as np

from buttress import _bloom, _hash
from buttress._validate import (
    require_bool,
    require_callable,
    require_choice,
    require_int,
    require_number,
    require_path,
    require_str,
)
from buttress.errors import CorruptFilterError

__all__ = [
    "LAYOUTS",
    "BloomFilter",
    "BloomFilterBase",
    "BloomGuard",
    "classic_fp_rate",
    "split_block_fp_rate",
]

logger = logging.getLogger("buttress.bloom")

LAYOUTS = ("classic", "split_block")
_LAYOUT_CODES = {"classic": 0, "split_block": 1}
_BLOCK_BITS = 256  # split_block: eight 32-bit words
_MAX_NUM_BITS = 1 << 40  # 128 GiB; split_block's block index needs num_blocks < 2**32
_MAX_THREADS = 1024  # threads=: far beyond any core count, and within the kernels' C int

# Persistence: a 64-byte little-endian header, then the bitset.
#   magic, format version, layout, hash algorithm, num_hashes, seed, num_bits,
#   bitset length in bytes, checksum, 16 reserved bytes.
# The checksum is XXH64 of the bitset, seeded with XXH64 of the 40 header bytes
# before it, so a flipped bit anywhere in header or bits is caught.
_MAGIC = b"BTRSBLM\x00"
_FORMAT_VERSION = 1
_HASH_XXH64 = 1
_SEED = 0  # Parquet hashes with XXH64 seed 0; classic uses the same hash
_HEADER = struct.Struct("<8sHBBIQQQQ16x")
_HEADER_SIZE = _HEADER.size  # 64: the bitset starts cache-line aligned in files
_CHECKSUMMED_HEADER = 40
_CHECKSUM_OFFSET = 40

_F = TypeVar("_F", bound="BloomFilterBase")
# from_parquet: rows per batch, and the read buffer (bytes) that streams pages.
# Measured at 10M ids in 10 row groups: a 256 KiB buffer grew the peak RSS by
# 29.4 MiB, 128 KiB by 24.6 MiB, for about 5% more time (and 32 KiB no less).
_PARQUET_BATCH = 1 << 15
_PARQUET_BUFFER = 1 << 17
V = TypeVar("V")

_READ_ONLY = (
    "this BloomFilter is read-only (opened with mode='r'); open it with mode='r+' or "
    "copy() it to modify it"
)


def classic_fp_rate(num_keys: float, num_bits: int, num_hashes: int) -> float:
    """Expected false-positive rate of a classic filter: ``(1 - e^(-k n / m))^k``."""
    num_keys = require_number("num_keys", num_keys, minimum=0)
    num_bits = require_int("num_bits", num_bits, minimum=1)
    num_hashes = require_int("num_hashes", num_hashes, minimum=1)
    if num_keys <= 0:
        return 0.0
    return float((-math.expm1(-num_hashes * num_keys / num_bits)) ** num_hashes)


def split_block_fp_rate(num_keys: float, num_bits: int) -> float:
    """Expected false-positive rate of a split-block filter (exact Poisson sum).

    A block receives ``j ~ Poisson(n / blocks)`` keys; with ``j`` keys each of
    its eight words has each bit set with probability ``1 - (31/32)^j``, and a
    query must find its bit set in all eight words.  The usual closed form
    ignores the variance of ``j`` and under-sizes the filter.
    """
    num_keys = require_number("num_keys", num_keys, minimum=0)
    blocks = require_int("num_bits", num_bits, minimum=_BLOCK_BITS) // _BLOCK_BITS
    if num_keys <= 0:
        return 0.0
    lam = num_keys / blocks
    if lam > 2000:  # the sum is within 1e-12 of 1 here; don't iterate millions of terms
        return float((-math.expm1(-lam / 32)) ** 8)
    spread = 12 * math.sqrt(lam) + 30
    total = 0.0
    log_lam = math.log(lam)
    for j in range(max(0, int(lam - spread)), int(lam + spread) + 1):
        weight = math.exp(-lam + j * log_lam - math.lgamma(j + 1))
        total += weight * (1.0 - (31 / 32) ** j) ** 8
    return min(1.0, total)


class BloomFilterBase:
    """The Python layer of :class:`BloomFilter`, shared with the pure-Python twin.

    Subclasses mix this with a core that provides the kernels (``_bind``,
    ``__contains__``, ``_insert_one``, ``_insert_many``, ``_contains_many``,
    ``_count_ones``, ``_unbind``) and name their XXH64 in ``_checksum_hash``.
    """

    _checksum_hash: ClassVar[Callable[..., int]]

    # Set by _setup; declared for type checkers.
    _bits: np.ndarray
    _layout: str
    _num_bits: int
    _num_hashes: int
    _modulus: int
    _path: str | None
    _file: BinaryIO | None
    _closed: bool
    _write_lock: threading.Lock
    _keys_inserted: int

    if TYPE_CHECKING:  # the kernels, provided by the core
        def __contains__(self, key: Any) -> bool: ...
        def _bind(self, buffer: np.ndarray, layout: int, modulus: int,
                  num_hashes: int) -> None: ...
        def _unbind(self) -> None: ...
        def _insert_one(self, key: Any) -> None: ...
        def _insert_many(self, keys: Any, threads: int = 1) -> int: ...
        def _contains_many(self, keys: Any, threads: int = 1) -> np.ndarray: ...
        def _count_ones(self) -> int: ...

    def __init__(self, num_bits: int, num_hashes: int, *, layout: str = "classic") -> None:
        """A filter of ``num_bits`` bits and ``num_hashes`` bits per key, all clear.

        ``layout`` is ``"classic"`` (``num_hashes`` in 1..64) or ``"split_block"``
        (``num_hashes`` must be 8; ``num_bits`` is rounded up to whole 256-bit
        blocks).  See :meth:`for_capacity` to size from a key count.
        """
        layout = _check_layout(layout)
        num_bits = _check_num_bits(num_bits, layout)
        num_hashes = _check_num_hashes(num_hashes, layout)
        self._setup(np.zeros(_bitset_bytes(num_bits, layout), dtype=np.uint8),
                    layout, num_bits, num_hashes)

    @classmethod
    def for_capacity(cls: type[_F], capacity: int, fp_rate: float = 0.01, *,
                     layout: str = "classic") -> _F:
        """A filter sized to hold ``capacity`` keys at false-positive rate ``fp_rate``.

        classic: ``m = -n ln p / ln(2)^2`` rounded up to a prime, ``k = m/n ln 2``.
        split_block: the fewest blocks whose exact false-positive rate
        (:func:`split_block_fp_rate`) is at most ``fp_rate``.
        """
        layout = _check_layout(layout)
        capacity = require_int("capacity", capacity, minimum=1, maximum=1 << 40)
        fp_rate = _check_fp_rate(fp_rate)
        if layout == "split_block":
            return cls(_split_block_bits(capacity, fp_rate), 8, layout=layout)
        bits = math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2)
        num_hashes = min(64, max(1, round(bits / capacity * math.log(2))))
        if num_hashes == 64:
            # Below fp_rate ~ 2**-64 the best k is over the cap, and 64 probes
            # need more bits than the formula above to reach fp_rate: the
            # bits that make (1 - e^(-64 n / m))^64 = fp_rate.
            bits = max(bits, math.ceil(-64 * capacity / math.log1p(-fp_rate ** (1 / 64))))
        num_bits = _next_prime(bits)
        if num_bits > _MAX_NUM_BITS:
            raise ValueError(f"capacity {capacity} at fp_rate {fp_rate} needs {num_bits} bits, "
                             f"more than the maximum {_MAX_NUM_BITS}")
        return cls(num_bits, num_hashes, layout=layout)

    @classmethod
    def from_parquet(cls: type[_F], path: str | os.PathLike[str], column: str, *,
                     fp_rate: float, layout: str = "split_block", threads: int = 1) -> _F:
        """A filter holding every non-null value of one column of a Parquet file.

        Sized by :meth:`for_capacity` from the file's row count (an upper bound
        on the distinct keys), then filled batch by batch (32,768 rows), so memory
        holds the filter and less than one row group's column, never the whole
        file.  ``threads`` row groups are decoded at once, each by its own
        reader (0: one per core; decoding is most of the cost).  The
        column's values hash as the same Python keys would (strings as their
        UTF-8, integers by the int rule), so a service can look up ``str`` or
        ``int`` keys in the result.  Needs pyarrow (``pip install 'buttress[arrow]'``).

        A column that is not in the file raises ``ValueError`` listing the
        file's columns; a column of an unsupported type raises ``TypeError``.
        """
        layout = _check_layout(layout)
        fp_rate = _check_fp_rate(fp_rate)
        threads = _check_threads(threads)
        require_str("column", column)
        path = require_path("path", path)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("BloomFilter.from_parquet needs pyarrow: "
                              "pip install 'buttress[arrow]'") from None
        # Memory stays at the filter plus one batch of the column: pages are read
        # through a small buffer (pre_buffer would first load a row group's whole
        # column chunk), each batch is dropped once inserted, and the Arrow memory
        # pool then hands its freed pages back to the system (mimalloc and jemalloc
        # keep them otherwise, and the peak grows with them: measured at 10M ids,
        # 57 MiB of peak RSS growth releasing per row group, 27 MiB per batch).
        pool = pa.default_memory_pool()

        def open_file(metadata: Any = None) -> Any:
            return pq.ParquetFile(source, metadata=metadata, pre_buffer=False,
                                  buffer_size=_PARQUET_BUFFER)

        def fill(parquet: Any, groups: Iterable[int]) -> None:
            for group in groups:
                for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group],
                                                  columns=[column], use_threads=False):
                    bf.insert_many(batch.column(0))
                    del batch  # before the next batch is decoded
                    pool.release_unused()

        _check_regular_file(path, os.stat(path).st_mode)  # a FIFO would block the reader
        # Every reader reads this one open file (its positioned reads are
        # thread-safe): readers that each opened `path` would read two different
        # files if it were replaced meanwhile (a batch job rewriting it), and mix
        # their rows into one filter sized for the first.
        source = pa.OSFile(path)
        try:
            try:
                parquet = open_file()
            except pa.ArrowInvalid as exc:  # not Parquet: say which file
                raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None
            with parquet:
                names = parquet.schema_arrow.names
                if column not in names:
                    listed = ", ".join(repr(name) for name in names)
                    raise ValueError(f"{path}: no column {column!r}; the file's "
                                     f"columns are {listed}")
                bf = cls.for_capacity(max(1, parquet.metadata.num_rows), fp_rate, layout=layout)
                # The key type is checked before any row is read, so a file with no
                # rows (or whose first rows are all null) is refused like any other.
                bf.insert_many(pa.nulls(0, parquet.schema_arrow.field(names.index(column)).type))
                groups = parquet.num_row_groups
                readers = max(1, min(threads, groups))
                if readers == 1:
                    fill(parquet, range(groups))
                else:
                    # Decoding is most of the work: each thread reads its share of
                    # the row groups through its own reader (Arrow decodes with the
                    # GIL released) and inserts under the filter's lock.
                    def share(part: int) -> None:
                        with open_file(parquet.metadata) as own:
                            fill(own, range(part, groups, readers))

                    _bloom._run_parallel([(share, part) for part in range(readers)])
        finally:
            source.close()
        logger.debug("built %r from %s column %r", bf, path, column)
        return bf

    def _setup(self, bits: np.ndarray, layout: str, num_bits: int, num_hashes: int,
               path: str | None = None) -> None:
        self._bits = bits
        self._layout = layout
        self._num_bits = num_bits
        self._num_hashes = num_hashes
        self._modulus = (num_bits // _BLOCK_BITS if layout == "split_block"
                         else _largest_prime_at_most(num_bits))
        self._path = path
        self._file = None  # mode="r+": the file the bits are mapped from
        self._closed = False
        self._write_lock = threading.Lock()
        self._keys_inserted = 0
        self._bind(bits, _LAYOUT_CODES[layout], self._modulus, num_hashes)

    # ------------------------------------------------------------------ properties

    @property
    def num_bits(self) -> int:
        """Size of the bit array."""
        return self._num_bits

    @property
    def num_hashes(self) -> int:
        """Bits set per key (8 for split_block)."""
        return self._num_hashes

    @property
    def layout(self) -> str:
        """``"classic"`` or ``"split_block"``."""
        return self._layout

    @property
    def read_only(self) -> bool:
        """True for a filter opened from a file with ``mode="r"``."""
        return not self._bits.flags.writeable

    # ------------------------------------------------------------------ keys

    def insert(self, key: Any) -> None:
        """Add ``key`` (str, bytes-like or int)."""
        with self._write_lock:
            self._require_writable()
            self._insert_one(key)
            self._keys_inserted += 1

    def possibly_contains(self, key: Any) -> bool:
        """False if ``key`` was certainly never inserted; True if it may have been.

        Same as ``key in bf``.
        """
        return key in self

    def insert_many(self, keys: Any, *, threads: int = 1) -> None:
        """Add every key of ``keys``.

        ``keys`` is a numpy integer, bytes (``'S'``), str (``'U'``) or
        ``StringDType`` array; an Arrow array or chunked array, or anything
        exporting the Arrow PyCapsule interface (polars, pandas, DuckDB
        results; a one-column table is its column); or a list/tuple/iterable
        of str, bytes-like or int keys.  Columnar input is hashed and inserted
        with the GIL released and no Python object per key.  Nulls are not
        keys: they are skipped.  Float, bool, object, list and struct columns
        raise ``TypeError`` naming the type.

        ``threads``: split a large batch over this many native threads (0: every
        core; at most 1024).  The result is bit for bit the single-thread one: each thread
        owns a slice of the bit array.
        """
        threads = _check_threads(threads)
        with self._write_lock:
            self._require_writable()
            self._keys_inserted += self._insert_many(keys, threads)

    def contains_many(self, keys: Any, *, threads: int = 1) -> np.ndarray:
        """A numpy bool array: for each key, may it be in the filter?

        Takes the same inputs as :meth:`insert_many`; a null key answers
        ``False``.  ``threads`` splits a large batch over native threads (0:
        every core; at most 1024).
        """
        threads = _check_threads(threads)
        return self._contains_many(keys, threads)

    # ------------------------------------------------------------------ statistics

    def fill_ratio(self) -> float:
        """Fraction of the bits that are set."""
        return self._count_ones() / self._effective_bits()

    def approx_count(self) -> float:
        """Estimate of the distinct keys inserted, from the fill (inf when full).

        ``-(m / k) ln(1 - X / m)`` for X set bits of m (Swamidass & Baldi); the
        split-block filter obeys the same formula with k = 8.
        """
        return self._approx_count(self._count_ones())

    def estimated_fp_rate(self) -> float:
        """False-positive rate a lookup of a never-inserted key has now."""
        return self._estimated_fp_rate(self._count_ones())

    # Counting the set bits reads the whole array (8-27 ms for 12 MB): the
    # estimates take the count, so stats() counts once for all three figures.
    def _approx_count(self, ones: int) -> float:
        m = self._effective_bits()
        if ones >= m:
            return math.inf
        return -(m / self._num_hashes) * math.log1p(-ones / m)

    def _estimated_fp_rate(self, ones: int) -> float:
        if self._layout == "classic":
            return float((ones / self._modulus) ** self._num_hashes)
        count = self._approx_count(ones)
        return 1.0 if math.isinf(count) else split_block_fp_rate(count, self._num_bits)

    def stats(self) -> dict[str, Any]:
        """A plain dict for dashboards: size, fill and the false-positive rate it implies.

        Watch ``fill_ratio`` and ``estimated_fp_rate``: they only go up as keys
        arrive; rebuild a bigger filter when the estimate passes your budget.
        """
        ones = self._count_ones()
        m = self._effective_bits()
        return {
            "layout": self._layout,
            "num_bits": self._num_bits,
            "num_hashes": self._num_hashes,
            "bytes": int(self._bits.nbytes),
            "bits_set": ones,
            "fill_ratio": ones / m,
            "approx_count": self._approx_count(ones),
            "estimated_fp_rate": self._estimated_fp_rate(ones),
            "keys_inserted": self._keys_inserted,  # insert calls' keys, duplicates included
            "read_only": self.read_only,
            "path": self._path,
        }

    def _effective_bits(self) -> int:
        # classic probes only the first `modulus` bits (the largest prime <= num_bits)
        return self._modulus if self._layout == "classic" else self._num_bits

    # ------------------------------------------------------------------ whole filter

    def clear(self) -> None:
        """Clear every bit (the only way to forget keys)."""
        with self._write_lock:
            self._require_writable()
            self._bits[:] = 0
            self._keys_inserted = 0

    def copy(self: _F) -> _F:
        """An independent, writable, in-memory copy."""
        self._check_open()
        clone = type(self).__new__(type(self))
        clone._setup(np.array(self._bits, dtype=np.uint8, copy=True), self._layout,
                     self._num_bits, self._num_hashes)
        clone._keys_inserted = self._keys_inserted
        return clone

    def bitset(self) -> bytes:
        """The raw bit array.  For split_block this is exactly a Parquet bitset
        (little-endian 32-bit words, block after block)."""
        with self._write_lock:  # a copy between two inserts, never half of one
            self._check_open()
            return self._bits.tobytes()

    def union(self: _F, other: BloomFilterBase) -> _F:
        """A new filter holding the keys of both (bitwise OR)."""
        return self.copy()._combine_in_place(other, np.bitwise_or)

    def intersection(self: _F, other: BloomFilterBase) -> _F:
        """A new filter that may hold the keys in both (bitwise AND).

        Its false-positive rate is at most that of either input, and may be
        higher than a filter built from the true intersection.
        """
        return self.copy()._combine_in_place(other, np.bitwise_and)

    def __or__(self, other: object) -> BloomFilterBase:
        if not isinstance(other, BloomFilterBase):
            return NotImplemented
        return self.union(other)

    def __and__(self, other: object) -> BloomFilterBase:
        if not isinstance(other, BloomFilterBase):
            return NotImplemented
        return self.intersection(other)

    def __ior__(self: _F, other: object) -> _F:
        return self._combine_in_place(other, np.bitwise_or)

    def __iand__(self: _F, other: object) -> _F:
        return self._combine_in_place(other, np.bitwise_and)

    def _combine_in_place(self: _F, other: object, op: np.ufunc) -> _F:
        if not isinstance(other, BloomFilterBase):
            raise TypeError(f"can only combine a BloomFilter with another BloomFilter, "
                            f"got {type(other).__name__}")
        theirs = other._bits  # taken first: a close() of `other` from now on cannot pull it
        self._check_compatible(other)
        with self._write_lock:
            self._require_writable()
            op(self._bits, theirs, out=self._bits)
        return self

    def _check_compatible(self, other: BloomFilterBase) -> None:
        if other._closed:
            raise ValueError("cannot combine a BloomFilter with a closed one")
        for name in ("layout", "num_bits", "num_hashes"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(f"cannot combine Bloom filters with different {name}: "
                                 f"{mine!r} != {theirs!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BloomFilterBase):
            return NotImplemented
        return (self._layout, self._num_bits, self._num_hashes) == (
            other._layout, other._num_bits, other._num_hashes
        ) and bool(np.array_equal(self._bits, other._bits))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_bits={self._num_bits}, "
                f"num_hashes={self._num_hashes}, layout={self._layout!r})")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BloomFilter is closed")

    def _require_writable(self) -> None:
        self._check_open()
        if not self._bits.flags.writeable:
            raise ValueError(_READ_ONLY)

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """Header (magic, format version, layout, hash, seed, num_bits, num_hashes,
        checksum) followed by the bitset; :meth:`from_bytes` reads it back."""
        # Under the writers' lock: a checksum taken while an insert changes the
        # bits would not match the bits copied after it, and from_bytes() would
        # then reject the snapshot as corrupted.
        with self._write_lock:
            return self._header() + self._bits.tobytes()

    @classmethod
    def from_bytes(cls: type[_F], data: Any) -> _F:
        """Rebuild a filter from :meth:`to_bytes` output.

        Raises ``ValueError`` saying what is wrong for truncated, corrupted or
        foreign data, ``TypeError`` if ``data`` is not bytes-like.
        """
        view = _byte_view(data, "data")
        layout, num_bits, num_hashes, bitset_bytes, checksum = _parse_header(view)
        if len(view) != _HEADER_SIZE + bitset_bytes:
            raise CorruptFilterError(_length_problem(len(view), bitset_bytes))
        bits = np.frombuffer(view, dtype=np.uint8, count=bitset_bytes, offset=_HEADER_SIZE)
        _verify_checksum(cls._checksum_hash, view[:_CHECKSUMMED_HEADER], bits, checksum)
        bf = cls.__new__(cls)
        bf._setup(bits.copy(), layout, num_bits, num_hashes)
        return bf

    @classmethod
    def from_bitset(cls: type[_F], data: Any, layout: str = "split_block", *,
                    num_hashes: int | None = None, num_bits: int | None = None) -> _F:
        """A filter over a raw bit array, such as a Parquet split-block bitset.

        split_block: ``data`` is whole 32-byte blocks (Parquet's bitset, read
        from a column chunk's bloom filter); ``num_hashes`` is 8.  classic:
        the inverse of :meth:`bitset`; give ``num_hashes`` (and ``num_bits`` if
        it was not a multiple of 8).
        """
        layout = _check_layout(layout)
        view = _byte_view(data, "data")
        if layout == "split_block":
            if len(view) == 0 or len(view) % 32:
                raise ValueError(f"a split_block bitset is whole 32-byte blocks, got "
                                 f"{len(view)} bytes")
            num_hashes = 8 if num_hashes is None else num_hashes
            num_bits = 8 * len(view) if num_bits is None else num_bits
        elif num_hashes is None:
            raise ValueError("from_bitset with layout='classic' needs num_hashes")
        num_bits = _check_num_bits(8 * len(view) if num_bits is None else num_bits, layout)
        num_hashes = _check_num_hashes(num_hashes, layout)
        if _bitset_bytes(num_bits, layout) != len(view):
            raise ValueError(f"num_bits={num_bits} needs a {_bitset_bytes(num_bits, layout)}-"
                             f"byte bitset, got {len(view)} bytes")
        bf = cls.__new__(cls)
        bf._setup(np.frombuffer(view, dtype=np.uint8).copy(), layout, num_bits, num_hashes)
        return bf

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self).from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically (temp file, fsync, rename).

        The file is one consistent snapshot: inserts from other threads wait
        while the bits are written (lookups do not), so its checksum matches.
        """
        path = require_path("path", path)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                with self._write_lock:  # header and bits from the same moment
                    fh.write(self._header())
                    fh.write(self._bits.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        logger.debug("saved %r to %s", self, path)

    @classmethod
    def open(cls: type[_F], path: str | os.PathLike[str], mode: str = "r", *,
             verify: bool = True) -> _F:
        """Memory-map a file written by :meth:`save`, without copying the bits.

        ``mode="r"``: read-only; many processes can share one filter through the
        page cache; inserts raise ``ValueError``.  ``mode="r+"``: inserts go to
        the file; call :meth:`flush` (or :meth:`close`, or use ``with``) to update
        its checksum and write it back.  ``verify`` checks the checksum (reads
        the whole file once); a file from a writer that died before flushing
        fails it, so pass ``verify=False`` to salvage one.
        """
        require_choice("mode", mode, ("r", "r+"))
        verify = require_bool("verify", verify)
        path = require_path("path", path)
        # Header, length and bits all come through one handle, so they describe
        # the same file even if save() replaces the file at `path` meanwhile
        # (the rebuild-and-swap recipe): reading the header from the old file
        # and mapping the new one would fail the checksum, or mix two filters.
        # A writer keeps the handle: flush() writes the header through it, so
        # its bits never go into a file saved over its path later.
        handle = _open_regular_file(path, mode)
        try:
            head = handle.read(_HEADER_SIZE)
            size = os.fstat(handle.fileno()).st_size
            try:
                layout, num_bits, num_hashes, bitset_bytes, checksum = _parse_header(
                    memoryview(head))
                if size != _HEADER_SIZE + bitset_bytes:
                    raise CorruptFilterError(_length_problem(size, bitset_bytes))
            except CorruptFilterError as exc:
                raise CorruptFilterError(f"{path}: {exc}") from None
            bits = np.memmap(handle, dtype=np.uint8, mode="r" if mode == "r" else "r+",
                             offset=_HEADER_SIZE, shape=(bitset_bytes,))
            if verify:
                try:
                    _verify_checksum(cls._checksum_hash, head[:_CHECKSUMMED_HEADER], bits,
                                     checksum)
                except CorruptFilterError as exc:
                    raise CorruptFilterError(f"{path}: {exc}") from None
        except BaseException:
            handle.close()
            raise
        if mode == "r":  # the mapping stays valid without the handle
            handle.close()
        bf = cls.__new__(cls)
        bf._setup(bits, layout, num_bits, num_hashes, path=path)
        bf._file = handle if mode == "r+" else None
        logger.debug("opened %s (mode=%s): %r", path, mode, bf)
        return bf

    def flush(self) -> None:
        """For a filter opened with ``mode="r+"``: write the bits and a fresh checksum.

        They go to the file this filter opened, even if another file has since
        been saved under its path (that one is left alone).
        """
        with self._write_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not isinstance(self._bits, np.memmap) or self.read_only:
            return
        handle = self._file
        if handle is None or handle.closed:
            raise ValueError("this BloomFilter's file handle is closed; it cannot be flushed")
        self._bits.flush()
        handle.seek(0)
        handle.write(self._header())
        handle.flush()
        os.fsync(handle.fileno())

    def close(self) -> None:
        """Flush a writable mapped filter and drop the bits; later use raises ValueError."""
        # One hold of the writers' lock from the flush to the unbind: an insert
        # from another thread slipping in between would change the mapped bits
        # after their checksum was written, and the file would fail to open.
        with self._write_lock:
            if self._closed:
                return
            try:
                self._flush_locked()
            finally:
                self._unbind()
                self._closed = True
                self._bits = np.zeros(0, dtype=np.uint8)  # lets the mapping go
                self._bits.flags.writeable = False
                if self._file is not None:
                    self._file.close()
                    self._file = None

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header(self) -> bytes:
        self._check_open()
        fields = [_MAGIC, _FORMAT_VERSION, _LAYOUT_CODES[self._layout], _HASH_XXH64,
                  self._num_hashes, _SEED, self._num_bits, int(self._bits.nbytes)]
        unsigned = _HEADER.pack(*fields, 0)
        checksum = _checksum(type(self)._checksum_hash, unsigned[:_CHECKSUMMED_HEADER],
                             self._bits)
        return _HEADER.pack(*fields, checksum)


class BloomFilter(BloomFilterBase, _bloom.BloomCore):
    """A Bloom filter: hashing and probing in Cython over a numpy bit array.

    ``BloomFilter(num_bits, num_hashes, *, layout="classic")``, or size it with
    :meth:`for_capacity`.  See the module docstring for layouts and thread safety.
    """

    _checksum_hash = staticmethod(_hash.xxh64)


# ---------------------------------------------------------------------- guard

class BloomGuard(Generic[V]):
    """Skip backend lookups for keys a Bloom filter rules out.

    Put every key that exists in the backend into ``bloom`` (via :meth:`add` or
    :meth:`add_many`, *before* the backend write becomes visible, or a reader
    could be told a fresh key is missing).  :meth:`get` then answers "missing"
    without calling ``lookup`` for most absent keys; only the filter's false
    positives still reach the backend.

    ``lookup(key)`` returns the value, or ``missing`` (default ``None``) when
    the backend has no such key.  :meth:`stats` counts backend calls avoided
    and false-positive backend hits, next to the number the filter's estimated
    false-positive rate predicts.
    """

    def __init__(self, lookup: Callable[[Any], V | None], bloom: BloomFilterBase, *,
                 missing: Any = None) -> None:
        require_callable("lookup", lookup)
        if not isinstance(bloom, BloomFilterBase):
            raise TypeError(f"bloom must be a BloomFilter, got {type(bloom).__name__}")
        self.lookup = lookup
        self.bloom = bloom
        self.missing = missing
        self._lock = threading.Lock()
        self._lookups = 0
        self._avoided = 0
        self._false_positives = 0

    def add(self, key: Any) -> None:
        """Record that ``key`` exists (or is about to) in the backend."""
        self.bloom.insert(key)

    def add_many(self, keys: Any) -> None:
        """Record many existing keys at once (see :meth:`BloomFilter.insert_many`)."""
        self.bloom.insert_many(keys)

    def get(self, key: Any, default: Any = None) -> V | Any:
        """``lookup(key)``, or ``default`` without a backend call when the filter says no."""
        if key not in self.bloom:
            return self._avoided_lookup(default)
        return self._backend_lookup(key, default)

    def get_many(self, keys: Iterable[Any], default: Any = None) -> list[V | Any]:
        """:meth:`get` for many keys, with one batch filter check."""
        keys = [key for key in keys]  # not list(): it trusts a __len__ that may lie
        maybe = self.bloom.contains_many(keys).tolist()
        return [self._backend_lookup(k, default) if m else self._avoided_lookup(default)
                for k, m in zip(keys, maybe, strict=True)]

    def _avoided_lookup(self, default: Any) -> Any:
        with self._lock:
            self._lookups += 1
            self._avoided += 1
        return default

    def _backend_lookup(self, key: Any, default: Any) -> Any:
        value = self.lookup(key)
        with self._lock:
            self._lookups += 1
            if value is self.missing:
                self._false_positives += 1
        return default if value is self.missing else value

    def stats(self) -> dict[str, Any]:
        """Counters: lookups, backend calls avoided, false-positive backend hits.

        ``predicted_false_positive_hits`` is what the filter's current estimated
        false-positive rate predicts for the absent keys looked up so far
        (avoided + false positives); a measured count far above it means the
        filter is fuller than it thinks, or keys are not hashing independently.
        """
        with self._lock:
            lookups, avoided, fps = self._lookups, self._avoided, self._false_positives
        fp_rate = self.bloom.estimated_fp_rate()
        absent = avoided + fps
        return {
            "lookups": lookups,
            "backend_calls": lookups - avoided,
            "backend_calls_avoided": avoided,
            "false_positive_hits": fps,
            "observed_fp_rate": fps / absent if absent else 0.0,
            "estimated_fp_rate": fp_rate,
            "predicted_false_positive_hits": absent * fp_rate,
            "filter": self.bloom.stats(),
        }


# ---------------------------------------------------------------------- helpers


def _check_fp_rate(fp_rate: Any) -> float:
    rate = require_number("fp_rate", fp_rate, above=0.0)
    if not rate < 1.0:
        raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate!r}")
    return rate


def _check_threads(threads: Any) -> int:
    """``threads`` as a thread count: 0 means every core this process may use."""
    threads = require_int("threads", threads, minimum=0, maximum=_MAX_THREADS)
    if threads == 0:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return threads


def _check_layout(layout: Any) -> str:
    # Not require_choice: its `in` compares with ==, which a numpy array answers
    # elementwise (array(['classic']) passed, then failed as a KeyError).
    if isinstance(layout, str) and layout in LAYOUTS:
        return str(layout)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_num_bits(num_bits: Any, layout: str) -> int:
    num_bits = require_int("num_bits", num_bits, minimum=1, maximum=_MAX_NUM_BITS)
    if layout == "split_block":
        num_bits = -(-num_bits // _BLOCK_BITS) * _BLOCK_BITS
    return num_bits


def _check_num_hashes(num_hashes: Any, layout: str) -> int:
    if layout == "split_block":
        if require_int("num_hashes", num_hashes) != 8:
            raise ValueError(f"layout 'split_block' sets exactly 8 bits per key "
                             f"(num_hashes=8), got num_hashes={num_hashes!r}")
        return 8
    return require_int("num_hashes", num_hashes, minimum=1, maximum=64)


def _bitset_bytes(num_bits: int, layout: str) -> int:
    return num_bits // 8 if layout == "split_block" else -(-num_bits // 8)


def _split_block_bits(capacity: int, fp_rate: float) -> int:
    """Fewest whole blocks whose exact false-positive rate is <= fp_rate."""
    low, high = 1, max(1, capacity * 16 // _BLOCK_BITS)
    while split_block_fp_rate(capacity, high * _BLOCK_BITS) > fp_rate:
        low, high = high, high * 2
        if high * _BLOCK_BITS > _MAX_NUM_BITS:
            raise ValueError(f"capacity {capacity} at fp_rate {fp_rate} needs more than "
                             f"the maximum {_MAX_NUM_BITS} bits")
    while low < high:
        mid = (low + high) // 2
        if split_block_fp_rate(capacity, mid * _BLOCK_BITS) <= fp_rate:
            high = mid
        else:
            low = mid + 1
    if high * _BLOCK_BITS > _MAX_NUM_BITS:  # the first guess was already too big
        raise ValueError(f"capacity {capacity} at fp_rate {fp_rate} needs "
                         f"{high * _BLOCK_BITS} bits, more than the maximum {_MAX_NUM_BITS}")
    return high * _BLOCK_BITS


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (far beyond _MAX_NUM_BITS)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _largest_prime_at_most(n: int) -> int:
    """The classic layout's probe modulus: prime, so every stride is coprime with it.

    1 for n == 1 (every probe is bit 0).  Prime gaps below 2**40 are under
    1000, so at most a few hundred bits at the end of the array go unused.
    """
    while n > 2 and not _is_prime(n):
        n -= 1
    return n


def _next_prime(n: int) -> int:
    while not _is_prime(n):
        n += 1
    return n


def _byte_view(data: Any, name: str) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _open_regular_file(path: str, mode: str) -> BinaryIO:
    """``path`` opened for reading (``mode="r+"``: and writing), if it is a regular file.

    Opened without blocking and checked before anything is read: a FIFO would
    otherwise hang the caller until some other process wrote to it.
    """
    flags = (os.O_RDWR if mode == "r+" else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        _check_regular_file(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "r+b" if mode == "r+" else "rb")


def _check_regular_file(path: str, kind: int) -> None:
    """Raise unless ``kind`` (an ``st_mode``) is a regular file's."""
    if stat.S_ISDIR(kind):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(kind):
        raise ValueError(f"{path}: not a regular file (a FIFO, socket or device)")


def _parse_header(view: memoryview) -> tuple[str, int, int, int, int]:
    """Validate a header; return layout, num_bits, num_hashes, bitset bytes, checksum."""
    if len(view) < _HEADER_SIZE:
        raise CorruptFilterError(f"truncated Bloom filter: the header needs {_HEADER_SIZE} bytes, "
                         f"got {len(view)}")
    (magic, version, layout_code, hash_code, num_hashes, seed, num_bits, bitset_bytes,
     checksum) = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise CorruptFilterError(f"not a buttress Bloom filter (magic {bytes(magic)!r}, expected "
                         f"{_MAGIC!r})")
    if version != _FORMAT_VERSION:
        raise CorruptFilterError(f"unsupported Bloom filter format version {version} (this "
                         f"buttress reads version {_FORMAT_VERSION})")
    if any(view[_CHECKSUM_OFFSET + 8:_HEADER_SIZE]):
        raise CorruptFilterError("corrupted header: reserved bytes are not zero")
    layouts = {code: name for name, code in _LAYOUT_CODES.items()}
    if layout_code not in layouts:
        raise CorruptFilterError(f"corrupted header: unknown layout code {layout_code}")
    if hash_code != _HASH_XXH64:
        raise CorruptFilterError(f"corrupted header: unknown hash algorithm code {hash_code}")
    if seed != _SEED:
        raise CorruptFilterError(f"unsupported hash seed {seed} (only {_SEED} is supported)")
    layout = layouts[layout_code]
    try:
        checked_bits = _check_num_bits(num_bits, layout)
        num_hashes = _check_num_hashes(num_hashes, layout)
    except ValueError as exc:
        raise CorruptFilterError(f"corrupted header: {exc}") from None
    if checked_bits != num_bits or bitset_bytes != _bitset_bytes(num_bits, layout):
        raise CorruptFilterError(f"corrupted header: num_bits={num_bits} does not match a "
                         f"{bitset_bytes}-byte {layout} bitset")
    return layout, num_bits, num_hashes, bitset_bytes, checksum


def _length_problem(length: int, bitset_bytes: int) -> str:
    expected = _HEADER_SIZE + bitset_bytes
    if length < expected:
        return f"truncated Bloom filter: expected {expected} bytes, got {length}"
    return f"Bloom filter has {length - expected} unexpected trailing bytes"


def _checksum(xxh64: Callable[..., int], header: Any, bits: np.ndarray) -> int:
    return xxh64(bits.data, xxh64(bytes(header)))


def _verify_checksum(xxh64: Callable[..., int], header: Any, bits: np.ndarray,
                     expected: int) -> None:
    if _checksum(xxh64, header, bits) != expected:
        raise CorruptFilterError("corrupted Bloom filter: checksum mismatch (the data was "
                                 "damaged, or a writer did not flush)")
