"""XXH64, written for buttress from the public xxHash specification.

Bit-identical with ``xxhash.xxh64_intdigest`` (the tests check every length
0..4096 and the specification's known-answer vectors).

The key-encoding rule, used by every buttress component that hashes keys
(Bloom filters, dedupe fingerprints, ...):

* ``str`` -> its UTF-8 bytes;
* ``bytes``, ``bytearray``, ``memoryview`` (any C-contiguous buffer) -> as is;
* ``int`` and numpy integer scalars (``bool`` excluded) -> 8 bytes little-endian: two's complement when it
  fits int64, else unsigned when it fits uint64, else ``OverflowError``;
* anything else -> ``TypeError`` naming the type.

Numpy inputs follow the same rule element by element: integer arrays hash each
value as its 8-byte little-endian encoding; fixed-width bytes arrays (dtype
``'S'``) hash each element without numpy's trailing NUL padding, exactly as
``arr.tolist()`` would hand it over.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint32_t, uint64_t

import numpy as np

from buttress._keys import as_key_array  # one rule for numpy keys, shared with the twin

cimport cython

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    /* The five XXH64 primes of the specification. */
    #define BUTTRESS_PRIME64_1 UINT64_C(0x9E3779B185EBCA87)
    #define BUTTRESS_PRIME64_2 UINT64_C(0xC2B2AE3D27D4EB4F)
    #define BUTTRESS_PRIME64_3 UINT64_C(0x165667B19E3779F9)
    #define BUTTRESS_PRIME64_4 UINT64_C(0x85EBCA77C2B2AE63)
    #define BUTTRESS_PRIME64_5 UINT64_C(0x27D4EB2F165667C5)
    /* Unaligned little-endian loads; the byte swap compiles away on
       little-endian hosts (x86-64, aarch64). */
    static inline uint64_t buttress_load_le64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint32_t buttress_load_le32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    """
    const uint64_t PRIME64_1 "BUTTRESS_PRIME64_1"
    const uint64_t PRIME64_2 "BUTTRESS_PRIME64_2"
    const uint64_t PRIME64_3 "BUTTRESS_PRIME64_3"
    const uint64_t PRIME64_4 "BUTTRESS_PRIME64_4"
    const uint64_t PRIME64_5 "BUTTRESS_PRIME64_5"
    uint64_t load_le64 "buttress_load_le64"(const unsigned char* p) noexcept nogil
    uint32_t load_le32 "buttress_load_le32"(const unsigned char* p) noexcept nogil



cdef inline uint64_t rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * PRIME64_2
    acc = rotl64(acc, 31)
    return acc * PRIME64_1


cdef inline uint64_t xxh_merge(uint64_t acc, uint64_t value) noexcept nogil:
    acc = acc ^ xxh_round(0, value)
    return acc * PRIME64_1 + PRIME64_4


cdef inline uint64_t xxh_avalanche(uint64_t h) noexcept nogil:
    h = h ^ (h >> 33)
    h = h * PRIME64_2
    h = h ^ (h >> 29)
    h = h * PRIME64_3
    return h ^ (h >> 32)


cdef uint64_t xxh64_bytes(const unsigned char* data, size_t length, uint64_t seed) noexcept nogil:
    """XXH64 of ``length`` bytes at ``data``."""
    cdef const unsigned char* p = data
    cdef const unsigned char* end = data + length
    cdef const unsigned char* limit
    cdef uint64_t v1, v2, v3, v4, h
    if length >= 32:
        limit = end - 32
        v1 = seed + PRIME64_1 + PRIME64_2
        v2 = seed + PRIME64_2
        v3 = seed
        v4 = seed - PRIME64_1
        while p <= limit:
            v1 = xxh_round(v1, load_le64(p))
            v2 = xxh_round(v2, load_le64(p + 8))
            v3 = xxh_round(v3, load_le64(p + 16))
            v4 = xxh_round(v4, load_le64(p + 24))
            p += 32
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18)
        h = xxh_merge(h, v1)
        h = xxh_merge(h, v2)
        h = xxh_merge(h, v3)
        h = xxh_merge(h, v4)
    else:
        h = seed + PRIME64_5
    h = h + <uint64_t>length
    while p + 8 <= end:
        h = h ^ xxh_round(0, load_le64(p))
        h = rotl64(h, 27) * PRIME64_1 + PRIME64_4
        p += 8
    if p + 4 <= end:
        h = h ^ (<uint64_t>load_le32(p) * PRIME64_1)
        h = rotl64(h, 23) * PRIME64_2 + PRIME64_3
        p += 4
    while p < end:
        h = h ^ (<uint64_t>p[0] * PRIME64_5)
        h = rotl64(h, 11) * PRIME64_1
        p += 1
    return xxh_avalanche(h)


cdef uint64_t xxh64_u64(uint64_t key, uint64_t seed) noexcept nogil:
    """XXH64 of the 8-byte little-endian encoding of ``key`` (the int key rule)."""
    cdef uint64_t h = seed + PRIME64_5 + 8
    h = h ^ xxh_round(0, key)
    h = rotl64(h, 27) * PRIME64_1 + PRIME64_4
    return xxh_avalanche(h)


cdef void xxh64_fixed_width(const unsigned char* data, Py_ssize_t count, Py_ssize_t width,
                            uint64_t seed, uint64_t* out) noexcept nogil:
    """Hash ``count`` NUL-padded elements of ``width`` bytes (numpy dtype 'S')."""
    cdef Py_ssize_t i, n
    cdef const unsigned char* item
    for i in range(count):
        item = data + i * width
        n = width
        while n > 0 and item[n - 1] == 0:
            n -= 1
        out[i] = xxh64_bytes(item, <size_t>n, seed)


cdef inline uint64_t int_key(object key) except? 0:
    # int64 two's complement when it fits, else uint64, else OverflowError.
    if key < 0:
        if key < -0x8000000000000000:
            raise OverflowError(f"int key {key} does not fit in int64 or uint64")
        return <uint64_t>(<long long>key)
    if key > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"int key {key} does not fit in int64 or uint64")
    return <uint64_t>key


cdef inline uint64_t check_seed(object seed) except? 0:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    return <uint64_t>seed


cdef uint64_t hash_object(object key, uint64_t seed) except? 0:
    """Hash one key by the key-encoding rule (see the module docstring)."""
    cdef const char* utf8
    cdef Py_ssize_t size
    cdef const unsigned char[::1] view
    if type(key) is str:
        utf8 = PyUnicode_AsUTF8AndSize(key, &size)
        return xxh64_bytes(<const unsigned char*>utf8, <size_t>size, seed)
    if type(key) is bytes:
        return xxh64_bytes(<const unsigned char*>PyBytes_AS_STRING(key),
                           <size_t>PyBytes_GET_SIZE(key), seed)
    if type(key) is int:
        return xxh64_u64(int_key(key), seed)
    if isinstance(key, bool):
        raise TypeError("bool is not a supported key type (use int or str explicitly)")
    if isinstance(key, str):
        return hash_object(str(key), seed)
    if isinstance(key, int):
        return xxh64_u64(int_key(int(key)), seed)
    if isinstance(key, np.integer):
        return xxh64_u64(int_key(int(key)), seed)
    if isinstance(key, (bytes, bytearray, memoryview)):
        view = memoryview(key).cast("B") if not isinstance(key, bytearray) else key
        if view.shape[0] == 0:
            return xxh64_bytes(<const unsigned char*>"", 0, seed)
        return xxh64_bytes(&view[0], <size_t>view.shape[0], seed)
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, "
        f"bytes-like or int"
    )


def xxh64(data, seed=0):
    """Return the XXH64 hash of ``data`` (bytes-like or str, UTF-8) as an int.

    >>> hex(xxh64(b""))
    '0xef46db3751d8e999'
    """
    cdef uint64_t s = check_seed(seed)
    if isinstance(data, int) and not isinstance(data, bool):
        raise TypeError("xxh64 takes bytes-like or str; use hash_key() for int keys")
    return hash_object(data, s)


def hash_key(key, seed=0):
    """Return the XXH64 hash of ``key`` encoded by the key-encoding rule.

    ``hash_key(k) == xxh64(encode_key(k))`` for every supported key.
    """
    return hash_object(key, check_seed(seed))


def encode_key(key):
    """Return the bytes that the key-encoding rule gives for ``key``."""
    if isinstance(key, bool):
        raise TypeError("bool is not a supported key type (use int or str explicitly)")
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, (int, np.integer)):
        return int_key(int(key)).to_bytes(8, "little")
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, "
        f"bytes-like or int"
    )


@cython.boundscheck(False)
@cython.wraparound(False)
def xxh64_many(keys, seed=0):
    """Hash many keys at once; returns a ``numpy.ndarray`` of uint64.

    ``keys`` is a numpy integer array (each value as its 8-byte little-endian
    encoding), a numpy fixed-width bytes array (dtype 'S'), or a list/tuple/
    iterable of str, bytes-like or int keys.  Numpy input is hashed with the
    GIL released and without creating a Python object per key.
    """
    cdef uint64_t s = check_seed(seed)
    cdef Py_ssize_t i, n
    cdef const uint64_t[::1] ints
    cdef const unsigned char[::1] raw
    cdef uint64_t[::1] out_view
    cdef Py_ssize_t width
    array = as_key_array(keys)
    if array is None:
        if isinstance(keys, (str, bytes, bytearray, memoryview)):
            raise TypeError("xxh64_many takes a collection of keys, not a single key")
        items = keys if isinstance(keys, (list, tuple)) else list(keys)
        n = len(items)
        out = np.empty(n, dtype=np.uint64)
        out_view = out
        for i in range(n):
            out_view[i] = hash_object(items[i], s)
        return out
    n = array.shape[0]
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    out_view = out
    if array.dtype.kind == "u":
        ints = array
        with nogil:
            for i in range(n):
                out_view[i] = xxh64_u64(ints[i], s)
        return out
    width = array.dtype.itemsize
    raw = array.view(np.uint8)
    with nogil:
        xxh64_fixed_width(&raw[0], n, width, s, &out_view[0])
    return out
