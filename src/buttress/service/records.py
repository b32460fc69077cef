"""Where a task's state lives in Redis: written by workers, read by the gateway.

One hash per client task id, kept as long as its dedupe record:
``buttress:svc:<queue>:task:{<id>}`` with fields ``state`` (running, done,
failed), ``started_at``, ``finished_at``, ``attempts``, ``worker``, ``error``.
Before a worker starts the task there is no record; the gateway's admission
claim then says "queued".  The id is the hash tag, so each record is one Redis
Cluster slot.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncTaskRecords", "TaskRecords"]

_NUMBERS = ("accepted_at", "started_at", "finished_at")


class TaskRecords:
    """Read and write task state records with redis-py (errors are the caller's).

    The commands are built here once; :class:`AsyncTaskRecords` sends the same
    ones with ``redis.asyncio``.
    """

    def __init__(self, client: Any, queue: str, *, ttl_ms: int) -> None:
        self.client = client
        self.prefix = f"buttress:svc:{queue}:task:"
        self.ttl_ms = ttl_ms

    def key(self, task_id: str) -> str:
        return f"{self.prefix}{{{task_id}}}"

    def write(self, task_id: str, fields: dict[str, Any]) -> None:
        """Set ``fields`` and restart the record's expiry (one round trip)."""
        self._write(task_id, fields).execute()

    def increment(self, task_id: str, field: str) -> None:
        self.client.hincrby(self.key(task_id), field, 1)

    def states(self, task_ids: list[str]) -> list[str | None]:
        """The ``state`` field of each record (None where there is none), one round trip."""
        return _states(self._states(task_ids).execute())

    def read(self, task_id: str) -> dict[str, Any] | None:
        return _record(self.client.hgetall(self.key(task_id)))

    def _write(self, task_id: str, fields: dict[str, Any]) -> Any:
        key = self.key(task_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.pexpire(key, self.ttl_ms)
        return pipe

    def _states(self, task_ids: list[str]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.key(task_id), "state")
        return pipe


class AsyncTaskRecords(TaskRecords):
    """:class:`TaskRecords` on a ``redis.asyncio`` client: the same keys and commands."""

    async def write(self, task_id: str, fields: dict[str, Any]) -> None:  # type: ignore[override]
        await self._write(task_id, fields).execute()

    async def increment(self, task_id: str, field: str) -> None:  # type: ignore[override]
        await self.client.hincrby(self.key(task_id), field, 1)

    async def states(self, task_ids: list[str]) -> list[str | None]:  # type: ignore[override]
        return _states(await self._states(task_ids).execute())

    async def read(self, task_id: str) -> dict[str, Any] | None:  # type: ignore[override]
        return _record(await self.client.hgetall(self.key(task_id)))


def _states(replies: list[Any]) -> list[str | None]:
    return [None if state is None else _text(state) for state in replies]


def _record(raw: dict[Any, Any]) -> dict[str, Any] | None:
    if not raw:
        return None
    record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for name in _NUMBERS:
        if name in record:
            record[name] = float(record[name])
    if "attempts" in record:
        record["attempts"] = int(record["attempts"])
    return record


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
