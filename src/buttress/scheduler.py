"""An in-process priority task scheduler with worker threads and backpressure.

``TaskScheduler`` runs zero-argument callables on worker threads, most
important first (larger priority; FIFO among equals), and pushes back before
it falls over:

* **Hysteresis.**  When the queue length reaches ``high_water`` the scheduler
  enters ``shedding`` and stays there until the length falls to ``low_water``.
  While shedding, tasks with ``priority < shed_below`` are refused
  (``enqueue`` raises ``buttress.Rejected`` with ``state="shedding"`` and a
  ``retry_after`` hint); more important tasks are still admitted.
* **Hard limit.**  At ``max_size`` queued tasks the ``overflow`` policy decides:
  ``"shed_lowest"`` (default) evicts the least important queued task if the
  newcomer is more important (its handle raises ``buttress.Shed``), else
  refuses the newcomer; ``"reject"`` refuses the newcomer; ``"block"`` waits
  up to ``block_timeout`` seconds for room, then refuses.
* **Deadlines.**  A task whose ``deadline`` (a ``time.monotonic()`` value) has
  passed when a worker is about to start it is not run; its handle raises
  ``buttress.Expired``.
* **Accounting.**  Every ``enqueue`` call ends in exactly one of *rejected*,
  *shed*, *expired*, *cancelled*, *completed*, *failed*; ``stats()`` counts
  them, and ``accepted == shed + expired + cancelled + completed + failed +
  queued + running`` holds in every snapshot.  Calls refused for bad arguments
  (``TypeError``/``ValueError``) are not enqueue outcomes and are not counted.

The exact hysteresis rule, shared with ``buttress.distributed`` (docs/scheduler.md):
after every change of the queue length ``L``, ``normal -> shedding`` when
``L >= high_water`` and ``shedding -> normal`` when ``L <= low_water``.

Throughput: a worker claims a batch of tasks per lock acquisition (as many as
it ran in about a millisecond last time, 1 to 256, at most its share of the
queue), idle workers are woken only when they are actually idle, and a
handle's completion event is made only if someone waits.  A claimed task
counts as ``running`` (``cancel()`` returns False) even while it waits behind
its batch mates; counters of finished tasks are folded in when the worker
comes back for more work.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from buttress._heap import PriorityDeque
from buttress._validate import require_int
from buttress.errors import Expired, Rejected, Shed

__all__ = ["PriorityDeque", "TaskHandle", "TaskScheduler"]

logger = logging.getLogger("buttress.scheduler")

# Task statuses (TaskHandle.status).
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
SHED = "shed"
EXPIRED = "expired"

# Scheduler states (stats()["state"], Rejected.state, on_state_change).
NORMAL = "normal"
SHEDDING = "shedding"
SHUTTING_DOWN = "shutting_down"
STOPPED = "stopped"

OVERFLOW_POLICIES = ("shed_lowest", "reject", "block")
# A worker claims a batch of tasks per lock acquisition: as many as it ran in
# about BATCH_SECONDS last time, within 1..MAX_BATCH and at most its share of the
# queue.  Fast tasks go in big batches (the lock and the hand-offs between
# threads are most of their cost); slow tasks go one by one, so an urgent task
# never waits behind a batch a busy worker is sitting on for long.
MAX_BATCH = 256
BATCH_SECONDS = 0.001

_waiter_lock = threading.Lock()  # makes one completion Event per waited-on handle


class TaskHandle:
    """The caller's view of one accepted task: its status, result, or why it did not run."""

    # Made by TaskScheduler.enqueue only, field by field: without an __init__,
    # TaskHandle() never enters Python code, a measurable saving per no-op task.
    __slots__ = ("_entry", "_scheduler", "_status", "_value", "_waiter", "deadline", "priority")
    _scheduler: TaskScheduler
    _value: Any  # the task until it ends, then its result or exception
    priority: Any
    deadline: float | None
    _status: str
    _waiter: threading.Event | None  # made only when someone waits in result()
    _entry: Any  # the PriorityDeque handle, for cancel()

    @property
    def status(self) -> str:
        """queued, running, completed, failed, cancelled, shed or expired."""
        return self._status

    def done(self) -> bool:
        """Whether the task has reached its end (any status but queued and running)."""
        return self._status is not QUEUED and self._status is not RUNNING

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value, waiting up to ``timeout`` seconds (None: forever).

        Raises the task's own exception if it failed, ``buttress.Shed``,
        ``buttress.Expired`` or ``concurrent.futures.CancelledError`` if it did
        not run, and ``TimeoutError`` if it is not done in time.
        """
        if not self.done():
            with _waiter_lock:
                if self._waiter is None:
                    self._waiter = threading.Event()
                waiter = self._waiter
            # The worker sets the status before it looks for a waiter, and we set
            # the waiter before we look at the status: one of us sees the other.
            if not self.done() and not waiter.wait(timeout):
                raise TimeoutError(f"task not done after {timeout}s (status {self._status})")
        if self._status is COMPLETED:
            return self._value
        raise self._value

    def cancel(self) -> bool:
        """Cancel the task if it is still queued; return whether it was."""
        return self._scheduler._cancel(self)

    def __repr__(self) -> str:
        return f"<TaskHandle priority={self.priority!r} status={self._status}>"


class TaskScheduler:
    """Runs callables on ``workers`` threads, most important first, with backpressure.

    ``high_water`` (default 10,000) starts shedding, ``low_water`` (default
    ``high_water // 2``) ends it, ``max_size`` (default ``2 * high_water``) is
    the hard limit.  ``on_state_change(old, new)`` is called (outside the lock,
    in order, from whichever thread made the change) on every state change.
    Use as a context manager (start, then drain on exit) or call ``start()``
    and ``shutdown()``.
    """

    _deque_class: type = PriorityDeque  # the twin plugs in the pure-Python deque here

    def __init__(
        self,
        workers: int = 4,
        *,
        high_water: int = 10_000,
        low_water: int | None = None,
        max_size: int | None = None,
        shed_below: float = 1,
        overflow: str = "shed_lowest",
        block_timeout: float = 1.0,
        on_state_change: Callable[[str, str], Any] | None = None,
        name: str = "buttress-scheduler",
    ) -> None:
        require_int("workers", workers, minimum=1)
        require_int("high_water", high_water, minimum=1)
        if low_water is None:
            low_water = high_water // 2
        require_int("low_water", low_water, minimum=0)
        if max_size is None:
            max_size = 2 * high_water
        require_int("max_size", max_size, minimum=1)
        if low_water >= high_water:
            raise ValueError(f"low_water must be < high_water, got low_water={low_water}, "
                             f"high_water={high_water}")
        if high_water > max_size:
            raise ValueError(f"high_water must be <= max_size, got high_water={high_water}, "
                             f"max_size={max_size}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if not _is_number(block_timeout) or not block_timeout >= 0:
            raise ValueError(f"block_timeout must be a number >= 0, got {block_timeout!r}")
        if on_state_change is not None and not callable(on_state_change):
            raise TypeError(f"on_state_change must be callable, got {on_state_change!r}")
        self._queue = self._deque_class()
        try:
            self._queue.priority_key(shed_below)  # the same rule as task priorities
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"shed_below: {exc}") from None
        self.workers = workers
        self.high_water = high_water
        self.low_water = low_water
        self.max_size = max_size
        self.shed_below = shed_below
        self.overflow = overflow
        self.block_timeout = float(block_timeout)
        self.name = name
        self._on_state_change = on_state_change

        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # "the queue has room" (block policy)
        self._blocked = 0  # producers waiting on _space
        self._idle: list[Any] = []  # wake locks of idle workers (held; release = wake)
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closing = False
        self._state = NORMAL
        self._shed_at: float = high_water  # queue length that starts SHEDDING (only from NORMAL)
        self._transitions: list[tuple[str, str]] = []  # for on_state_change, in order
        self._callback_lock = threading.RLock()  # a callback may enqueue
        self._shedding_since: float | None = None
        self._shedding_seconds = 0.0
        self._rate_mark = (0, time.monotonic())  # (dequeued, when): for retry-after hints
        self._dequeued = 0
        self._running = 0
        self._accepted = self._rejected = self._shed = self._expired = 0
        self._cancelled = self._completed = self._failed = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> TaskScheduler:
        """Start the worker threads (idempotent); a scheduler cannot restart after shutdown."""
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self.name}: cannot start after shutdown")
            self._start_workers_locked()
        return self

    def __enter__(self) -> TaskScheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(drain=True)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Stop admitting, finish (``drain``) or cancel queued work, wait for the workers.

        New ``enqueue`` calls raise ``Rejected`` (state ``shutting_down``) from
        the first call on.  With ``drain`` the workers finish the queue (a
        scheduler never started gets its workers now, to do so); without it
        queued tasks are cancelled.  Waits up to ``timeout`` seconds (None:
        until done) for the workers; if the time runs out, tasks still queued
        are cancelled (never left unresolved) and running ones keep running.

        Safe to call again and from any thread, a task included (it does not
        wait for its own worker): a later call waits again and returns a fresh
        summary, and ``drain=False`` escalates a draining shutdown.  Returns a
        summary: ``stats()`` plus ``timed_out`` and ``cancelled_by_shutdown``.
        """
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if not self._closing:
                logger.info("%s: shutting down (drain=%s)", self.name, drain)
                self._closing = True
                self._set_state_locked(SHUTTING_DOWN)
            cancelled = 0 if drain else self._cancel_queued_locked()
            if drain and not self._started and len(self._queue):
                self._start_workers_locked()
            self._wake_all_locked()
        self._dispatch_transitions()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            alive = [t for t in self._threads if t.is_alive() and t is not current]
            timed_out = bool(alive)
            if timed_out and len(self._queue):
                cancelled += self._cancel_queued_locked()
            if not any(t.is_alive() for t in self._threads):
                self._set_state_locked(STOPPED)
            summary = self._stats_locked()
        self._dispatch_transitions()
        summary["timed_out"] = timed_out
        summary["cancelled_by_shutdown"] = cancelled
        if timed_out:
            logger.warning("%s: shutdown timed out with %d task(s) still running",
                           self.name, summary["running"])
        return summary

    # -- admission -------------------------------------------------------------

    def enqueue(self, task: Callable[[], Any], priority: Any = 0, *,
                deadline: float | None = None) -> TaskHandle:
        """Queue ``task()`` at ``priority`` (larger runs first); return its handle.

        ``deadline`` is a ``time.monotonic()`` value after which the task is
        not started.  Raises ``Rejected`` when backpressure or shutdown refuses
        it, ``TypeError``/``ValueError`` for a bad task, priority or deadline.
        """
        if not callable(task):
            raise TypeError(f"task must be callable, got {type(task).__name__}: {task!r}")
        if deadline is not None:
            _check_deadline(deadline)
        handle = TaskHandle()
        handle._scheduler = self
        handle._value = task
        handle.priority = priority
        handle.deadline = deadline
        handle._status = QUEUED
        handle._waiter = None
        lock = self._lock
        lock.acquire()
        try:
            if self._state is not NORMAL:
                self._admit_slow_locked(handle)
            queue = self._queue
            handle._entry = queue.push(handle, priority)
            self._accepted += 1
            if len(queue) >= self._shed_at:
                self._set_state_locked(SHEDDING)
            if self._idle:
                self._idle.pop().release()
        finally:
            lock.release()
        if self._transitions:
            self._dispatch_transitions()
        return handle

    def _admit_slow_locked(self, handle: TaskHandle) -> None:
        """Admission outside NORMAL: raise Rejected, or make room (evict or wait)."""
        queue = self._queue
        priority = handle.priority
        queue.priority_key(priority)  # bad input is an error, not a rejection
        if self._closing:
            self._reject_locked("scheduler is shutting down", retry=False)
        if self._state is SHEDDING and priority < self.shed_below:
            self._reject_locked(f"shedding: queue reached high_water={self.high_water}; "
                                f"priority {priority!r} < shed_below={self.shed_below!r}")
        if len(queue) < self.max_size:
            return
        if self.overflow == "shed_lowest":
            if queue.peek_lowest().priority < priority:
                victim = queue.pop_lowest()
                self._shed += 1
                _finish(victim, SHED, Shed(f"evicted at max_size={self.max_size} by a task of "
                                           f"priority {priority!r}"))
                return
            self._reject_locked(f"queue full (max_size={self.max_size}) and the task is not "
                                f"more important than any queued task")
        if self.overflow == "block":
            limit = time.monotonic() + self.block_timeout
            self._blocked += 1
            try:
                while len(queue) >= self.max_size and not self._closing:
                    remaining = limit - time.monotonic()
                    if remaining <= 0 or not self._space.wait(remaining):
                        break
            finally:
                self._blocked -= 1
            if self._closing:
                self._reject_locked("scheduler is shutting down", retry=False)
            if len(queue) < self.max_size:
                return
        self._reject_locked(f"queue full (max_size={self.max_size})")

    def _reject_locked(self, reason: str, *, retry: bool = True) -> None:
        self._rejected += 1
        state = SHUTTING_DOWN if self._closing else self._state
        raise Rejected(reason, state=state,
                       retry_after=self._retry_after_locked() if retry else None)

    def _retry_after_locked(self) -> float:
        """Seconds until the queue is likely back at low_water, at the recent drain rate."""
        dequeued, since = self._rate_mark
        elapsed = time.monotonic() - since
        rate = (self._dequeued - dequeued) / elapsed if elapsed > 0 else 0.0
        excess = max(1, len(self._queue) - self.low_water)
        return min(60.0, max(0.01, excess / rate)) if rate > 0 else 1.0

    # -- cancellation ----------------------------------------------------------

    def _cancel(self, handle: TaskHandle) -> bool:
        with self._lock:
            if handle._status is not QUEUED:
                return False
            self._queue.remove(handle._entry)
            self._cancelled += 1
            _finish(handle, CANCELLED, CancelledError("cancelled"))
            self._after_dequeue_locked()
        self._dispatch_transitions()
        return True

    def _cancel_queued_locked(self) -> int:
        cancelled = 0
        queue = self._queue
        while queue:
            _finish(queue.pop(), CANCELLED, CancelledError("cancelled by shutdown"))
            cancelled += 1
        self._cancelled += cancelled
        self._after_dequeue_locked()
        return cancelled

    # -- workers ---------------------------------------------------------------

    def _start_workers_locked(self) -> None:
        if self._started:
            return
        self._started = True
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{number}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        logger.debug("%s: started %d workers", self.name, self.workers)

    def _work(self) -> None:
        lock = self._lock
        queue = self._queue
        wake = threading.Lock()
        wake.acquire()
        monotonic = time.monotonic
        clock = time.perf_counter
        batch: list[TaskHandle] = []
        limit = 1  # batch size; adapts to how long tasks take
        failed = expired = 0
        while True:
            with lock:
                # Fold in the batch just finished, then take the next one.
                if batch:
                    self._completed += len(batch) - failed - expired
                    self._failed += failed
                    self._expired += expired
                    self._running -= len(batch)
                    failed = expired = 0
                size = len(queue)
                if size:
                    batch = queue.pop_many(min(limit, size // self.workers + 1))
                    for handle in batch:
                        handle._status = RUNNING
                    self._running += len(batch)
                    self._dequeued += len(batch)
                    self._after_dequeue_locked()
                elif self._closing:
                    return
                else:
                    batch = []
                    self._idle.append(wake)
            if self._transitions:
                self._dispatch_transitions()
            if not batch:
                wake.acquire()  # until enqueue or shutdown releases it
                continue
            started = clock()
            for handle in batch:
                if handle.deadline is not None and handle.deadline < monotonic():
                    handle._value = Expired(f"deadline passed before the task could start "
                                            f"(priority {handle.priority!r})")
                    handle._status = EXPIRED
                    expired += 1
                else:
                    try:
                        handle._value = handle._value()
                        handle._status = COMPLETED
                    except BaseException as exc:  # the task's failure goes to its handle
                        handle._value = exc
                        handle._status = FAILED
                        failed += 1
                if handle._waiter is not None:
                    handle._waiter.set()
            per_task = (clock() - started) / len(batch)
            limit = MAX_BATCH if per_task * MAX_BATCH <= BATCH_SECONDS else (
                max(1, int(BATCH_SECONDS / per_task)))

    def _after_dequeue_locked(self) -> None:
        """The queue got shorter: leave SHEDDING at low_water, make room for blocked producers."""
        if self._state is SHEDDING and len(self._queue) <= self.low_water:
            self._set_state_locked(NORMAL)
        if self._blocked:
            self._space.notify(self._blocked)

    def _wake_all_locked(self) -> None:
        for wake in self._idle:
            wake.release()
        self._idle.clear()
        self._space.notify_all()

    # -- state and observability -----------------------------------------------

    def _set_state_locked(self, new: str) -> None:
        old = self._state
        if old in (new, STOPPED):
            return
        now = time.monotonic()
        if old == SHEDDING and self._shedding_since is not None:
            self._shedding_seconds += now - self._shedding_since
            self._shedding_since = None
        if new == SHEDDING:
            self._shedding_since = now
            self._rate_mark = (self._dequeued, now)
        self._state = new
        self._shed_at = self.high_water if new == NORMAL else math.inf
        logger.log(logging.INFO if new != SHEDDING else logging.WARNING,
                   "%s: %s -> %s (queued %d)", self.name, old, new, len(self._queue))
        if self._on_state_change is not None:
            self._transitions.append((old, new))

    def _dispatch_transitions(self) -> None:
        """Call on_state_change for the recorded transitions, in order, outside the lock."""
        with self._callback_lock:
            with self._lock:
                transitions, self._transitions = self._transitions, []
            for old, new in transitions:
                try:
                    self._on_state_change(old, new)  # type: ignore[misc]
                except Exception:
                    logger.exception("%s: on_state_change(%r, %r) raised", self.name, old, new)

    @property
    def state(self) -> str:
        """normal, shedding, shutting_down or stopped."""
        return self._state

    def __len__(self) -> int:
        """Tasks queued (not yet taken by a worker)."""
        return len(self._queue)

    def stats(self) -> dict[str, Any]:
        """Counts of every outcome, what is queued (by priority) and running, and the state."""
        with self._lock:
            return self._stats_locked()

    def _stats_locked(self) -> dict[str, Any]:
        by_priority: dict[float, int] = {}
        for key, _ in self._queue.items():
            by_priority[key] = by_priority.get(key, 0) + 1
        shedding = self._shedding_seconds
        if self._shedding_since is not None:
            shedding += time.monotonic() - self._shedding_since
        return {
            "state": self._state,
            "accepted": self._accepted,
            "rejected": self._rejected,
            "shed": self._shed,
            "expired": self._expired,
            "cancelled": self._cancelled,
            "completed": self._completed,
            "failed": self._failed,
            "queued": len(self._queue),
            "running": self._running,
            "queued_by_priority": {
                (int(k) if k.is_integer() else k): n for k, n in sorted(by_priority.items())},
            "shedding_seconds": shedding,
            "workers": sum(t.is_alive() for t in self._threads),
            "idle_workers": len(self._idle),
            "high_water": self.high_water,
            "low_water": self.low_water,
            "max_size": self.max_size,
        }

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} state={self._state} "
                f"queued={len(self._queue)} running={self._running}>")


def _finish(handle: TaskHandle, status: str, outcome: BaseException) -> None:
    """End a task that will not run (shed, cancelled): record why and wake its waiter."""
    handle._value = outcome
    handle._status = status
    if handle._waiter is not None:
        handle._waiter.set()



def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_deadline(deadline: Any) -> None:
    if not _is_number(deadline):
        raise TypeError(f"deadline must be a time.monotonic() value or None, "
                        f"got {type(deadline).__name__}: {deadline!r}")
    if math.isnan(deadline):
        raise ValueError("deadline must not be NaN")
