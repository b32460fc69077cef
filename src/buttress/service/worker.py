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

``BUTTRESS_WORKER_METRICS_PORT`` (optional) serves this process's dedupe
metrics on a port of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from buttress._validate import parse_int_setting, parse_number_setting
from buttress.dedupe import DedupeStatus, Deduplicator, RedisStore
from buttress.distributed import handler_factory
from buttress.errors import ButtressError
from buttress.service.records import TaskRecords

__all__ = ["InProgressElsewhere", "ServiceHandlers", "export_worker", "handlers"]

logger = logging.getLogger("buttress.service")

_serving_metrics = False  # set once this process serves /metrics (BUTTRESS_WORKER_METRICS_PORT)


class InProgressElsewhere(ButtressError):
    """Another worker still holds this task id; the queue retries the delivery later."""


class ServiceHandlers:
    """A mapping task name -> callable(envelope), for :class:`~buttress.distributed.Worker`.

    ``handlers`` maps task names to callables taking the payload (as for a
    plain worker).  ``lease`` (seconds) must cover the longest handler: a
    claim older than that may be taken over by a redelivery.
    """

    def __init__(self, handlers: Mapping[str, Callable[[Any], Any]], client: Any, queue: str,
                 *, ttl: float = 86_400.0, lease: float = 30.0,
                 worker_name: str | None = None) -> None:
        self.handlers = dict(handlers)
        self.records = TaskRecords(client, queue, ttl_ms=round(ttl * 1000))
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease = lease
        store = RedisStore(client, namespace=f"buttress:svc:{queue}:run")
        self.dedupe = Deduplicator(self._run, store, ttl=ttl, mode="effectively_once",
                                   lease=lease)
        self.wrapped = {name: self._for(name) for name in self.handlers}

    def _for(self, name: str) -> Callable[[Any], Any]:
        def handle(envelope: Any) -> Any:
            return self.handle(name, envelope)
        handle.__name__ = f"dedupe_{name}"
        return handle

    def handle(self, name: str, envelope: Any) -> Any:
        """Run the task unless its id already ran; raise to make the queue retry it."""
        if not isinstance(envelope, dict) or "id" not in envelope or "payload" not in envelope:
            raise ValueError(f"task {name!r}: expected a gateway envelope "
                             f"{{'id', 'payload'}}, got {envelope!r:.200}")
        body = {"task": name, "payload": envelope["payload"]}
        deadline = time.monotonic() + self.lease + 1.0
        while True:
            result = self.dedupe.process_message(envelope["id"], body)
            if result.status is not DedupeStatus.IN_PROGRESS:
                break
            if time.monotonic() > deadline:
                raise InProgressElsewhere(f"task {envelope['id']!r} is still held by another "
                                          "worker")
            time.sleep(0.05)  # the other holder finishes, or its lease lapses
        if result.status is DedupeStatus.FAILED:
            assert result.error is not None
            raise result.error
        if result.status is DedupeStatus.CONFLICT:
            raise ValueError(f"task {envelope['id']!r} was delivered with another payload")
        return result.value  # PROCESSED, or DUPLICATE: done before, acknowledged now

    def _run(self, task_id: str, body: dict[str, Any]) -> Any:
        self.records.write(task_id, {"state": "running", "started_at": round(time.time(), 3),
                                     "worker": self.worker_name})
        self.records.increment(task_id, "attempts")
        try:
            value = self.handlers[body["task"]](body["payload"])
        except Exception as exc:
            self._note(task_id, {"state": "failed", "error": repr(exc)[:500]})
            raise
        self._note(task_id, {"state": "done", "finished_at": round(time.time(), 3)})
        return value

    def _note(self, task_id: str, fields: dict[str, Any]) -> None:
        # After the handler ran, a failed status write must not fail the task: that would
        # release the claim and run the side effect again.  The record is informational.
        try:
            self.records.write(task_id, fields)
        except Exception as exc:
            logger.warning("task %r: could not record state %r: %r", task_id,
                           fields.get("state"), exc)


@handler_factory
def handlers(environ: Mapping[str, str] | None = None) -> Mapping[str, Callable[[Any], Any]]:
    """The factory ``--handlers buttress.service.worker:handlers`` calls (settings from env).

    ``BUTTRESS_SERVICE_HANDLERS`` (module:object, the application's handlers),
    ``BUTTRESS_REDIS_URL`` and ``BUTTRESS_QUEUE`` are required;
    ``BUTTRESS_DEDUPE_TTL`` and ``BUTTRESS_WORKER_DEDUPE_LEASE`` (seconds) and
    ``BUTTRESS_WORKER_METRICS_PORT`` are optional.
    """
    import redis

    from buttress.distributed import load_handlers

    env = os.environ if environ is None else environ
    missing = [name for name in ("BUTTRESS_SERVICE_HANDLERS", "BUTTRESS_REDIS_URL",
                                 "BUTTRESS_QUEUE") if not env.get(name)]
    if missing:
        raise ValueError(f"buttress.service.worker:handlers needs {', '.join(missing)} set")
    ttl = parse_number_setting("BUTTRESS_DEDUPE_TTL", env.get("BUTTRESS_DEDUPE_TTL", "86400"),
                               minimum=1.0)
    lease = parse_number_setting("BUTTRESS_WORKER_DEDUPE_LEASE",
                                 env.get("BUTTRESS_WORKER_DEDUPE_LEASE", "30"), minimum=0.1)
    client = redis.Redis.from_url(env["BUTTRESS_REDIS_URL"])
    service = ServiceHandlers(load_handlers(env["BUTTRESS_SERVICE_HANDLERS"]), client,
                              env["BUTTRESS_QUEUE"], ttl=ttl, lease=min(lease, ttl))
    port_text = env.get("BUTTRESS_WORKER_METRICS_PORT")
    if port_text:
        port = parse_int_setting("BUTTRESS_WORKER_METRICS_PORT", port_text, minimum=1,
                                 maximum=65535)
        serve_worker_metrics(service, port)
    return service.wrapped


def serve_worker_metrics(service: ServiceHandlers, port: int, host: str = "0.0.0.0") -> None:
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
