"""Task handlers for the worker processes started by tests/test_distributed*.py.

Run as ``python -m buttress worker --handlers distributed_handlers:HANDLERS``
with this directory on PYTHONPATH.  Handlers that record their executions write
to the Redis named by ``BUTTRESS_TEST_REDIS_URL``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

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


HANDLERS = {"noop": noop, "work": work, "boom": boom}
