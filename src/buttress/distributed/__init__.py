"""Distributed fair scheduling over Redis: many workers, fair between tenants.

A :class:`FairQueue` keeps one queue per tenant in Redis and serves them by
deficit round robin (DRR) with per-tenant weights, so a tenant that floods the
queue cannot starve the others, while within a tenant higher priority goes
first (FIFO among equals).  A :class:`Worker` leases tasks, runs the handler
registered for the task's name with the task's JSON payload, and acknowledges.
:class:`AsyncFairQueue` and :class:`AsyncWorker` are the asyncio twins
(``redis.asyncio``, coroutine handlers): same script, keys and records, so sync
and async producers and workers of one queue interoperate.

>>> queue = FairQueue(redis.Redis(), "emails", high_water=10_000, low_water=5_000,
...                   lease_ms=30_000)                                  # doctest: +SKIP
>>> queue.enqueue("send", {"to": "a@example.com"}, tenant="acme")      # doctest: +SKIP
>>> Worker(queue, handlers={"send": send}).run()                     # doctest: +SKIP

The package, top-down: ``queue`` (the I/O shells of the queue), ``worker`` and
``worker_async`` (the workers, and the ``--handlers`` spec), ``core`` (the
decisions both shells share: requests, replies, a worker's books), ``records``
(LeasedTask, DeadLetter), ``lua/queue.lua`` (the one script, with its KEYS/ARGV
contract), ``cli`` (``python -m buttress worker``).  The algorithm, the resend
rule per operation, leases and prefetch are in ``docs/distributed.md``.
"""

from buttress.distributed.queue import AsyncFairQueue, FairQueue
from buttress.distributed.records import DeadLetter, LeasedTask
from buttress.distributed.worker import Worker, handler_factory, load_handlers
from buttress.distributed.worker_async import AsyncWorker

__all__ = [
    "AsyncFairQueue",
    "AsyncWorker",
    "DeadLetter",
    "FairQueue",
    "LeasedTask",
    "Worker",
    "handler_factory",
    "load_handlers",
]
