# The C-level contract of a Bloom filter's native core.  buttress.bloom.BloomFilter
# subclasses BloomCore and adds everything that is not a kernel (validation,
# persistence, set operations, statistics).  The kernels are plain C in
# bloom_kernels.h (portable, with AVX2 where the CPU has it).
from libc.stdint cimport uint8_t, uint64_t

from buttress._hash cimport KeySource

cdef extern from "bloom_kernels.h":
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
    size_t sbbf_select "buttress_sbbf_select"(
        uint64_t num_blocks, const uint64_t* hashes, size_t n, uint64_t first_block,
        uint64_t end_block, uint64_t* out) noexcept nogil
    void classic_insert "buttress_classic_insert"(
        uint8_t* bits, uint64_t modulus, int k, const uint64_t* hashes, size_t n) noexcept nogil
    void classic_insert_range "buttress_classic_insert_range"(
        uint8_t* bits, uint64_t modulus, int k, const uint64_t* hashes, size_t n,
        uint64_t first_byte, uint64_t end_byte) noexcept nogil
    void classic_check "buttress_classic_check"(
        const uint8_t* bits, uint64_t modulus, int k, const uint64_t* hashes, size_t n,
        uint8_t* out, int stop_early) noexcept nogil
    void classic_prefetch "buttress_classic_prefetch"(
        const uint8_t* bits, uint64_t modulus, int depth, const uint64_t* hashes,
        size_t n) noexcept nogil
    uint64_t popcount "buttress_popcount"(const uint8_t* data, size_t length) noexcept nogil


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
    cdef void _run(self, uint8_t* data, const KeySource* src, Py_ssize_t begin,
                   Py_ssize_t end, uint8_t* out) noexcept nogil
    cdef void _insert_share(self, uint8_t* data, const KeySource* src, const uint64_t* hashes,
                            Py_ssize_t base, Py_ssize_t n, int part, int parts) noexcept nogil
