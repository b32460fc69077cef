# The C-level contract of buttress._heap: a double-ended priority queue (a
# min-max heap) over C arrays, holding Python objects.
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t


# C kernels that use compiler builtins, with portable fallbacks: heap_kernels.h.
cdef extern from "heap_kernels.h" nogil:
    int heap_level "buttress_heap_level"(unsigned long long position) noexcept
    void prefetch "buttress_prefetch"(const void* address) noexcept


cdef struct HeapEntry:
    double priority       # larger is more important
    uint64_t seq          # insertion order: among equal priorities, smaller is older
    Py_ssize_t slot       # index into the slot table (and the items list)
    PyObject* item        # the item, borrowed from the items list (which owns it)


cdef class DequeHandle


cdef class MinMaxHeap:
    cdef HeapEntry* heap
    cdef Py_ssize_t* positions    # positions[slot]: heap index, or < 0 when free
    cdef list objects             # objects[slot]: a Python list, so the GC sees the items
    cdef Py_ssize_t size
    cdef Py_ssize_t capacity
    cdef Py_ssize_t free_head
    cdef uint64_t next_seq
    cdef uint64_t deque_id

    cdef void link_free_slots(self, Py_ssize_t start) noexcept
    cdef int grow(self) except -1
    cdef object take(self, Py_ssize_t position)
    cdef Py_ssize_t highest(self) noexcept
    cdef bint is_queued(self, DequeHandle handle) noexcept


cdef class DequeHandle:
    cdef uint64_t deque_id        # the MinMaxHeap it came from (no reference held)
    cdef Py_ssize_t slot
    cdef uint64_t seq
