# The C-level contract of buttress._hash: other extensions (the Bloom filter)
# cimport these kernels and key sources and hash without touching Python objects.
# The XXH64 kernels themselves live in xxh64.h (plain C, portable).
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "xxh64.h":
    uint64_t xxh64_bytes "buttress_xxh64"(const unsigned char* data, size_t length,
                                          uint64_t seed) noexcept nogil
    uint64_t xxh64_u64 "buttress_xxh64_u64"(uint64_t key, uint64_t seed) noexcept nogil
    void xxh64_fixed_width "buttress_xxh64_fixed_width"(
        const unsigned char* data, Py_ssize_t count, Py_ssize_t width, int strip_nul,
        uint64_t seed, uint64_t* out) noexcept nogil
    Py_ssize_t ucs4_to_utf8 "buttress_ucs4_to_utf8"(
        const uint32_t* ucs4, Py_ssize_t count, unsigned char* out) noexcept nogil
    Py_ssize_t ucs4_first_unencodable "buttress_ucs4_first_unencodable"(
        const uint32_t* ucs4, Py_ssize_t count) noexcept nogil


# How a batch's keys are laid out in memory.
cdef enum KeyKind:
    KEYS_HASHES = 0     # hashes computed beforehand (Python keys); `ints`
    KEYS_U64 = 1        # uint64 values (numpy integer arrays, as their 8-byte encoding)
    KEYS_INT = 2        # Arrow integers: `width` bytes, `is_signed`, sign/zero-extended
    KEYS_FIXED = 3      # fixed `width` bytes; `strip_nul`: numpy 'S' padding dropped
    KEYS_UCS4 = 4       # numpy 'U': `width` bytes of UCS-4, hashed as UTF-8
    KEYS_OFFSETS32 = 5  # Arrow string/binary: int32 offsets into `values`
    KEYS_OFFSETS64 = 6  # Arrow large_string/large_binary: int64 offsets
    KEYS_VIEWS = 7      # Arrow string_view/binary_view: 16-byte views over `buffers`
    KEYS_NULL = 8       # Arrow null type: every key is null
    KEYS_NPSTRING = 9   # numpy 2 StringDType: `width`-byte packed strings of dtype `descr`
    KEYS_DICT = 10      # Arrow dictionary: `width`-byte indices in `values` into `ints`, the
                        # dictionary's `dict_size` hashes (computed once, with the batch's seed)


cdef struct KeySource:
    int kind
    Py_ssize_t count              # number of keys (nulls included)
    Py_ssize_t offset             # Arrow offset: applies to validity, offsets, views, values
    const uint8_t* validity       # Arrow validity bitmap, or NULL when no key is null
    Py_ssize_t null_count
    const uint64_t* ints          # KEYS_HASHES / KEYS_U64 / KEYS_DICT (the dictionary's)
    const unsigned char* values   # element data, string bytes, or the views
    const void* offsets           # KEYS_OFFSETS32 / KEYS_OFFSETS64
    const unsigned char** buffers # KEYS_VIEWS: the variadic data buffers
    Py_ssize_t width
    bint is_signed
    bint strip_nul
    const void* descr             # KEYS_NPSTRING: the StringDType (its allocator reads them)
    Py_ssize_t dict_size          # KEYS_DICT: how many hashes `ints` holds


cdef class KeyChunk:
    """One contiguous run of keys and the objects that keep its memory alive."""
    cdef KeySource src
    cdef object owner


cdef uint64_t hash_object(object key, uint64_t seed) except? 0
cdef void hash_source(const KeySource* src, Py_ssize_t start, Py_ssize_t n, uint64_t seed,
                      uint64_t* out) noexcept nogil


cdef inline bint key_is_null(const KeySource* src, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t bit
    if src.kind == KEYS_NULL:
        return True
    if src.validity == NULL:
        return False
    bit = src.offset + i
    return not ((src.validity[bit >> 3] >> (bit & 7)) & 1)
