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

The rules themselves (admission, hysteresis, accounting, states) live once in
``buttress._scheduler_core.SchedulerCore``, shared with ``AsyncTaskScheduler``
(``buttress.scheduler_async``), the same scheduler for coroutines on one event
loop; this module is the thread driver.  ``TaskHandle`` is a
``concurrent.futures.Future``, so ``wait``, ``as_completed``,
``add_done_callback`` and ``asyncio.wrap_future`` work with it.

Throughput: a worker claims a batch of tasks per lock acquisition (as many as
it ran in about a millisecond last time, 1 to 256, at most its share of the
queue), idle workers are woken only when they are actually idle, and a
handle's condition variable is made only if someone waits or listens.  A claimed task
counts as ``running`` (``cancel()`` returns False) even while it waits behind
its batch mates; counters of finished tasks are folded in when the worker
comes back for more work.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures._base import (
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
)
from concurrent.futures._base import (
    RUNNING as FUTURE_RUNNING,
)
from typing import Any

from buttress._heap import PriorityDeque
from buttress._scheduler_core import (
    BATCH_SECONDS,
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    MAX_BATCH,
    NORMAL,
    QUEUED,
    RUNNING,
    SHED,
    SHEDDING,
    SchedulerCore,
    check_deadline,
)
from buttress._validate import require_callable, require_number
from buttress.errors import Expired

__all__ = ["PriorityDeque", "TaskHandle", "TaskScheduler"]

logger = logging.getLogger("buttress.scheduler")

_listener_lock = threading.Lock()  # makes one condition per waited-on handle
# TaskHandle.status -> the concurrent.futures state the standard tools read.
_FUTURE_STATE = {QUEUED: PENDING, RUNNING: FUTURE_RUNNING, CANCELLED: CANCELLED_AND_NOTIFIED,
                 COMPLETED: FINISHED, FAILED: FINISHED, SHED: FINISHED, EXPIRED: FINISHED}


class TaskHandle(concurrent.futures.Future):
    """The caller's view of one accepted task: a ``concurrent.futures.Future``.

    Beyond the Future API: ``status`` (queued, running, completed, failed,
    cancelled, shed, expired), ``priority`` and ``deadline``.  ``result()``
    raises the task's own exception, ``buttress.Shed`` or ``buttress.Expired``
    if it did not run, ``concurrent.futures.CancelledError`` if cancelled and
    ``TimeoutError`` if not done in time; ``exception()`` returns those.
    ``cancel()`` cancels a queued task (True, also if it was already
    cancelled); a running or finished one is not cancelled (False).
    Callbacks run on the thread that ends the task.  The result is set by the
    scheduler alone: ``set_result``/``set_exception`` raise RuntimeError.
    """

    # Made by enqueue only, field by field: no __init__ runs, a measurable saving
    # per no-op task.  Future's own attributes are derived (_state from _status)
    # or made on first use (_condition, _waiters, _done_callbacks), so a handle
    # nobody waits on never builds a threading.Condition.
    __slots__ = ("_callbacks", "_cond", "_entry", "_scheduler", "_status", "_value",
                 "_waiter_list", "deadline", "priority")
    _aio: Any = None  # the asyncio future of an awaited AsyncTaskHandle (class default)
    _scheduler: Any
    _value: Any  # the task until it ends, then its result or exception
    priority: Any
    deadline: float | None
    _status: str
    _cond: threading.Condition | None  # made when someone waits or listens
    _waiter_list: list[Any]  # concurrent.futures waiters (made with _cond)
    _callbacks: list[Callable[[Any], object]]  # done callbacks (made with _cond)
    _entry: Any  # the PriorityDeque handle, for cancel()

    # enqueue makes a handle with TaskHandle() and sets its fields: object's C
    # __init__ instead of Future's Python one, which would also build a Condition.
    __init__ = object.__init__

    @property
    def status(self) -> str:
        """queued, running, completed, failed, cancelled, shed or expired."""
        return self._status

    def done(self) -> bool:
        """Whether the task has reached its end (any status but queued and running)."""
        return self._status is not QUEUED and self._status is not RUNNING

    def running(self) -> bool:
        return self._status is RUNNING

    def cancelled(self) -> bool:
        return self._status is CANCELLED

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value, waiting up to ``timeout`` seconds (None: forever).

        Raises the task's own exception if it failed, ``buttress.Shed``,
        ``buttress.Expired`` or ``concurrent.futures.CancelledError`` if it did
        not run, and ``TimeoutError`` if it is not done in time.
        """
        if not self.done():
            self._wait(timeout)
        if self._status is COMPLETED:
            return self._value
        raise self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (or Shed/Expired), None if it completed; waits like result()."""
        if not self.done():
            self._wait(timeout)
        status = self._status
        if status is COMPLETED:
            return None
        if status is CANCELLED:
            raise self._value
        return self._value

    def cancel(self) -> bool:
        """Cancel the task if it is still queued; True also if it was already cancelled."""
        status = self._status
        if status is CANCELLED:
            return True
        if status is not QUEUED:
            return False
        return self._scheduler._cancel(self)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(handle)`` when the task ends (now, if it has)."""
        if not self.done():
            with self._condition:
                if not self.done():
                    self._callbacks.append(fn)
                    return
        self._call(fn)

    def set_running_or_notify_cancel(self) -> bool:
        raise RuntimeError("a TaskHandle's state is set by its scheduler")

    def set_result(self, result: Any) -> None:
        raise RuntimeError("a TaskHandle's result is set by its scheduler")

    def set_exception(self, exception: BaseException | None) -> None:
        raise RuntimeError("a TaskHandle's result is set by its scheduler")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} priority={self.priority!r} status={self._status}>"

    # -- what concurrent.futures.wait / as_completed read ----------------------------

    @property
    def _state(self) -> str:  # type: ignore[override]
        return _FUTURE_STATE[self._status]

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """The handle's condition variable, made on first use (with the listener lists)."""
        cond = self._cond
        if cond is None:
            with _listener_lock:
                cond = self._cond
                if cond is None:
                    self._waiter_list = []
                    self._callbacks = []
                    # Published last: whoever ends the task looks at _cond after
                    # setting the status, and we look at the status after this.
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        self._condition  # noqa: B018 - makes the lists
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Any]:
        self._condition  # noqa: B018 - makes the lists
        return self._callbacks

    # -- the scheduler's side ------------------------------------------------------------

    def _wait(self, timeout: float | None) -> None:
        cond = self._condition
        with cond:
            # Whoever ends the task sets the status before it looks for _cond, and
            # we made _cond before looking at the status: one of us sees the other.
            if not cond.wait_for(self.done, timeout):
                raise TimeoutError(f"task not done after {timeout}s (status {self._status})")

    def _notify(self) -> None:
        """The task has ended: wake waiters, tell concurrent.futures waiters, run callbacks."""
        cond = self._cond
        if cond is None:
            return
        status = self._status
        with cond:
            cond.notify_all()
            for waiter in self._waiter_list:
                if status is COMPLETED:
                    waiter.add_result(self)
                elif status is CANCELLED:
                    waiter.add_cancelled(self)
                else:
                    waiter.add_exception(self)
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn: Callable[[Any], object]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("exception calling callback for %r", self)


class SchedulerBase:
    """What TaskScheduler and AsyncTaskScheduler share: the constructor, the surface.

    The constructor validates through the core and then calls the driver's
    ``_start_driver()``; the arguments are documented on each driver.
    """

    _deque_class: type = PriorityDeque  # the twins plug in the pure-Python deque here
    _default_name = "buttress-scheduler"
    _core: SchedulerCore

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
        name: str | None = None,
    ) -> None:
        self._core = SchedulerCore(
            self._deque_class(), workers=workers, high_water=high_water, low_water=low_water,
            max_size=max_size, shed_below=shed_below, overflow=overflow,
            block_timeout=block_timeout, on_state_change=on_state_change,
            name=self._default_name if name is None else name, logger=logger)
        self._start_driver()

    def _start_driver(self) -> None:
        raise NotImplementedError

    @property
    def state(self) -> str:
        """normal, shedding, shutting_down or stopped."""
        return self._core.state

    @property
    def workers(self) -> int:
        return self._core.workers

    @property
    def high_water(self) -> int:
        return self._core.high_water

    @property
    def low_water(self) -> int:
        return self._core.low_water

    @property
    def max_size(self) -> int:
        return self._core.max_size

    @property
    def shed_below(self) -> Any:
        return self._core.shed_below

    @property
    def overflow(self) -> str:
        return self._core.overflow

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def block_timeout(self) -> float:
        return self._core.block_timeout

    @block_timeout.setter
    def block_timeout(self, value: float) -> None:
        self._core.block_timeout = require_number("block_timeout", value, minimum=0)

    def __len__(self) -> int:
        """Tasks queued (not yet taken by a worker)."""
        return len(self._core.queue)

    def __repr__(self) -> str:
        core = self._core
        return (f"<{type(self).__name__} {core.name!r} state={core.state} "
                f"queued={len(core.queue)} running={core.running}>")

    @staticmethod
    def _check_shutdown_timeout(timeout: float | None) -> float | None:
        if timeout is None:
            return None
        return time.monotonic() + require_number("timeout", timeout, minimum=0)


class TaskScheduler(SchedulerBase):
    """Runs callables on ``workers`` threads, most important first, with backpressure.

    ``high_water`` (default 10,000) starts shedding, ``low_water`` (default
    ``high_water // 2``) ends it, ``max_size`` (default ``2 * high_water``) is
    the hard limit.  ``on_state_change(old, new)`` is called (outside the lock,
    in order, from whichever thread made the change) on every state change.
    Use as a context manager (start, then drain on exit) or call ``start()``
    and ``shutdown()``.
    """

    def _start_driver(self) -> None:
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # "the queue has room" (block policy)
        self._changed = threading.Condition(self._lock)  # a worker exited or began shutdown
        self._blocked = 0  # producers waiting on _space
        self._idle: list[Any] = []  # wake locks of idle workers (held; release = wake)
        self._threads: list[threading.Thread] = []
        self._worker_idents: set[int] = set()
        self._started = False
        self._callback_lock = threading.RLock()  # events in order; a callback may enqueue

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> TaskScheduler:
        """Start the worker threads (idempotent); a scheduler cannot restart after shutdown."""
        with self._lock:
            if self._core.closing:
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

        Safe to call again, concurrently and from any thread, a task included:
        a task's call waits for the other workers except those whose task is
        itself inside ``shutdown()`` (so two such tasks cannot wait for each
        other), and the last worker to exit makes the state ``stopped``.  A
        later call waits again and returns a fresh summary, and ``drain=False``
        escalates a draining shutdown.  Returns a summary: ``stats()`` plus
        ``timed_out`` and ``cancelled_by_shutdown``.
        """
        deadline = self._check_shutdown_timeout(timeout)
        core = self._core
        in_worker = threading.get_ident() in self._worker_idents
        with self._lock:
            core.close(drain)
            cancelled = 0 if drain else core.cancel_queued()
            if drain and not self._started and len(core.queue):
                self._start_workers_locked()
            self._wake_all_locked()
        self._dispatch()  # shutting_down, and what was cancelled, before the wait
        with self._lock:
            if in_worker:
                core.stopping += 1
                self._changed.notify_all()
            try:
                while core.waits_for_workers(in_worker):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._changed.wait(remaining)
                timed_out = core.waits_for_workers(in_worker)
            finally:
                if in_worker:
                    core.stopping -= 1
            summary = core.shutdown_summary(timed_out=timed_out, cancelled=cancelled,
                                            workers=core.alive, idle_workers=len(self._idle))
        self._dispatch()
        if not in_worker and not timed_out:
            for thread in self._threads:  # exiting already; their last events delivered
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
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
            require_callable("task", task)
        if deadline is not None:
            check_deadline(deadline)
        handle = TaskHandle()
        handle._scheduler = self
        handle._value = task
        handle.priority = priority
        handle.deadline = deadline
        handle._status = QUEUED
        handle._cond = None
        core = self._core
        lock = self._lock
        lock.acquire()
        try:
            if core.state is not NORMAL and not core.admit(handle):
                self._wait_for_room_locked()
            # SchedulerCore.push, inlined: the call costs ~8% of a no-op task's
            # CPU here.  The rule stays in the core (shed_at is its threshold).
            queue = core.queue
            handle._entry = queue.push(handle, priority)
            core.accepted += 1
            if len(queue) >= core.shed_at:
                core.set_state(SHEDDING)
            if self._idle:
                self._idle.pop().release()
        finally:
            lock.release()
        if core.events:
            self._dispatch()
        return handle

    def _wait_for_room_locked(self) -> None:
        """overflow="block": wait up to block_timeout for room, then admit or refuse."""
        core = self._core
        limit = time.monotonic() + core.block_timeout
        self._blocked += 1
        try:
            while not core.has_room() and not core.closing:
                remaining = limit - time.monotonic()
                if remaining <= 0 or not self._space.wait(remaining):
                    break
        finally:
            self._blocked -= 1
        core.admit_after_wait()

    # -- cancellation ----------------------------------------------------------

    def _cancel(self, handle: TaskHandle) -> bool:
        with self._lock:
            cancelled = self._core.cancel(handle)
            if cancelled and self._blocked:
                self._space.notify(self._blocked)
        self._dispatch()
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
            self._core.alive += 1
            thread.start()
        logger.debug("%s: started %d workers", self.name, self.workers)

    def _work(self) -> None:
        self._worker_idents.add(threading.get_ident())
        core = self._core
        lock = self._lock
        queue = core.queue
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
                if batch or len(queue):
                    batch = core.exchange(len(batch), failed, expired, 0, limit)
                    failed = expired = 0
                    if batch and self._blocked:
                        self._space.notify(self._blocked)
                if not batch:
                    if core.closing:
                        core.worker_exited()  # the last one out stops the scheduler
                        self._changed.notify_all()
                        wake = None  # type: ignore[assignment]
                    else:
                        self._idle.append(wake)
            if core.events:
                self._dispatch()
            if wake is None:
                self._worker_idents.discard(threading.get_ident())  # idents are reused
                return
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
                if handle._cond is not None:
                    handle._notify()
            per_task = (clock() - started) / len(batch)  # next_batch_limit, inlined
            limit = MAX_BATCH if per_task * MAX_BATCH <= BATCH_SECONDS else (
                max(1, int(BATCH_SECONDS / per_task)))

    def _wake_all_locked(self) -> None:
        for wake in self._idle:
            wake.release()
        self._idle.clear()
        self._space.notify_all()

    # -- state and observability -----------------------------------------------

    def _dispatch(self) -> None:
        """Deliver the core's events (state changes, ended handles) in order, outside the lock."""
        with self._callback_lock:
            with self._lock:
                events = self._core.take_events()
            self._core.deliver(events)

    def stats(self) -> dict[str, Any]:
        """Counts of every outcome, what is queued (by priority) and running, and the state."""
        with self._lock:
            return self._stats_locked()

    def _stats_locked(self) -> dict[str, Any]:
        return self._core.stats(workers=self._core.alive, idle_workers=len(self._idle))
