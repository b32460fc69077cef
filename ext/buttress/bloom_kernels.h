/* Bloom filter kernels of buttress: split block (Apache Parquet's layout) and
 * classic double hashing over a prime modulus.  See buttress/_bloom.pyx for
 * the layouts.
 *
 * Portable C99.  Compiler-specific pieces have fallbacks:
 *   - AVX2 split-block kernels: GCC/Clang (target attribute, __builtin_cpu_supports)
 *     and MSVC (intrinsics need no attribute; __cpuidex + _xgetbv detect AVX2 and
 *     the OS's YMM state); elsewhere only the scalar kernels are built;
 *   - prefetch: __builtin_prefetch, _mm_prefetch on MSVC x86, else nothing;
 *   - popcount: __builtin_popcountll, else a SWAR count;
 *   - 64x64->128 multiply: unsigned __int128, _umul128 (MSVC x64), else 32-bit parts.
 */
#ifndef BUTTRESS_BLOOM_KERNELS_H
#define BUTTRESS_BLOOM_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "xxh64.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#  define BUTTRESS_BLOOM_X86 1
#  define BUTTRESS_TARGET_AVX2 __attribute__((target("avx2")))
#  include <immintrin.h>
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_AMD64)) && !defined(_M_ARM64EC)
#  define BUTTRESS_BLOOM_X86 1
#  define BUTTRESS_TARGET_AVX2
#  include <immintrin.h>
#  include <intrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define BUTTRESS_PREFETCH(p, rw) __builtin_prefetch((p), (rw), 3)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#  include <xmmintrin.h>
#  define BUTTRESS_PREFETCH(p, rw) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#  define BUTTRESS_PREFETCH(p, rw) ((void)(p))
#endif

/* Apache Parquet's split block Bloom filter salts. */
static const uint32_t buttress_salt[8] = {
    0x47b6137bU, 0x44974d91U, 0x8824ad5bU, 0xa2b7289dU,
    0x705495c7U, 0x2df1424bU, 0x9efc4947U, 0x5c6bfb31U};

static int buttress_bloom_avx2 = 0;

static void buttress_bloom_detect_cpu(int allow_avx2) {
    buttress_bloom_avx2 = 0;
    if (!allow_avx2) return;
#if defined(BUTTRESS_BLOOM_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    buttress_bloom_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
#elif defined(BUTTRESS_BLOOM_X86) && defined(_MSC_VER)
    {
        int info[4];
        __cpuid(info, 1);
        /* OSXSAVE and AVX, then the OS saves YMM state, then the AVX2 bit. */
        if ((info[2] & (1 << 27)) && (info[2] & (1 << 28)) && (_xgetbv(0) & 6) == 6) {
            __cpuidex(info, 7, 0);
            buttress_bloom_avx2 = (info[1] & (1 << 5)) ? 1 : 0;
        }
    }
#endif
}

/* The bitset is little-endian on disk and in memory on every host. */
BUTTRESS_INLINE uint32_t buttress_le32(uint32_t v) {
#ifdef BUTTRESS_BIG_ENDIAN
    return buttress_bswap32(v);
#else
    return v;
#endif
}

BUTTRESS_INLINE uint64_t buttress_block_index(uint64_t h, uint64_t num_blocks) {
    return ((h >> 32) * num_blocks) >> 32;
}

/* floor(h * m / 2**64): maps a 64-bit hash onto [0, m) without a division. */
BUTTRESS_INLINE uint64_t buttress_fastrange64(uint64_t h, uint64_t m) {
#if defined(__SIZEOF_INT128__)
    return (uint64_t)(((unsigned __int128)h * m) >> 64);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_AMD64)) && !defined(_M_ARM64EC)
    uint64_t high;
    (void)_umul128(h, m, &high);
    return high;
#else
    uint64_t h_lo = (uint32_t)h, h_hi = h >> 32, m_lo = (uint32_t)m, m_hi = m >> 32;
    uint64_t lo_lo = h_lo * m_lo, hi_lo = h_hi * m_lo, lo_hi = h_lo * m_hi;
    uint64_t cross = (lo_lo >> 32) + (uint32_t)hi_lo + (uint32_t)lo_hi;
    return h_hi * m_hi + (hi_lo >> 32) + (lo_hi >> 32) + (cross >> 32);
#endif
}

BUTTRESS_INLINE uint64_t buttress_popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return (uint64_t)__builtin_popcountll(x);
#else
    x = x - ((x >> 1) & UINT64_C(0x5555555555555555));
    x = (x & UINT64_C(0x3333333333333333)) + ((x >> 2) & UINT64_C(0x3333333333333333));
    x = (x + (x >> 4)) & UINT64_C(0x0F0F0F0F0F0F0F0F);
    return (x * UINT64_C(0x0101010101010101)) >> 56;
#endif
}

/* ---- split block, portable ---- */
BUTTRESS_INLINE void buttress_sbbf_insert_block(uint8_t *block, uint32_t x) {
    for (int w = 0; w < 8; w++) {
        uint32_t word;
        memcpy(&word, block + 4 * w, 4);
        word |= buttress_le32(1U << ((x * buttress_salt[w]) >> 27));
        memcpy(block + 4 * w, &word, 4);
    }
}

static void buttress_sbbf_insert_scalar(uint8_t *bits, uint64_t num_blocks,
                                        const uint64_t *hashes, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint64_t h = hashes[i];
        buttress_sbbf_insert_block(bits + 32 * buttress_block_index(h, num_blocks), (uint32_t)h);
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
BUTTRESS_TARGET_AVX2
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

BUTTRESS_TARGET_AVX2
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

/* Keep the hashes whose block lies in [first_block, end_block): the share of a
 * batch one thread inserts when several split the bit array between them.
 * Returns how many were kept (written to `out`). */
static size_t buttress_sbbf_select(uint64_t num_blocks, const uint64_t *hashes, size_t n,
                                   uint64_t first_block, uint64_t end_block, uint64_t *out) {
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t block = buttress_block_index(hashes[i], num_blocks);
        out[kept] = hashes[i];
        kept += (block >= first_block) & (block < end_block);
    }
    return kept;
}

/* ---- classic: double hashing over a prime modulus ---- */
BUTTRESS_INLINE void buttress_classic_start(uint64_t h, uint64_t modulus,
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

/* Set only the bits that fall in bytes [first_byte, end_byte): one thread's
 * share when several insert one batch into disjoint parts of the array, so no
 * byte is ever written by two threads (exact, no atomics). */
static void buttress_classic_insert_range(uint8_t *bits, uint64_t modulus, int k,
                                          const uint64_t *hashes, size_t n,
                                          uint64_t first_byte, uint64_t end_byte) {
    for (size_t i = 0; i < n; i++) {
        uint64_t x, y;
        buttress_classic_start(hashes[i], modulus, &x, &y);
        for (int j = 0; j < k; j++) {
            uint64_t byte = x >> 3;
            if (byte >= first_byte && byte < end_byte) bits[byte] |= (uint8_t)(1U << (x & 7));
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
        total += buttress_popcount64(word);
    }
    for (; i < length; i++) total += buttress_popcount64(data[i]);
    return total;
}

#endif /* BUTTRESS_BLOOM_KERNELS_H */
