"""buttress: fast, production-grade building blocks for resilient services.

Public names are importable from the top level (``from buttress import
BloomFilter``).  Components load lazily, on first use, so importing buttress
stays cheap and optional dependencies (redis, uvicorn) are needed only by the
components that use them.  Type checkers see the real classes and functions
through the ``TYPE_CHECKING`` imports below.  Pure-Python twins of the native
pieces live in ``buttress.reference``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from buttress._version import __version__
from buttress.errors import (
    ButtressError,
    CorruptFilterError,
    Expired,
    FencingRejected,
    PortInUseError,
    Rejected,
    ServerConfigError,
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
    "DrainSignal": "buttress.shutdown",
    # consumer-side message dedupe
    "Deduplicator": "buttress.dedupe",
    "DedupeResult": "buttress.dedupe",
    "DedupeStatus": "buttress.dedupe",
    "SQLiteStore": "buttress.dedupe",
    "RedisStore": "buttress.dedupe",
    "AsyncDeduplicator": "buttress.dedupe",
    "AsyncRedisStore": "buttress.dedupe",
    "AsyncSQLiteStore": "buttress.dedupe",
    # priority task scheduler (native heap)
    "PriorityDeque": "buttress.scheduler",
    "TaskScheduler": "buttress.scheduler",
    "TaskHandle": "buttress.scheduler",
    "AsyncTaskScheduler": "buttress.scheduler_async",
    "AsyncTaskHandle": "buttress.scheduler_async",
    # distributed fair queue over Redis (sync and asyncio)
    "FairQueue": "buttress.distributed",
    "Worker": "buttress.distributed",
    "AsyncFairQueue": "buttress.distributed",
    "AsyncWorker": "buttress.distributed",
}

if TYPE_CHECKING:
    # What type checkers see: the real classes and functions behind the lazy names
    # (at run time __getattr__ imports them on first use).  Every name in _LAZY
    # must be here too; tests/test_typing.py checks it.
    from buttress._hash import encode_key, hash_key, xxh64, xxh64_many
    from buttress.bloom import BloomFilter, BloomGuard
    from buttress.dedupe import (
        AsyncDeduplicator,
        AsyncRedisStore,
        AsyncSQLiteStore,
        DedupeResult,
        DedupeStatus,
        Deduplicator,
        RedisStore,
        SQLiteStore,
    )
    from buttress.distributed import AsyncFairQueue, AsyncWorker, FairQueue, Worker
    from buttress.leader import FencedStore, LeaderElection, LeaderElector
    from buttress.leader_async import AsyncFencedStore, AsyncLeaderElection, AsyncLeaderElector
    from buttress.scheduler import PriorityDeque, TaskHandle, TaskScheduler
    from buttress.scheduler_async import AsyncTaskHandle, AsyncTaskScheduler
    from buttress.shutdown import (
        DrainSignal,
        GracefulShutdown,
        ShutdownBudget,
        serve_asgi,
        serve_wsgi,
    )

__all__ = [
    "ButtressError",
    "CorruptFilterError",
    "Expired",
    "FencingRejected",
    "PortInUseError",
    "Rejected",
    "ServerConfigError",
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
