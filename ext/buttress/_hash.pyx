"""XXH64, written for buttress from the public xxHash specification.

Bit-identical with ``xxhash.xxh64_intdigest`` (the tests check every length
0..4096 and the specification's known-answer vectors).  The kernels are plain
C in ``xxh64.h``; this module applies the key rule and reads key batches.

The key-encoding rule, used by every buttress component that hashes keys
(Bloom filters, dedupe fingerprints, ...):

* ``str`` -> its UTF-8 bytes;
* ``bytes``, ``bytearray``, ``memoryview`` -> as is: the bytes ``bytes(key)``
  gives (a non-contiguous memoryview hashes the bytes it shows, in C order);
* ``int`` and numpy integer scalars (``bool`` excluded) -> 8 bytes little-endian:
  two's complement when it fits int64, else unsigned when it fits uint64, else
  ``OverflowError``;
* anything else -> ``TypeError`` naming the type.

Batches follow the same rule element by element, without a Python object per
key:

* numpy integer arrays: each value's 8-byte encoding; fixed-width bytes arrays
  (dtype ``'S'``) without numpy's trailing NUL padding, and unicode arrays
  (dtype ``'U'``) as the UTF-8 of each element without trailing NULs, exactly
  as ``arr.tolist()`` would hand them over;
* Arrow arrays, chunked arrays, and anything exporting the Arrow PyCapsule
  interface (``__arrow_c_array__`` / ``__arrow_c_stream__``: pyarrow, polars,
  pandas, DuckDB results; a one-column table is its column): integers of every
  width by the int rule, string / large_string / string_view as UTF-8 (the same
  hash as the ``str``), binary / large_binary / binary_view / fixed_size_binary
  as is; a dictionary-encoded column of those as its values (each dictionary
  entry is hashed once per chunk, then the keys gather by their indices).
  Nulls are not keys (in a dictionary column: a null index or a null entry):
  a Bloom filter skips them on insert and answers False for them;
  ``xxh64_many`` refuses them (ValueError).  Other Arrow types (floats, bool,
  lists, structs, temporal types, dictionaries of those) raise TypeError
  naming the type.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from buttress._keys import as_key_array  # one rule for numpy keys, shared with the twin

cimport cython

cdef extern from "arrow_c.h":
    struct ArrowSchema:
        const char* format
        const char* name
        int64_t n_children
        ArrowSchema** children
        ArrowSchema* dictionary
        void* release

    struct ArrowArray:
        int64_t length
        int64_t null_count
        int64_t offset
        int64_t n_buffers
        int64_t n_children
        const void** buffers
        ArrowArray** children
        ArrowArray* dictionary
        void* release

    struct ArrowArrayStream:
        int (*get_schema)(ArrowArrayStream*, ArrowSchema*) noexcept
        int (*get_next)(ArrowArrayStream*, ArrowArray*) noexcept
        const char* (*get_last_error)(ArrowArrayStream*) noexcept
        void* release

    void release_array "buttress_arrow_release_array"(ArrowArray* array) noexcept
    void release_schema "buttress_arrow_release_schema"(ArrowSchema* schema) noexcept


# numpy 2's StringDType C API, called through numpy's API table (the slots
# are fixed for numpy >= 2.0) so this module still builds and runs with
# numpy 1.x, which has no StringDType.
ctypedef struct NpyStaticString:
    size_t size
    const char* buf
ctypedef int (*npstring_load_fn)(void* allocator, const void* packed,
                                 NpyStaticString* out) noexcept nogil
ctypedef void* (*npstring_acquire_fn)(const void* descr) noexcept nogil
ctypedef void (*npstring_release_fn)(void* allocator) noexcept nogil

cdef npstring_load_fn npstring_load = NULL
cdef npstring_acquire_fn npstring_acquire = NULL
cdef npstring_release_fn npstring_release = NULL


cdef int bind_numpy_string_api() except -1:
    global npstring_load, npstring_acquire, npstring_release
    if int(np.__version__.split(".")[0]) < 2:
        return 0
    from numpy._core import _multiarray_umath
    cdef void** api = <void**>PyCapsule_GetPointer(_multiarray_umath._ARRAY_API, NULL)
    npstring_load = <npstring_load_fn>api[313]       # NpyString_load
    npstring_acquire = <npstring_acquire_fn>api[316]  # NpyString_acquire_allocator
    npstring_release = <npstring_release_fn>api[318]  # NpyString_release_allocator
    return 0


bind_numpy_string_api()


# A numpy 'U' element is hashed from a stack buffer up to this many bytes of
# UTF-8 (256 characters); longer elements use one heap buffer per call.
cdef enum:
    UTF8_STACK = 1024


cdef inline uint64_t load_int(const unsigned char* p, Py_ssize_t width, bint is_signed) noexcept nogil:
    # Arrow integers by the int rule: sign- or zero-extended to 64 bits.
    cdef int8_t i8
    cdef int16_t i16
    cdef int32_t i32
    cdef uint16_t u16
    cdef uint32_t u32
    cdef uint64_t u64
    if width == 8:
        memcpy(&u64, p, 8)
        return u64
    if width == 4:
        if is_signed:
            memcpy(&i32, p, 4)
            return <uint64_t><int64_t>i32
        memcpy(&u32, p, 4)
        return u32
    if width == 2:
        if is_signed:
            memcpy(&i16, p, 2)
            return <uint64_t><int64_t>i16
        memcpy(&u16, p, 2)
        return u16
    if is_signed:
        i8 = <int8_t>p[0]
        return <uint64_t><int64_t>i8
    return p[0]


ctypedef fused arrow_offset:
    int32_t
    int64_t


cdef enum:
    # hash_by_offsets decides fixed-width or not per run of this many keys, so
    # the offsets it scans are still in cache when the keys are hashed.
    OFFSETS_RUN = 64


cdef inline void hash_by_offsets(const arrow_offset* offsets, const unsigned char* values,
                                 Py_ssize_t n, uint64_t seed, uint64_t* out) noexcept nogil:
    # Arrow (large_)string/binary: key i is values[offsets[i]:offsets[i + 1]].
    # Keys of one length (ids, codes, fixed-format strings) are common: a run of
    # them is hashed as fixed-width keys, one loop with no offset loads, whose
    # hashes the CPU overlaps better (measured: 13-byte ids 4.3 against 5.1 ns).
    cdef Py_ssize_t i, run, done = 0
    cdef int64_t begin, end, width
    cdef arrow_offset step, mismatch
    while done < n:
        run = min(<Py_ssize_t>OFFSETS_RUN, n - done)
        begin = offsets[done]
        width = offsets[done + 1] - begin
        step = <arrow_offset>width
        mismatch = 0
        for i in range(done + 1, done + run):  # no early exit: the scan vectorizes
            mismatch |= (offsets[i + 1] - offsets[i]) ^ step
        if mismatch == 0:
            xxh64_fixed_width(values + begin, run, <Py_ssize_t>width, False, seed, out + done)
        else:
            for i in range(done, done + run):
                end = offsets[i + 1]
                out[i] = xxh64_bytes(values + begin, <size_t>(end - begin), seed)
                begin = end
        done += run


ctypedef fused dict_index:
    int8_t
    uint8_t
    int16_t
    uint16_t
    int32_t
    uint32_t
    int64_t
    uint64_t


cdef inline void gather_hashes(const dict_index* indices, const uint64_t* hashes,
                               Py_ssize_t size, Py_ssize_t n, uint64_t* out) noexcept nogil:
    # A dictionary-encoded key's hash is its dictionary entry's, hashed once per
    # chunk.  A null slot's index may be anything: out of range gives 0 (unused).
    cdef Py_ssize_t i
    cdef uint64_t index
    for i in range(n):
        index = <uint64_t><int64_t>indices[i]
        out[i] = hashes[index] if index < <uint64_t>size else 0


cdef void gather_dict(const KeySource* src, Py_ssize_t start, Py_ssize_t n,
                      uint64_t* out) noexcept nogil:
    cdef const unsigned char* at = src.values + (src.offset + start) * src.width
    if src.width == 4:
        if src.is_signed:
            gather_hashes(<const int32_t*>at, src.ints, src.dict_size, n, out)
        else:
            gather_hashes(<const uint32_t*>at, src.ints, src.dict_size, n, out)
    elif src.width == 1:
        if src.is_signed:
            gather_hashes(<const int8_t*>at, src.ints, src.dict_size, n, out)
        else:
            gather_hashes(<const uint8_t*>at, src.ints, src.dict_size, n, out)
    elif src.width == 2:
        if src.is_signed:
            gather_hashes(<const int16_t*>at, src.ints, src.dict_size, n, out)
        else:
            gather_hashes(<const uint16_t*>at, src.ints, src.dict_size, n, out)
    elif src.is_signed:
        gather_hashes(<const int64_t*>at, src.ints, src.dict_size, n, out)
    else:
        gather_hashes(<const uint64_t*>at, src.ints, src.dict_size, n, out)


cdef void hash_source(const KeySource* src, Py_ssize_t start, Py_ssize_t n, uint64_t seed,
                      uint64_t* out) noexcept nogil:
    """Hash keys ``start .. start + n`` of ``src`` into ``out`` (nulls get an unused value)."""
    cdef Py_ssize_t i, j, length
    cdef const unsigned char* view
    cdef int32_t size, buffer_index, buffer_offset
    cdef unsigned char stack[UTF8_STACK]
    cdef unsigned char* scratch
    cdef void* allocator
    cdef NpyStaticString unpacked
    cdef int kind = src.kind
    if kind == KEYS_HASHES:
        memcpy(out, src.ints + start, n * sizeof(uint64_t))
    elif kind == KEYS_DICT:
        gather_dict(src, start, n, out)
    elif kind == KEYS_U64:
        for i in range(n):
            out[i] = xxh64_u64(src.ints[start + i], seed)
    elif kind == KEYS_INT:
        for i in range(n):
            out[i] = xxh64_u64(load_int(src.values + (src.offset + start + i) * src.width,
                                        src.width, src.is_signed), seed)
    elif kind == KEYS_FIXED:
        xxh64_fixed_width(src.values + (src.offset + start) * src.width, n, src.width,
                          src.strip_nul, seed, out)
    elif kind == KEYS_OFFSETS32:
        hash_by_offsets(<const int32_t*>src.offsets + src.offset + start, src.values, n, seed,
                        out)
    elif kind == KEYS_OFFSETS64:
        hash_by_offsets(<const int64_t*>src.offsets + src.offset + start, src.values, n, seed,
                        out)
    elif kind == KEYS_VIEWS:
        # 16-byte views: int32 length, then the bytes inline (<= 12) or a
        # 4-byte prefix, the data buffer's index and the offset in it.
        for i in range(n):
            view = src.values + 16 * (src.offset + start + i)
            memcpy(&size, view, 4)
            if size <= 12:
                out[i] = xxh64_bytes(view + 4, <size_t>size, seed)
            else:
                memcpy(&buffer_index, view + 8, 4)
                memcpy(&buffer_offset, view + 12, 4)
                out[i] = xxh64_bytes(src.buffers[buffer_index] + buffer_offset, <size_t>size,
                                     seed)
    elif kind == KEYS_UCS4:
        if src.width <= UTF8_STACK:
            scratch = &stack[0]
        else:
            scratch = <unsigned char*>malloc(src.width)
        if scratch == NULL:  # out of memory: the caller validated, so hash nothing new
            return
        for i in range(n):
            length = ucs4_to_utf8(<const uint32_t*>(src.values + (start + i) * src.width),
                                  src.width // 4, scratch)
            out[i] = xxh64_bytes(scratch, <size_t>length, seed)
        if scratch != &stack[0]:
            free(scratch)
    elif kind == KEYS_NPSTRING:
        # the allocator's lock is held per window, never across Python code
        allocator = npstring_acquire(src.descr)
        for i in range(n):
            if npstring_load(allocator, src.values + (start + i) * src.width, &unpacked) == 0:
                out[i] = xxh64_bytes(<const unsigned char*>unpacked.buf, unpacked.size, seed)
            else:  # a null (1) or a damaged string (-1): not hashed
                out[i] = 0
        npstring_release(allocator)
    else:  # KEYS_NULL
        for i in range(n):
            out[i] = 0


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
    cdef int overflow = 0
    cdef long long value
    cdef const unsigned char[::1] view
    if type(key) is str:
        utf8 = PyUnicode_AsUTF8AndSize(key, &size)
        return xxh64_bytes(<const unsigned char*>utf8, <size_t>size, seed)
    if type(key) is bytes:
        return xxh64_bytes(<const unsigned char*>PyBytes_AS_STRING(key),
                           <size_t>PyBytes_GET_SIZE(key), seed)
    if type(key) is int:
        value = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:  # fits int64: its two's complement, with no Python arithmetic
            return xxh64_u64(<uint64_t>value, seed)
        return xxh64_u64(int_key(key), seed)
    if isinstance(key, bool):
        raise TypeError("bool is not a supported key type (use int or str explicitly)")
    if isinstance(key, str):
        # a str subclass hashes its characters; no __str__ of the subclass runs
        utf8 = PyUnicode_AsUTF8AndSize(key, &size)
        return xxh64_bytes(<const unsigned char*>utf8, <size_t>size, seed)
    if isinstance(key, int):
        return xxh64_u64(int_key(int(key)), seed)
    if isinstance(key, np.integer):
        return xxh64_u64(int_key(int(key)), seed)
    if isinstance(key, (bytes, bytearray, memoryview)):
        return xxh64_bytes_like(key, seed)
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, "
        f"bytes-like or int"
    )


cdef uint64_t xxh64_bytes_like(object key, uint64_t seed) except? 0:
    # As is: the bytes bytes(key) gives.  A non-contiguous memoryview (a slice
    # with a step, a transposed array) is copied into C order first.
    cdef const unsigned char[::1] view
    buffer = memoryview(key)
    if not buffer.c_contiguous:
        buffer = memoryview(buffer.tobytes())
    view = buffer.cast("B") if buffer.ndim != 1 or buffer.format != "B" else buffer
    if view.shape[0] == 0:
        return xxh64_bytes(<const unsigned char*>"", 0, seed)
    return xxh64_bytes(&view[0], <size_t>view.shape[0], seed)


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
    # str.encode and the buffer, not key.encode() or bytes(key): a subclass's
    # encode() or __bytes__ must not change the key (hashing reads the buffer)
    if isinstance(key, str):
        return str.encode(key, "utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return memoryview(key).tobytes()
    if isinstance(key, (int, np.integer)):
        return int_key(int(key)).to_bytes(8, "little")
    raise TypeError(
        f"unsupported key type {type(key).__name__!r}: keys must be str, "
        f"bytes-like or int"
    )


def xxh64_many(keys, seed=0):
    """Hash many keys at once; returns a ``numpy.ndarray`` of uint64.

    ``keys`` is a numpy integer, ``'S'`` or ``'U'`` array, an Arrow array or
    chunked array (or anything exporting the Arrow PyCapsule interface), or a
    list/tuple/iterable of str, bytes-like or int keys.  Columnar input is
    hashed with the GIL released and without creating a Python object per key.
    A null has no hash: Arrow input with nulls raises ``ValueError``.
    """
    cdef uint64_t s = check_seed(seed)
    cdef KeyChunk chunk
    cdef uint64_t[::1] out_view
    parts = []
    for chunk in iter_key_chunks(keys, s, "xxh64_many"):
        if chunk.src.count == 0:
            continue
        if chunk.src.validity != NULL or chunk.src.kind == KEYS_NULL:
            raise ValueError(
                    f"xxh64_many: the keys hold {chunk.src.null_count} null(s), which have "
                    f"no hash; drop them first (pyarrow.compute.drop_null, Series.drop_nulls)")
        if chunk.src.kind == KEYS_HASHES:
            parts.append(chunk.owner)
            continue
        out = np.empty(chunk.src.count, dtype=np.uint64)
        out_view = out
        with nogil:
            hash_source(&chunk.src, 0, chunk.src.count, s, &out_view[0])
        parts.append(out)
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, dtype=np.uint64)
    return np.concatenate(parts)


# ---------------------------------------------------------------------- key batches

cdef class KeyChunk:
    """One contiguous run of keys (``src``) and the objects owning its memory."""

    @property
    def count(self):
        return self.src.count

    @property
    def null_count(self):
        return self.src.null_count if self.src.kind != KEYS_NULL else self.src.count


cdef class _ArrowArrayHolder:
    """Owns one ArrowArray moved out of a stream; releases it when dropped."""
    cdef ArrowArray array
    cdef object keep

    def __cinit__(self):
        self.array.release = NULL

    def __dealloc__(self):
        release_array(&self.array)


cdef class _ArrowSchemaHolder:
    cdef ArrowSchema schema

    def __cinit__(self):
        self.schema.release = NULL

    def __dealloc__(self):
        release_schema(&self.schema)


def iter_key_chunks(keys, uint64_t seed=0, str caller="insert_many/contains_many"):
    """Yield the batch ``keys`` as :class:`KeyChunk` runs (one per Arrow chunk).

    Python keys are hashed here with ``seed`` (the only per-key Python work);
    columnar keys are described, not copied.  A stream's chunks are pulled one
    at a time, so only one chunk is held at once.
    """
    array = as_key_array(keys)
    if array is not None:
        yield string_dtype_chunk(array) if array.dtype.kind == "T" else numpy_chunk(array)
        return
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{caller} take(s) a collection of keys, not a single "
                        f"{type(keys).__name__} key")
    exported = export_arrow(keys)
    if exported is None:
        yield python_chunk(keys, seed)
        return
    kind, capsules = exported
    if kind == "array":
        yield array_chunk(capsules, seed)
        return
    yield from stream_chunks(capsules, seed)


cdef object export_arrow(keys):
    """The object's Arrow PyCapsules, or None if it exports none.

    A producer that cannot export (pandas without pyarrow, an object column
    holding mixed types) falls back to the Python-keys path, as before.
    """
    if isinstance(keys, (list, tuple)):
        return None
    try:
        if hasattr(keys, "__arrow_c_stream__"):
            return "stream", keys.__arrow_c_stream__()
        if hasattr(keys, "__arrow_c_array__"):
            return "array", keys.__arrow_c_array__()
    except (ImportError, TypeError, ValueError, NotImplementedError):
        if hasattr(keys, "__iter__"):
            return None
        raise
    return None


cdef KeyChunk python_chunk(keys, uint64_t seed):
    cdef KeyChunk chunk = KeyChunk.__new__(KeyChunk)
    cdef uint64_t[::1] hashes_view
    cdef Py_ssize_t i, n
    cdef list items
    if type(keys) is list:
        items = keys
    elif type(keys) is tuple:
        items = list(keys)
    else:
        # Not list(keys): it sizes the list by __len__ first, the caller's code,
        # which may lie (a huge length is a MemoryError) or raise.
        items = [key for key in keys]
    n = len(items)
    hashes = np.empty(n, dtype=np.uint64)
    if n:
        hashes_view = hashes
        for i in range(n):
            # Hashing a key may run Python code (a subclass's __int__, a
            # finaliser) that shrinks the caller's list: check the size before
            # every read instead of trusting the length taken at the start.
            if i >= len(items):
                raise RuntimeError(f"the list of keys shrank from {n} to {len(items)} "
                                   f"items while it was being hashed")
            hashes_view[i] = hash_object(items[i], seed)
        chunk.src.ints = &hashes_view[0]
    chunk.src.kind = KEYS_HASHES
    chunk.src.count = n
    chunk.owner = hashes
    return chunk


cdef KeyChunk string_dtype_chunk(array):
    """A numpy 2 StringDType array, read through numpy's string API (no str objects)."""
    cdef KeyChunk chunk = KeyChunk.__new__(KeyChunk)
    cdef Py_ssize_t i, count = array.shape[0], nulls = 0
    cdef uint8_t[::1] bits
    cdef void* allocator
    cdef NpyStaticString unpacked
    cdef const unsigned char* data
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    dtype = array.dtype
    chunk.owner = (array, dtype)
    chunk.src.count = count
    if count == 0:
        chunk.src.kind = KEYS_HASHES
        return chunk
    if npstring_load == NULL:
        raise TypeError("StringDType arrays need numpy >= 2")
    data = <const unsigned char*><size_t>array.ctypes.data
    chunk.src.kind = KEYS_NPSTRING
    chunk.src.values = data
    chunk.src.width = dtype.itemsize
    chunk.src.descr = <const void*>dtype
    if getattr(dtype, "na_object", _NO_NA) is _NO_NA:
        return chunk
    validity = np.zeros((count + 7) // 8, dtype=np.uint8)
    bits = validity
    with nogil:
        allocator = npstring_acquire(chunk.src.descr)
        for i in range(count):
            if npstring_load(allocator, data + i * chunk.src.width, &unpacked) == 0:
                bits[i >> 3] |= <uint8_t>(1 << (i & 7))
            else:
                nulls += 1
        npstring_release(allocator)
    if nulls:
        chunk.owner = (array, dtype, validity)
        chunk.src.validity = &bits[0]
        chunk.src.null_count = nulls
    return chunk


_NO_NA = object()


@cython.boundscheck(False)
cdef KeyChunk numpy_chunk(array):
    cdef KeyChunk chunk = KeyChunk.__new__(KeyChunk)
    cdef const uint64_t[::1] ints
    cdef const unsigned char[::1] raw
    cdef Py_ssize_t bad
    chunk.owner = array
    chunk.src.count = array.shape[0]
    if chunk.src.count == 0:
        chunk.src.kind = KEYS_HASHES
        return chunk
    kind = array.dtype.kind
    if kind == "u":
        ints = array
        chunk.src.kind = KEYS_U64
        chunk.src.ints = &ints[0]
        return chunk
    raw = array.view(np.uint8)
    chunk.src.values = &raw[0]
    chunk.src.width = array.dtype.itemsize
    if kind == "S":
        chunk.src.kind = KEYS_FIXED
        chunk.src.strip_nul = True
        return chunk
    # 'U': UCS-4 code points, hashed as UTF-8; refuse what str.encode() refuses
    if not array.flags.aligned:
        array = array.copy()
        chunk.owner = array
        raw = array.view(np.uint8)
        chunk.src.values = &raw[0]
    chunk.src.kind = KEYS_UCS4
    with nogil:
        bad = ucs4_first_unencodable(<const uint32_t*>chunk.src.values,
                                     chunk.src.count * (chunk.src.width // 4))
    if bad >= 0:
        code_point = (<const uint32_t*>chunk.src.values)[bad]
        if code_point > 0x10FFFF:  # numpy cannot even make a str of this element
            raise ValueError(f"'U' array element {bad // (chunk.src.width // 4)} holds "
                             f"{code_point:#x}, which is not a Unicode code point")
        text = str(array[bad // (chunk.src.width // 4)])
        position = bad % (chunk.src.width // 4)
        raise UnicodeEncodeError("utf-8", text, position, position + 1,
                                 "surrogates not allowed")
    return chunk


cdef KeyChunk array_chunk(capsules, uint64_t seed):
    schema_capsule, array_capsule = capsules
    cdef ArrowSchema* schema = <ArrowSchema*>PyCapsule_GetPointer(schema_capsule, "arrow_schema")
    cdef ArrowArray* array = <ArrowArray*>PyCapsule_GetPointer(array_capsule, "arrow_array")
    return arrow_chunk(schema, array, capsules, seed)


def stream_chunks(capsule, uint64_t seed=0):
    """Pull an Arrow stream chunk by chunk."""
    cdef ArrowArrayStream* stream = <ArrowArrayStream*>PyCapsule_GetPointer(
        capsule, "arrow_array_stream")
    cdef _ArrowSchemaHolder schema = _ArrowSchemaHolder()
    cdef _ArrowArrayHolder holder
    if stream.get_schema(stream, &schema.schema) != 0:
        raise stream_error(stream, "reading the stream's schema")
    check_arrow_type(&schema.schema)  # also for an empty stream
    while True:
        holder = _ArrowArrayHolder()
        if stream.get_next(stream, &holder.array) != 0:
            raise stream_error(stream, "reading the next chunk")
        if holder.array.release == NULL:  # end of stream
            return
        holder.keep = (schema, capsule)
        yield arrow_chunk(&schema.schema, &holder.array, holder, seed)


cdef object stream_error(ArrowArrayStream* stream, str doing):
    cdef const char* message = stream.get_last_error(stream)
    detail = message.decode("utf-8", "replace") if message != NULL else "no detail given"
    return ValueError(f"the Arrow stream failed while {doing}: {detail}")


# Arrow format strings -> type names for messages.
_ARROW_NAMES = {
    "n": "null", "b": "bool", "c": "int8", "C": "uint8", "s": "int16", "S": "uint16",
    "i": "int32", "I": "uint32", "l": "int64", "L": "uint64", "e": "float16 (halffloat)",
    "f": "float32 (float)", "g": "float64 (double)", "z": "binary", "Z": "large_binary",
    "u": "string", "U": "large_string", "vz": "binary_view", "vu": "string_view",
    "+l": "list", "+L": "large_list", "+vl": "list_view", "+vL": "large_list_view",
    "+s": "struct", "+m": "map", "+r": "run_end_encoded", "+ud": "dense_union",
    "+us": "sparse_union", "tdD": "date32", "tdm": "date64",
}
_INT_FORMATS = {"c": (1, True), "C": (1, False), "s": (2, True), "S": (2, False),
                "i": (4, True), "I": (4, False), "l": (8, True), "L": (8, False)}
_BYTES_FORMATS = {"u", "U", "z", "Z", "vu", "vz"}
_TIME_UNITS = {"s": "s", "m": "ms", "u": "us", "n": "ns"}


cdef str arrow_type_name(ArrowSchema* schema):
    fmt = schema.format.decode("utf-8", "replace")
    if schema.dictionary != NULL:
        return (f"dictionary<values={arrow_type_name(schema.dictionary)}, "
                f"indices={_ARROW_NAMES.get(fmt, fmt)}>")
    if fmt in _ARROW_NAMES:
        name = _ARROW_NAMES[fmt]
        if fmt in ("+l", "+L", "+vl", "+vL") and schema.n_children == 1:
            return f"{name}<{arrow_type_name(schema.children[0])}>"
        if fmt == "+s":
            fields = ", ".join(
                f"{(schema.children[i].name or b'').decode('utf-8', 'replace')}: "
                f"{arrow_type_name(schema.children[i])}" for i in range(schema.n_children))
            return f"struct<{fields}>"
        return name
    if fmt.startswith("w:"):
        return f"fixed_size_binary[{fmt[2:]}]"
    if fmt.startswith("d:"):
        return f"decimal({fmt[2:]})"
    if fmt[:2] in ("ts", "tD", "tt") and fmt[2:3] in _TIME_UNITS:
        # "tsu:UTC" is timestamp[us, tz=UTC], "tDs" duration[s], "ttn" time64[ns]
        unit = _TIME_UNITS[fmt[2:3]]
        if fmt.startswith("ts"):
            zone = fmt[4:]
            return f"timestamp[{unit}, tz={zone}]" if zone else f"timestamp[{unit}]"
        if fmt.startswith("tD"):
            return f"duration[{unit}]"
        return f"time{32 if unit in ('s', 'ms') else 64}[{unit}]"
    return f"Arrow format {fmt!r}"


cdef bint plain_key_type(ArrowSchema* schema):
    fmt = schema.format.decode("utf-8", "replace")
    return schema.dictionary == NULL and (fmt in _INT_FORMATS or fmt in _BYTES_FORMATS
                                          or fmt == "n" or fmt.startswith("w:"))


cdef ArrowSchema* check_arrow_type(ArrowSchema* schema) except NULL:
    """The schema of the key column (a one-column table's column), or TypeError.

    A dictionary-encoded column is a key column when its values are.
    """
    if schema.dictionary == NULL and schema.format.decode("utf-8", "replace") == "+s" \
            and schema.n_children == 1:
        schema = schema.children[0]
    if plain_key_type(schema):
        return schema
    if schema.dictionary != NULL and schema.format.decode("utf-8", "replace") in _INT_FORMATS \
            and plain_key_type(schema.dictionary):
        return schema
    raise TypeError(
        f"unsupported Arrow key type {arrow_type_name(schema)}: keys must be integers "
        f"(int8..uint64), string, large_string, string_view, binary, large_binary, "
        f"binary_view or fixed_size_binary, or a dictionary of those; cast the column "
        f"first (a one-column table is read as its column)")


cdef Py_ssize_t count_nulls(const KeySource* src, Py_ssize_t count) noexcept nogil:
    cdef Py_ssize_t i, nulls = 0
    for i in range(count):
        nulls += key_is_null(src, i)
    return nulls


cdef KeyChunk arrow_chunk(ArrowSchema* schema, ArrowArray* array, object owner,
                         uint64_t seed):
    cdef KeyChunk chunk = KeyChunk.__new__(KeyChunk)
    cdef ArrowSchema* column = check_arrow_type(schema)
    cdef int64_t offset = array.offset
    cdef int64_t length = array.length
    cdef int64_t null_count = array.null_count
    if column != schema:  # a one-column table: descend into the column
        if array.null_count != 0 and array.buffers[0] != NULL:
            raise ValueError("a table-like Arrow struct with null rows is not a key column")
        array = array.children[0]
        offset += array.offset
        # The child's null_count covers the whole child, which a sliced table
        # shows only part of: count the nulls of the rows it shows.
        null_count = -1 if array.null_count != 0 else 0
    chunk.owner = owner
    chunk.src.count = length
    chunk.src.offset = offset
    chunk.src.null_count = null_count
    if array.null_count != 0 and array.n_buffers > 0 and array.buffers[0] != NULL:
        chunk.src.validity = <const uint8_t*>array.buffers[0]
    else:
        chunk.src.null_count = 0
    if chunk.src.null_count < 0:  # the producer did not count them
        chunk.src.null_count = count_nulls(&chunk.src, length)
        if chunk.src.null_count == 0:
            chunk.src.validity = NULL
    fmt = column.format.decode("utf-8", "replace")
    if length == 0:
        chunk.src.kind = KEYS_HASHES
        chunk.src.validity = NULL
        chunk.src.null_count = 0
    elif column.dictionary != NULL:
        chunk.src.values = <const unsigned char*>array.buffers[1]
        chunk.src.width, chunk.src.is_signed = _INT_FORMATS[fmt]
        dictionary_chunk(chunk, column.dictionary, array.dictionary, seed)
    elif fmt == "n":
        chunk.src.kind = KEYS_NULL
        chunk.src.validity = NULL
        chunk.src.null_count = length
    elif fmt in _INT_FORMATS:
        chunk.src.kind = KEYS_INT
        chunk.src.width, chunk.src.is_signed = _INT_FORMATS[fmt]
        chunk.src.values = <const unsigned char*>array.buffers[1]
    elif fmt.startswith("w:"):
        chunk.src.kind = KEYS_FIXED
        chunk.src.width = int(fmt[2:])
        chunk.src.strip_nul = False
        chunk.src.values = <const unsigned char*>array.buffers[1]
    elif fmt in ("u", "z"):
        chunk.src.kind = KEYS_OFFSETS32
        chunk.src.offsets = array.buffers[1]
        chunk.src.values = <const unsigned char*>array.buffers[2]
    elif fmt in ("U", "Z"):
        chunk.src.kind = KEYS_OFFSETS64
        chunk.src.offsets = array.buffers[1]
        chunk.src.values = <const unsigned char*>array.buffers[2]
    else:  # "vu", "vz": views, then the variadic data buffers, then their sizes
        chunk.src.kind = KEYS_VIEWS
        chunk.src.values = <const unsigned char*>array.buffers[1]
        chunk.src.buffers = <const unsigned char**>(array.buffers + 2)
    return chunk


cdef int dictionary_chunk(KeyChunk chunk, ArrowSchema* schema, ArrowArray* dictionary,
                          uint64_t seed) except -1:
    """Make ``chunk`` (its indices, validity and offset set) read a dictionary-encoded
    column: hash the dictionary's entries once, then each key is a gather.

    A key is null when its index is null or its dictionary entry is null.
    """
    cdef KeyChunk entries = arrow_chunk(schema, dictionary, None, seed)
    cdef Py_ssize_t size = entries.src.count, i, count = chunk.src.count, nulls = 0
    cdef uint64_t index
    cdef uint64_t[::1] hashes_view
    cdef uint8_t[::1] entry_nulls_view
    cdef uint8_t[::1] bits
    cdef KeySource* src = &chunk.src
    hashes = np.zeros(max(size, 1), dtype=np.uint64)
    hashes_view = hashes
    if size:
        with nogil:
            hash_source(&entries.src, 0, size, seed, &hashes_view[0])
    src.kind = KEYS_DICT
    src.ints = &hashes_view[0]
    src.dict_size = size
    chunk.owner = (chunk.owner, hashes)
    if entries.src.validity == NULL and entries.src.kind != KEYS_NULL:
        return 0
    # Null entries: fold them into one validity bitmap for this chunk's keys,
    # which then start at bit 0 (the indices' offset moves into `values`).
    entry_nulls = np.zeros(max(size, 1), dtype=np.uint8)
    entry_nulls_view = entry_nulls
    validity = np.zeros((count + 7) // 8, dtype=np.uint8)
    bits = validity
    with nogil:
        for i in range(size):
            entry_nulls_view[i] = key_is_null(&entries.src, i)
        for i in range(count):
            if key_is_null(src, i):
                nulls += 1
                continue
            index = <uint64_t>load_int(src.values + (src.offset + i) * src.width, src.width,
                                       src.is_signed)
            if index < <uint64_t>size and entry_nulls_view[index]:
                nulls += 1
                continue
            bits[i >> 3] |= <uint8_t>(1 << (i & 7))
    src.values += src.offset * src.width
    src.offset = 0
    src.validity = &bits[0] if count else NULL
    src.null_count = nulls
    if nulls == 0:
        src.validity = NULL
    chunk.owner = (chunk.owner, validity)
    return 0
