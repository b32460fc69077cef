# The dedupe fingerprint's hot path: XXH64 of a payload's canonical JSON, written as
# UTF-8 straight into a C buffer instead of building the JSON str first.
#
# Canonical JSON is exactly what json.dumps(payload, sort_keys=True, separators=(",", ":"),
# ensure_ascii=False, allow_nan=False) gives.  This encoder writes it for the common
# payloads only: exact dict (str keys), list, tuple, str, int, float, bool and None, nested
# at most MAX_DEPTH deep.  Anything else (another type, a subclass, a non-str key, deeper
# nesting) is handed whole to ``fallback`` (json itself, in buttress.dedupe.core), so the
# two can never disagree on a payload this encoder does not fully understand; a test
# checks they agree on the rest.  The pure-Python twin is that fallback.
#
# Pointers into Python objects (PyUnicode_AsUTF8AndSize) are only used while a
# local variable owns the object: a temporary would be freed before _write reads
# it, and _write's allocation may reuse that very memory.
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport isfinite
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from buttress._hash cimport xxh64_bytes

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

cdef enum:
    MAX_DEPTH = 64  # deeper payloads go to json, which has its own recursion guard
    NOT_HANDLED = 1  # _encode's answer for a value it leaves to the fallback
    STACK_BYTES = 512  # JSON up to this size is written on the stack

cdef const char* HEX = b"0123456789abcdef"


cdef struct Buffer:
    char* data
    Py_ssize_t size
    Py_ssize_t capacity
    bint on_heap  # False while data is the caller's stack array


def canonical_xxh64(payload, fallback):
    """XXH64 (seed 0) of ``payload``'s canonical JSON as UTF-8; ``fallback(payload)`` if the
    payload holds anything but exact dict (str keys), list, tuple, str, int, float, bool, None.

    Raises ValueError where json would (NaN or Infinity) and where the text is not UTF-8
    (a lone surrogate).
    """
    cdef char first[STACK_BYTES]  # most payloads fit: no allocation at all
    cdef Buffer out
    out.data, out.size, out.capacity, out.on_heap = first, 0, STACK_BYTES, False
    try:
        if _encode(&out, payload, 0) == NOT_HANDLED:
            return fallback(payload)
        return xxh64_bytes(<const unsigned char*>out.data, out.size, 0)
    finally:
        if out.on_heap:
            PyMem_Free(out.data)


cdef int _write(Buffer* out, const char* data, Py_ssize_t size) except -1:
    cdef Py_ssize_t needed = out.size + size
    cdef Py_ssize_t capacity = out.capacity
    cdef char* grown
    if needed > capacity:
        while capacity < needed:
            capacity *= 2
        if out.on_heap:
            grown = <char*>PyMem_Realloc(out.data, capacity)
        else:
            grown = <char*>PyMem_Malloc(capacity)
            if grown != NULL:
                memcpy(grown, out.data, out.size)
        if grown == NULL:
            raise MemoryError()
        out.data, out.capacity, out.on_heap = grown, capacity, True
    memcpy(out.data + out.size, data, size)
    out.size = needed
    return 0


cdef int _encode(Buffer* out, object value, int depth) except -1:
    """Append ``value``'s canonical JSON; return NOT_HANDLED (and stop) on anything unknown."""
    cdef type kind = type(value)
    cdef Py_ssize_t size
    cdef const char* text
    cdef str digits  # owns the text ``text`` points into, until it is written
    cdef double number
    if kind is str:
        return _string(out, value)
    if value is None:
        return _write(out, b"null", 4)
    if value is True:
        return _write(out, b"true", 4)
    if value is False:
        return _write(out, b"false", 5)
    if kind is int:
        digits = repr(value)  # exact int: int.__repr__
        text = PyUnicode_AsUTF8AndSize(digits, &size)
        return _write(out, text, size)
    if kind is float:
        number = PyFloat_AS_DOUBLE(value)
        if not isfinite(number):
            raise ValueError(f"Out of range float values are not JSON compliant: {value!r}")
        digits = repr(value)  # exact float: float.__repr__
        text = PyUnicode_AsUTF8AndSize(digits, &size)
        return _write(out, text, size)
    if depth >= MAX_DEPTH:
        return NOT_HANDLED
    if kind is dict:
        return _object(out, <dict>value, depth + 1)
    if kind is list or kind is tuple:
        return _array(out, value, depth + 1)
    return NOT_HANDLED


cdef int _object(Buffer* out, dict mapping, int depth) except -1:
    cdef list keys = list(mapping)
    cdef object key
    cdef bint first = True
    for key in keys:
        # json turns int, float, bool and None keys into strings (and mixed key types fail
        # to sort): all of that is left to json itself.
        if type(key) is not str:
            return NOT_HANDLED
    keys.sort()
    _write(out, b"{", 1)
    for key in keys:
        if not first:
            _write(out, b",", 1)
        first = False
        _string(out, key)
        _write(out, b":", 1)
        if _encode(out, mapping[key], depth) == NOT_HANDLED:
            return NOT_HANDLED
    return _write(out, b"}", 1)


cdef int _array(Buffer* out, object items, int depth) except -1:
    cdef object item
    cdef bint first = True
    _write(out, b"[", 1)
    for item in items:
        if not first:
            _write(out, b",", 1)
        first = False
        if _encode(out, item, depth) == NOT_HANDLED:
            return NOT_HANDLED
    return _write(out, b"]", 1)


cdef int _string(Buffer* out, str text) except -1:
    """A JSON string as json's ensure_ascii=False writes it: only ", \\ and controls escaped."""
    cdef Py_ssize_t size, start = 0, i
    cdef const unsigned char* data = <const unsigned char*>PyUnicode_AsUTF8AndSize(text, &size)
    cdef unsigned char c
    cdef char escape[6]
    _write(out, b'"', 1)
    for i in range(size):
        c = data[i]
        if c >= 0x20 and c != 0x22 and c != 0x5c:
            continue  # the common byte: copied with its run below
        _write(out, <const char*>data + start, i - start)
        start = i + 1
        escape[0] = 0x5c  # backslash
        if c == 0x22 or c == 0x5c:
            escape[1] = c
            _write(out, escape, 2)
        elif c == 0x0a:
            _write(out, b"\\n", 2)
        elif c == 0x0d:
            _write(out, b"\\r", 2)
        elif c == 0x09:
            _write(out, b"\\t", 2)
        elif c == 0x08:
            _write(out, b"\\b", 2)
        elif c == 0x0c:
            _write(out, b"\\f", 2)
        else:
            escape[1], escape[2], escape[3] = 0x75, 0x30, 0x30  # u00
            escape[4], escape[5] = HEX[c >> 4], HEX[c & 0xf]
            _write(out, escape, 6)
    _write(out, <const char*>data + start, size - start)
    return _write(out, b'"', 1)
