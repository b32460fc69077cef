/*
 * C kernels of buttress._heap that need compiler builtins, with portable
 * fallbacks.  Declared in _heap.pxd (the way numpy.random keeps its C kernels
 * in distributions.h), so the Cython source holds no C text.
 *
 * Each builtin has three spellings: GCC/Clang, MSVC, and plain C.  Defining
 * BUTTRESS_PORTABLE_C forces the plain-C ones (the tests build with it to check
 * that they agree with the builtins).
 */
#ifndef BUTTRESS_HEAP_KERNELS_H
#define BUTTRESS_HEAP_KERNELS_H

#if defined(_MSC_VER) && !defined(BUTTRESS_PORTABLE_C)
#include <intrin.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define BUTTRESS_INLINE static __inline
#else
#define BUTTRESS_INLINE static inline
#endif

/* floor(log2(x)) for x > 0. */
BUTTRESS_INLINE int buttress_log2_floor(unsigned long long x) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(BUTTRESS_PORTABLE_C)
    return 63 - __builtin_clzll(x);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64)) && !defined(BUTTRESS_PORTABLE_C)
    unsigned long index;
    _BitScanReverse64(&index, x);
    return (int)index;
#else
    int level = 0;
    if (x >> 32) { x >>= 32; level += 32; }
    if (x >> 16) { x >>= 16; level += 16; }
    if (x >> 8) { x >>= 8; level += 8; }
    if (x >> 4) { x >>= 4; level += 4; }
    if (x >> 2) { x >>= 2; level += 2; }
    if (x >> 1) { level += 1; }
    return level;
#endif
}

/* The level of heap position i (i >= 0): the root is level 0, its children 1, ... */
BUTTRESS_INLINE int buttress_heap_level(unsigned long long position) {
    return buttress_log2_floor(position + 1);
}

/* A hint to start loading the cache line at address; no effect where unsupported. */
BUTTRESS_INLINE void buttress_prefetch(const void* address) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(BUTTRESS_PORTABLE_C)
    __builtin_prefetch(address);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86)) && !defined(BUTTRESS_PORTABLE_C)
    _mm_prefetch((const char*)address, _MM_HINT_T0);
#else
    (void)address;
#endif
}

#endif /* BUTTRESS_HEAP_KERNELS_H */
