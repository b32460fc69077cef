"""RedisStore: claim records as Redis strings, transitions in Lua, cleanup by native TTL.

For consumers on many machines.  Each message id is one string key holding
``state|attempt|lease_until_ms|fingerprint|token``
(fingerprint in 16 hex digits) (``state`` is ``c`` for
claimed, ``d`` for done) with a PX expiry, so Redis itself deletes old records
and there is nothing to sweep.  Every transition is a Lua script (atomic on the
server; lease times come from the server clock, so consumers' clocks do not
matter) registered once and called by EVALSHA; redis-py reloads a script when
the server answers NOSCRIPT (after a restart or SCRIPT FLUSH).

One claim is not a script: a single id whose lease outlives its record
(``lease_ms >= ttl_ms``, as in at_most_once) is claimed with a plain
``SET key value NX PX ttl``, the same command a hand-rolled dedupe sends.  Such
a lease can never lapse before Redis deletes the record, so it needs no clock:
its ``lease_until_ms`` is :data:`NEVER_MS`, here and in the script alike.  Only
when SET NX finds the key taken does a second round trip, the claim script,
read the record and decide (duplicate, in progress, conflict, takeover; or a
fresh claim if the record expired in between).

Keys are ``{namespace}:<msg_id>``: the braces are a hash tag, so every key a
script touches lives in one Redis Cluster slot.  With ``partitions=N`` the tag
becomes ``{namespace:p}`` (``p`` from the id's XXH64) to spread a namespace over
N slots; a batch then costs one script call per partition it touches.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any, TypeVar

from buttress._hash import xxh64
from buttress.dedupe.store import ClaimRecord
from buttress.errors import StoreUnavailable

__all__ = ["NEVER_MS", "RedisStore"]

logger = logging.getLogger("buttress.dedupe")

T = TypeVar("T")


_ONE = ord("1")  # an "applied" flag in FINISH_SCRIPT's reply
NEVER_MS = 9_999_999_999_999  # lease_until_ms of a claim whose lease outlives its record


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


class RedisStore:
    """Claim records in Redis, for consumers on many machines.

    ``client`` is a redis-py ``Redis`` or ``RedisCluster`` (bytes or decoded
    responses).
    ``namespace`` prefixes every key; ``partitions`` (default 1) spreads keys
    over that many hash tags for Redis Cluster.  Connection failures raise
    :class:`~buttress.StoreUnavailable`.
    """

    # KEYS[i]: record key of message i (one hash tag, so one slot).
    # ARGV[1]: owner token of this claim call; ARGV[2]: lease in ms (>= the TTL: never lapses,
    # written as NEVER_MS, as the single-claim SET NX path writes it); ARGV[3]: record TTL in ms;
    # ARGV[4]: the payload fingerprints, 16 hex digits per key, concatenated in KEYS order (one
    # argument, not one per key: packing arguments is most of a batch's client-side cost).
    # Returns one code per key, comma-separated: n > 0 claimed by this call as attempt n (n > 1:
    # taken over after attempt n - 1's lease lapsed); 0 duplicate (done); -1 in progress
    # (another owner's lease is live); -2 conflict (the record holds another fingerprint).
    # SET NX decides every race: of two consumers claiming one id, exactly one SET NX succeeds,
    # whether it came from this script or bare (RedisStore._set_claim): Redis runs one at a time.
    CLAIM_SCRIPT = """
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local token, ttl, fingerprints = ARGV[1], ARGV[3], ARGV[4]
local lease_until = string.format('%d', now + tonumber(ARGV[2]))
if tonumber(ARGV[2]) >= tonumber(ttl) then lease_until = 'NEVER_MS' end
local fresh_head, fresh_tail = 'c|1|' .. lease_until .. '|', '|' .. token
local codes = {}
for i, key in ipairs(KEYS) do
  local fingerprint = string.sub(fingerprints, 16 * i - 15, 16 * i)
  if redis.call('SET', key, fresh_head .. fingerprint .. fresh_tail, 'NX', 'PX', ttl) then
    codes[i] = 1
  else
    local state, attempt, until_ms, held = string.match(
      redis.call('GET', key), '^(%a)|(%d+)|(%d+)|(%x+)|')
    if held ~= fingerprint then
      codes[i] = -2
    elseif state == 'd' then
      codes[i] = 0
    elseif tonumber(until_ms) > now then
      codes[i] = -1
    else
      local next_attempt = tonumber(attempt) + 1
      redis.call('SET', key, 'c|' .. next_attempt .. '|' .. lease_until .. '|' .. fingerprint
        .. '|' .. token, 'PX', ttl)
      codes[i] = next_attempt
    end
  end
end
return table.concat(codes, ',')
""".replace("NEVER_MS", str(NEVER_MS))

    # KEYS[i]: record key of message i.  ARGV[1]: owner token; ARGV[2]: the transition, 'd' to
    # mark done (kept ARGV[3] ms) or 'c' to release (lease ended, TTL kept, ARGV[3] unused);
    # ARGV[4]: the attempt each key was claimed as, comma-separated in KEYS order.
    # Applies the transition only where the record is still claimed by this token at this
    # attempt: an owner whose lease lapsed and was taken over is fenced off.  A released
    # record's next claim takes it over at once as attempt + 1.  Returns a string with one
    # character per key: 1 applied, 0 fenced.
    FINISH_SCRIPT = """
local token, target, ttl = ARGV[1], ARGV[2], ARGV[3]
local applied, i = {}, 0
for claimed_attempt in string.gmatch(ARGV[4], '%d+') do
  i = i + 1
  applied[i] = '0'
  local record = redis.call('GET', KEYS[i])
  if record then
    local state, attempt, fingerprint, holder = string.match(
      record, '^(%a)|(%d+)|%d+|(%x+)|(.*)$')
    if state == 'c' and attempt == claimed_attempt and holder == token then
      local value = target .. '|' .. attempt .. '|0|' .. fingerprint .. '|' .. token
      if target == 'd' then
        redis.call('SET', KEYS[i], value, 'PX', ttl)
      else
        redis.call('SET', KEYS[i], value, 'KEEPTTL')
      end
      applied[i] = '1'
    end
  end
end
return table.concat(applied)
"""

    def __init__(self, client: Any, *, namespace: str = "buttress:dedupe",
                 partitions: int = 1) -> None:
        import redis

        if not callable(getattr(client, "register_script", None)):
            raise TypeError(f"client must be a redis-py client, got {type(client).__name__}")
        if not isinstance(namespace, str) or not namespace or "{" in namespace \
                or "}" in namespace:
            raise ValueError(f"namespace must be a non-empty str without braces, got {namespace!r}")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be an int >= 1, got {partitions!r}")
        self.client = client
        self.namespace = namespace
        self.partitions = partitions
        # The server cannot take writes now; anything else (a script error) is a bug to see.
        self._unavailable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                             redis.exceptions.ReadOnlyError, redis.exceptions.ClusterError,
                             redis.exceptions.TryAgainError)
        self._claim = client.register_script(self.CLAIM_SCRIPT)
        self._finish = client.register_script(self.FINISH_SCRIPT)
        self._script_calls = 0
        self._set_claims = 0  # single claims sent as a plain SET NX PX
        self._owns_client = False  # close() closes only a client this store created
        self._prefix = f"{{{namespace}}}:".encode()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStore:
        """A store on a new redis-py client for ``url`` (``redis://host:port/db``)."""
        import redis

        store = cls(redis.Redis.from_url(url), **kwargs)
        store._owns_client = True
        return store

    def key(self, msg_id: str) -> str:
        """The Redis key of ``msg_id``'s record."""
        if self.partitions == 1:
            return f"{{{self.namespace}}}:{msg_id}"
        return f"{{{self.namespace}:{self._partition(msg_id)}}}:{msg_id}"

    def _partition(self, msg_id: str) -> int:
        return xxh64(msg_id) % self.partitions

    # -- the store interface ------------------------------------------------------------

    def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
              lease_ms: int, ttl_ms: int) -> list[int]:
        if len(msg_ids) == 1 and lease_ms >= ttl_ms and self._set_claim(
                msg_ids[0], fingerprints[0], token, ttl_ms):
            return [1]
        answers = []
        for keys, positions in self._groups(msg_ids):
            chosen = fingerprints if positions is None else [fingerprints[i] for i in positions]
            # 16 hex digits per fingerprint, big-endian: what f"{fp:016x}" gives, at C speed.
            packed = struct.pack(f">{len(chosen)}Q", *chosen).hex()
            reply = self._run(self._claim, keys, [token, lease_ms, ttl_ms, packed])
            answers.append((positions, list(map(int, reply.split(b",")))))
        return _merge(answers, len(msg_ids))

    def _set_claim(self, msg_id: str, fingerprint: int, token: str, ttl_ms: int) -> bool:
        """Claim one id with a plain SET NX PX; False if its key exists (the script decides)."""
        key = self._prefix + msg_id.encode() if self.partitions == 1 else self.key(msg_id)
        self._set_claims += 1
        try:
            return bool(self.client.set(key, f"c|1|{NEVER_MS}|{fingerprint:016x}|{token}",
                                        nx=True, px=ttl_ms))
        except self._unavailable as exc:
            raise self._unreachable(exc) from exc

    def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                 ttl_ms: int) -> list[bool]:
        return self._transition(msg_ids, attempts, token, "d", ttl_ms)

    def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                token: str) -> list[bool]:
        return self._transition(msg_ids, attempts, token, "c", 0)

    def lookup(self, msg_id: str) -> ClaimRecord | None:
        try:
            raw = self.client.get(self.key(msg_id))
        except self._unavailable as exc:
            raise self._unreachable(exc) from exc
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        state, attempt, lease_until, fingerprint, token = text.split("|", 4)
        return ClaimRecord(msg_id, "done" if state == "d" else "claimed", int(attempt),
                           int(fingerprint, 16), token, int(lease_until))

    def sweep(self, *, budget: float = 0.05) -> int:
        """Nothing to do: Redis expires records itself (PX on every write)."""
        return 0

    def stats(self) -> dict[str, Any]:
        return {"store": "redis", "namespace": self.namespace, "partitions": self.partitions,
                "script_calls": self._script_calls, "set_claims": self._set_claims}

    def close(self) -> None:
        """Close the client if this store made it (``from_url``); one you passed stays open."""
        if self._owns_client:
            self.client.close()

    # -- helpers ----------------------------------------------------------------------

    def _transition(self, msg_ids: Sequence[str], attempts: Sequence[int], token: str,
                    target: str, ttl_ms: int) -> list[bool]:
        """Run FINISH_SCRIPT per hash tag: ``target`` "d" marks done, "c" releases."""
        answers = []
        for keys, positions in self._groups(msg_ids):
            chosen = attempts if positions is None else [attempts[i] for i in positions]
            reply = self._run(self._finish, keys,
                              [token, target, ttl_ms, ",".join(map(str, chosen))])
            answers.append((positions, [flag == _ONE for flag in reply]))
        return _merge(answers, len(msg_ids))

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
            keys, positions = groups.setdefault(self._partition(msg_id), ([], []))
            keys.append(self.key(msg_id).encode())
            positions.append(position)
        return list(groups.values())

    def _run(self, script: Any, keys: list[bytes], args: list[Any]) -> bytes:
        """One EVALSHA (redis-py loads the script on NOSCRIPT); the reply as bytes."""
        self._script_calls += 1
        try:
            reply = script(keys=keys, args=args)
        except self._unavailable as exc:
            raise self._unreachable(exc) from exc
        return reply.encode() if isinstance(reply, str) else reply

    def _unreachable(self, exc: Exception) -> StoreUnavailable:
        where = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", {})
        address = f"{where.get('host', '?')}:{where.get('port', '?')}" if where else "?"
        return StoreUnavailable(f"Redis at {address} is unavailable for dedupe records "
                                f"({type(exc).__name__}: {exc})")

    def __repr__(self) -> str:
        return f"RedisStore(namespace={self.namespace!r}, partitions={self.partitions})"
