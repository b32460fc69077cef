"""The one Redis core: everything in buttress that talks to Redis goes through here.

The rule every caller lives by: **a command that timed out may still run, once
or twice.**  redis-py (or the caller) resends it after a timeout, and the
server may run both copies once it resumes.  So every mutating call carries an
identity chosen before its first send (an owner token, a call nonce), and its
script recognises a second copy of itself.  docs/redis.md says how each
operation meets the rule.

API (stable; additions only):

Clients (:mod:`buttress._redis.clients`)
    ``require_sync_client(client, owner=..., twin=...)`` -> client
        TypeError (naming both classes) for a ``redis.asyncio`` client or a
        non-client; ``owner`` is the class asking, ``twin`` its asyncio sibling.
    ``require_async_client(client, owner=..., twin=...)`` -> client
        The reverse: TypeError for a sync client.
    ``is_async_client(client)`` -> bool
    ``describe(client)`` -> ``"host:port"`` for messages.

Keys (:mod:`buttress._redis.keys`)
    ``check_tag(name, value)`` -> str: a non-empty str without braces (it
        becomes a hash tag).
    ``Keys(tag, prefix="")``: ``.key(*parts)`` -> ``"prefix:{tag}:part:..."``
        (``"{tag}:part"`` without a prefix); ``.base`` the text before the
        parts, ``.base_bytes`` the same plus ``":"`` encoded (for fast key
        building in batches).  One hash tag per logical object, so every key a
        script touches lives in one Redis Cluster slot.

Scripts (:mod:`buttress._redis.scripts`)
    ``load_script(filename)`` -> :class:`Script` (cached: each ``.lua`` file in
        this package is read once).  The file's header comment states its
        KEYS/ARGV contract.
    ``Script.run(client, keys, args)``: EVALSHA, reloading after NOSCRIPT
        (a restart or SCRIPT FLUSH).  ``await Script.run_async(...)`` for
        ``redis.asyncio`` clients.  Errors are not mapped here: wrap the call
        in a :class:`StoreErrors` guard.

Errors (:mod:`buttress._redis.errors`)
    ``UNAVAILABLE_CODES``: the reply codes meaning "cannot serve now"
        (LOADING, READONLY, MASTERDOWN, CLUSTERDOWN, TRYAGAIN).
    ``is_unavailable(exc)`` -> bool: connection and timeout errors, socket
        errors (OSError), the codes above (also inside a script error).
    ``StoreErrors(what, client=None)``: a reusable context manager (sync and
        async code alike: ``with guard: await ...``) that turns an unavailable
        error into :class:`buttress.errors.StoreUnavailable`, cause chained;
        any other error (a script bug, WRONGTYPE) passes through unchanged.
        ``guard.error(exc)`` -> the StoreUnavailable it would raise.

Backoff (:mod:`buttress._redis.backoff`)
    ``Backoff(base, cap, *, jitter=0.5, seed=None)``: ``.next()`` -> seconds,
        ``uniform(1 - jitter, 1) * min(cap, base * 2**n)`` for the n-th call
        since ``.reset()``; ``.attempts``.
"""

from buttress._redis.backoff import Backoff
from buttress._redis.clients import (
    describe,
    is_async_client,
    require_async_client,
    require_sync_client,
)
from buttress._redis.errors import UNAVAILABLE_CODES, StoreErrors, is_unavailable
from buttress._redis.keys import Keys, check_tag
from buttress._redis.scripts import Script, load_script

__all__ = [
    "UNAVAILABLE_CODES",
    "Backoff",
    "Keys",
    "Script",
    "StoreErrors",
    "check_tag",
    "describe",
    "is_async_client",
    "is_unavailable",
    "load_script",
    "require_async_client",
    "require_sync_client",
]
