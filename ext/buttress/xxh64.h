/* XXH64, written for buttress from the public xxHash specification.
 *
 * Header-only so other extensions inline it (the Bloom filter hashes keys in
 * its probe loops).  Plain C99 with portable fallbacks: compiler builtins are
 * used only where the compiler is known to have them.  Bit-identical with the
 * xxhash package (tests/test_hash.py checks every length 0..4096).
 */
#ifndef BUTTRESS_XXH64_H
#define BUTTRESS_XXH64_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#  define BUTTRESS_INLINE static __inline
#  define BUTTRESS_FORCE_INLINE static __forceinline
#elif defined(__GNUC__) || defined(__clang__)
#  define BUTTRESS_INLINE static inline
#  define BUTTRESS_FORCE_INLINE static inline __attribute__((always_inline))
#else
#  define BUTTRESS_INLINE static inline
#  define BUTTRESS_FORCE_INLINE static inline
#endif

/* The five XXH64 primes of the specification. */
#define BUTTRESS_PRIME64_1 UINT64_C(0x9E3779B185EBCA87)
#define BUTTRESS_PRIME64_2 UINT64_C(0xC2B2AE3D27D4EB4F)
#define BUTTRESS_PRIME64_3 UINT64_C(0x165667B19E3779F9)
#define BUTTRESS_PRIME64_4 UINT64_C(0x85EBCA77C2B2AE63)
#define BUTTRESS_PRIME64_5 UINT64_C(0x27D4EB2F165667C5)

/* Big-endian hosts byte-swap the little-endian loads; everything else
 * (x86-64, aarch64, MSVC targets) compiles the swap away. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  define BUTTRESS_BIG_ENDIAN 1
#endif

BUTTRESS_INLINE uint32_t buttress_bswap32(uint32_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_bswap32(v);
#else
    return ((v & 0xFFU) << 24) | ((v & 0xFF00U) << 8) | ((v >> 8) & 0xFF00U) | (v >> 24);
#endif
}

BUTTRESS_INLINE uint64_t buttress_bswap64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_bswap64(v);
#else
    return ((uint64_t)buttress_bswap32((uint32_t)v) << 32) | buttress_bswap32((uint32_t)(v >> 32));
#endif
}

/* Unaligned little-endian loads. */
BUTTRESS_INLINE uint64_t buttress_load_le64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#ifdef BUTTRESS_BIG_ENDIAN
    v = buttress_bswap64(v);
#endif
    return v;
}

BUTTRESS_INLINE uint32_t buttress_load_le32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#ifdef BUTTRESS_BIG_ENDIAN
    v = buttress_bswap32(v);
#endif
    return v;
}

/* Compilers turn this pattern into one rotate instruction (MSVC included). */
BUTTRESS_INLINE uint64_t buttress_rotl64(uint64_t x, int r) {
    return (x << r) | (x >> (64 - r));
}

BUTTRESS_INLINE uint64_t buttress_xxh_round(uint64_t acc, uint64_t lane) {
    acc += lane * BUTTRESS_PRIME64_2;
    acc = buttress_rotl64(acc, 31);
    return acc * BUTTRESS_PRIME64_1;
}

BUTTRESS_INLINE uint64_t buttress_xxh_merge(uint64_t acc, uint64_t value) {
    acc ^= buttress_xxh_round(0, value);
    return acc * BUTTRESS_PRIME64_1 + BUTTRESS_PRIME64_4;
}

BUTTRESS_INLINE uint64_t buttress_xxh_avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= BUTTRESS_PRIME64_2;
    h ^= h >> 29;
    h *= BUTTRESS_PRIME64_3;
    return h ^ (h >> 32);
}

/* XXH64 of `length` bytes at `data`.  Forced inline: the batch loops call it
 * once per key, and a call per key costs as much as hashing a short key. */
BUTTRESS_FORCE_INLINE uint64_t buttress_xxh64(const unsigned char *data, size_t length, uint64_t seed) {
    const unsigned char *p = data;
    const unsigned char *end = data + length;
    uint64_t h;
    if (length >= 32) {
        const unsigned char *limit = end - 32;
        uint64_t v1 = seed + BUTTRESS_PRIME64_1 + BUTTRESS_PRIME64_2;
        uint64_t v2 = seed + BUTTRESS_PRIME64_2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - BUTTRESS_PRIME64_1;
        do {
            v1 = buttress_xxh_round(v1, buttress_load_le64(p));
            v2 = buttress_xxh_round(v2, buttress_load_le64(p + 8));
            v3 = buttress_xxh_round(v3, buttress_load_le64(p + 16));
            v4 = buttress_xxh_round(v4, buttress_load_le64(p + 24));
            p += 32;
        } while (p <= limit);
        h = buttress_rotl64(v1, 1) + buttress_rotl64(v2, 7) + buttress_rotl64(v3, 12) +
            buttress_rotl64(v4, 18);
        h = buttress_xxh_merge(h, v1);
        h = buttress_xxh_merge(h, v2);
        h = buttress_xxh_merge(h, v3);
        h = buttress_xxh_merge(h, v4);
    } else {
        h = seed + BUTTRESS_PRIME64_5;
    }
    h += (uint64_t)length;
    while (p + 8 <= end) {
        h ^= buttress_xxh_round(0, buttress_load_le64(p));
        h = buttress_rotl64(h, 27) * BUTTRESS_PRIME64_1 + BUTTRESS_PRIME64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)buttress_load_le32(p) * BUTTRESS_PRIME64_1;
        h = buttress_rotl64(h, 23) * BUTTRESS_PRIME64_2 + BUTTRESS_PRIME64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * BUTTRESS_PRIME64_5;
        h = buttress_rotl64(h, 11) * BUTTRESS_PRIME64_1;
        p++;
    }
    return buttress_xxh_avalanche(h);
}

/* XXH64 of the 8-byte little-endian encoding of `key` (the int key rule). */
BUTTRESS_INLINE uint64_t buttress_xxh64_u64(uint64_t key, uint64_t seed) {
    uint64_t h = seed + BUTTRESS_PRIME64_5 + 8;
    h ^= buttress_xxh_round(0, key);
    h = buttress_rotl64(h, 27) * BUTTRESS_PRIME64_1 + BUTTRESS_PRIME64_4;
    return buttress_xxh_avalanche(h);
}

/* Hash `count` elements of `width` bytes; `strip_nul` drops each element's
 * trailing NUL bytes first (numpy 'S' padding, what arr.tolist() removes). */
BUTTRESS_FORCE_INLINE void buttress_xxh64_fixed_width(const unsigned char *data, ptrdiff_t count,
                                                ptrdiff_t width, int strip_nul, uint64_t seed,
                                                uint64_t *out) {
    for (ptrdiff_t i = 0; i < count; i++) {
        const unsigned char *item = data + i * width;
        ptrdiff_t n = width;
        if (strip_nul)
            while (n > 0 && item[n - 1] == 0) n--;
        out[i] = buttress_xxh64(item, (size_t)n, seed);
    }
}

/* UTF-8 encoding of `count` UCS-4 code points (a numpy 'U' element, native
 * byte order, 4-byte aligned); trailing NUL code points are dropped first, as
 * arr.tolist() does.  Writes at most 4 * count bytes to `out` and returns the
 * length.  The caller has checked every code point is encodable
 * (buttress_ucs4_all_encodable). */
BUTTRESS_INLINE ptrdiff_t buttress_ucs4_to_utf8(const uint32_t *cp, ptrdiff_t count,
                                                unsigned char *out) {
    ptrdiff_t n = count, length = 0, i;
    uint32_t any = 0;
    while (n > 0 && cp[n - 1] == 0) n--;
    for (i = 0; i < n; i++) any |= cp[i];
    if (any < 0x80) { /* ASCII, the common case: both loops vectorize */
        for (i = 0; i < n; i++) out[i] = (unsigned char)cp[i];
        return n;
    }
    for (i = 0; i < n; i++) {
        uint32_t c = cp[i];
        if (c < 0x80) {
            out[length++] = (unsigned char)c;
        } else if (c < 0x800) {
            out[length++] = (unsigned char)(0xC0 | (c >> 6));
            out[length++] = (unsigned char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            out[length++] = (unsigned char)(0xE0 | (c >> 12));
            out[length++] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            out[length++] = (unsigned char)(0x80 | (c & 0x3F));
        } else {
            out[length++] = (unsigned char)(0xF0 | (c >> 18));
            out[length++] = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
            out[length++] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            out[length++] = (unsigned char)(0x80 | (c & 0x3F));
        }
    }
    return length;
}

/* Index of the first of `count` code points that UTF-8 cannot encode (a
 * surrogate, or beyond U+10FFFF, which str.encode() refuses), or -1.  The
 * scan without an early exit vectorizes; the index is found only on failure. */
BUTTRESS_INLINE ptrdiff_t buttress_ucs4_first_unencodable(const uint32_t *cp, ptrdiff_t count) {
    uint32_t bad = 0;
    ptrdiff_t i;
    for (i = 0; i < count; i++)
        bad |= (uint32_t)((cp[i] - 0xD800U) < 0x800U) | (uint32_t)(cp[i] > 0x10FFFFU);
    if (!bad) return -1;
    for (i = 0; i < count; i++)
        if ((cp[i] - 0xD800U) < 0x800U || cp[i] > 0x10FFFFU) return i;
    return -1;
}

#endif /* BUTTRESS_XXH64_H */
