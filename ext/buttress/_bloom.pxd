# The C-level contract of a Bloom filter's native core.  buttress.bloom.BloomFilter
# subclasses BloomCore and adds everything that is not a kernel (validation,
# persistence, set operations, statistics).
from libc.stdint cimport uint8_t, uint64_t


# Where a batch's keys (or their precomputed hashes) live.
cdef struct KeySource:
    int kind                   # SOURCE_INTS, SOURCE_FIXED_WIDTH or SOURCE_HASHES
    const uint64_t* ints       # uint64 keys, or hashes for SOURCE_HASHES
    const unsigned char* raw   # numpy 'S' element data
    Py_ssize_t width
    Py_ssize_t count


cdef class BloomCore:
    cdef uint8_t* _data          # the bit array (owned by _buffer)
    cdef object _buffer          # numpy uint8 array or memmap holding the bits
    cdef uint64_t _modulus       # classic: probe modulus; split_block: number of blocks
    cdef int _num_hashes
    cdef int _layout             # CLASSIC or SPLIT_BLOCK
    cdef bint _writable
    cdef bint _large              # outgrows the caches: prefetch, stop classic lookups early

    cdef int _check_bound(self) except -1
    cdef int _check_writable(self) except -1
    cdef void _probe(self, uint8_t* data, const uint64_t* hashes, size_t n,
                     uint8_t* out) noexcept nogil
    cdef void _prefetch(self, const uint8_t* data, const uint64_t* hashes, size_t n,
                        bint for_write) noexcept nogil
    cdef void _run(self, uint8_t* data, const KeySource* src, uint8_t* out) noexcept nogil
    cdef object _prepare(self, keys, KeySource* src)
