"""A double-ended priority queue of Python objects: a min-max heap over C arrays.

Order.  Every entry has a key ``(priority, seq)`` where ``seq`` is the
insertion order.  Larger priority is more important; among equal priorities
the older entry (smaller ``seq``) is more important.  That is one strict total
order, so both ends are exact and deterministic:

* ``pop()`` returns the most important item: highest priority, FIFO among equals;
* ``pop_lowest()`` returns the least important: lowest priority and, among equal
  lowest, the newest.  Newest is the one to shed: it has waited least, and
  shedding it keeps FIFO fairness for the rest of its priority class.

Priorities.  ``int`` or ``float`` (numpy integer and floating scalars too);
``bool`` is refused.  Keys are stored as float64, so an int priority must lie
within ``[-2**53, 2**53]``, where every int converts exactly; a larger one
raises ``ValueError`` rather than silently colliding with its neighbours.
NaN raises ``ValueError``; anything else ``TypeError``.  ``1`` and ``1.0`` are
the same priority.

Layout.  The heap is an array of ``(priority, seq, slot, item)`` entries:
level 0 holds the least important entry, levels alternate min/max, the two
children of the root hold candidates for the most important.  A Python list
indexed by slot owns the items (so the garbage collector sees them, cycles
included); the entry borrows the pointer, so a pop finds its item without a
second cache miss.  A slot table maps each slot to its heap position, which
makes ``remove(handle)`` O(log n).  A handle names its deque (by id), a slot and the entry's ``seq``; it
is valid while the entry at that slot's position still carries that ``seq``,
so a stale handle (popped, removed, cleared, or from another deque) is refused
with ``ValueError`` and can never remove another item, even when its slot has
been reused.

Not locked: the GIL makes each call atomic; callers sharing a deque across
threads (the scheduler) hold their own lock around sequences of calls.

Re-entrancy.  Any Python allocation can run the garbage collector, and so the
finaliser of unrelated garbage, which may call anything on this deque
(``clear()``, ``push()``...).  So no method holds a pointer into the arrays, or
a borrowed item, across a Python allocation: allocations come first and the
state is read after them (``grow``, ``clear``), or the entries are copied out
and their items owned before any is allocated (``items``).  The C steps in
between allocate nothing a collection could start from.
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_SIZE, PyList_SET_ITEM
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, Py_XINCREF, PyObject
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import numbers
import operator

# Every int of magnitude up to 2**53 is exactly a float64; beyond it they collide.
cdef long long EXACT_INT_LIMIT = 9007199254740992
cdef enum:
    MIN_CAPACITY = 16

# Each deque gets a distinct id, so a handle can name its deque without holding a
# reference: handles stay plain C structs, invisible to the garbage collector
# (the scheduler makes one per task), and a handle never keeps a deque alive.
cdef uint64_t deques_made = 0


cdef double _priority_slow(object priority) except? -1.0:
    if isinstance(priority, bool) or not isinstance(priority, numbers.Real):
        raise TypeError(
            f"priority must be an int or a float, got {type(priority).__name__}: {priority!r}")
    if isinstance(priority, numbers.Integral):
        return _priority_of_int(operator.index(priority))
    try:
        value = float(priority)
    except OverflowError:  # a Fraction or Decimal-like Real beyond the float range
        raise ValueError(f"priority is out of range: a {type(priority).__name__} beyond "
                         f"the float range (about +-1.8e308)") from None
    return _checked_float(value)


cdef double _priority_of_int(object priority) except? -1.0:
    cdef int overflow = 0
    cdef long long value = PyLong_AsLongLongAndOverflow(priority, &overflow)
    if overflow or value > EXACT_INT_LIMIT or value < -EXACT_INT_LIMIT:
        raise ValueError(
            f"priority {priority} is outside [-2**53, 2**53], the range where int "
            f"priorities order exactly; scale it down or pass a float")
    return <double>value


cdef inline double _checked_float(double value) except? -1.0:
    if value != value:
        raise ValueError("priority must not be NaN")
    return value


cdef inline double as_priority(object priority) except? -1.0:
    """The float64 key of a priority (exact types first: this is the hot path)."""
    if type(priority) is float:
        return _checked_float(PyFloat_AS_DOUBLE(priority))
    if type(priority) is int:
        return _priority_of_int(priority)
    return _priority_slow(priority)


cdef inline bint ranks_below(const HeapEntry* a, const HeapEntry* b) noexcept nogil:
    """Entry ``a`` is less important than entry ``b``."""
    return a.priority < b.priority or (a.priority == b.priority and a.seq > b.seq)


cdef inline bint below(const HeapEntry* heap, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    return ranks_below(&heap[i], &heap[j])


cdef inline void place(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i,
                       HeapEntry entry) noexcept nogil:
    heap[i] = entry
    positions[entry.slot] = i


cdef inline void swap(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i,
                      Py_ssize_t j) noexcept nogil:
    cdef HeapEntry entry = heap[i]
    place(heap, positions, i, heap[j])
    place(heap, positions, j, entry)


cdef inline bint on_min_level(Py_ssize_t i) noexcept nogil:
    return (heap_level(i) & 1) == 0


cdef Py_ssize_t bubble_up_min(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i) noexcept nogil:
    """Move entry ``i`` up the min levels (grandparent by grandparent); return where it ends."""
    cdef HeapEntry entry = heap[i]
    cdef Py_ssize_t grandparent
    while i >= 3:
        grandparent = (i - 3) >> 2
        if not ranks_below(&entry, &heap[grandparent]):
            break
        place(heap, positions, i, heap[grandparent])
        i = grandparent
    place(heap, positions, i, entry)
    return i


cdef Py_ssize_t bubble_up_max(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i) noexcept nogil:
    cdef HeapEntry entry = heap[i]
    cdef Py_ssize_t grandparent
    while i >= 3:
        grandparent = (i - 3) >> 2
        if not ranks_below(&heap[grandparent], &entry):
            break
        place(heap, positions, i, heap[grandparent])
        i = grandparent
    place(heap, positions, i, entry)
    return i


cdef inline Py_ssize_t smallest_grandchild(const HeapEntry* heap, Py_ssize_t first) noexcept nogil:
    """The least of the four grandchildren at ``first..first+3``, as a tournament.

    When all four exist they are the candidates: each child lies on the other
    kind of level and is beaten by its own children.  Two independent
    comparisons then one keep the dependency chain short.
    """
    cdef Py_ssize_t a = first + 1 if below(heap, first + 1, first) else first
    cdef Py_ssize_t b = first + 3 if below(heap, first + 3, first + 2) else first + 2
    return b if below(heap, b, a) else a


cdef inline Py_ssize_t largest_grandchild(const HeapEntry* heap, Py_ssize_t first) noexcept nogil:
    cdef Py_ssize_t a = first + 1 if below(heap, first, first + 1) else first
    cdef Py_ssize_t b = first + 3 if below(heap, first + 2, first + 3) else first + 2
    return b if below(heap, a, b) else a


cdef void trickle_down_min(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i,
                           Py_ssize_t n) noexcept nogil:
    """Move entry ``i`` (on a min level) down until its subtree is ordered.

    The entry travels as a hole: entries move into it, it is written once at the end.
    """
    cdef HeapEntry entry = heap[i]
    cdef HeapEntry parent_entry
    cdef Py_ssize_t child, smallest, k, parent
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if 4 * i + 6 < n:
            smallest = smallest_grandchild(heap, 4 * i + 3)
        else:
            smallest = child
            if child + 1 < n and below(heap, child + 1, smallest):
                smallest = child + 1
            for k in range(4 * i + 3, n):
                if below(heap, k, smallest):
                    smallest = k
        if not ranks_below(&heap[smallest], &entry):
            break
        place(heap, positions, i, heap[smallest])
        i = smallest
        if smallest <= child + 1:  # a child: one level down, nothing below to fix
            break
        parent = (smallest - 1) >> 1
        if ranks_below(&heap[parent], &entry):  # the entry outranks a max-level parent
            parent_entry = heap[parent]
            place(heap, positions, parent, entry)
            entry = parent_entry
    place(heap, positions, i, entry)


cdef void trickle_down_max(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i,
                           Py_ssize_t n) noexcept nogil:
    cdef HeapEntry entry = heap[i]
    cdef HeapEntry parent_entry
    cdef Py_ssize_t child, largest, k, parent
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if 4 * i + 6 < n:
            largest = largest_grandchild(heap, 4 * i + 3)
        else:
            largest = child
            if child + 1 < n and below(heap, largest, child + 1):
                largest = child + 1
            for k in range(4 * i + 3, n):
                if below(heap, largest, k):
                    largest = k
        if not ranks_below(&entry, &heap[largest]):
            break
        place(heap, positions, i, heap[largest])
        i = largest
        if largest <= child + 1:
            break
        parent = (largest - 1) >> 1
        if ranks_below(&entry, &heap[parent]):
            parent_entry = heap[parent]
            place(heap, positions, parent, entry)
            entry = parent_entry
    place(heap, positions, i, entry)


cdef void bubble_up(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i) noexcept nogil:
    """Restore order above a new entry at ``i`` (nothing is below it)."""
    cdef Py_ssize_t parent
    if i == 0:
        return
    parent = (i - 1) >> 1
    if on_min_level(i):
        if below(heap, parent, i):
            swap(heap, positions, i, parent)
            bubble_up_max(heap, positions, parent)
        else:
            bubble_up_min(heap, positions, i)
    elif below(heap, i, parent):
        swap(heap, positions, i, parent)
        bubble_up_min(heap, positions, parent)
    else:
        bubble_up_max(heap, positions, i)


cdef void restore(HeapEntry* heap, Py_ssize_t* positions, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Restore order around entry ``i`` after it replaced a removed entry.

    The newcomer can be out of order with its parent (then the parent moves
    down into ``i`` and must trickle down there, the newcomer continues up), with
    its grandparents (it moves up, and what comes down is already in order), or
    with its subtree (it trickles down): never more than one of the three.
    """
    cdef Py_ssize_t parent
    if i > 0:
        parent = (i - 1) >> 1
        if on_min_level(i):
            if below(heap, parent, i):
                swap(heap, positions, i, parent)
                bubble_up_max(heap, positions, parent)
                trickle_down_min(heap, positions, i, n)
                return
            if bubble_up_min(heap, positions, i) != i:
                return
        else:
            if below(heap, i, parent):
                swap(heap, positions, i, parent)
                bubble_up_min(heap, positions, parent)
                trickle_down_max(heap, positions, i, n)
                return
            if bubble_up_max(heap, positions, i) != i:
                return
    if on_min_level(i):
        trickle_down_min(heap, positions, i, n)
    else:
        trickle_down_max(heap, positions, i, n)


@cython.freelist(256)
@cython.auto_pickle(False)  # a handle means nothing outside its process, and must not be forged
cdef class DequeHandle:
    """Names one queued entry of a PriorityDeque, for ``remove``; opaque otherwise."""

    def __repr__(self):
        return f"<DequeHandle deque={self.deque_id} seq={self.seq}>"


# no_gc_clear: the collector breaks cycles through the items list instead, so
# ``objects`` is never None while the heap still borrows pointers from it.
@cython.no_gc_clear
cdef class MinMaxHeap:
    """The native min-max heap behind ``PriorityDeque`` (use that)."""

    def __cinit__(self):
        self.heap = <HeapEntry*>malloc(MIN_CAPACITY * sizeof(HeapEntry))
        self.positions = <Py_ssize_t*>malloc(MIN_CAPACITY * sizeof(Py_ssize_t))
        if self.heap is NULL or self.positions is NULL:
            raise MemoryError("PriorityDeque: cannot allocate the heap")
        self.capacity = MIN_CAPACITY
        self.objects = [None] * MIN_CAPACITY
        self.size = 0
        self.next_seq = 0
        global deques_made
        deques_made += 1
        self.deque_id = deques_made
        self.free_head = -1
        self.link_free_slots(0)

    def __dealloc__(self):
        if self.heap is not NULL:
            free(self.heap)
            self.heap = NULL
        if self.positions is not NULL:
            free(self.positions)
            self.positions = NULL

    cdef void link_free_slots(self, Py_ssize_t start) noexcept:
        """Put slots ``start..capacity-1`` on the free list, lowest first.

        A free slot's position is negative and encodes the next free slot:
        ``-2 - next`` (so -1 ends the list).
        """
        cdef Py_ssize_t s
        for s in range(self.capacity - 1, start - 1, -1):
            self.positions[s] = -2 - self.free_head
            self.free_head = s

    cdef int grow(self) except -1:
        """Double the arrays while the deque is full (a finaliser may have changed that)."""
        cdef Py_ssize_t old, new
        cdef HeapEntry* heap
        cdef Py_ssize_t* positions
        while self.size == self.capacity:
            old = self.capacity
            new = old * 2
            tail = [None] * old  # the one allocation: a finaliser it runs may clear or push
            if self.size != old or self.capacity != old:
                continue  # it did: look again
            # From here to the end of the loop nothing allocates a Python object.
            heap = <HeapEntry*>realloc(self.heap, new * sizeof(HeapEntry))
            if heap is NULL:
                raise MemoryError(f"PriorityDeque: cannot grow to {new} entries")
            self.heap = heap
            positions = <Py_ssize_t*>realloc(self.positions, new * sizeof(Py_ssize_t))
            if positions is NULL:
                raise MemoryError(f"PriorityDeque: cannot grow to {new} entries")
            self.positions = positions
            self.objects.extend(tail)  # resizes the list's buffer: no object, no collection
            self.capacity = new
            self.link_free_slots(old)
        return 0

    def push(self, item, priority):
        """Queue ``item`` at ``priority`` (larger is more important); return its handle."""
        cdef double key = as_priority(priority)
        if self.size == self.capacity:
            self.grow()
        cdef Py_ssize_t slot = self.free_head
        cdef Py_ssize_t position = self.size
        cdef uint64_t seq = self.next_seq
        self.free_head = -2 - self.positions[slot]
        self.next_seq = seq + 1
        self.objects[slot] = item  # the list owns the reference; the entry borrows it
        self.positions[slot] = position
        self.heap[position].priority = key
        self.heap[position].seq = seq
        self.heap[position].slot = slot
        self.heap[position].item = <PyObject*>item
        self.size = position + 1
        bubble_up(self.heap, self.positions, position)
        cdef DequeHandle handle = DequeHandle.__new__(DequeHandle)
        handle.deque_id = self.deque_id
        handle.slot = slot
        handle.seq = seq
        return handle

    cdef Py_ssize_t highest(self) noexcept:
        """Heap position of the most important entry (the deque is not empty)."""
        if self.size <= 2:
            return self.size - 1
        return 1 if below(self.heap, 2, 1) else 2

    cdef object take(self, Py_ssize_t position):
        """Remove the entry at ``position`` and return its item."""
        cdef Py_ssize_t slot = self.heap[position].slot
        cdef PyObject* item = self.heap[position].item
        cdef Py_ssize_t last = self.size - 1
        if slot >= PyList_GET_SIZE(self.objects):
            # Only if the garbage collector has already torn the item list down.
            raise RuntimeError("PriorityDeque used after the garbage collector cleared it")
        # Start fetching the item now: in a big heap it is a cache miss, and this
        # way it overlaps the walk down the heap instead of following it.
        prefetch(item)
        self.size = last
        if position != last:
            place(self.heap, self.positions, position, self.heap[last])
            restore(self.heap, self.positions, position, last)
        self.positions[slot] = -2 - self.free_head
        self.free_head = slot
        result = <object>item
        # Hand the list's reference back without reading the cell (another miss):
        # the cell gets None, and the reference the list held is dropped here.
        Py_INCREF(None)
        PyList_SET_ITEM(self.objects, slot, None)
        Py_DECREF(result)  # never the last reference: ``result`` holds one
        return result

    def pop(self):
        """Remove and return the most important item (highest priority, oldest first)."""
        if self.size == 0:
            raise IndexError("pop from an empty PriorityDeque")
        return self.take(self.highest())

    def pop_lowest(self):
        """Remove and return the least important item (lowest priority, newest first)."""
        if self.size == 0:
            raise IndexError("pop_lowest from an empty PriorityDeque")
        return self.take(0)

    def pop_many(self, Py_ssize_t limit):
        """Remove and return up to ``limit`` items, most important first."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        cdef list out = []
        while self.size and limit:
            out.append(self.take(self.highest()))
            limit -= 1
        return out

    def peek(self):
        """The most important item, left in place."""
        if self.size == 0:
            raise IndexError("peek at an empty PriorityDeque")
        return <object>self.heap[self.highest()].item

    def peek_lowest(self):
        """The least important item, left in place."""
        if self.size == 0:
            raise IndexError("peek_lowest at an empty PriorityDeque")
        return <object>self.heap[0].item

    @staticmethod
    def priority_key(priority) -> float:
        """The float key ``priority`` orders by; ``TypeError``/``ValueError`` if it is not one."""
        return as_priority(priority)

    def holds(self, DequeHandle handle not None) -> bool:
        """Whether ``handle`` names an entry still queued here."""
        return self.is_queued(handle)

    cdef bint is_queued(self, DequeHandle handle) noexcept:
        cdef Py_ssize_t position
        if handle.deque_id != self.deque_id or not 0 <= handle.slot < self.capacity:
            return False
        position = self.positions[handle.slot]
        return position >= 0 and self.heap[position].seq == handle.seq

    def remove(self, DequeHandle handle not None):
        """Remove the entry ``handle`` names and return its item.

        Raises ``ValueError`` when it is no longer queued here (popped, removed
        or cleared), or belongs to another deque.
        """
        if not self.is_queued(handle):
            raise ValueError("handle does not name a queued entry of this PriorityDeque "
                             "(already popped, removed or cleared, or from another deque)")
        return self.take(self.positions[handle.slot])

    def items(self):
        """``(priority, item)`` pairs of everything queued, in no particular order (O(n))."""
        cdef Py_ssize_t i, n = self.size
        cdef HeapEntry* snapshot
        if n == 0:
            return []
        # Building the pairs allocates, which may run a finaliser that clears or
        # pops this deque: copy the entries out and own their items first.
        snapshot = <HeapEntry*>malloc(n * sizeof(HeapEntry))
        if snapshot is NULL:
            raise MemoryError(f"PriorityDeque.items: cannot copy {n} entries")
        memcpy(snapshot, self.heap, n * sizeof(HeapEntry))
        for i in range(n):
            Py_XINCREF(snapshot[i].item)
        try:
            return [(snapshot[i].priority, <object>snapshot[i].item) for i in range(n)]
        finally:
            for i in range(n):
                Py_XDECREF(snapshot[i].item)
            free(snapshot)

    def priority_counts(self):
        """``{priority: number queued}`` (O(n), but no object per entry: what stats() needs).

        ``items()`` builds a tuple per entry; a scheduler's ``stats()`` (read at
        every metrics scrape, under the scheduler's lock) only needs the counts.
        """
        cdef Py_ssize_t i, j, n = self.size
        cdef double* priorities
        cdef double seen[32]  # most deques hold a few distinct priorities: count in C
        cdef Py_ssize_t tally[32]
        cdef int used = 0
        cdef dict counts = {}
        cdef double p
        if n == 0:
            return counts
        # Counting past the table allocates (boxed floats): copy the keys out first, so
        # nothing that runs meanwhile can change what is counted.
        priorities = <double*>malloc(n * sizeof(double))
        if priorities is NULL:
            raise MemoryError(f"PriorityDeque.priority_counts: cannot copy {n} keys")
        for i in range(n):
            priorities[i] = self.heap[i].priority
        try:
            for i in range(n):
                p = priorities[i]
                for j in range(used):
                    if seen[j] == p:
                        tally[j] += 1
                        break
                else:
                    if used < 32:
                        seen[used] = p
                        tally[used] = 1
                        used += 1
                    else:
                        counts[p] = counts.get(p, 0) + 1
        finally:
            free(priorities)
        for j in range(used):
            counts[seen[j]] = tally[j]
        return counts

    def clear(self):
        """Drop every entry (outstanding handles become stale) and release the memory."""
        fresh = [None] * MIN_CAPACITY  # allocate before the state changes (see the docstring)
        dropped = self.objects
        cdef HeapEntry* heap = <HeapEntry*>realloc(self.heap, MIN_CAPACITY * sizeof(HeapEntry))
        cdef Py_ssize_t* positions = <Py_ssize_t*>realloc(
            self.positions, MIN_CAPACITY * sizeof(Py_ssize_t))
        if heap is not NULL:  # shrinking realloc cannot really fail; keep the old block if so
            self.heap = heap
        if positions is not NULL:
            self.positions = positions
        self.size = 0
        self.capacity = MIN_CAPACITY
        self.free_head = -1
        self.link_free_slots(0)
        self.objects = fresh
        del dropped  # finalisers of the dropped items run now, against an empty deque

    def __len__(self):
        return self.size

    def __bool__(self):
        return self.size > 0

    def __repr__(self):
        return f"<{type(self).__name__} size={self.size}>"


class PriorityDeque(MinMaxHeap):
    """A double-ended priority queue: ``pop()`` the most, ``pop_lowest()`` the least important.

    ``push(item, priority)`` returns a handle for ``remove``.  Every operation
    is O(log n) except ``clear`` and ``items`` (O(n)).  See the module docstring
    for the order and the accepted priorities.  (The native heap is
    ``MinMaxHeap``; this subclass only gives it a plain Python constructor.)
    """

    __slots__ = ()

    def __init__(self) -> None:
        pass
