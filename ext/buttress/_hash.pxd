# The C-level contract of buttress._hash: other extensions (the Bloom filter)
# cimport these kernels and hash without touching Python objects.
from libc.stdint cimport uint64_t

cdef uint64_t xxh64_bytes(const unsigned char* data, size_t length, uint64_t seed) noexcept nogil
cdef uint64_t xxh64_u64(uint64_t key, uint64_t seed) noexcept nogil
cdef uint64_t hash_object(object key, uint64_t seed) except? 0
cdef void xxh64_fixed_width(const unsigned char* data, Py_ssize_t count, Py_ssize_t width,
                            uint64_t seed, uint64_t* out) noexcept nogil
