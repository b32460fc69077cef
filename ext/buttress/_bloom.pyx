"""Native kernels of buttress's Bloom filter: hash keys and probe a numpy bit array.

``buttress.bloom.BloomFilter`` subclasses :class:`BloomCore` and keeps every
non-kernel concern (validation, persistence, set operations, statistics) in
Python; ``buttress.reference.BloomFilter`` is the same Python class over a
pure-Python core.  Both give the same bits for the same keys.

Each key is hashed once with XXH64 (seed 0, the key-encoding rule of
``buttress._hash``); the 64-bit hash ``h`` then places the key:

``split_block`` (Apache Parquet's split block Bloom filter, bit for bit)
    256-bit blocks of eight little-endian 32-bit words.  The block is
    ``((h >> 32) * num_blocks) >> 32``; word ``i`` gets bit
    ``(uint32(h) * SALT[i]) >> 27``.  One cache line per key; on x86-64 CPUs
    with AVX2 the eight words are handled in one 256-bit operation (chosen at
    import time, with a portable scalar fallback).

``classic``
    ``num_hashes`` bits by double hashing over a prime modulus ``m`` (the largest
    prime <= num_bits, chosen by the Python layer): ``x = fastrange(h, m)``,
    stride ``y = 1 + fastrange(rotl(h, 32), m - 1)``, then bits
    ``x, x + y, x + 2y, ... (mod m)``.  Because ``m`` is prime, the stride is
    never 0 and never shares a factor with ``m``, so the probes are distinct.
    Bit ``b`` is bit ``b & 7`` of byte ``b >> 3``.

Batch loops run with the GIL released.  Once the filter outgrows the L2
cache they hash a window of keys, prefetch the cache lines those keys will
touch (the block of a split-block key; the first probes of a classic lookup),
and probe the previous window while the prefetches are in flight, so a
split-block filter much larger than the caches costs about one overlapped
memory access per key.

Thread safety: probes only read, and bits only ever go from 0 to 1, so
concurrent readers are safe (a reader racing an insert sees the key either
absent or present, never a torn false negative after the insert returned).
Writes are plain read-modify-write stores, not atomic: the Python layer
serialises every writer on one lock per filter (see ``buttress.bloom``), which
costs one lock round trip per call instead of an atomic operation per bit.
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

import os
import threading

import numpy as np

from buttress._hash cimport (KEYS_HASHES, KEYS_NULL, KeyChunk, KeySource, hash_object,
                             hash_source, key_is_null, xxh64_bytes, xxh64_u64)

from buttress._hash import iter_key_chunks

# BUTTRESS_BLOOM_PORTABLE=1 forces the portable kernels (the tests use it to
# check they give the same bits as the AVX2 ones).
detect_cpu(os.environ.get("BUTTRESS_BLOOM_PORTABLE", "") in ("", "0"))

LAYOUT_CLASSIC = 0
LAYOUT_SPLIT_BLOCK = 1
#: Whether the split-block kernels use AVX2 on this CPU (chosen at import).
USES_AVX2 = bool(cpu_has_avx2)
#: A batch is split over threads only in shares of at least this many keys:
#: below it, starting a thread costs more than it saves.  (The tests lower it
#: to drive the threaded paths with small batches.)
PARALLEL_MIN_KEYS = 1 << 15
#: Threaded inserts hash this many keys, then insert them, per round: the
#: scratch (8 bytes a key) stays bounded whatever the batch size.
PARALLEL_INSERT_CHUNK = 1 << 20

cdef enum:
    CLASSIC = 0
    SPLIT_BLOCK = 1
    # Keys hashed per window; the next window's cache lines are prefetched while
    # this one is probed.  32 split-block lines keep the CPU's miss buffers busy.
    WINDOW = 32
    # A lookup in a classic filter usually stops at the first clear bit, so only
    # its first probes are worth prefetching.
    CLASSIC_PREFETCH_LOOKUP = 2

# Filters smaller than this stay mostly in cache: prefetching would only add work,
# and a classic lookup is faster reading all k bits than branching on each.
cdef uint64_t PREFETCH_MIN_BYTES = 4 << 20


cdef inline Py_ssize_t window_hashes(const KeySource* src, Py_ssize_t start, Py_ssize_t n,
                                     uint64_t* buf, bint skip_nulls,
                                     const uint64_t** hashes) noexcept nogil:
    """Hash keys start..start+n; return how many hashes ``*hashes`` holds.

    With ``skip_nulls`` (inserts) null keys are dropped from the window;
    otherwise every key keeps its slot (lookups answer False for nulls later).
    """
    cdef Py_ssize_t j, kept
    if src.kind == KEYS_HASHES and (src.validity == NULL or not skip_nulls):
        hashes[0] = src.ints + start
        return n
    hash_source(src, start, n, 0, buf)
    hashes[0] = buf
    if not skip_nulls or (src.validity == NULL and src.kind != KEYS_NULL):
        return n
    kept = 0
    for j in range(n):
        if not key_is_null(src, start + j):
            buf[kept] = buf[j]
            kept += 1
    return kept


cdef inline uint64_t hash_one(object key) except? 0:
    # Fast paths for the two commonest keys, str (its UTF-8 bytes) and an int
    # that fits int64 (its two's complement); everything else goes through the
    # key rule in buttress._hash.
    cdef int overflow = 0
    cdef long long value
    cdef const char* utf8
    cdef Py_ssize_t size
    if type(key) is str:
        utf8 = PyUnicode_AsUTF8AndSize(key, &size)
        return xxh64_bytes(<const unsigned char*>utf8, <size_t>size, 0)
    if type(key) is int:
        value = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            return xxh64_u64(<uint64_t>value, 0)
    return hash_object(key, 0)


cdef class BloomCore:
    """The kernels under ``buttress.bloom.BloomFilter`` (not used directly)."""

    def __cinit__(self):
        self._data = NULL
        self._buffer = None
        self._writable = False

    def _bind(self, buffer, int layout, uint64_t modulus, int num_hashes):
        """Probe ``buffer`` (1-D C-contiguous uint8 numpy array) from now on."""
        if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise TypeError("the bit array must be a one-dimensional uint8 numpy array")
        if not buffer.flags.c_contiguous:
            raise ValueError("the bit array must be C-contiguous")
        if layout == SPLIT_BLOCK:
            needed = 32 * modulus
            if num_hashes != 8:
                raise ValueError(f"split_block needs num_hashes=8, got {num_hashes}")
        elif layout == CLASSIC:
            needed = (modulus + 7) // 8
            if not 1 <= num_hashes <= 64:
                raise ValueError(f"num_hashes must be in 1..64, got {num_hashes}")
        else:
            raise ValueError(f"unknown layout code {layout}")
        if modulus < 1 or buffer.shape[0] < needed:
            raise ValueError(f"bit array of {buffer.shape[0]} bytes is too small "
                             f"({needed} needed)")
        cdef const uint8_t[::1] view = buffer
        self._buffer = buffer
        self._data = <uint8_t*>&view[0]
        self._writable = bool(buffer.flags.writeable)
        self._layout = layout
        self._modulus = modulus
        self._num_hashes = num_hashes
        self._large = buffer.shape[0] >= PREFETCH_MIN_BYTES

    cdef int _check_bound(self) except -1:
        if self._data == NULL:
            raise ValueError("this BloomFilter has no bit array (closed or not initialised)")
        return 0

    cdef int _check_writable(self) except -1:
        self._check_bound()
        if not self._writable:
            raise ValueError("this BloomFilter is read-only (opened with mode='r'); "
                             "open it with mode='r+' to insert")
        return 0

    cdef void _probe(self, uint8_t* data, const uint64_t* hashes, size_t n,
                     uint8_t* out) noexcept nogil:
        """Insert the keys of ``hashes`` (``out`` NULL) or look them up into ``out``."""
        if self._layout == SPLIT_BLOCK:
            if out == NULL:
                sbbf_insert(data, self._modulus, hashes, n)
            else:
                sbbf_check(data, self._modulus, hashes, n, out)
        elif out == NULL:
            classic_insert(data, self._modulus, self._num_hashes, hashes, n)
        else:
            classic_check(data, self._modulus, self._num_hashes, hashes, n, out,
                          self._large)

    cdef void _prefetch(self, const uint8_t* data, const uint64_t* hashes, size_t n,
                        bint for_write) noexcept nogil:
        if self._layout == SPLIT_BLOCK:
            sbbf_prefetch(data, self._modulus, hashes, n, for_write)
        elif not for_write:
            # Classic inserts are not prefetched: their k stores per key are
            # independent, so the CPU overlaps the misses by itself, and k * WINDOW
            # prefetches only crowd out the lines in use (measured: 70 vs 126 ns
            # per key at 30M keys).
            classic_prefetch(data, self._modulus,
                             min(self._num_hashes, CLASSIC_PREFETCH_LOOKUP), hashes, n)

    cdef void _run(self, uint8_t* data, const KeySource* src, Py_ssize_t begin,
                   Py_ssize_t end, uint8_t* out) noexcept nogil:
        """Insert (``out`` NULL) or look up keys ``begin..end`` of ``src``.

        Hash window w+1 and prefetch its lines, then probe window w.  ``data``
        is the bit array captured with the GIL held, so a concurrent close()
        (which clears ``self._data``) cannot pull it away mid-batch.  ``out``
        points at key 0's answer.  Null keys are skipped on insert and answer
        False on lookup.
        """
        cdef uint64_t buf_a[WINDOW]
        cdef uint64_t buf_b[WINDOW]
        cdef uint64_t* spare = &buf_b[0]
        cdef const uint64_t* current
        cdef const uint64_t* following = NULL
        cdef Py_ssize_t start = begin, n, kept, next_start, next_n, next_kept = 0, j
        cdef bint for_write = out == NULL
        cdef bint prefetch = self._large
        cdef bint has_nulls = src.validity != NULL or src.kind == KEYS_NULL
        if end <= begin:
            return
        n = min(<Py_ssize_t>WINDOW, end - begin)
        kept = window_hashes(src, start, n, buf_a, for_write, &current)
        if prefetch:
            self._prefetch(data, current, kept, for_write)
        while True:
            next_start = start + n
            next_n = min(<Py_ssize_t>WINDOW, end - next_start)
            if next_n > 0:
                next_kept = window_hashes(src, next_start, next_n, spare, for_write,
                                          &following)
                if prefetch:
                    self._prefetch(data, following, next_kept, for_write)
            if for_write:
                self._probe(data, current, kept, NULL)
            else:
                self._probe(data, current, n, out + start)
                if has_nulls:
                    for j in range(n):
                        if key_is_null(src, start + j):
                            out[start + j] = 0
            if next_n <= 0:
                return
            spare = &buf_a[0] if spare == &buf_b[0] else &buf_b[0]
            current = following
            start = next_start
            n = next_n
            kept = next_kept

    cdef void _insert_share(self, uint8_t* data, const KeySource* src, const uint64_t* hashes,
                            Py_ssize_t base, Py_ssize_t n, int part, int parts) noexcept nogil:
        """Insert the keys among ``hashes[0..n)`` (keys ``base..``) whose bits fall in
        part ``part`` of ``parts`` equal slices of the bit array.

        Each thread of a threaded insert owns one slice, so no byte is written by
        two threads: the result is bit for bit the single-thread one, without
        atomic operations.
        """
        cdef uint64_t selected[WINDOW]
        cdef uint64_t valid[WINDOW]
        cdef uint64_t first, end_, total
        cdef Py_ssize_t start, count, j, kept
        cdef const uint64_t* window
        cdef bint has_nulls = src.validity != NULL or src.kind == KEYS_NULL
        if self._layout == SPLIT_BLOCK:
            total = self._modulus  # blocks
        else:
            total = (self._modulus + 7) // 8  # bytes
        first = total * <uint64_t>part // <uint64_t>parts
        end_ = total * <uint64_t>(part + 1) // <uint64_t>parts
        start = 0
        while start < n:
            count = min(<Py_ssize_t>WINDOW, n - start)
            window = hashes + start
            if has_nulls:
                kept = 0
                for j in range(count):
                    if not key_is_null(src, base + start + j):
                        valid[kept] = window[j]
                        kept += 1
                window = valid
                count = kept
            if self._layout == SPLIT_BLOCK:
                kept = sbbf_select(self._modulus, window, count, first, end_, selected)
                sbbf_insert(data, self._modulus, selected, kept)
            else:
                classic_insert_range(data, self._modulus, self._num_hashes, window, count,
                                     first, end_)
            start += WINDOW

    def __contains__(self, key):
        cdef uint64_t h = hash_one(key)
        cdef uint8_t found = 0
        if self._data == NULL:
            self._check_bound()
        if self._layout == SPLIT_BLOCK:
            sbbf_check(self._data, self._modulus, &h, 1, &found)
        else:
            classic_check(self._data, self._modulus, self._num_hashes, &h, 1, &found, 0)
        return found != 0

    def _insert_one(self, key):
        cdef uint64_t h = hash_one(key)
        self._check_writable()
        self._probe(self._data, &h, 1, NULL)

    def _insert_many(self, keys, int threads=1):
        """Insert every non-null key; return how many there were."""
        cdef KeyChunk chunk
        cdef _Batch batch
        self._check_writable()
        # Capture the bits before Python code runs (another thread may close()
        # the filter meanwhile); `buffer` keeps them alive without the GIL.
        buffer = self._buffer
        cdef uint8_t* data = self._data
        inserted = 0
        for chunk in iter_key_chunks(keys):
            batch = _Batch.create(self, buffer, data, chunk, None)
            parts = _share_count(chunk.src.count, threads)
            if self._layout == SPLIT_BLOCK:
                parts = min(parts, self._modulus)
            if parts <= 1:
                with nogil:
                    self._run(data, &chunk.src, 0, chunk.src.count, NULL)
            else:
                batch.insert_threaded(parts)
            inserted += chunk.src.count - chunk.null_count
        return inserted

    def _contains_many(self, keys, int threads=1):
        """Return a numpy bool array: may each key be in the filter?"""
        cdef KeyChunk chunk
        cdef _Batch batch
        self._check_bound()
        buffer = self._buffer  # captured before Python code runs (see _insert_many)
        cdef uint8_t* data = self._data
        # One answer array per chunk, joined at the end.  Not one array of
        # len(keys) filled in place: __len__ is the caller's code, and may lie
        # (a huge length is a huge allocation) or raise.
        parts = []
        for chunk in iter_key_chunks(keys):
            count = chunk.src.count
            answers = np.zeros(count, dtype=np.bool_)
            parts.append(answers)
            if count == 0:
                continue
            batch = _Batch.create(self, buffer, data, chunk, answers)
            batch.lookup_threaded(_share_count(count, threads))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros(0, dtype=np.bool_)
        return np.concatenate(parts)

    def _count_ones(self):
        """Number of set bits."""
        cdef const uint8_t[::1] view
        cdef uint64_t total
        self._check_bound()
        view = self._buffer
        with nogil:
            total = popcount(&view[0], <size_t>view.shape[0])
        return total

    def _unbind(self):
        """Forget the bit array (after close); later calls raise ValueError."""
        self._data = NULL
        self._buffer = None
        self._writable = False


cdef object _share_count(Py_ssize_t count, int threads):
    """How many threads a batch of ``count`` keys is worth, at most ``threads``."""
    if threads <= 1:
        return 1
    return max(1, min(threads, count // PARALLEL_MIN_KEYS))


cdef class _Batch:
    """One chunk of keys being inserted or looked up, possibly by several threads."""
    cdef BloomCore core
    cdef object keep                  # the bit array, the chunk and the answers
    cdef uint8_t* data
    cdef KeyChunk chunk
    cdef uint8_t* out
    cdef uint64_t[::1] scratch        # threaded inserts: one round's hashes

    @staticmethod
    cdef _Batch create(BloomCore core, object buffer, uint8_t* data, KeyChunk chunk,
                       object answers):
        cdef _Batch batch = _Batch.__new__(_Batch)
        cdef uint8_t[::1] out_view
        batch.core = core
        batch.data = data
        batch.chunk = chunk
        batch.keep = (buffer, answers)
        batch.out = NULL
        if answers is not None and answers.shape[0]:
            out_view = answers.view(np.uint8)
            batch.out = &out_view[0]
        return batch

    def lookup_threaded(self, int parts):
        cdef Py_ssize_t count = self.chunk.src.count
        bounds = [count * i // parts for i in range(parts + 1)]
        _run_parallel([(self.lookup_range, bounds[i], bounds[i + 1]) for i in range(parts)])

    def lookup_range(self, Py_ssize_t begin, Py_ssize_t end):
        with nogil:
            self.core._run(self.data, &self.chunk.src, begin, end, self.out)

    def insert_threaded(self, int parts):
        """Rounds of: every thread hashes a slice of the round's keys, then every
        thread inserts the round's keys that land in its slice of the bit array."""
        cdef Py_ssize_t count = self.chunk.src.count
        cdef Py_ssize_t size = min(count, <Py_ssize_t>PARALLEL_INSERT_CHUNK)
        if self.chunk.src.kind != KEYS_HASHES:
            self.scratch = np.empty(size, dtype=np.uint64)
        barrier = threading.Barrier(parts)

        def worker(int part):
            cdef Py_ssize_t base, n, lo, hi
            for base in range(0, count, size):
                n = min(size, count - base)
                lo = n * part // parts
                hi = n * (part + 1) // parts
                self.hash_range(base, lo, hi)
                barrier.wait()
                self.insert_part(base, n, part, parts)
                barrier.wait()

        _run_parallel([(worker, part) for part in range(parts)])

    def hash_range(self, Py_ssize_t base, Py_ssize_t lo, Py_ssize_t hi):
        if self.chunk.src.kind == KEYS_HASHES or hi <= lo:
            return
        with nogil:
            hash_source(&self.chunk.src, base + lo, hi - lo, 0, &self.scratch[lo])

    def insert_part(self, Py_ssize_t base, Py_ssize_t n, int part, int parts):
        cdef const uint64_t* hashes
        if self.chunk.src.kind == KEYS_HASHES:
            hashes = self.chunk.src.ints + base
        else:
            hashes = &self.scratch[0]
        with nogil:
            self.core._insert_share(self.data, &self.chunk.src, hashes, base, n, part, parts)


def _run_parallel(calls):
    """Run each ``(function, *args)``, all but the last on new threads; wait for all.

    The functions release the GIL around their loops, so the threads run on
    separate cores.
    """
    # (no negative indices: this module is compiled with wraparound off)
    errors = []
    last = len(calls) - 1
    threads = [threading.Thread(target=_guarded, args=(calls[i], errors), name="buttress-bloom",
                                daemon=True) for i in range(last)]
    for thread in threads:
        thread.start()
    _guarded(calls[last], errors)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _guarded(call, errors):
    try:
        call[0](*call[1:])
    except BaseException as exc:  # re-raised by _run_parallel in the calling thread
        errors.append(exc)
