"""Task handlers for the worker processes started by tests/test_distributed*.py.

Run as ``python -m buttress worker --handlers distributed_handlers:HANDLERS``
with this directory on PYTHONPATH.  Handlers that record their executions write
to the Redis named by ``BUTTRESS_TEST_REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis

from buttress.distributed import handler_factory

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BUTTRESS_TEST_REDIS_URL"])
    return _client


def noop(payload: Any) -> None:
    """Do nothing."""


def work(payload: dict[str, Any]) -> None:
    """Sleep ``payload["sleep"]`` seconds, then record the execution in ``payload["log"]``."""
    time.sleep(payload.get("sleep", 0.0))
    _redis().rpush(payload["log"], f"{payload['n']}:{os.getpid()}")


def boom(payload: Any) -> None:
    raise ValueError(f"boom on {payload!r}")


class Fatal(BaseException):
    """Not a task failure: kills the worker thread or coroutine that meets it."""


def fatal(payload: Any) -> None:
    raise Fatal("a worker thread dies")


HANDLERS = {"noop": noop, "work": work, "boom": boom, "fatal": fatal}


@handler_factory
def make_handlers() -> dict[str, Any]:
    """Handlers built at worker start-up (the marked-factory form of --handlers)."""
    return {"noop": noop}


async def async_noop(payload: Any) -> None:
    """Do nothing, on the event loop."""


async def async_work(payload: dict[str, Any]) -> None:
    """The coroutine twin of :func:`work`: sleep, then record the execution."""
    await asyncio.sleep(payload.get("sleep", 0.0))
    _redis().rpush(payload["log"], f"{payload['n']}:{os.getpid()}")


async def async_fatal(payload: Any) -> None:
    raise Fatal("a worker coroutine dies")


ASYNC_HANDLERS = {"noop": async_noop, "work": async_work, "fatal": async_fatal}
