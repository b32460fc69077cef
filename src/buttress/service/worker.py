"""Handlers for ``python -m buttress worker`` that run each gateway task effectively once.

The gateway enqueues ``{"id": <client id>, "payload": ...}``.  The queue
delivers at least once (a worker killed mid-task is redelivered after its
lease; a rare double admission makes two queue tasks of one id), so each
handler is wrapped in a :class:`~buttress.Deduplicator` (``effectively_once``)
keyed by the client id: a redelivered task whose first run finished is
acknowledged without running again.  The one window left is a worker dying
after the side effect and before the "done" write (a few hundred microseconds):
handlers should be idempotent or transactional there, as docs/dedupe.md says.

Run it without changing the worker itself::

    BUTTRESS_REDIS_URL=redis://redis:6379/0 BUTTRESS_QUEUE=tasks \\
    BUTTRESS_SERVICE_HANDLERS=app.tasks:HANDLERS \\
    python -m buttress worker --redis redis://redis:6379/0 --queue tasks \\
        --handlers buttress.service.worker:handlers

With coroutine handlers, on :class:`~buttress.distributed.AsyncWorker`:
``python -m buttress worker --async ... --handlers
buttress.service.worker:async_handlers`` (:class:`AsyncServiceHandlers`: the
same claims and records, awaited).

``BUTTRESS_WORKER_METRICS_PORT`` (optional) serves this process's dedupe
metrics on a port of its own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from buttress._validate import parse_int_setting, parse_number_setting
from buttress.dedupe import (
    AsyncDeduplicator,
    AsyncRedisStore,
    DedupeResult,
    DedupeStatus,
    Deduplicator,
    RedisStore,
)
from buttress.distributed import handler_factory
from buttress.errors import ButtressError
from buttress.service.records import AsyncTaskRecords, TaskRecords
from buttress.service.settings import MAX_DEDUPE_TTL

__all__ = ["AsyncServiceHandlers", "InProgressElsewhere", "ServiceHandlers", "async_handlers",
           "export_worker", "handlers"]

logger = logging.getLogger("buttress.service")

_serving_metrics = False  # set once this process serves /metrics (BUTTRESS_WORKER_METRICS_PORT)


class InProgressElsewhere(ButtressError):
    """Another worker still holds this task id; the queue retries the delivery later."""


_POLL = 0.05  # seconds between two claims of an id another worker holds


class _HandlersCore:
    """What both handler shells decide: envelopes, retries of a held id, records, results.

    A shell names its I/O classes (records, dedupe store, deduplicator) and
    defines ``handle`` and ``_run``; the rest is here.
    """

    _records: type[TaskRecords]
    _store: type[Any]
    _deduplicator: type[Any]

    def __init__(self, handlers: Mapping[str, Callable[[Any], Any]], client: Any, queue: str,
                 *, ttl: float = 86_400.0, lease: float = 30.0,
                 worker_name: str | None = None) -> None:
        self.handlers = dict(handlers)
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease = lease
        self.records = self._records(client, queue, ttl_ms=round(ttl * 1000))
        store = self._store(client, namespace=f"buttress:svc:{queue}:run")
        self.dedupe = self._deduplicator(self._run, store, ttl=ttl, mode="effectively_once",
                                         lease=lease)
        self.wrapped = self._wrap(self.handle)

    def handle(self, name: str, envelope: Any) -> Any:
        raise NotImplementedError

    def _run(self, task_id: str, body: dict[str, Any]) -> Any:
        raise NotImplementedError

    @staticmethod
    def _message(name: str, envelope: Any) -> tuple[str, dict[str, Any]]:
        """The dedupe message of a delivery: the client id, and what a duplicate must match."""
        if not isinstance(envelope, dict) or "id" not in envelope or "payload" not in envelope:
            raise ValueError(f"task {name!r}: expected a gateway envelope "
                             f"{{'id', 'payload'}}, got {envelope!r:.200}")
        return envelope["id"], {"task": name, "payload": envelope["payload"]}

    def _deadline(self) -> float:
        # Past the holder's lease (and a second), its claim can be taken over.
        return time.monotonic() + self.lease + 1.0

    @staticmethod
    def _held(result: DedupeResult, deadline: float) -> bool:
        """True to claim again after a pause: another worker holds the id, within the lease."""
        if result.status is not DedupeStatus.IN_PROGRESS:
            return False
        if time.monotonic() > deadline:
            raise InProgressElsewhere(f"task {result.msg_id!r} is still held by another "
                                      "worker")
        return True

    @staticmethod
    def _value(result: DedupeResult) -> Any:
        """The handler's value (PROCESSED), None (DUPLICATE: done before), or the error."""
        if result.status is DedupeStatus.FAILED:
            assert result.error is not None
            raise result.error
        if result.status is DedupeStatus.CONFLICT:
            raise ValueError(f"task {result.msg_id!r} was delivered with another payload")
        return result.value  # PROCESSED, or DUPLICATE: done before, acknowledged now

    def _running(self) -> dict[str, Any]:
        return {"state": "running", "started_at": round(time.time(), 3),
                "worker": self.worker_name}

    @staticmethod
    def _failed(exc: BaseException) -> dict[str, Any]:
        return {"state": "failed", "error": repr(exc)[:500]}

    @staticmethod
    def _done() -> dict[str, Any]:
        return {"state": "done", "finished_at": round(time.time(), 3)}

    @staticmethod
    def _note_failed(task_id: str, fields: dict[str, Any], exc: BaseException) -> None:
        # After the handler ran, a failed status write must not fail the task: that would
        # release the claim and run the side effect again.  The record is informational.
        logger.warning("task %r: could not record state %r: %r", task_id,
                       fields.get("state"), exc)

    def _wrap(self, handle: Callable[[str, Any], Any]) -> dict[str, Callable[[Any], Any]]:
        """One handler per task name taking the envelope (a coroutine function if handle is)."""
        def one(name: str) -> Callable[[Any], Any]:
            if inspect.iscoroutinefunction(handle):
                async def run_async(envelope: Any) -> Any:
                    return await handle(name, envelope)
                run: Callable[[Any], Any] = run_async
            else:
                run = functools.partial(handle, name)
            run.__name__ = f"dedupe_{name}"
            return run
        return {name: one(name) for name in self.handlers}


class ServiceHandlers(_HandlersCore):
    """A mapping task name -> callable(envelope), for :class:`~buttress.distributed.Worker`.

    ``handlers`` maps task names to callables taking the payload (as for a
    plain worker).  ``lease`` (seconds) must cover the longest handler: a
    claim older than that may be taken over by a redelivery.
    :class:`AsyncServiceHandlers` is the asyncio twin, for ``AsyncWorker``.
    """

    records: TaskRecords
    dedupe: Deduplicator
    _records, _store, _deduplicator = TaskRecords, RedisStore, Deduplicator

    def handle(self, name: str, envelope: Any) -> Any:
        """Run the task unless its id already ran; raise to make the queue retry it."""
        msg_id, body = self._message(name, envelope)
        deadline = self._deadline()
        result = self.dedupe.process_message(msg_id, body)
        while self._held(result, deadline):
            time.sleep(_POLL)  # the other holder finishes, or its lease lapses
            result = self.dedupe.process_message(msg_id, body)
        return self._value(result)

    def _run(self, task_id: str, body: dict[str, Any]) -> Any:
        self.records.write(task_id, self._running())
        self.records.increment(task_id, "attempts")
        try:
            value = self.handlers[body["task"]](body["payload"])
        except Exception as exc:
            self._note(task_id, self._failed(exc))
            raise
        self._note(task_id, self._done())
        return value

    def _note(self, task_id: str, fields: dict[str, Any]) -> None:
        try:
            self.records.write(task_id, fields)
        except Exception as exc:
            self._note_failed(task_id, fields, exc)


class AsyncServiceHandlers(_HandlersCore):
    """:class:`ServiceHandlers` for :class:`~buttress.distributed.AsyncWorker`.

    The same claims, records and decisions, awaited on the worker's loop:
    ``client`` is a ``redis.asyncio`` client; ``handlers`` map task names to
    coroutine functions taking the payload (a plain function is called on the
    loop, so it must not block).  ``wrapped`` maps each name to a coroutine
    function taking the gateway's envelope.
    """

    records: AsyncTaskRecords
    dedupe: AsyncDeduplicator
    _records, _store, _deduplicator = AsyncTaskRecords, AsyncRedisStore, AsyncDeduplicator

    async def handle(self, name: str, envelope: Any) -> Any:
        """Run the task unless its id already ran; raise to make the queue retry it."""
        msg_id, body = self._message(name, envelope)
        deadline = self._deadline()
        result = await self.dedupe.process_message(msg_id, body)
        while self._held(result, deadline):
            await asyncio.sleep(_POLL)
            result = await self.dedupe.process_message(msg_id, body)
        return self._value(result)

    async def _run(self, task_id: str, body: dict[str, Any]) -> Any:
        await self.records.write(task_id, self._running())
        await self.records.increment(task_id, "attempts")
        try:
            value = self.handlers[body["task"]](body["payload"])
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            await self._note(task_id, self._failed(exc))
            raise
        await self._note(task_id, self._done())
        return value

    async def _note(self, task_id: str, fields: dict[str, Any]) -> None:
        try:
            await self.records.write(task_id, fields)
        except Exception as exc:
            self._note_failed(task_id, fields, exc)


@handler_factory
def handlers(environ: Mapping[str, str] | None = None) -> Mapping[str, Callable[[Any], Any]]:
    """The factory ``--handlers buttress.service.worker:handlers`` calls (settings from env).

    ``BUTTRESS_SERVICE_HANDLERS`` (module:object, the application's handlers),
    ``BUTTRESS_REDIS_URL`` and ``BUTTRESS_QUEUE`` are required;
    ``BUTTRESS_DEDUPE_TTL`` and ``BUTTRESS_WORKER_DEDUPE_LEASE`` (seconds) and
    ``BUTTRESS_WORKER_METRICS_PORT`` are optional.
    """
    import redis

    return _from_env(environ, ServiceHandlers, redis.Redis.from_url)


@handler_factory
def async_handlers(environ: Mapping[str, str] | None = None
                   ) -> Mapping[str, Callable[[Any], Any]]:
    """``python -m buttress worker --async --handlers buttress.service.worker:async_handlers``.

    The settings of :func:`handlers`; the application's handlers
    (``BUTTRESS_SERVICE_HANDLERS``) are coroutine functions.
    """
    import redis.asyncio

    return _from_env(environ, AsyncServiceHandlers, redis.asyncio.Redis.from_url)


def _from_env(environ: Mapping[str, str] | None,
              kind: Callable[..., ServiceHandlers | AsyncServiceHandlers],
              connect: Callable[[str], Any]) -> Mapping[str, Callable[[Any], Any]]:
    from buttress.distributed import load_handlers

    env = os.environ if environ is None else environ
    missing = [name for name in ("BUTTRESS_SERVICE_HANDLERS", "BUTTRESS_REDIS_URL",
                                 "BUTTRESS_QUEUE") if not env.get(name)]
    if missing:
        raise ValueError(f"buttress.service.worker:handlers needs {', '.join(missing)} set")
    ttl = parse_number_setting("BUTTRESS_DEDUPE_TTL", env.get("BUTTRESS_DEDUPE_TTL", "86400"),
                               minimum=1.0, maximum=MAX_DEDUPE_TTL)
    lease = parse_number_setting("BUTTRESS_WORKER_DEDUPE_LEASE",
                                 env.get("BUTTRESS_WORKER_DEDUPE_LEASE", "30"), minimum=0.1)
    service = kind(load_handlers(env["BUTTRESS_SERVICE_HANDLERS"]),
                   connect(env["BUTTRESS_REDIS_URL"]), env["BUTTRESS_QUEUE"], ttl=ttl,
                   lease=min(lease, ttl))
    port_text = env.get("BUTTRESS_WORKER_METRICS_PORT")
    if port_text:
        port = parse_int_setting("BUTTRESS_WORKER_METRICS_PORT", port_text, minimum=1,
                                 maximum=65535)
        try:
            serve_worker_metrics(service, port)
        except OSError as exc:
            # A setting that cannot work, reported as the others are (the worker command
            # prints it and exits 2), not as a traceback ending in a bare bind error.
            raise ValueError(f"BUTTRESS_WORKER_METRICS_PORT: cannot serve metrics on port "
                             f"{port}: {exc.strerror or exc}") from exc
    return service.wrapped


def serve_worker_metrics(service: ServiceHandlers | AsyncServiceHandlers, port: int,
                         host: str = "0.0.0.0") -> None:
    """Serve this worker process's metrics (its dedupe) on ``port`` from a daemon thread."""
    from prometheus_client import REGISTRY, start_http_server

    from buttress.metrics import register

    global _serving_metrics
    register(service.dedupe, REGISTRY, name="worker")
    start_http_server(port, addr=host, registry=REGISTRY)
    _serving_metrics = True
    logger.info("worker metrics on http://%s:%d/metrics", host, port)


def export_worker(worker: Any) -> None:
    """Add the Worker's own counters to this process's metrics, if it serves any.

    Called by ``python -m buttress worker`` once the Worker exists (the handler
    factory, which opened the port, runs before it).
    """
    if _serving_metrics:
        from buttress.metrics import register

        register(worker)
