"""The thread-based worker (:class:`Worker`) and the handler spec of ``worker --handlers``."""

from __future__ import annotations

import functools
import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, TypeVar

from redis.exceptions import RedisError

from buttress._validate import require_str
from buttress.distributed.core import WorkerCore, new_request_id
from buttress.distributed.queue import FairQueue
from buttress.distributed.records import LeasedTask
from buttress.errors import StoreUnavailable

__all__ = ["Worker", "handler_factory", "load_handlers"]

logger = logging.getLogger("buttress.distributed")

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[[], Any])
_RETRYABLE = (StoreUnavailable, RedisError, OSError)


class Worker(WorkerCore):
    """Runs tasks from a :class:`FairQueue` with registered handlers, on threads.

    ``handlers`` maps task names to callables taking the task's payload.  A
    handler that raises fails the delivery (retried up to ``max_attempts``); a
    task whose name has no handler is dead-lettered with the reason and the
    worker keeps going.  ``concurrency`` threads each lease ``prefetch`` tasks
    per round trip and run them one after the other.

    Every task the worker holds keeps its lease: a keeper thread renews the
    leases of all of them (running, waiting in a prefetched batch, finished and
    not yet acknowledged) every ``lease_ms / 3``.  A finished task's ack rides on
    its thread's next lease call; when the thread has more prefetched tasks to
    run first, the keeper sends the ack at once instead.

    :meth:`run` blocks until :meth:`stop` (from another thread) or SIGTERM /
    SIGINT (when run in the main thread: the first signal drains, a second one
    stops at once).  Any Redis error is retried with jittered backoff, counted
    (``store_errors``) and logged; a thread that dies of anything else stops
    the worker and :meth:`run` raises :class:`buttress.WorkerCrashed`.
    """

    _queue_type = FairQueue

    def __init__(self, queue: FairQueue, handlers: Mapping[str, Callable[[Any], Any]],
                 **options: Any) -> None:
        super().__init__(queue, handlers, **options)
        self.queue: FairQueue = queue
        self._draining = threading.Event()  # stop leasing, finish what is held
        self._halt = threading.Event()  # stop now
        self._stopped = threading.Event()
        self._serving_done = threading.Event()
        self._flush = threading.Event()  # finished tasks wait for an ack: send it now
        self._start_lock = threading.Lock()
        self._started_run = False

    def run(self) -> dict[str, Any]:
        """Serve tasks until stopped; return :meth:`stats`."""
        with self._start_lock:
            if self._started_run:
                raise RuntimeError("Worker.run() can only be called once")
            self._started_run = True
        restore = self._install_signal_handlers()
        serving = [threading.Thread(target=self._guarded, args=(self._serve,),
                                    name=f"buttress-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        keeper = threading.Thread(target=self._guarded, args=(self._keep,),
                                  name="buttress-worker-keeper", daemon=True)
        logger.info("worker %s serving queue %r with %d thread(s), prefetch %d", self.name,
                    self.queue.name, self.concurrency, self.prefetch)
        try:
            for thread in [*serving, keeper]:
                thread.start()
            while any(t.is_alive() for t in serving) and not self._halt.is_set():
                self._halt.wait(0.2)  # short waits keep the main thread responsive to signals
            self._serving_done.set()
            self._flush.set()
            if not self._halt.is_set():
                keeper.join()
        finally:
            self._stopped.set()
            restore()
        return self._outcome()

    def stop(self, drain: bool = True) -> None:
        """Stop leasing; with ``drain`` finish and acknowledge the tasks held, else return now.

        Without drain, tasks still held are left to their leases: if this
        process exits they are redelivered after ``lease_ms``.
        """
        self._draining.set()
        if not drain:
            self._halt.set()

    def _is_draining(self) -> bool:
        return self._draining.is_set()

    def _is_stopped(self) -> bool:
        return self._stopped.is_set()

    # ---------------------------------------------------------------- threads

    def _guarded(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # a thread must not die silently
            self._record_crash(exc)
            self._halt.set()

    def _serve(self) -> None:
        while not self._halt.is_set():
            draining = self._draining.is_set()
            plan = self._lease_plan(draining)
            if plan is None:
                return
            acks, count = plan
            reply = self._call(
                functools.partial(self.queue._lease_and_ack, acks, count, self.name))
            tasks = self._lease_answered(acks, reply)
            if tasks is None:  # halted, or gave up while draining: leases will expire
                return
            if not tasks:
                if not draining:
                    self._idle()
                continue
            for position, task in enumerate(tasks, 1):
                if self._halt.is_set():
                    return
                self._execute(task)
                if position < len(tasks):
                    self._flush.set()  # more to run first: the keeper acks this one now

    def _keep(self) -> None:
        """Send pending acks as soon as they wait, and renew every held lease."""
        renew_every = self._renew_every
        next_renew = time.monotonic() + renew_every
        while not self._halt.is_set():
            final = self._serving_done.is_set()
            if not final:
                self._flush.wait(max(0.0, next_renew - time.monotonic()))
                self._flush.clear()
            renew_due = time.monotonic() >= next_renew
            acks, renew = self._keeper_plan(renew_due, final)
            if acks or renew:
                reply = self._call(functools.partial(self.queue._renew_and_ack, acks, renew))
                self._keeper_answered(acks, reply)
            if renew_due:
                next_renew = time.monotonic() + renew_every
            if final:
                return

    def _execute(self, task: LeasedTask) -> None:
        handler, payload = self._prepare(task)
        if handler is None:
            self._report_failure(task, payload, retry=False)
            return
        self._started()
        try:
            handler(payload)
        except Exception as exc:
            self._report_failure(task, self._handler_failed(task, exc), retry=True)
            return
        self._succeeded(task)

    def _report_failure(self, task: LeasedTask, reason: str, *, retry: bool) -> None:
        self._count("failed")
        outcome = self._call(lambda request_id: self.queue.fail(
            task, reason, retry=retry, request_id=request_id))
        self._fail_reported(task, reason, outcome)

    def _call(self, send: Callable[[str], _T]) -> _T | None:
        """Send one request until Redis answers; resends carry the same request id.

        Returns None when the worker halts, or when it drains and Redis has been
        unusable for ``lease_ms`` (the leases are gone by then anyway).
        """
        request_id = new_request_id()
        backoff = None  # made on the first failure: seeding its jitter costs ~40 us
        give_up_at = float("inf")
        while True:
            try:
                reply = send(request_id)
            except _RETRYABLE as exc:
                if backoff is None:
                    backoff = self._new_backoff()
                delay = self._store_error(backoff, exc)
                if self._draining.is_set():
                    give_up_at = min(give_up_at, time.monotonic() + self.queue.lease_ms / 1000)
                if self._halt.is_set() or time.monotonic() > give_up_at:
                    return None
                self._halt.wait(delay)
                continue
            if backoff is not None:
                logger.info("worker %s: Redis usable again after %d failed call(s)",
                            self.name, backoff.attempts)
            return reply

    def _idle(self) -> None:
        # A failure here shows again in the next lease call, which reports it and backs off.
        try:
            self.queue._wait_for_work(self.idle_wait)
        except _RETRYABLE:
            self._halt.wait(self.idle_wait)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            drain = not self._draining.is_set()
            logger.info("worker %s: %s, %s", self.name, signal.Signals(signum).name,
                        "draining" if drain else "stopping now")
            self.stop(drain=drain)

        previous = {s: signal.signal(s, on_signal) for s in signals}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore


# --------------------------------------------------------------------------- handler spec


def handler_factory(function: _F) -> _F:
    """Mark a zero-argument function as building the handler mapping at worker start-up.

    ``python -m buttress worker --handlers app.tasks:make_handlers`` calls a
    function only when it carries this mark::

        @handler_factory
        def make_handlers():
            client = connect()          # per-process set-up
            return {"send": lambda payload: client.send(payload)}
    """
    function.__buttress_handler_factory__ = True  # type: ignore[attr-defined]
    return function


def load_handlers(spec: str) -> Mapping[str, Callable[[Any], Any]]:
    """Import ``"package.module:object"`` and return the handler mapping it names.

    The one rule: ``object`` is either a **mapping of task name -> handler**, or a
    **zero-argument function marked with** :func:`handler_factory` that returns
    such a mapping.  Anything else (an unmarked function such as ``json:dumps``,
    a class, a module) is a ``TypeError`` saying so.  Whether the handlers are
    plain callables or coroutine functions is checked by the worker that runs
    them (``Worker`` or ``AsyncWorker``).
    """
    require_str("handlers", spec)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"handlers must look like 'package.module:object', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"handlers {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"handlers {spec!r}: {module_name!r} has no attribute "
                             f"{attribute!r}") from None
    if getattr(target, "__buttress_handler_factory__", False):
        target = target()
        if not isinstance(target, Mapping):
            raise TypeError(f"handlers {spec!r}: the factory returned "
                            f"{type(target).__name__}, not a mapping of task name -> handler")
    elif not isinstance(target, Mapping):
        raise TypeError(
            f"handlers {spec!r} names a {type(target).__name__}, not a mapping of task name "
            "-> handler; to build the mapping at start-up, name a zero-argument function "
            "decorated with @buttress.distributed.handler_factory")
    return target
