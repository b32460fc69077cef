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

import os

import numpy as np

from buttress._hash cimport hash_object, xxh64_bytes, xxh64_fixed_width, xxh64_u64

from buttress._hash import as_key_array

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #  define BUTTRESS_BLOOM_X86 1
    #  include <immintrin.h>
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    #  define BUTTRESS_PREFETCH(p, rw) __builtin_prefetch((p), (rw), 3)
    #else
    #  define BUTTRESS_PREFETCH(p, rw) ((void)0)
    #endif

    /* Apache Parquet's split block Bloom filter salts. */
    static const uint32_t buttress_salt[8] = {
        0x47b6137bU, 0x44974d91U, 0x8824ad5bU, 0xa2b7289dU,
        0x705495c7U, 0x2df1424bU, 0x9efc4947U, 0x5c6bfb31U};

    static int buttress_bloom_avx2 = 0;

    static void buttress_bloom_detect_cpu(int allow_avx2) {
    #ifdef BUTTRESS_BLOOM_X86
        __builtin_cpu_init();
        buttress_bloom_avx2 = allow_avx2 && __builtin_cpu_supports("avx2") ? 1 : 0;
    #endif
    }

    /* The bitset is little-endian on disk and in memory on every host. */
    static inline uint32_t buttress_le32(uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_bswap32(v);
    #else
        return v;
    #endif
    }

    static inline uint64_t buttress_block_index(uint64_t h, uint64_t num_blocks) {
        return ((h >> 32) * num_blocks) >> 32;
    }

    /* floor(h * m / 2**64): maps a 64-bit hash onto [0, m) without a division. */
    static inline uint64_t buttress_fastrange64(uint64_t h, uint64_t m) {
    #ifdef __SIZEOF_INT128__
        return (uint64_t)(((unsigned __int128)h * m) >> 64);
    #else
        uint64_t h_lo = (uint32_t)h, h_hi = h >> 32, m_lo = (uint32_t)m, m_hi = m >> 32;
        uint64_t lo_lo = h_lo * m_lo, hi_lo = h_hi * m_lo, lo_hi = h_lo * m_hi;
        uint64_t cross = (lo_lo >> 32) + (uint32_t)hi_lo + (uint32_t)lo_hi;
        return h_hi * m_hi + (hi_lo >> 32) + (lo_hi >> 32) + (cross >> 32);
    #endif
    }

    /* ---- split block, portable ---- */
    static void buttress_sbbf_insert_scalar(uint8_t *bits, uint64_t num_blocks,
                                            const uint64_t *hashes, size_t n) {
        for (size_t i = 0; i < n; i++) {
            uint64_t h = hashes[i];
            uint8_t *block = bits + 32 * buttress_block_index(h, num_blocks);
            uint32_t x = (uint32_t)h;
            for (int w = 0; w < 8; w++) {
                uint32_t word;
                memcpy(&word, block + 4 * w, 4);
                word |= buttress_le32(1U << ((x * buttress_salt[w]) >> 27));
                memcpy(block + 4 * w, &word, 4);
            }
        }
    }

    static void buttress_sbbf_check_scalar(const uint8_t *bits, uint64_t num_blocks,
                                           const uint64_t *hashes, size_t n, uint8_t *out) {
        for (size_t i = 0; i < n; i++) {
            uint64_t h = hashes[i];
            const uint8_t *block = bits + 32 * buttress_block_index(h, num_blocks);
            uint32_t x = (uint32_t)h, found = 1;
            for (int w = 0; w < 8; w++) {
                uint32_t word;
                memcpy(&word, block + 4 * w, 4);
                found &= buttress_le32(word) >> ((x * buttress_salt[w]) >> 27);
            }
            out[i] = (uint8_t)(found & 1);
        }
    }

    /* ---- split block, AVX2: the eight words in one 256-bit register ---- */
    #ifdef BUTTRESS_BLOOM_X86
    __attribute__((target("avx2")))
    static void buttress_sbbf_insert_avx2(uint8_t *bits, uint64_t num_blocks,
                                          const uint64_t *hashes, size_t n) {
        const __m256i salt = _mm256_loadu_si256((const __m256i *)buttress_salt);
        const __m256i one = _mm256_set1_epi32(1);
        for (size_t i = 0; i < n; i++) {
            uint64_t h = hashes[i];
            __m256i *block = (__m256i *)(bits + 32 * buttress_block_index(h, num_blocks));
            __m256i shift = _mm256_srli_epi32(
                _mm256_mullo_epi32(_mm256_set1_epi32((int)(uint32_t)h), salt), 27);
            __m256i mask = _mm256_sllv_epi32(one, shift);
            _mm256_storeu_si256(block, _mm256_or_si256(_mm256_loadu_si256(block), mask));
        }
    }

    __attribute__((target("avx2")))
    static void buttress_sbbf_check_avx2(const uint8_t *bits, uint64_t num_blocks,
                                         const uint64_t *hashes, size_t n, uint8_t *out) {
        const __m256i salt = _mm256_loadu_si256((const __m256i *)buttress_salt);
        const __m256i one = _mm256_set1_epi32(1);
        for (size_t i = 0; i < n; i++) {
            uint64_t h = hashes[i];
            const __m256i *block =
                (const __m256i *)(bits + 32 * buttress_block_index(h, num_blocks));
            __m256i shift = _mm256_srli_epi32(
                _mm256_mullo_epi32(_mm256_set1_epi32((int)(uint32_t)h), salt), 27);
            __m256i mask = _mm256_sllv_epi32(one, shift);
            out[i] = (uint8_t)_mm256_testc_si256(_mm256_loadu_si256(block), mask);
        }
    }
    #endif

    static void buttress_sbbf_insert(uint8_t *bits, uint64_t num_blocks,
                                     const uint64_t *hashes, size_t n) {
    #ifdef BUTTRESS_BLOOM_X86
        if (buttress_bloom_avx2) { buttress_sbbf_insert_avx2(bits, num_blocks, hashes, n); return; }
    #endif
        buttress_sbbf_insert_scalar(bits, num_blocks, hashes, n);
    }

    static void buttress_sbbf_check(const uint8_t *bits, uint64_t num_blocks,
                                    const uint64_t *hashes, size_t n, uint8_t *out) {
    #ifdef BUTTRESS_BLOOM_X86
        if (buttress_bloom_avx2) { buttress_sbbf_check_avx2(bits, num_blocks, hashes, n, out); return; }
    #endif
        buttress_sbbf_check_scalar(bits, num_blocks, hashes, n, out);
    }

    static void buttress_sbbf_prefetch(const uint8_t *bits, uint64_t num_blocks,
                                       const uint64_t *hashes, size_t n, int for_write) {
        for (size_t i = 0; i < n; i++) {
            const uint8_t *block = bits + 32 * buttress_block_index(hashes[i], num_blocks);
            if (for_write) BUTTRESS_PREFETCH(block, 1); else BUTTRESS_PREFETCH(block, 0);
        }
    }

    /* ---- classic: double hashing over a prime modulus ---- */
    static inline void buttress_classic_start(uint64_t h, uint64_t modulus,
                                              uint64_t *x, uint64_t *y) {
        *x = buttress_fastrange64(h, modulus);
        *y = 1 + buttress_fastrange64((h << 32) | (h >> 32), modulus - 1);
    }

    static void buttress_classic_insert(uint8_t *bits, uint64_t modulus, int k,
                                        const uint64_t *hashes, size_t n) {
        for (size_t i = 0; i < n; i++) {
            uint64_t x, y;
            buttress_classic_start(hashes[i], modulus, &x, &y);
            for (int j = 0; j < k; j++) {
                bits[x >> 3] |= (uint8_t)(1U << (x & 7));
                x += y;
                if (x >= modulus) x -= modulus;
            }
        }
    }

    /* stop_early: leave a key at its first clear bit.  That saves memory
       traffic when the filter is larger than the caches; for a cache-resident
       filter reading all k bits without a data-dependent branch is faster. */
    static void buttress_classic_check(const uint8_t *bits, uint64_t modulus, int k,
                                       const uint64_t *hashes, size_t n, uint8_t *out,
                                       int stop_early) {
        for (size_t i = 0; i < n; i++) {
            uint64_t x, y;
            unsigned found = 1;
            buttress_classic_start(hashes[i], modulus, &x, &y);
            if (stop_early) {
                for (int j = 0; j < k && found; j++) {
                    found = (bits[x >> 3] >> (x & 7)) & 1U;
                    x += y;
                    if (x >= modulus) x -= modulus;
                }
            } else {
                for (int j = 0; j < k; j++) {
                    found &= (unsigned)(bits[x >> 3] >> (x & 7));
                    x += y;
                    x -= (x >= modulus) ? modulus : 0;
                }
            }
            out[i] = (uint8_t)(found & 1);
        }
    }

    /* Prefetch the first `depth` probes of each key to be looked up. */
    static void buttress_classic_prefetch(const uint8_t *bits, uint64_t modulus, int depth,
                                          const uint64_t *hashes, size_t n) {
        for (size_t i = 0; i < n; i++) {
            uint64_t x, y;
            buttress_classic_start(hashes[i], modulus, &x, &y);
            for (int j = 0; j < depth; j++) {
                BUTTRESS_PREFETCH(bits + (x >> 3), 0);
                x += y;
                if (x >= modulus) x -= modulus;
            }
        }
    }

    static uint64_t buttress_popcount(const uint8_t *data, size_t length) {
        uint64_t total = 0;
        size_t i = 0;
        for (; i + 8 <= length; i += 8) {
            uint64_t word;
            memcpy(&word, data + i, 8);
            total += (uint64_t)__builtin_popcountll(word);
        }
        for (; i < length; i++) total += (uint64_t)__builtin_popcount(data[i]);
        return total;
    }
    """
    void detect_cpu "buttress_bloom_detect_cpu"(int allow_avx2) noexcept nogil
    int cpu_has_avx2 "buttress_bloom_avx2"
    void sbbf_insert "buttress_sbbf_insert"(
        uint8_t* bits, uint64_t num_blocks, const uint64_t* hashes, size_t n) noexcept nogil
    void sbbf_check "buttress_sbbf_check"(
        const uint8_t* bits, uint64_t num_blocks, const uint64_t* hashes, size_t n,
        uint8_t* out) noexcept nogil
    void sbbf_prefetch "buttress_sbbf_prefetch"(
        const uint8_t* bits, uint64_t num_blocks, const uint64_t* hashes, size_t n,
        int for_write) noexcept nogil
    void classic_insert "buttress_classic_insert"(
        uint8_t* bits, uint64_t modulus, int k, const uint64_t* hashes, size_t n) noexcept nogil
    void classic_check "buttress_classic_check"(
        const uint8_t* bits, uint64_t modulus, int k, const uint64_t* hashes, size_t n,
        uint8_t* out, int stop_early) noexcept nogil
    void classic_prefetch "buttress_classic_prefetch"(
        const uint8_t* bits, uint64_t modulus, int depth, const uint64_t* hashes,
        size_t n) noexcept nogil
    uint64_t popcount "buttress_popcount"(const uint8_t* data, size_t length) noexcept nogil

# BUTTRESS_BLOOM_PORTABLE=1 forces the portable kernels (the tests use it to
# check they give the same bits as the AVX2 ones).
detect_cpu(os.environ.get("BUTTRESS_BLOOM_PORTABLE", "") in ("", "0"))

LAYOUT_CLASSIC = 0
LAYOUT_SPLIT_BLOCK = 1
#: Whether the split-block kernels use AVX2 on this CPU (chosen at import).
USES_AVX2 = bool(cpu_has_avx2)

cdef enum:
    CLASSIC = 0
    SPLIT_BLOCK = 1
    # Keys hashed per window; the next window's cache lines are prefetched while
    # this one is probed.  32 split-block lines keep the CPU's miss buffers busy.
    WINDOW = 32
    # A lookup in a classic filter usually stops at the first clear bit, so only
    # its first probes are worth prefetching.
    CLASSIC_PREFETCH_LOOKUP = 2
    # Source of a batch's hashes.
    SOURCE_INTS = 0          # uint64 keys, hashed here
    SOURCE_FIXED_WIDTH = 1   # numpy 'S' keys, hashed here
    SOURCE_HASHES = 2        # hashes computed beforehand (Python keys)

# Filters smaller than this stay mostly in cache: prefetching would only add work,
# and a classic lookup is faster reading all k bits than branching on each.
cdef uint64_t PREFETCH_MIN_BYTES = 4 << 20


cdef inline const uint64_t* window_hashes(const KeySource* src, Py_ssize_t start,
                                          Py_ssize_t n, uint64_t* buf) noexcept nogil:
    cdef Py_ssize_t j
    if src.kind == SOURCE_HASHES:
        return src.ints + start
    if src.kind == SOURCE_INTS:
        for j in range(n):
            buf[j] = xxh64_u64(src.ints[start + j], 0)
    else:
        xxh64_fixed_width(src.raw + start * src.width, n, src.width, 0, buf)
    return buf


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

    cdef void _run(self, uint8_t* data, const KeySource* src, uint8_t* out) noexcept nogil:
        """Hash window w+1 and prefetch its lines, then probe window w.

        ``data`` is the bit array captured with the GIL held, so a concurrent
        close() (which clears ``self._data``) cannot pull it away mid-batch.
        """
        cdef uint64_t buf_a[WINDOW]
        cdef uint64_t buf_b[WINDOW]
        cdef uint64_t* spare = &buf_b[0]
        cdef const uint64_t* current
        cdef const uint64_t* following
        cdef Py_ssize_t start = 0, n, next_start, next_n, count = src.count
        cdef bint for_write = out == NULL
        cdef bint prefetch = self._large
        if count == 0:
            return
        n = min(<Py_ssize_t>WINDOW, count)
        current = window_hashes(src, 0, n, buf_a)
        if prefetch:
            self._prefetch(data, current, n, for_write)
        while True:
            next_start = start + n
            next_n = min(<Py_ssize_t>WINDOW, count - next_start)
            if next_n > 0:
                following = window_hashes(src, next_start, next_n, spare)
                if prefetch:
                    self._prefetch(data, following, next_n, for_write)
            self._probe(data, current, n, NULL if for_write else out + start)
            if next_n <= 0:
                return
            if spare == &buf_b[0]:
                spare = &buf_a[0]
            else:
                spare = &buf_b[0]
            current = following
            start = next_start
            n = next_n

    cdef object _prepare(self, keys, KeySource* src):
        """Describe ``keys`` in ``src``; return the object owning the memory it points to."""
        cdef const uint64_t[::1] ints
        cdef const unsigned char[::1] raw
        cdef uint64_t[::1] hashes_view
        cdef list items
        cdef Py_ssize_t i
        array = as_key_array(keys)
        if array is None:
            if isinstance(keys, (str, bytes, bytearray, memoryview)):
                raise TypeError("insert_many/contains_many take a collection of keys, "
                                f"not a single {type(keys).__name__} key")
            items = keys if type(keys) is list else list(keys)
            array = np.empty(len(items), dtype=np.uint64)
            src.kind = SOURCE_HASHES
            src.count = len(items)
            if src.count:
                hashes_view = array
                for i in range(src.count):
                    hashes_view[i] = hash_one(items[i])
                src.ints = &hashes_view[0]
            return array
        src.count = array.shape[0]
        if src.count == 0:
            src.kind = SOURCE_HASHES
            return array
        if array.dtype.kind == "u":
            ints = array
            src.kind = SOURCE_INTS
            src.ints = &ints[0]
        else:
            raw = array.view(np.uint8)
            src.kind = SOURCE_FIXED_WIDTH
            src.raw = &raw[0]
            src.width = array.dtype.itemsize
        return array

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

    def _insert_many(self, keys):
        """Insert every key; return how many there were."""
        cdef KeySource src
        self._check_writable()
        # Capture the bits before _prepare runs Python code (another thread may
        # close() the filter meanwhile); `buffer` keeps them alive without the GIL.
        buffer = self._buffer
        cdef uint8_t* data = self._data
        owner = self._prepare(keys, &src)
        with nogil:
            self._run(data, &src, NULL)
        return src.count

    def _contains_many(self, keys):
        """Return a numpy bool array: may each key be in the filter?"""
        cdef KeySource src
        cdef uint8_t[::1] out_view
        self._check_bound()
        buffer = self._buffer  # captured before Python code runs (see _insert_many)
        cdef uint8_t* data = self._data
        owner = self._prepare(keys, &src)
        result = np.zeros(src.count, dtype=np.bool_)
        if src.count == 0:
            return result
        out_view = result.view(np.uint8)
        with nogil:
            self._run(data, &src, &out_view[0])
        return result

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
