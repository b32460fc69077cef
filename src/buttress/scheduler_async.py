"""The priority scheduler for coroutines: ``AsyncTaskScheduler``, on one event loop.

The same scheduler as ``buttress.TaskScheduler`` (docs/scheduler.md), for
services on asyncio or uvloop: ``workers`` worker coroutines run coroutine
functions, most important first (larger priority; FIFO among equals), over the
same native ``PriorityDeque`` and the same rules, which live once in
``buttress._scheduler_core.SchedulerCore``: the hysteresis between
``high_water`` and ``low_water``, ``shed_below``, the overflow policies at
``max_size``, deadlines, the accounting identity, the states.  Only the
waiting differs, and that is all this module does:

* ``enqueue()`` never waits; under ``overflow="block"`` a full queue refuses at
  once, and ``await enqueue_wait()`` waits up to ``block_timeout`` for room
  (``asyncio.Queue.put_nowait`` and ``put``).
* The handle is awaitable (``await handle`` gives the result or raises) and a
  ``concurrent.futures.Future`` like ``TaskHandle``.  ``cancel()`` cancels a
  queued task, and also a running one: the coroutine gets ``CancelledError``
  at its next ``await`` (as with ``asyncio.Task.cancel``).  Cancelling a
  coroutine that awaits the handle cancels the task too, as awaiting an
  ``asyncio.Task`` does; ``asyncio.shield(handle)`` avoids that.
* Workers run tasks inline (``await task()``), not as a Task each, so a no-op
  task costs about what its coroutine does.  A worker yields to the loop after
  each batch, so a long queue of quick tasks does not starve other coroutines.

A scheduler belongs to the event loop it was first used on; a call from
another loop or thread raises RuntimeError.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import CancelledError
from threading import get_ident
from typing import Any

from buttress._scheduler_core import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    NORMAL,
    QUEUED,
    RUNNING,
    SHEDDING,
    check_deadline,
    next_batch_limit,
)
from buttress.errors import Expired
from buttress.scheduler import SchedulerBase, TaskHandle

__all__ = ["AsyncTaskHandle", "AsyncTaskScheduler"]

logger = logging.getLogger("buttress.scheduler")

_CO_COROUTINE = inspect.CO_COROUTINE
_get_running_loop = asyncio._get_running_loop


class AsyncTaskHandle(TaskHandle):
    """A ``TaskHandle`` for a coroutine task: awaitable, and cancellable while running.

    ``await handle`` returns the task's result or raises what ``result()``
    would.  ``result()`` and ``exception()`` do not wait on the event loop's
    own thread (that would block the loop): there they raise RuntimeError
    while the task is not done.
    """

    __slots__ = ("_aio",)  # the asyncio future awaiters wait on, made on the first await
    _aio: asyncio.Future[None] | None
    _scheduler: AsyncTaskScheduler

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            waiter = self._aio
            if waiter is None or waiter.done():
                waiter = self._aio = self._scheduler._check_loop().create_future()
                waiter.add_done_callback(self._awaiter_cancelled)
            yield from waiter
        return self.result()

    def cancel(self) -> bool:
        """Cancel the task if queued, or ask its coroutine to stop if running.

        True if the task is cancelled or will be (a running coroutine that
        catches ``CancelledError`` and returns may still complete); False once
        it has ended otherwise.
        """
        status = self._status
        if status is CANCELLED:
            return True
        if status is QUEUED:
            return self._scheduler._cancel(self)
        if status is RUNNING:
            return self._scheduler._cancel_running(self)
        return False

    def _wait(self, timeout: float | None) -> None:
        scheduler = self._scheduler
        if scheduler._loop is not None and _get_running_loop() is scheduler._loop:
            raise RuntimeError("result() would block the event loop that runs the task: "
                               "await the handle instead")
        super()._wait(timeout)

    def _notify(self) -> None:
        waiter = self._aio
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        super()._notify()

    def _awaiter_cancelled(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled() and not self.done():
            self.cancel()


class _Worker:
    """One worker coroutine's bookkeeping, for cancelling what it runs."""

    __slots__ = ("cancelling", "current", "pending_cancels", "task")

    def __init__(self) -> None:
        self.current: AsyncTaskHandle | None = None  # the handle whose coroutine it awaits
        self.cancelling: AsyncTaskHandle | None = None  # the running handle asked to cancel
        self.pending_cancels = 0  # task.cancel() calls made for running handles, not yet seen
        self.task: asyncio.Task[None] | None = None


class AsyncTaskScheduler(SchedulerBase):
    """Runs coroutine functions on ``workers`` worker coroutines, most important first.

    The arguments, states, overflow policies, ``stats()`` and the shutdown
    summary are ``TaskScheduler``'s (docs/scheduler.md).  Use ``async with``
    (start, then drain on exit) or ``start()`` and ``await shutdown()``.
    """

    _default_name = "buttress-async-scheduler"

    def _start_driver(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id: int | None = None  # the loop's thread
        self._workers: list[_Worker] = []
        self._idle: list[asyncio.Future[None]] = []  # one per idle worker
        self._room: list[asyncio.Future[None]] = []  # producers waiting for room (block)
        self._changed: list[asyncio.Future[None]] = []  # shutdown() calls waiting
        self._started = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> AsyncTaskScheduler:
        """Start the worker coroutines on the running loop (idempotent).

        Raises RuntimeError outside a running loop, on another loop than the
        scheduler's, and after shutdown (a scheduler does not restart).
        """
        self._check_loop()
        if self._core.closing:
            raise RuntimeError(f"{self.name}: cannot start after shutdown")
        self._start_workers()
        return self

    async def __aenter__(self) -> AsyncTaskScheduler:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(drain=True)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Stop admitting, finish (``drain``) or cancel queued work, wait for the workers.

        ``TaskScheduler.shutdown``'s contract, awaited: the same summary, the
        same ``timeout`` rule (running coroutines keep running when it runs
        out), safe to call again, concurrently, and from a task (it waits for
        the other workers, except those whose task is itself in shutdown).
        """
        deadline = self._check_shutdown_timeout(timeout)
        self._check_loop()
        core = self._core
        core.close(drain)
        cancelled = 0 if drain else core.cancel_queued()
        if drain and not self._started and len(core.queue):
            self._start_workers()
        self._wake(self._idle)
        self._wake(self._room)
        self._dispatch()  # shutting_down, and what was cancelled, before the wait
        current = asyncio.current_task()
        in_worker = any(worker.task is current for worker in self._workers)
        if in_worker:
            core.stopping += 1
            self._wake(self._changed)
        try:
            while core.waits_for_workers(in_worker):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                await self._wait(self._changed, remaining)
            timed_out = core.waits_for_workers(in_worker)
        finally:
            if in_worker:
                core.stopping -= 1
        summary = core.shutdown_summary(timed_out=timed_out, cancelled=cancelled,
                                        workers=core.alive, idle_workers=len(self._idle))
        self._dispatch()
        return summary

    # -- admission -------------------------------------------------------------

    def enqueue(self, task: Callable[[], Coroutine[Any, Any, Any]], priority: Any = 0, *,
                deadline: float | None = None) -> AsyncTaskHandle:
        """Queue ``await task()`` at ``priority`` (larger runs first); return its handle.

        ``task`` is a coroutine function (``async def``; ``functools.partial``
        for arguments).  Never waits: raises ``Rejected`` when backpressure or
        shutdown refuses the task (under ``overflow="block"``, when the queue
        is full: ``await enqueue_wait()`` waits for room), and
        ``TypeError``/``ValueError`` for a bad task, priority or deadline.
        """
        # _handle(), inlined: this is the hot path of a no-op task.
        code = getattr(task, "__code__", None)
        if code is None or not code.co_flags & _CO_COROUTINE:
            _check_coroutine_function(task)
        if deadline is not None:
            check_deadline(deadline)
        core = self._core
        if get_ident() != self._thread_id or self._idle or not core.alive:
            # The full check costs ~0.2 us on Python 3.11 (asyncio._get_running_loop):
            # the hot path compares threads; the full check runs when idle workers
            # are woken or none is running, which is where another loop of this
            # thread (the first one ended) would otherwise go unnoticed.
            self._check_loop()
        handle = AsyncTaskHandle()
        handle._scheduler = self
        handle._value = task
        handle.priority = priority
        handle.deadline = deadline
        handle._status = QUEUED
        handle._cond = None
        handle._aio = None
        if core.state is not NORMAL and not core.admit(handle):
            core.reject(f"queue full (max_size={core.max_size}) and overflow='block': "
                        f"enqueue() does not wait for room, enqueue_wait() waits up to "
                        f"block_timeout={core.block_timeout}s")
        # SchedulerCore.push, inlined as in TaskScheduler.enqueue (the rule is
        # the core's: shed_at is its threshold).
        queue = core.queue
        handle._entry = queue.push(handle, priority)
        core.accepted += 1
        if len(queue) >= core.shed_at:
            core.set_state(SHEDDING)
        if self._idle:
            self._wake(self._idle, 1)
        if core.events:
            self._dispatch()
        return handle

    async def enqueue_wait(self, task: Callable[[], Coroutine[Any, Any, Any]],
                           priority: Any = 0, *, deadline: float | None = None
                           ) -> AsyncTaskHandle:
        """``enqueue``, except that under ``overflow="block"`` a full queue is waited on.

        Waits up to ``block_timeout`` seconds for room, then admits or raises
        ``Rejected``; with the other policies it is ``enqueue``.
        """
        _check_coroutine_function(task)  # bad arguments fail before any wait
        if deadline is not None:
            check_deadline(deadline)
        core = self._core
        if core.would_wait(priority):
            limit = time.monotonic() + core.block_timeout
            while core.would_wait(priority):
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait(self._room, remaining)
        return self.enqueue(task, priority, deadline=deadline)  # admits, or refuses

    # -- cancellation ----------------------------------------------------------

    def _cancel(self, handle: AsyncTaskHandle) -> bool:
        self._check_loop()
        cancelled = self._core.cancel(handle)
        if cancelled:
            self._wake(self._room, 1)
        self._dispatch()
        return cancelled

    def _cancel_running(self, handle: AsyncTaskHandle) -> bool:
        """Cancel a claimed task: before it starts (skipped), or while it runs (task.cancel)."""
        self._check_loop()
        for worker in self._workers:
            if worker.current is handle:
                # The worker is suspended inside this very coroutine, so the
                # CancelledError lands there (see _run); asked once per handle.
                if worker.cancelling is not handle:
                    worker.cancelling = handle
                    worker.pending_cancels += 1
                    worker.task.cancel()  # type: ignore[union-attr]
                return True
        # Claimed in a batch, not started: it ends now, and its worker skips it.
        self._core.settle(handle, CANCELLED, CancelledError("cancelled"))
        self._dispatch()
        return True

    # -- workers ---------------------------------------------------------------

    def _start_workers(self) -> None:
        if self._started:
            return
        self._started = True
        loop = self._check_loop()
        for number in range(self.workers):
            worker = _Worker()
            worker.task = loop.create_task(self._work(worker), name=f"{self.name}-{number}")
            self._workers.append(worker)
            self._core.alive += 1
        logger.debug("%s: started %d workers", self.name, self.workers)

    async def _work(self, worker: _Worker) -> None:
        """A worker: claim a batch, run it, yield to the loop; until shutdown empties the queue."""
        core = self._core
        batch: list[AsyncTaskHandle] = []
        counts = [0, 0, 0]  # failed, expired, cancelled in the batch just run
        limit = 1
        try:
            while True:
                batch = core.exchange(len(batch), counts[0], counts[1], counts[2], limit)
                counts[:] = (0, 0, 0)
                if self._room and batch:
                    self._wake(self._room, len(batch))
                if core.events:
                    self._dispatch()
                if batch:
                    started = time.perf_counter()
                    await self._run(worker, batch, counts)
                    limit = next_batch_limit((time.perf_counter() - started) / len(batch))
                    await self._pause(worker, None)  # let the rest of the loop run
                elif core.closing:
                    return
                else:
                    waiter = self._check_loop().create_future()
                    self._idle.append(waiter)
                    await self._pause(worker, waiter)
        finally:
            self._worker_exited(worker, batch, counts)

    async def _run(self, worker: _Worker, batch: list[AsyncTaskHandle], counts: list[int]
                   ) -> None:
        """Run a claimed batch in order; every handle of it has ended when this returns.

        ``counts`` gets how many failed, expired and were cancelled.  If the
        worker itself goes away mid-batch (its task cancelled, KeyboardInterrupt),
        the tasks it has not run end cancelled before the exception goes on.
        """
        monotonic = time.monotonic
        handle = None
        try:
            for handle in batch:
                if handle._status is not RUNNING:  # cancelled while it waited in the batch
                    counts[2] += 1
                    continue
                if handle.deadline is not None and handle.deadline < monotonic():
                    handle._value = Expired(f"deadline passed before the task could start "
                                            f"(priority {handle.priority!r})")
                    handle._status = EXPIRED
                    counts[1] += 1
                else:
                    # Left set afterwards: cancel() looks at it only while the status
                    # is RUNNING, which the next lines end.
                    worker.current = handle
                    try:
                        handle._value = await handle._value()
                        handle._status = COMPLETED
                    except asyncio.CancelledError:
                        handle._value = CancelledError("cancelled while running")
                        handle._status = CANCELLED
                        counts[2] += 1
                        if worker.cancelling is not handle:  # the worker itself is cancelled
                            self._notify(handle)
                            raise
                        worker.cancelling = None
                        self._cancel_seen(worker)
                    except (KeyboardInterrupt, SystemExit) as exc:
                        handle._value = exc
                        handle._status = FAILED
                        counts[0] += 1
                        self._notify(handle)
                        raise
                    except BaseException as exc:  # the task's failure goes to its handle
                        handle._value = exc
                        handle._status = FAILED
                        counts[0] += 1
                if handle._cond is not None or handle._aio is not None:
                    handle._notify()
                if worker.cancelling is not None:  # asked for this one, which ended otherwise
                    worker.cancelling = None
                    await self._absorb_cancel(worker)
        except BaseException:
            self._abandon(batch, handle, counts)
            raise
        finally:
            worker.current = None

    def _abandon(self, batch: list[AsyncTaskHandle], handle: AsyncTaskHandle | None,
                 counts: list[int]) -> None:
        """The worker leaves mid-batch: ``handle`` has ended (and said so); the rest end
        cancelled."""
        start = 0 if handle is None else batch.index(handle) + 1
        for rest in batch[start:]:
            if rest._status is RUNNING:
                rest._value = CancelledError("cancelled: the worker was cancelled")
                rest._status = CANCELLED
                self._notify(rest)
            counts[2] += 1

    async def _absorb_cancel(self, worker: _Worker) -> None:
        """A cancel asked for a coroutine that ended otherwise: consume it before the next."""
        task = worker.task
        if getattr(task, "_must_cancel", False):
            await self._pause(worker, None)  # still pending: it arrives at this yield
        else:
            self._cancel_seen(worker)  # delivered, and the coroutine swallowed it

    async def _pause(self, worker: _Worker, waiter: asyncio.Future[None] | None) -> None:
        """Wait for work (``waiter``) or yield once; absorb a cancel meant for a task."""
        try:
            if waiter is None:
                await asyncio.sleep(0)
            else:
                await waiter
        except asyncio.CancelledError:
            if not worker.pending_cancels:
                raise  # the worker itself is cancelled
            self._cancel_seen(worker)
            if waiter is not None and waiter in self._idle:
                self._idle.remove(waiter)  # cancelled with it: look for work again

    def _cancel_seen(self, worker: _Worker) -> None:
        worker.pending_cancels -= 1
        uncancel = getattr(worker.task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()

    def _worker_exited(self, worker: _Worker, batch: list[AsyncTaskHandle],
                       counts: list[int]) -> None:
        """Account for a worker leaving (shutdown, or its task cancelled with the loop)."""
        core = self._core
        core.exchange(len(batch), counts[0], counts[1], counts[2], 0)  # _run ended them all
        core.worker_exited()  # the last one out stops the scheduler
        self._wake(self._changed)
        if core.events:
            self._dispatch()

    # -- waiting ---------------------------------------------------------------

    async def _wait(self, waiters: list[asyncio.Future[None]], timeout: float | None) -> None:
        """Wait until woken through ``waiters`` or ``timeout`` seconds pass."""
        waiter = self._check_loop().create_future()
        waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                await asyncio.wait((waiter,), timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
                if waiter in waiters:
                    waiters.remove(waiter)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]], count: int | None = None) -> None:
        """Wake ``count`` (default: all) of ``waiters``."""
        while waiters and (count is None or count > 0):
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                if count is not None:
                    count -= 1

    # -- state and observability -----------------------------------------------

    def _notify(self, handle: AsyncTaskHandle) -> None:
        if handle._cond is not None or handle._aio is not None:
            handle._notify()

    def _dispatch(self) -> None:
        """Deliver the core's events (state changes, ended handles) in order."""
        core = self._core
        while core.events:
            core.deliver(core.take_events())

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        """The scheduler's loop, bound on first use; RuntimeError from anywhere else."""
        loop = _get_running_loop()
        if loop is None:
            raise RuntimeError(f"{self.name}: AsyncTaskScheduler must be used from a running "
                               f"event loop (inside a coroutine)")
        if self._loop is None:
            self._loop = loop
            self._thread_id = get_ident()
        elif loop is not self._loop:
            raise RuntimeError(f"{self.name}: used from a different event loop than the one "
                               f"it started on ({self._loop!r})")
        return loop

    def stats(self) -> dict[str, Any]:
        """Counts of every outcome, what is queued (by priority) and running, and the state."""
        return self._core.stats(workers=self._core.alive, idle_workers=len(self._idle))


def _check_coroutine_function(task: Any) -> None:
    """TypeError unless ``task`` is a coroutine function (or a partial, or async __call__)."""
    if inspect.iscoroutinefunction(task):
        return
    if callable(task) and inspect.iscoroutinefunction(type(task).__call__):
        return
    if inspect.iscoroutine(task):
        task.close()  # never awaited: close it rather than leave a warning behind
        raise TypeError("task must be a coroutine function, got a coroutine object: pass the "
                        "function itself (functools.partial for its arguments)")
    raise TypeError(f"task must be a coroutine function (async def), got "
                    f"{type(task).__name__}: {task!r}; wrap arguments with functools.partial")
