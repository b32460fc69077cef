"""buttress: fast, production-grade building blocks for resilient services.

Public names are importable from the top level (``from buttress import
BloomFilter``).  Components load lazily, on first use, so importing buttress
stays cheap and optional dependencies (redis, uvicorn) are needed only by the
components that use them.  Pure-Python twins of the native pieces live in
``buttress.reference``.
"""

from __future__ import annotations

import importlib
from typing import Any

from buttress._version import __version__
from buttress.errors import (
    ButtressError,
    Expired,
    FencingRejected,
    PortInUseError,
    Rejected,
    Shed,
    StoreUnavailable,
    WorkerCrashed,
)

# Public name -> module that defines it.
_LAZY: dict[str, str] = {
    # hashing and the key-encoding rule (native)
    "xxh64": "buttress._hash",
    "xxh64_many": "buttress._hash",
    "hash_key": "buttress._hash",
    "encode_key": "buttress._hash",
    # Bloom filter (native core) and the backend-lookup guard
    "BloomFilter": "buttress.bloom",
    "BloomGuard": "buttress.bloom",
    # leader election with fencing tokens
    "LeaderElection": "buttress.leader",
    "LeaderElector": "buttress.leader",
    "FencedStore": "buttress.leader",
    "AsyncLeaderElection": "buttress.leader_async",
    "AsyncLeaderElector": "buttress.leader_async",
    "AsyncFencedStore": "buttress.leader_async",
    # graceful HTTP shutdown (WSGI and ASGI)
    "GracefulShutdown": "buttress.shutdown",
    "ShutdownBudget": "buttress.shutdown",
    "serve_wsgi": "buttress.shutdown",
    "serve_asgi": "buttress.shutdown",
    # consumer-side message dedupe
    "Deduplicator": "buttress.dedupe",
    "DedupeResult": "buttress.dedupe",
    "DedupeStatus": "buttress.dedupe",
    "SQLiteStore": "buttress.dedupe",
    "RedisStore": "buttress.dedupe",
    # priority task scheduler (native heap)
    "PriorityDeque": "buttress.scheduler",
    "TaskScheduler": "buttress.scheduler",
    "TaskHandle": "buttress.scheduler",
    # distributed fair queue over Redis (sync and asyncio)
    "FairQueue": "buttress.distributed",
    "Worker": "buttress.distributed",
    "AsyncFairQueue": "buttress.distributed",
    "AsyncWorker": "buttress.distributed",
}

__all__ = [
    "ButtressError",
    "Expired",
    "FencingRejected",
    "PortInUseError",
    "Rejected",
    "Shed",
    "StoreUnavailable",
    "WorkerCrashed",
    "__version__",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'buttress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
