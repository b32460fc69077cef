/* The Arrow C data interface structures, as the Apache Arrow specification
 * fixes them (https://arrow.apache.org/docs/format/CDataInterface.html and
 * CStreamInterface.html).  The ABI is stable; the specification asks every
 * consumer to carry these definitions, guarded so two copies can coexist. */
#ifndef BUTTRESS_ARROW_C_H
#define BUTTRESS_ARROW_C_H

#include <stdint.h>

#ifndef ARROW_C_DATA_INTERFACE
#define ARROW_C_DATA_INTERFACE

#define ARROW_FLAG_DICTIONARY_ORDERED 1
#define ARROW_FLAG_NULLABLE 2
#define ARROW_FLAG_MAP_KEYS_SORTED 4

struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

#endif /* ARROW_C_DATA_INTERFACE */

#ifndef ARROW_C_STREAM_INTERFACE
#define ARROW_C_STREAM_INTERFACE

struct ArrowArrayStream {
    int (*get_schema)(struct ArrowArrayStream *, struct ArrowSchema *out);
    int (*get_next)(struct ArrowArrayStream *, struct ArrowArray *out);
    const char *(*get_last_error)(struct ArrowArrayStream *);
    void (*release)(struct ArrowArrayStream *);
    void *private_data;
};

#endif /* ARROW_C_STREAM_INTERFACE */

#if defined(_MSC_VER)
#  define BUTTRESS_ARROW_INLINE static __inline
#else
#  define BUTTRESS_ARROW_INLINE static inline
#endif

/* Call a release callback through a pointer (Cython cannot call a struct's
 * function-pointer member on a struct it holds by value portably). */
BUTTRESS_ARROW_INLINE void buttress_arrow_release_array(struct ArrowArray *array) {
    if (array->release != NULL) array->release(array);
}
BUTTRESS_ARROW_INLINE void buttress_arrow_release_schema(struct ArrowSchema *schema) {
    if (schema->release != NULL) schema->release(schema);
}

#endif /* BUTTRESS_ARROW_C_H */
