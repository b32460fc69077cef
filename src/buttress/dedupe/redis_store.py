"""RedisStore and AsyncRedisStore: claim records as Redis strings, transitions in Lua.

For consumers on many machines.  Each message id is one string key holding
``state|attempt|lease_until_ms|fingerprint|token``
(fingerprint in 16 hex digits) (``state`` is ``c`` for
claimed, ``d`` for done) with a PX expiry, so Redis itself deletes old records
and there is nothing to sweep.  Every transition is a Lua script of the Redis
core (``buttress/_redis/dedupe_claim.lua`` and ``dedupe_finish.lua``, their
KEYS/ARGV contract in their header), atomic on the server, with lease times
from the server clock so consumers' clocks do not matter, run by EVALSHA.

A command that timed out may still run, once or twice (redis-py resends it
after reconnecting, and the server runs both copies when it resumes).  Every
claim call carries an owner token chosen before its first send, and the
scripts recognise it: a claim that finds a record holding its own token is the
caller's own claim (an earlier copy of the same call ran first), never someone
else's; a done or release write that finds its own transition already applied
reports it applied.  docs/redis.md walks through each case.

One claim is not a script: a single id whose lease outlives its record
(``lease_ms >= ttl_ms``, as in at_most_once) is claimed with a plain
``SET key value NX PX ttl``, the same command a hand-rolled dedupe sends.  Such
a lease can never lapse before Redis deletes the record, so it needs no clock:
its ``lease_until_ms`` is :data:`NEVER_MS`, here and in the script alike.  Only
when SET NX finds the key taken (another consumer's record, or this call's own
from an earlier copy of the SET) does a second round trip, the claim script,
read the record and decide.

Keys are ``{namespace}:<msg_id>``: the braces are a hash tag, so every key a
script touches lives in one Redis Cluster slot.  With ``partitions=N`` the tag
becomes ``{namespace:p}`` (``p`` from the id's XXH64) to spread a namespace over
N slots; a batch then costs one script call per partition it touches.

The two classes share every decision (keys, argument packing, reply parsing:
:class:`_RedisRecords`); they differ only in sending the commands, blocking or
with ``await``.  Sync and asyncio consumers of one namespace interoperate.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any, TypeVar

from buttress._hash import xxh64
from buttress._redis import (
    Keys,
    StoreErrors,
    check_tag,
    load_script,
    require_async_client,
    require_sync_client,
)
from buttress._validate import require_int
from buttress.dedupe.store import ClaimRecord

__all__ = ["NEVER_MS", "AsyncRedisStore", "RedisStore"]

logger = logging.getLogger("buttress.dedupe")

T = TypeVar("T")

_ONE = ord("1")  # an "applied" flag in the finish script's reply
NEVER_MS = 9_999_999_999_999  # lease_until_ms of a claim whose lease outlives its record
CLAIM = load_script("dedupe_claim.lua")
FINISH = load_script("dedupe_finish.lua")

# One script call: positions in the input (None: all of them, in order), keys, arguments.
_Call = tuple[list[int] | None, list[bytes], list[Any]]


def _merge(answers: list[tuple[list[int] | None, list[T]]], size: int) -> list[T]:
    """Put per-group answers back in input order (one group of positions None: as is)."""
    if len(answers) == 1 and answers[0][0] is None:
        return answers[0][1]
    out: list[Any] = [None] * size
    for positions, values in answers:
        assert positions is not None
        for position, value in zip(positions, values, strict=True):
            out[position] = value
    return out


def _claim_codes(reply: bytes | str) -> list[int]:
    return list(map(int, (reply.encode() if isinstance(reply, str) else reply).split(b",")))


def _finish_flags(reply: bytes | str) -> list[bool]:
    return [flag == _ONE for flag in (reply.encode() if isinstance(reply, str) else reply)]


class _RedisRecords:
    """Keys, script arguments and replies of the Redis dedupe records: no I/O."""

    _OWNER = "RedisStore"
    _TWIN = "AsyncRedisStore"

    def __init__(self, client: Any, *, namespace: str = "buttress:dedupe",
                 partitions: int = 1) -> None:
        self.namespace = check_tag("namespace", namespace)
        self.partitions = require_int("partitions", partitions, minimum=1)
        self.client = self._check_client(client)
        # The server cannot take writes now; anything else (a script error) is a bug to see.
        self._errors = StoreErrors("dedupe records", client)
        self._script_calls = 0
        self._set_claims = 0  # single claims sent as a plain SET NX PX
        self._owns_client = False  # close() closes only a client this store created
        self._keys = Keys(namespace)
        self._prefix = self._keys.base_bytes
        self._partitions: dict[int, Keys] = {}

    def _check_client(self, client: Any) -> Any:
        return require_sync_client(client, owner=self._OWNER, twin=self._TWIN)

    def key(self, msg_id: str) -> str:
        """The Redis key of ``msg_id``'s record."""
        if self.partitions == 1:
            return self._keys.key(msg_id)
        return self._partition_keys(self._partition(msg_id)).key(msg_id)

    def _partition_keys(self, partition: int) -> Keys:
        """The keys of one partition (hash tag ``{namespace:p}``), built once each."""
        keys = self._partitions.get(partition)
        if keys is None:
            keys = self._partitions[partition] = Keys(f"{self.namespace}:{partition}")
        return keys

    def _partition(self, msg_id: str) -> int:
        return xxh64(msg_id) % self.partitions

    def stats(self) -> dict[str, Any]:
        return {"store": "redis", "namespace": self.namespace, "partitions": self.partitions,
                "script_calls": self._script_calls, "set_claims": self._set_claims}

    # -- requests and replies ---------------------------------------------------------

    def _set_claim_request(self, msg_id: str, fingerprint: int, token: str) -> tuple[Any, str]:
        """Key and value of a single claim sent as SET NX PX (its lease never lapses)."""
        self._set_claims += 1
        key = (self._prefix if self.partitions == 1 else self._partition_keys(
            self._partition(msg_id)).base_bytes) + msg_id.encode()
        return key, f"c|1|{NEVER_MS}|{fingerprint:016x}|{token}"

    def _claim_calls(self, msg_ids: Sequence[str], fingerprints: Sequence[int], token: str,
                     lease_ms: int, ttl_ms: int) -> list[_Call]:
        calls: list[_Call] = []
        for keys, positions in self._groups(msg_ids):
            chosen = fingerprints if positions is None else [fingerprints[i] for i in positions]
            # 16 hex digits per fingerprint, big-endian: what f"{fp:016x}" gives, at C speed.
            packed = struct.pack(f">{len(chosen)}Q", *chosen).hex()
            calls.append((positions, keys, [token, lease_ms, ttl_ms, packed]))
        self._script_calls += len(calls)
        return calls

    def _finish_calls(self, msg_ids: Sequence[str], attempts: Sequence[int], token: str,
                      target: str, ttl_ms: int) -> list[_Call]:
        """Finish-script calls per hash tag: ``target`` "d" marks done, "c" releases."""
        calls: list[_Call] = []
        for keys, positions in self._groups(msg_ids):
            chosen = attempts if positions is None else [attempts[i] for i in positions]
            calls.append((positions, keys, [token, target, ttl_ms, ",".join(map(str, chosen))]))
        self._script_calls += len(calls)
        return calls

    @staticmethod
    def _record(msg_id: str, raw: bytes | str | None) -> ClaimRecord | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        state, attempt, lease_until, fingerprint, token = text.split("|", 4)
        return ClaimRecord(msg_id, "done" if state == "d" else "claimed", int(attempt),
                           int(fingerprint, 16), token, int(lease_until))

    def _groups(self, msg_ids: Sequence[str]) -> list[tuple[list[bytes], list[int] | None]]:
        """The record keys per hash tag, with their positions in ``msg_ids``.

        With one partition (the usual case) that is one group, positions None;
        no ids, no groups (and no script call).
        Keys go to redis-py as bytes: it sends bytes as they are, and encoding
        here is cheaper than its per-argument type checks.
        """
        if not msg_ids:
            return []
        if self.partitions == 1:
            prefix = self._prefix
            return [([prefix + msg_id.encode() for msg_id in msg_ids], None)]
        groups: dict[int, tuple[list[bytes], list[int]]] = {}
        for position, msg_id in enumerate(msg_ids):
            partition = self._partition(msg_id)
            keys, positions = groups.setdefault(partition, ([], []))
            keys.append(self._partition_keys(partition).base_bytes + msg_id.encode())
            positions.append(position)
        return list(groups.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r}, partitions={self.partitions})"


class RedisStore(_RedisRecords):
    """Claim records in Redis, for consumers on many machines.

    ``client`` is a redis-py ``Redis`` or ``RedisCluster`` (bytes or decoded
    responses; a ``redis.asyncio`` client is a TypeError: use
    :class:`AsyncRedisStore`).  ``namespace`` prefixes every key;
    ``partitions`` (default 1) spreads keys over that many hash tags for Redis
    Cluster.  A server that cannot serve (connection or timeout errors,
    LOADING, READONLY, MASTERDOWN, CLUSTERDOWN, TRYAGAIN) raises
    :class:`~buttress.StoreUnavailable`, cause chained.
    """

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStore:
        """A store on a new redis-py client for ``url`` (``redis://host:port/db``)."""
        import redis

        store = cls(redis.Redis.from_url(url), **kwargs)
        store._owns_client = True
        return store

    def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
              lease_ms: int, ttl_ms: int) -> list[int]:
        with self._errors:
            if len(msg_ids) == 1 and lease_ms >= ttl_ms:
                key, value = self._set_claim_request(msg_ids[0], fingerprints[0], token)
                if self.client.set(key, value, nx=True, px=ttl_ms):
                    return [1]
            client = self.client
            return _merge([(positions, _claim_codes(CLAIM.run(client, keys, args)))
                           for positions, keys, args in self._claim_calls(
                               msg_ids, fingerprints, token, lease_ms, ttl_ms)], len(msg_ids))

    def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                 ttl_ms: int) -> list[bool]:
        return self._transition(self._finish_calls(msg_ids, attempts, token, "d", ttl_ms),
                                len(msg_ids))

    def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                token: str) -> list[bool]:
        return self._transition(self._finish_calls(msg_ids, attempts, token, "c", 0),
                                len(msg_ids))

    def lookup(self, msg_id: str) -> ClaimRecord | None:
        with self._errors:
            return self._record(msg_id, self.client.get(self.key(msg_id)))

    def sweep(self, *, budget: float = 0.05) -> int:
        """Nothing to do: Redis expires records itself (PX on every write)."""
        return 0

    def close(self) -> None:
        """Close the client if this store made it (``from_url``); one you passed stays open."""
        if self._owns_client:
            self.client.close()

    def _transition(self, calls: list[_Call], size: int) -> list[bool]:
        with self._errors:
            client = self.client
            return _merge([(positions, _finish_flags(FINISH.run(client, keys, args)))
                           for positions, keys, args in calls], size)


class AsyncRedisStore(_RedisRecords):
    """:class:`RedisStore` for a ``redis.asyncio`` client: the same records and scripts.

    Every store method is a coroutine except :meth:`stats`.  A sync client is
    a TypeError (use :class:`RedisStore`).
    """

    _OWNER = "AsyncRedisStore"
    _TWIN = "RedisStore"

    def _check_client(self, client: Any) -> Any:
        return require_async_client(client, owner=self._OWNER, twin=self._TWIN)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> AsyncRedisStore:
        """A store on a new ``redis.asyncio`` client for ``url``."""
        import redis.asyncio

        store = cls(redis.asyncio.Redis.from_url(url), **kwargs)
        store._owns_client = True
        return store

    async def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
                    lease_ms: int, ttl_ms: int) -> list[int]:
        with self._errors:
            if len(msg_ids) == 1 and lease_ms >= ttl_ms:
                key, value = self._set_claim_request(msg_ids[0], fingerprints[0], token)
                if await self.client.set(key, value, nx=True, px=ttl_ms):
                    return [1]
            answers = []
            for positions, keys, args in self._claim_calls(msg_ids, fingerprints, token,
                                                           lease_ms, ttl_ms):
                answers.append((positions,
                                _claim_codes(await CLAIM.run_async(self.client, keys, args))))
            return _merge(answers, len(msg_ids))

    async def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                       ttl_ms: int) -> list[bool]:
        return await self._transition(
            self._finish_calls(msg_ids, attempts, token, "d", ttl_ms), len(msg_ids))

    async def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                      token: str) -> list[bool]:
        return await self._transition(
            self._finish_calls(msg_ids, attempts, token, "c", 0), len(msg_ids))

    async def lookup(self, msg_id: str) -> ClaimRecord | None:
        with self._errors:
            return self._record(msg_id, await self.client.get(self.key(msg_id)))

    async def sweep(self, *, budget: float = 0.05) -> int:
        """Nothing to do: Redis expires records itself (PX on every write)."""
        return 0

    async def close(self) -> None:
        """Close the client if this store made it (``from_url``); one you passed stays open."""
        if self._owns_client:
            await self.client.aclose()

    async def _transition(self, calls: list[_Call], size: int) -> list[bool]:
        with self._errors:
            answers = []
            for positions, keys, args in calls:
                answers.append((positions,
                                _finish_flags(await FINISH.run_async(self.client, keys, args))))
            return _merge(answers, size)
