"""The asyncio worker (:class:`AsyncWorker`): coroutine handlers on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.exceptions import RedisError

from buttress.distributed.core import WorkerCore, new_request_id
from buttress.distributed.queue import AsyncFairQueue
from buttress.distributed.records import LeasedTask
from buttress.errors import StoreUnavailable

__all__ = ["AsyncWorker"]

logger = logging.getLogger("buttress.distributed")

_T = TypeVar("_T")
_RETRYABLE = (StoreUnavailable, RedisError, OSError)


class AsyncWorker(WorkerCore):
    """:class:`buttress.distributed.Worker` for an :class:`AsyncFairQueue` and coroutine handlers.

    ``handlers`` maps task names to coroutine functions (``async def``) taking
    the payload.  ``concurrency`` coroutines each lease ``prefetch`` tasks per
    round trip and await them one after the other, so at most ``concurrency``
    handlers are in flight per process.  The same books and decisions as the
    thread worker: a keeper coroutine renews every held lease every
    ``lease_ms / 3`` and sends a finished task's ack at once when its serving
    coroutine has more prefetched tasks to run first; Redis errors are retried
    with backoff and counted; a request whose reply was lost is resent with the
    same request id, so its tasks come back.

    ``await run()`` serves until :meth:`stop`, or SIGTERM / SIGINT when the loop
    runs in the main thread (the first signal drains: no new leases, held tasks
    finish and are acknowledged; a second stops at once, cancelling running
    handlers, whose tasks are redelivered after their lease).  A serving
    coroutine that dies of anything but a handler's exception or a Redis error
    stops the worker, and ``run()`` raises :class:`buttress.WorkerCrashed`.
    """

    _queue_type = AsyncFairQueue
    _coroutine_handlers = True

    def __init__(self, queue: AsyncFairQueue,
                 handlers: Mapping[str, Callable[[Any], Awaitable[Any]]],
                 **options: Any) -> None:
        super().__init__(queue, handlers, **options)
        self.queue: AsyncFairQueue = queue
        self._draining = False
        self._halted = False
        self._stopped = False
        self._started_run = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halt: asyncio.Event | None = None
        self._flush: asyncio.Event | None = None
        self._serving_done = False

    async def run(self) -> dict[str, Any]:
        """Serve tasks until stopped; return :meth:`stats`."""
        if self._started_run:
            raise RuntimeError("AsyncWorker.run() can only be called once")
        self._started_run = True
        self._loop = asyncio.get_running_loop()
        self._halt = asyncio.Event()
        self._flush = asyncio.Event()
        if self._halted:
            self._halt.set()
        restore = self._install_signal_handlers()
        logger.info("async worker %s serving queue %r with %d coroutine(s), prefetch %d",
                    self.name, self.queue.name, self.concurrency, self.prefetch)
        serving = [asyncio.create_task(self._guarded(self._serve()),
                                       name=f"buttress-worker-{i}")
                   for i in range(self.concurrency)]
        keeper = asyncio.create_task(self._guarded(self._keep()), name="buttress-worker-keeper")
        halt_wait = asyncio.ensure_future(self._halt.wait())
        serving_done: asyncio.Future[Any] = asyncio.gather(*serving)
        try:
            await asyncio.wait([halt_wait, serving_done], return_when=asyncio.FIRST_COMPLETED)
            self._serving_done = True
            self._flush.set()
            if self._halt.is_set():
                for task in [*serving, keeper]:
                    task.cancel()
            await asyncio.gather(*serving, keeper, return_exceptions=True)
        finally:
            halt_wait.cancel()
            for task in [*serving, keeper]:
                task.cancel()
            self._stopped = True
            restore()
        return self._outcome()

    def stop(self, drain: bool = True) -> None:
        """Stop leasing; with ``drain`` finish and acknowledge the held tasks, else stop now.

        Safe to call from any thread.
        """
        self._draining = True
        if not drain:
            self._halted = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            if threading.current_thread() is threading.main_thread() and _in_loop(loop):
                self._wake()
            else:
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._halted and self._halt is not None:
            self._halt.set()
        if self._flush is not None:
            self._flush.set()

    def _is_draining(self) -> bool:
        return self._draining

    def _is_stopped(self) -> bool:
        return self._stopped

    # ---------------------------------------------------------------- coroutines

    async def _guarded(self, body: Awaitable[None]) -> None:
        try:
            await body
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a coroutine must not die silently
            self._record_crash(exc)
            self._halted = True
            assert self._halt is not None
            self._halt.set()

    async def _serve(self) -> None:
        while not self._halted:
            draining = self._draining
            plan = self._lease_plan(draining)
            if plan is None:
                return
            acks, count = plan
            reply = await self._call(
                functools.partial(self.queue._lease_and_ack, acks, count, self.name))
            tasks = self._lease_answered(acks, reply)
            if tasks is None:  # halted, or gave up while draining: leases will expire
                return
            if not tasks:
                if not draining:
                    await self._idle()
                continue
            for position, task in enumerate(tasks, 1):
                if self._halted:
                    return
                await self._execute(task)
                if position < len(tasks):
                    assert self._flush is not None
                    self._flush.set()

    async def _keep(self) -> None:
        assert self._flush is not None
        renew_every = self._renew_every
        next_renew = time.monotonic() + renew_every
        while not self._halted:
            final = self._serving_done
            if not final:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._flush.wait(),
                                           max(0.0, next_renew - time.monotonic()))
                self._flush.clear()
            renew_due = time.monotonic() >= next_renew
            acks, renew = self._keeper_plan(renew_due, final)
            if acks or renew:
                reply = await self._call(functools.partial(self.queue._renew_and_ack, acks, renew))
                self._keeper_answered(acks, reply)
            if renew_due:
                next_renew = time.monotonic() + renew_every
            if final:
                return

    async def _execute(self, task: LeasedTask) -> None:
        handler, payload = self._prepare(task)
        if handler is None:
            await self._report_failure(task, payload, retry=False)
            return
        self._started()
        try:
            await handler(payload)
        except Exception as exc:
            await self._report_failure(task, self._handler_failed(task, exc), retry=True)
            return
        self._succeeded(task)

    async def _report_failure(self, task: LeasedTask, reason: str, *, retry: bool) -> None:
        self._count("failed")
        outcome = await self._call(lambda request_id: self.queue.fail(
            task, reason, retry=retry, request_id=request_id))
        self._fail_reported(task, reason, outcome)

    async def _call(self, send: Callable[[str], Awaitable[_T]]) -> _T | None:
        """Send one request until Redis answers; resends carry the same request id."""
        assert self._halt is not None
        request_id = new_request_id()
        backoff = None  # made on the first failure: seeding its jitter costs ~40 us
        give_up_at = float("inf")
        while True:
            try:
                reply = await send(request_id)
            except _RETRYABLE as exc:
                if backoff is None:
                    backoff = self._new_backoff()
                delay = self._store_error(backoff, exc)
                if self._draining:
                    give_up_at = min(give_up_at, time.monotonic() + self.queue.lease_ms / 1000)
                if self._halted or time.monotonic() > give_up_at:
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._halt.wait(), delay)
                continue
            if backoff is not None:
                logger.info("worker %s: Redis usable again after %d failed call(s)",
                            self.name, backoff.attempts)
            return reply

    async def _idle(self) -> None:
        try:
            await self.queue._wait_for_work(self.idle_wait)
        except _RETRYABLE:
            assert self._halt is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._halt.wait(), self.idle_wait)

    def _install_signal_handlers(self) -> Callable[[], None]:
        loop = self._loop
        if loop is None or threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: signal.Signals) -> None:
            drain = not self._draining
            logger.info("worker %s: %s, %s", self.name, signum.name,
                        "draining" if drain else "stopping now")
            self.stop(drain=drain)

        installed = []
        for s in signals:
            try:
                loop.add_signal_handler(s, on_signal, s)
            except (NotImplementedError, RuntimeError):  # not the main loop / platform
                continue
            installed.append(s)

        def restore() -> None:
            for s in installed:
                loop.remove_signal_handler(s)

        return restore


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
