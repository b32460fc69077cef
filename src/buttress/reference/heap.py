"""Pure-Python twin of ``buttress.PriorityDeque`` (the native min-max heap).

Same public API, same order, same results: larger priority is more important;
``pop()`` returns the most important item (FIFO among equal priorities),
``pop_lowest()`` the least important (the newest among equal lowest).  The
accepted priorities are the native ones: ``int`` within ``[-2**53, 2**53]`` or
``float`` (numpy scalars too), never ``bool`` or NaN.

It keeps two ``heapq`` heaps over the same entries, one per end, and deletes
lazily: an entry popped from one end stays in the other heap, marked gone,
until it surfaces there or a compaction (when the dead outnumber the live)
drops it.  Amortised O(log n) per operation; plain and easy to check.

Like the native deque, it stays consistent when a garbage-collector finaliser
calls into it in the middle of a call: objects are allocated before the state
changes, and a compaction started before such a call is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
import operator
from typing import Any

__all__ = ["DequeHandle", "PriorityDeque"]

EXACT_INT_LIMIT = 2**53


def _int_key(priority: int) -> float:
    if not -EXACT_INT_LIMIT <= priority <= EXACT_INT_LIMIT:
        raise ValueError(
            f"priority {priority} is outside [-2**53, 2**53], the range where int "
            f"priorities order exactly; scale it down or pass a float")
    return float(priority)


class DequeHandle:
    """Names one queued entry of a PriorityDeque, for ``remove``; opaque otherwise."""

    __slots__ = ("_item", "_key", "_queued", "_seq", "owner")

    def __init__(self, owner: PriorityDeque, item: Any, key: float, seq: int) -> None:
        self.owner: PriorityDeque | None = owner
        self._item = item
        self._key = key
        self._seq = seq
        self._queued = True

    def __repr__(self) -> str:
        return f"<DequeHandle seq={self._seq} {'queued' if self._queued else 'gone'}>"


class PriorityDeque:
    """A double-ended priority queue: ``pop()`` the most, ``pop_lowest()`` the least important.

    ``push(item, priority)`` returns a handle for ``remove``.  See the module
    docstring for the order and the accepted priorities.
    """

    def __init__(self) -> None:
        self._high: list[tuple[float, int, DequeHandle]] = []  # (-priority, seq): top = most
        self._low: list[tuple[float, int, DequeHandle]] = []  # (priority, -seq): top = least
        self._size = 0
        self._seq = itertools.count()
        self._changes = 0  # bumped by every mutation, so a compaction can tell it raced one

    @staticmethod
    def priority_key(priority: Any) -> float:
        """The float key ``priority`` orders by; ``TypeError``/``ValueError`` if it is not one."""
        if type(priority) is float:
            key = priority
        elif type(priority) is int:
            return _int_key(priority)
        elif isinstance(priority, bool) or not isinstance(priority, numbers.Real):
            raise TypeError(
                f"priority must be an int or a float, got {type(priority).__name__}: "
                f"{priority!r}")
        elif isinstance(priority, numbers.Integral):
            return _int_key(operator.index(priority))
        else:
            try:
                key = float(priority)
            except OverflowError:  # a Fraction beyond the float range
                raise ValueError(
                    f"priority is out of range: a {type(priority).__name__} beyond the "
                    f"float range (about +-1.8e308)") from None
        if math.isnan(key):
            raise ValueError("priority must not be NaN")
        return key

    def push(self, item: Any, priority: Any) -> DequeHandle:
        """Queue ``item`` at ``priority`` (larger is more important); return its handle."""
        key = self.priority_key(priority)
        seq = next(self._seq)
        handle = DequeHandle(self, item, key, seq)
        high, low = (-key, seq, handle), (key, -seq, handle)  # allocate, then change state
        heapq.heappush(self._high, high)
        heapq.heappush(self._low, low)
        self._size += 1
        self._changes += 1
        return handle

    def pop(self) -> Any:
        """Remove and return the most important item (highest priority, oldest first)."""
        if not self._size:
            raise IndexError("pop from an empty PriorityDeque")
        return self._take(self._top(self._high))

    def pop_lowest(self) -> Any:
        """Remove and return the least important item (lowest priority, newest first)."""
        if not self._size:
            raise IndexError("pop_lowest from an empty PriorityDeque")
        return self._take(self._top(self._low))

    def pop_many(self, limit: int) -> list[Any]:
        """Remove and return up to ``limit`` items, most important first."""
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        out: list[Any] = []
        while self._size and len(out) < limit:
            out.append(self._take(self._top(self._high)))
        return out

    def peek(self) -> Any:
        """The most important item, left in place."""
        if not self._size:
            raise IndexError("peek at an empty PriorityDeque")
        return self._top(self._high)._item

    def peek_lowest(self) -> Any:
        """The least important item, left in place."""
        if not self._size:
            raise IndexError("peek_lowest at an empty PriorityDeque")
        return self._top(self._low)._item

    def holds(self, handle: DequeHandle) -> bool:
        """Whether ``handle`` names an entry still queued here."""
        if not isinstance(handle, DequeHandle):
            raise TypeError(f"handle must be a DequeHandle, got {type(handle).__name__}")
        return handle.owner is self and handle._queued

    def remove(self, handle: DequeHandle) -> Any:
        """Remove the entry ``handle`` names and return its item.

        Raises ``ValueError`` when it is no longer queued here (popped, removed
        or cleared), or belongs to another deque.
        """
        if not self.holds(handle):
            raise ValueError("handle does not name a queued entry of this PriorityDeque "
                             "(already popped, removed or cleared, or from another deque)")
        return self._take(handle)

    def items(self) -> list[tuple[float, Any]]:
        """``(priority, item)`` pairs of everything queued, in no particular order (O(n))."""
        return [(h._key, h._item) for _, _, h in self._high if h._queued]

    def priority_counts(self) -> dict[float, int]:
        """``{priority: number queued}`` (O(n), but no object per entry: what stats() needs)."""
        counts: dict[float, int] = {}
        for _, _, handle in self._high:
            if handle._queued:
                counts[handle._key] = counts.get(handle._key, 0) + 1
        return counts

    def clear(self) -> None:
        """Drop every entry (outstanding handles become stale) and release the memory."""
        high: list[tuple[float, int, DequeHandle]] = []
        low: list[tuple[float, int, DequeHandle]] = []
        dropped = self._high
        for _, _, handle in dropped:
            handle._queued = False
        self._high, self._low, self._size = high, low, 0
        self._changes += 1
        del dropped

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __repr__(self) -> str:
        return f"<PriorityDeque size={self._size}>"

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _top(heap: list[tuple[float, int, DequeHandle]]) -> DequeHandle:
        while not heap[0][2]._queued:  # drop entries already taken at the other end
            heapq.heappop(heap)
        return heap[0][2]

    def _take(self, handle: DequeHandle) -> Any:
        handle._queued = False
        self._size -= 1
        self._changes += 1
        item, handle._item = handle._item, None
        self._compact_if_mostly_dead()
        return item

    def _compact_if_mostly_dead(self) -> None:
        if len(self._high) + len(self._low) > 4 * self._size + 32:
            changes = self._changes
            high = [e for e in self._high if e[2]._queued]
            low = [e for e in self._low if e[2]._queued]
            if self._changes != changes:
                return  # a finaliser changed the deque meanwhile: compact another time
            heapq.heapify(high)
            heapq.heapify(low)
            self._high, self._low = high, low
