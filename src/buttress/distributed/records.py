"""What the queue hands out: leased tasks and dead letters (plain, immutable records)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["DeadLetter", "LeasedTask"]


@dataclass(frozen=True)
class LeasedTask:
    """A task delivered to a worker under a lease (``token`` proves ownership)."""

    id: str
    task_name: str
    payload_json: str
    tenant: str
    priority: int | float
    attempts: int
    deadline: float | None
    token: str

    def payload(self) -> Any:
        """The decoded JSON payload."""
        return json.loads(self.payload_json)


@dataclass(frozen=True)
class DeadLetter:
    """A task that will not run again, and why."""

    id: str
    task_name: str
    tenant: str
    priority: int | float
    payload: Any
    attempts: int
    reason: str
    last_error: str | None
    dead_at: float  # Unix time, from the Redis server's clock


def number_text(value: int | float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
