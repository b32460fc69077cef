"""Which redis-py client a class was given: sync (``redis.Redis``) or ``redis.asyncio``.

A sync client given to an asyncio class would hand back values where the
class awaits coroutines (and the reverse would hand back coroutines nobody
awaits), so the wrong kind is refused up front with a TypeError naming both.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["describe", "is_async_client", "require_async_client", "require_sync_client"]


def is_async_client(client: Any) -> bool:
    """True for a ``redis.asyncio`` client (``Redis``, ``RedisCluster``) or one like it."""
    execute = getattr(client, "execute_command", None)
    return execute is not None and inspect.iscoroutinefunction(execute)


def _kind(client: Any) -> str:
    kind = type(client)
    return f"{kind.__module__}.{kind.__qualname__}"


def require_sync_client(
    client: Any, *, owner: str, twin: str | None = None, argument: str = "client"
) -> Any:
    """``client`` if it is a sync redis-py client; TypeError naming both classes otherwise."""
    if callable(getattr(client, "execute_command", None)) and not is_async_client(client):
        return client
    hint = f"; use {twin} with a redis.asyncio client" if twin and is_async_client(client) \
        else ""
    raise TypeError(f"{owner} needs a sync redis-py client as {argument} (redis.Redis or "
                    f"redis.cluster.RedisCluster), got {_kind(client)}{hint}")


def require_async_client(
    client: Any, *, owner: str, twin: str | None = None, argument: str = "client"
) -> Any:
    """``client`` if it is a ``redis.asyncio`` client; TypeError naming both classes otherwise."""
    if is_async_client(client):
        return client
    hint = f"; use {twin} with a sync client" if twin and callable(
        getattr(client, "execute_command", None)) else ""
    raise TypeError(f"{owner} needs a redis.asyncio client as {argument} "
                    f"(redis.asyncio.Redis or redis.asyncio.RedisCluster), "
                    f"got {_kind(client)}{hint}")


def describe(client: Any) -> str:
    """``host:port`` of ``client``'s server for messages (``?`` where it cannot tell)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if kwargs:
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    nodes = getattr(client, "startup_nodes", None)
    if nodes:
        first = nodes[0] if isinstance(nodes, list) else next(iter(nodes.values()), None)
        name = getattr(first, "name", None)
        if name:
            return f"cluster {name}"
    return "?"
