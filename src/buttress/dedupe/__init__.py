"""Consumer-side message deduplication: each message id handled once, across consumers.

>>> store = SQLiteStore("dedupe.db")                              # doctest: +SKIP
>>> dedupe = Deduplicator(handle, store, ttl=86400, mode="effectively_once")
>>> result = dedupe.process_message("order-17", {"amount": 12})
>>> if result: ...  # the handler ran here; else result.status says why not

:class:`Deduplicator` holds the semantics (modes, fingerprints, the race; read
``buttress.dedupe.core``); a store does the I/O behind one small interface
(:class:`~buttress.dedupe.store.DedupeStore`): :class:`SQLiteStore` embedded,
:class:`RedisStore` for consumers on many machines.  :class:`AsyncDeduplicator`
with :class:`AsyncRedisStore` or :class:`AsyncSQLiteStore` is the asyncio twin.
docs/dedupe.md covers both modes, the race between consumers and how cleanup
scales; docs/redis.md how every Redis call survives a resend.
"""

from buttress.dedupe.aio import AsyncDeduplicator
from buttress.dedupe.core import (
    MAX_ID_BYTES,
    DedupeResult,
    DedupeStatus,
    Deduplicator,
    fingerprint,
)
from buttress.dedupe.redis_store import AsyncRedisStore, RedisStore
from buttress.dedupe.sqlite_store import AsyncSQLiteStore, SQLiteStore
from buttress.dedupe.store import AsyncDedupeStore, ClaimRecord, DedupeStore

__all__ = [
    "MAX_ID_BYTES",
    "AsyncDedupeStore",
    "AsyncDeduplicator",
    "AsyncRedisStore",
    "AsyncSQLiteStore",
    "ClaimRecord",
    "DedupeResult",
    "DedupeStatus",
    "DedupeStore",
    "Deduplicator",
    "RedisStore",
    "SQLiteStore",
    "fingerprint",
]
