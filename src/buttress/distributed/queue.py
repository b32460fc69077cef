"""The queue's I/O shells: :class:`FairQueue` (redis-py), :class:`AsyncFairQueue` (asyncio).

Both send the requests :class:`~buttress.distributed.core.QueueCore` builds to
the one script ``lua/queue.lua`` and hand its replies back to the core; they
differ only in ``await``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from buttress._redis import Script
from buttress._validate import require_int, require_number
from buttress.distributed.core import STATS_READS, QueueCore, new_request_id
from buttress.distributed.records import DeadLetter, LeasedTask, text

__all__ = ["AsyncFairQueue", "FairQueue"]

# The one script of the queue (its KEYS/ARGV contract is in the file), run by the core.
_SCRIPT = Script("queue.lua", resources.files(__package__).joinpath("lua/queue.lua")
                 .read_text(encoding="utf-8"))


class FairQueue(QueueCore):
    """A multi-tenant task queue in Redis, served fairly by deficit round robin.

    ``high_water`` / ``low_water`` (default ``high_water // 2``) set the
    backpressure hysteresis on the number of *ready* (queued, not leased) tasks;
    ``shed_below``: while SHEDDING, enqueues with a lower priority are refused.
    ``lease_ms`` is how long a worker owns a delivered task before it is
    redelivered; ``max_attempts`` bounds deliveries before a task is
    dead-lettered, and a failed delivery is retried after ``retry_delay_ms``,
    doubled per attempt.  ``weights`` (tenant -> positive number, default 1)
    are stored in Redis, shared by every process using the queue; the last
    writer wins.  ``completion_log`` > 0 keeps the last that many acknowledged
    ``(tenant, id)`` pairs for audit (:meth:`completions`).
    ``resend_window_ms``: how long Redis remembers an enqueue's request id, so
    that a resend of the same call within it returns the same task id instead of
    creating a second task.

    The water marks are producer settings (each enqueue stores them in Redis for
    the workers' scripts); ``lease_ms``, ``max_attempts``, ``retry_delay_ms``,
    ``max_dead_letters`` and ``completion_log`` are worker settings.  Processes
    in the same role should agree on them.  Every Redis or socket error
    (including READONLY from a replica, LOADING, timeouts) is raised as
    :class:`buttress.StoreUnavailable` with the cause chained.
    """

    def __init__(self, redis_client: Any, name: str, **settings: Any) -> None:
        super().__init__(redis_client, name, **settings)
        if self._initial_weights:
            with self._guard:
                self.redis.hset(self.prefix + "weights", mapping=self._initial_weights)

    # ---------------------------------------------------------------- producers

    def enqueue(self, task_name: str, payload: Any, *, tenant: str, priority: int | float = 0,
                deadline: float | None = None, request_id: str | None = None) -> str:
        """Queue a task for ``tenant`` and return its id.

        ``payload`` must be JSON-serialisable (``TypeError`` otherwise; NaN and
        infinities are ``ValueError``).  ``priority``: larger runs first within
        the tenant.  ``deadline``: Unix time (``time.time()`` scale, compared
        with the Redis server's clock) after which the task is not started but
        dead-lettered as expired.  ``request_id``: the call's identity (drawn at
        random when omitted); a resend with the same id within
        ``resend_window_ms`` -- by redis-py's retry, or yours after a
        ``StoreUnavailable`` -- returns the first call's task id and creates
        nothing.  Raises :class:`buttress.Rejected` while the queue is SHEDDING
        and ``priority < shed_below``, and :class:`buttress.StoreUnavailable`
        when Redis cannot be used.
        """
        args = self._enqueue_request(task_name, payload, tenant, priority, deadline, request_id)
        with self._guard:
            reply = _SCRIPT.run(self.redis, [self._meta], args)
        return self._enqueue_reply(reply, priority)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set DRR weights (tenant -> quantum per turn, >= 0.01) for everyone using the queue."""
        checked = self._weights_request(weights)
        if checked:
            with self._guard:
                self.redis.hset(self.prefix + "weights", mapping=checked)

    # ---------------------------------------------------------------- consumers

    def lease(self, count: int = 1, *, owner: str = "", request_id: str | None = None
              ) -> list[LeasedTask]:
        """Lease up to ``count`` tasks, fairly across tenants (empty list: nothing ready).

        Resending a call with the same ``request_id`` after it failed returns the
        tasks its first run leased (if it ran) rather than leasing more.
        """
        require_int("count", count, minimum=1)
        return self._lease_and_ack((), count, owner, request_id or new_request_id())[1]

    def ack(self, task: LeasedTask) -> bool:
        """Complete a leased task; False if the lease was lost (expired and re-taken)."""
        stale, _ = self._lease_and_ack((task,), 0, "", new_request_id())
        return not stale

    def fail(self, task: LeasedTask, reason: str, *, retry: bool = True,
             request_id: str | None = None) -> str:
        """Record a failed delivery: ``"retried"``, ``"dead"`` (dead-lettered) or ``"stale"``.

        The task is retried while ``retry`` and it has had fewer than
        ``max_attempts`` deliveries, otherwise dead-lettered with ``reason``.
        A retry waits ``retry_delay_ms``, doubled for each earlier attempt
        (capped at an hour), then rejoins the front of its tenant's queue.
        """
        args = self._fail_request(task, reason, retry, request_id or new_request_id())
        with self._guard:
            return text(_SCRIPT.run(self.redis, [self._meta], args))

    def renew(self, tasks: Iterable[LeasedTask]) -> int:
        """Extend the leases of tasks still owned by their tokens; return how many."""
        return self._renew_and_ack((), tasks, new_request_id())[1]

    # ---------------------------------------------------------------- inspection

    def stats(self) -> dict[str, Any]:
        """Depth per tenant and priority, state, lease and dead-letter counts, counters."""
        pipe = self.redis.pipeline(transaction=False)
        for command, key in STATS_READS:
            getattr(pipe, command)(self.prefix + key)
        with self._guard:
            replies = pipe.execute()
        return self._stats_reply(replies)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead-lettered tasks, newest first."""
        require_int("limit", limit, minimum=1)
        with self._guard:
            ids = self.redis.lrange(self.prefix + "dead", 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(self.prefix + "task:" + text(task_id))
            records = pipe.execute()
        return self._dead_letters_reply(ids, records)

    def retry_dead_letter(self, task_id: str, *, request_id: str | None = None) -> bool:
        """Queue a dead-lettered task again (attempts reset); False if it is not dead-lettered.

        Admission control does not apply: the task was admitted once already.
        """
        args = self._revive_request(task_id, request_id or new_request_id())
        with self._guard:
            return bool(_SCRIPT.run(self.redis, [self._meta], args))

    def completions(self, limit: int | None = None) -> list[tuple[str, str]]:
        """Acknowledged ``(tenant, task id)`` pairs in ack order (needs ``completion_log``)."""
        if limit is not None:
            require_int("limit", limit, minimum=1)
        with self._guard:
            raw = self.redis.lrange(self.prefix + "done", 0, -1 if limit is None else limit - 1)
        return self._completions_reply(raw)

    # ---------------------------------------------------------------- the worker's calls

    def _lease_and_ack(self, acks: Iterable[LeasedTask], count: int, owner: str,
                       request_id: str) -> tuple[list[str], list[LeasedTask]]:
        """One round trip: ack ``acks``, then lease up to ``count`` tasks.

        ``request_id`` is also the delivery token of the tasks leased; resend a
        failed call with the same id (the worker does).
        """
        args = self._lease_request(acks, count, owner, request_id)
        with self._guard:
            reply = _SCRIPT.run(self.redis, [self._meta], args)
        return self._lease_reply(reply, request_id)

    def _renew_and_ack(self, acks: Iterable[LeasedTask], tasks: Iterable[LeasedTask],
                       request_id: str) -> tuple[list[str], int]:
        """One round trip: ack ``acks``, renew the leases of ``tasks``."""
        args = self._renew_request(acks, tasks, request_id)
        if len(args) == 5:
            return [], 0
        with self._guard:
            return self._renew_reply(_SCRIPT.run(self.redis, [self._meta], args))

    def _wait_for_work(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds until an enqueue leaves a wake token."""
        with self._guard:
            self.redis.blpop([self.prefix + "wake"], timeout=timeout)


class AsyncFairQueue(QueueCore):
    """:class:`FairQueue` for a ``redis.asyncio`` client: the same settings, keys and script.

    Every method that talks to Redis is a coroutine; construction does no I/O
    (``weights`` given here are stored by the first call, or by
    :meth:`set_weights`).  Sync and async producers and workers of one queue
    interoperate.
    """

    _asynchronous = True

    def __init__(self, redis_client: Any, name: str, **settings: Any) -> None:
        super().__init__(redis_client, name, **settings)
        self._weights_pending = self._initial_weights

    async def _script(self, args: list[Any]) -> Any:
        if self._weights_pending:
            await self._store_weights(self._weights_pending)
            self._weights_pending = None
        with self._guard:
            return await _SCRIPT.run_async(self.redis, [self._meta], args)

    async def _store_weights(self, checked: dict[str, str]) -> None:
        with self._guard:
            await self.redis.hset(self.prefix + "weights", mapping=checked)

    async def enqueue(self, task_name: str, payload: Any, *, tenant: str,
                      priority: int | float = 0, deadline: float | None = None,
                      request_id: str | None = None) -> str:
        """See :meth:`FairQueue.enqueue`."""
        args = self._enqueue_request(task_name, payload, tenant, priority, deadline, request_id)
        return self._enqueue_reply(await self._script(args), priority)

    async def set_weights(self, weights: Mapping[str, float]) -> None:
        """See :meth:`FairQueue.set_weights`."""
        checked = self._weights_request(weights)
        if checked:
            await self._store_weights(checked)

    async def lease(self, count: int = 1, *, owner: str = "", request_id: str | None = None
                    ) -> list[LeasedTask]:
        """See :meth:`FairQueue.lease`."""
        require_int("count", count, minimum=1)
        return (await self._lease_and_ack((), count, owner, request_id or new_request_id()))[1]

    async def ack(self, task: LeasedTask) -> bool:
        """See :meth:`FairQueue.ack`."""
        stale, _ = await self._lease_and_ack((task,), 0, "", new_request_id())
        return not stale

    async def fail(self, task: LeasedTask, reason: str, *, retry: bool = True,
                   request_id: str | None = None) -> str:
        """See :meth:`FairQueue.fail`."""
        args = self._fail_request(task, reason, retry, request_id or new_request_id())
        return text(await self._script(args))

    async def renew(self, tasks: Iterable[LeasedTask]) -> int:
        """See :meth:`FairQueue.renew`."""
        return (await self._renew_and_ack((), tasks, new_request_id()))[1]

    async def stats(self) -> dict[str, Any]:
        """See :meth:`FairQueue.stats`."""
        pipe = self.redis.pipeline(transaction=False)
        for command, key in STATS_READS:
            getattr(pipe, command)(self.prefix + key)
        with self._guard:
            replies = await pipe.execute()
        return self._stats_reply(replies)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """See :meth:`FairQueue.dead_letters`."""
        require_int("limit", limit, minimum=1)
        with self._guard:
            ids = await self.redis.lrange(self.prefix + "dead", 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(self.prefix + "task:" + text(task_id))
            records = await pipe.execute()
        return self._dead_letters_reply(ids, records)

    async def retry_dead_letter(self, task_id: str, *, request_id: str | None = None) -> bool:
        """See :meth:`FairQueue.retry_dead_letter`."""
        args = self._revive_request(task_id, request_id or new_request_id())
        return bool(await self._script(args))

    async def completions(self, limit: int | None = None) -> list[tuple[str, str]]:
        """See :meth:`FairQueue.completions`."""
        if limit is not None:
            require_int("limit", limit, minimum=1)
        with self._guard:
            raw = await self.redis.lrange(self.prefix + "done", 0,
                                          -1 if limit is None else limit - 1)
        return self._completions_reply(raw)

    async def _lease_and_ack(self, acks: Iterable[LeasedTask], count: int, owner: str,
                             request_id: str) -> tuple[list[str], list[LeasedTask]]:
        args = self._lease_request(acks, count, owner, request_id)
        return self._lease_reply(await self._script(args), request_id)

    async def _renew_and_ack(self, acks: Iterable[LeasedTask], tasks: Iterable[LeasedTask],
                             request_id: str) -> tuple[list[str], int]:
        args = self._renew_request(acks, tasks, request_id)
        if len(args) == 5:
            return [], 0
        return self._renew_reply(await self._script(args))

    async def _wait_for_work(self, timeout: float) -> None:
        require_number("timeout", timeout, above=0)
        with self._guard:
            await self.redis.blpop([self.prefix + "wake"], timeout=timeout)
