"""The queue's decisions, written once for the sync and asyncio shells.

:class:`QueueCore` checks a queue's settings, builds the argument list of every
script call and reads every reply; :class:`WorkerCore` keeps a worker's books
(what it holds, what is finished and waits for its ack, the counters) and
decides what a handler's outcome means.  Neither does any I/O: ``FairQueue`` /
``Worker`` send the requests with redis-py, ``AsyncFairQueue`` /
``AsyncWorker`` with ``redis.asyncio``, the way ``buttress.leader`` and
``buttress.leader_async`` share one core.  Both shells run the same script
(``lua/queue.lua``) on the same keys, so sync and async producers and workers
of one queue interoperate.

The resend rule (a command that timed out may still run, once or twice): every
mutating request carries a request id drawn here *before* its first send, and
the shells resend a failed request with the same id; the script recognises a
second run of a request by it (see ``lua/queue.lua``).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from buttress._redis import (
    Backoff,
    StoreErrors,
    check_tag,
    require_async_client,
    require_sync_client,
)
from buttress._validate import require_callable, require_int, require_number, require_str
from buttress.distributed.records import (
    DeadLetter,
    LeasedTask,
    number_text,
    parse_number,
    text,
)
from buttress.errors import Rejected, WorkerCrashed

logger = logging.getLogger("buttress.distributed")

_MIN_WEIGHT = 0.01
_MAX_PRIORITY = 2**53  # scores are doubles: larger integers would lose their order
_MAX_RETRY_DELAY_MS = 3_600_000
_STAT_COUNTERS = ("rejected", "completed", "failed", "retried", "redelivered", "expired",
                  "dead", "revived", "stale_acks", "shed_entries")
_REJECTED = (b"rejected", "rejected")  # the enqueue reply's status (bytes, or str if decoded)
# json.dumps(payload, allow_nan=False, separators=...) builds an encoder per call (~1 us).
_encode_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
# stats(): the reads of one pipeline, in order.
STATS_READS = (("hgetall", "meta"), ("hgetall", "depth"), ("zcard", "leases"),
               ("zcard", "delayed"), ("llen", "dead"), ("llen", "ring"))


def new_request_id() -> str:
    """An identity for one call, drawn before its first send and kept for its resends.

    A random 64-bit prefix per process (drawn again in a forked child) and a
    counter: unique across processes and machines, and about 10x cheaper than
    ``os.urandom`` per call on the enqueue path.
    """
    return f"{_request_ids.prefix}{next(_request_ids.counter):x}"


class _RequestIds:
    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex() + "-"
        self.counter = itertools.count()  # next() on it is atomic under the GIL


_request_ids = _RequestIds()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_request_ids.reseed)


# --------------------------------------------------------------------------- the queue


class QueueCore:
    """Settings, requests and replies of a fair queue (no I/O; see FairQueue for the API)."""

    _asynchronous = False

    def __init__(
        self,
        redis_client: Any,
        name: str,
        *,
        high_water: int = 10_000,
        low_water: int | None = None,
        lease_ms: int = 30_000,
        weights: Mapping[str, float] | None = None,
        shed_below: int | float = 1,
        max_attempts: int = 3,
        retry_delay_ms: int = 1_000,
        max_dead_letters: int = 10_000,
        completion_log: int = 0,
        resend_window_ms: int = 600_000,
    ) -> None:
        check_tag("name", name)  # the queue's hash tag
        require_int("high_water", high_water, minimum=1)
        if low_water is None:
            low_water = high_water // 2
        require_int("low_water", low_water, minimum=0)
        if low_water >= high_water:
            raise ValueError(
                f"low_water must be < high_water, got low_water={low_water!r}, "
                f"high_water={high_water!r}")
        require_int("lease_ms", lease_ms, minimum=1)
        _check_priority("shed_below", shed_below)
        require_int("max_attempts", max_attempts, minimum=1)
        require_int("retry_delay_ms", retry_delay_ms, minimum=0)
        require_int("max_dead_letters", max_dead_letters, minimum=1)
        require_int("completion_log", completion_log, minimum=0)
        require_int("resend_window_ms", resend_window_ms, minimum=1)
        if self._asynchronous:
            require_async_client(redis_client, owner="AsyncFairQueue", twin="FairQueue")
        else:
            require_sync_client(redis_client, owner="FairQueue", twin="AsyncFairQueue")
        self.redis = redis_client
        self.name = name
        self.high_water = high_water
        self.low_water = low_water
        self.lease_ms = lease_ms
        self.shed_below = shed_below
        self.max_attempts = max_attempts
        self.retry_delay_ms = retry_delay_ms
        self.max_dead_letters = max_dead_letters
        self.completion_log = completion_log
        self.resend_window_ms = resend_window_ms
        self.prefix = f"buttress:{{{name}}}:"
        # Unavailable (connection, timeout, READONLY, LOADING, ...) -> StoreUnavailable.
        self._guard = StoreErrors(f"queue {name!r}", redis_client)
        self._meta = self.prefix + "meta"
        self._initial_weights = None if weights is None else self._weights_request(weights)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, high_water={self.high_water}, "
                f"low_water={self.low_water}, lease_ms={self.lease_ms})")

    # ---------------------------------------------------------------- requests

    def _enqueue_request(self, task_name: str, payload: Any, tenant: str,
                         priority: int | float, deadline: float | None,
                         request_id: str | None) -> list[Any]:
        # The common case checked inline (a producer's hot path); anything else goes
        # through the validators, which raise with their messages.
        if type(task_name) is not str or not task_name:
            require_str("task_name", task_name)
        if type(tenant) is not str or not tenant:
            require_str("tenant", tenant)
        if type(priority) is int and -_MAX_PRIORITY <= priority <= _MAX_PRIORITY:
            priority_text, score_text = str(priority), str(-priority)
        else:
            _check_priority("priority", priority)
            priority_text, score_text = number_text(priority), number_text(-priority)
        deadline_ms = ""
        if deadline is not None:
            require_number("deadline", deadline)
            if deadline < 1e9:
                raise ValueError(
                    f"deadline must be a Unix time (time.time() + seconds), got {deadline!r}; "
                    "a time.monotonic() value means nothing to other machines")
            deadline_ms = str(int(deadline * 1000))
        if request_id is None:
            request_id = new_request_id()
        else:
            require_str("request_id", request_id, max_bytes=200)
        try:
            payload_json = _encode_json(payload)
        except TypeError as exc:
            raise TypeError(f"payload must be JSON-serialisable: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"payload must be JSON-serialisable: {exc}") from None
        sheddable = "1" if priority < self.shed_below else "0"
        return ["enqueue", request_id, tenant, task_name, payload_json, priority_text,
                score_text, deadline_ms, sheddable, self.high_water,
                self.low_water, self.resend_window_ms]

    def _enqueue_reply(self, reply: Any, priority: int | float) -> str:
        if reply[0] in _REJECTED:
            raise Rejected(
                f"queue {self.name!r} is shedding (ready depth {int(reply[2])} reached "
                f"high_water={self.high_water}; priority {priority!r} < "
                f"shed_below={self.shed_below!r})",
                state="shedding", retry_after=int(reply[1]) / 1000.0)
        return text(reply[1])

    @staticmethod
    def _weights_request(weights: Mapping[str, float]) -> dict[str, str]:
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of tenant -> weight, got {weights!r}")
        checked: dict[str, str] = {}
        for tenant, weight in weights.items():
            require_str("weights keys", tenant)
            require_number(f"weights[{tenant!r}]", weight, minimum=_MIN_WEIGHT)
            checked[tenant] = number_text(weight)
        return checked

    def _lease_request(self, acks: Iterable[LeasedTask], count: int, owner: str,
                       request_id: str) -> list[Any]:
        args: list[Any] = ["lease", request_id, self.lease_ms, self.max_attempts,
                           self.max_dead_letters, self.completion_log, owner, count, 0]
        for task in acks:
            args += [task.id, task.token]
        args[8] = (len(args) - 9) // 2
        return args

    @staticmethod
    def _lease_reply(reply: Any, token: str) -> tuple[list[str], list[LeasedTask]]:
        stale = [text(i) for i in reply[0]]
        tasks = [
            LeasedTask(
                id=text(task_id), task_name=text(name), payload_json=text(payload),
                tenant=text(tenant), priority=parse_number(text(priority)),
                attempts=int(attempts),
                deadline=int(deadline) / 1000.0 if deadline not in (b"", "") else None,
                token=token,
            )
            for task_id, name, payload, tenant, priority, attempts, deadline in reply[1:]
        ]
        return stale, tasks

    def _renew_request(self, acks: Iterable[LeasedTask], tasks: Iterable[LeasedTask],
                       request_id: str) -> list[Any]:
        args: list[Any] = ["renew", request_id, self.lease_ms, self.completion_log, 0]
        for task in acks:
            args += [task.id, task.token]
        args[4] = (len(args) - 5) // 2
        for task in tasks:
            args += [task.id, task.token]
        return args

    @staticmethod
    def _renew_reply(reply: Any) -> tuple[list[str], int]:
        return [text(i) for i in reply[0]], int(reply[1])

    def _fail_request(self, task: LeasedTask, reason: str, retry: bool,
                      request_id: str) -> list[Any]:
        require_str("reason", reason, allow_empty=True)
        delay_ms = min(_MAX_RETRY_DELAY_MS, self.retry_delay_ms * 2 ** max(0, task.attempts - 1))
        return ["fail", request_id, self.max_attempts, self.max_dead_letters, task.id,
                task.token, reason, "1" if retry else "0", delay_ms, self.lease_ms]

    def _revive_request(self, task_id: str, request_id: str) -> list[Any]:
        require_str("task_id", task_id)
        return ["revive", request_id, task_id, self.resend_window_ms]

    # ---------------------------------------------------------------- replies of reads

    def _stats_reply(self, replies: list[Any]) -> dict[str, Any]:
        meta_raw, depth_raw, leased, delayed, dead, active = replies
        meta = {text(k): text(v) for k, v in meta_raw.items()}
        by_tenant: dict[str, dict[int | float, int]] = {}
        for field, value in depth_raw.items():
            tenant, _, priority = text(field).rpartition("\n")
            by_tenant.setdefault(tenant, {})[parse_number(priority)] = int(value)
        return {
            "queue": self.name,
            "state": meta.get("state", "normal"),
            "depth": int(meta.get("depth", 0)),
            "depth_by_tenant": {t: sum(p.values()) for t, p in sorted(by_tenant.items())},
            "depth_by_tenant_priority": {t: dict(sorted(p.items(), reverse=True))
                                         for t, p in sorted(by_tenant.items())},
            "leased": int(leased),
            "delayed_retries": int(delayed),
            "dead_letters": int(dead),
            "active_tenants": int(active),
            "high_water": self.high_water,
            "low_water": self.low_water,
            "shedding_seconds": int(meta.get("shedding_ms", 0)) / 1000.0,
            **{name: int(meta.get(name, 0)) for name in _STAT_COUNTERS},
            "enqueued": int(meta.get("seq", 0)),  # every admitted task takes a sequence number
        }

    @staticmethod
    def _dead_letters_reply(ids: list[Any], records: list[Any]) -> list[DeadLetter]:
        letters = []
        for task_id, raw in zip(ids, records, strict=True):
            record = {text(k): text(v) for k, v in raw.items()}
            if not record:
                continue  # trimmed between the two reads
            letters.append(DeadLetter(
                id=text(task_id),
                task_name=record.get("name", ""),
                tenant=record.get("tenant", ""),
                priority=parse_number(record.get("priority", "0")),
                payload=json.loads(record["payload"]) if "payload" in record else None,
                attempts=int(record.get("attempts", 0)),
                reason=record.get("reason", ""),
                last_error=record.get("last_error"),
                dead_at=int(record.get("dead_at", 0)) / 1000.0,
            ))
        return letters

    @staticmethod
    def _completions_reply(raw: list[Any]) -> list[tuple[str, str]]:
        pairs = []
        for entry in raw:
            tenant, _, task_id = text(entry).rpartition("\n")
            pairs.append((tenant, task_id))
        return pairs


def _check_priority(argument: str, value: Any) -> None:
    require_number(argument, value, minimum=-_MAX_PRIORITY, maximum=_MAX_PRIORITY)


# --------------------------------------------------------------------------- the worker


class WorkerCore:
    """A worker's books and decisions (no I/O; see Worker and AsyncWorker for the API).

    Every task the worker holds -- running, waiting its turn in a prefetched
    batch, or finished and waiting for its ack -- is in ``_held`` until Redis has
    acknowledged it, and the keeper renews all of them; finished tasks wait in
    ``_finished`` until the next call to Redis carries their acks.  ``_held`` is
    keyed by (task id, delivery token): after Redis restarts without persistence,
    task ids start again from 1, so a task leased then may share its id with one
    leased before the restart that the worker still holds.
    """

    _queue_type: type = QueueCore
    _coroutine_handlers = False
    _COUNTERS = ("completed", "failed", "retried", "dead_lettered", "unknown_task",
                 "stale_acks", "store_errors")

    def __init__(
        self,
        queue: Any,
        handlers: Mapping[str, Callable[[Any], Any]],
        *,
        concurrency: int = 1,
        prefetch: int = 1,
        idle_wait: float = 0.5,
        name: str | None = None,
    ) -> None:
        if not isinstance(queue, self._queue_type):
            raise TypeError(f"queue must be a{'n' if self._queue_type.__name__[0] in 'AE' else ''}"
                            f" {self._queue_type.__name__}, got {type(queue).__name__}")
        if not isinstance(handlers, Mapping) or not handlers:
            raise TypeError(f"handlers must be a non-empty mapping of task name -> callable, "
                            f"got {handlers!r}")
        for task_name, handler in handlers.items():
            require_str("handlers keys", task_name)
            require_callable(f"handlers[{task_name!r}]", handler)
            is_coroutine = inspect.iscoroutinefunction(handler)
            if self._coroutine_handlers and not is_coroutine:
                raise TypeError(f"handlers[{task_name!r}] must be a coroutine function "
                                f"(async def) for {type(self).__name__}, got {handler!r}")
            if is_coroutine and not self._coroutine_handlers:
                raise TypeError(f"handlers[{task_name!r}] is a coroutine function; "
                                f"{type(self).__name__} runs plain callables: use AsyncWorker")
        require_int("concurrency", concurrency, minimum=1)
        require_int("prefetch", prefetch, minimum=1)
        require_number("idle_wait", idle_wait, above=0, maximum=60)
        if name is not None:
            require_str("name", name)
        self.queue: Any = queue
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.idle_wait = float(idle_wait)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._books = threading.Lock()  # held briefly, never across I/O
        self._held: dict[tuple[str, str], LeasedTask] = {}
        self._finished: list[LeasedTask] = []
        self._running = 0
        self._counts = dict.fromkeys(self._COUNTERS, 0)
        self._backoff_base, self._backoff_cap = 0.05, 5.0
        self._crash: BaseException | None = None

    def stats(self) -> dict[str, Any]:
        """Counters of this worker: completed, failed, retried, dead-lettered, errors..."""
        with self._books:
            counts = dict(self._counts)
            running, held = self._running, len(self._held)
        return {"worker": self.name, "queue": self.queue.name, "running": running,
                "held": held, "draining": self._is_draining(), "stopped": self._is_stopped(),
                **counts}

    def _is_draining(self) -> bool:
        raise NotImplementedError

    def _is_stopped(self) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- books

    def _count(self, name: str, n: int = 1) -> None:
        with self._books:
            self._counts[name] += n

    def _take_finished(self) -> list[LeasedTask]:
        """The finished tasks to acknowledge with the next call (taken by one caller)."""
        with self._books:
            finished, self._finished = self._finished, []
        return finished

    def _held_tasks(self) -> list[LeasedTask]:
        with self._books:
            return list(self._held.values())

    def _acknowledged(self, acks: list[LeasedTask], stale: list[str]) -> None:
        """Redis answered a call that carried ``acks``: they are no longer held."""
        with self._books:
            for task in acks:
                self._held.pop((task.id, task.token), None)
        if stale:
            self._stale(stale)

    def _stale(self, stale: list[str]) -> None:
        self._count("stale_acks", len(stale))
        logger.warning("worker %s: %d ack(s) came after the lease was lost: %s",
                       self.name, len(stale), stale)

    def _started(self) -> None:
        with self._books:
            self._running += 1

    def _succeeded(self, task: LeasedTask) -> None:
        with self._books:
            self._running -= 1
            self._counts["completed"] += 1
            self._finished.append(task)

    def _ended_without_ack(self, task: LeasedTask) -> None:
        """A failed task is settled by its fail call, not by an ack."""
        with self._books:
            self._held.pop((task.id, task.token), None)

    # ---------------------------------------------------------------- the calls' plans

    def _lease_plan(self, draining: bool) -> tuple[list[LeasedTask], int] | None:
        """What a serving thread's next lease call carries: (acks, count); None: stop."""
        acks = self._take_finished()
        if draining and not acks:
            return None
        return acks, 0 if draining else self.prefetch

    def _lease_answered(self, acks: list[LeasedTask],
                        reply: tuple[list[str], list[LeasedTask]] | None
                        ) -> list[LeasedTask] | None:
        """Book a lease call's reply; the tasks to run, or None when the call was given up."""
        if reply is None:
            self._dropped(acks)
            return None
        stale, tasks = reply
        with self._books:  # one lock round for the whole reply: this runs once per task
            for task in acks:
                self._held.pop((task.id, task.token), None)
            for task in tasks:
                self._held[task.id, task.token] = task
        if stale:
            self._stale(stale)
        return tasks

    def _keeper_plan(self, renew_due: bool, final: bool
                     ) -> tuple[list[LeasedTask], list[LeasedTask]]:
        """The keeper's next call: (acks to send, held tasks whose leases to renew)."""
        acks = self._take_finished()
        if not renew_due or final:
            return acks, []
        acked = {(task.id, task.token) for task in acks}
        return acks, [task for task in self._held_tasks() if (task.id, task.token) not in acked]

    def _keeper_answered(self, acks: list[LeasedTask],
                         reply: tuple[list[str], int] | None) -> None:
        if reply is None:
            self._dropped(acks)
        else:
            self._acknowledged(acks, reply[0])

    def _dropped(self, acks: list[LeasedTask]) -> None:
        """Acks given up on (halted, or Redis gone longer than a lease while draining)."""
        if acks:
            with self._books:
                for task in acks:
                    self._held.pop((task.id, task.token), None)
            logger.warning("worker %s: %d finished task(s) not acknowledged will be "
                           "redelivered", self.name, len(acks))

    @property
    def _renew_every(self) -> float:
        """Seconds between renewals of the held leases: a third of a lease."""
        return float(self.queue.lease_ms) / 3000.0

    # ---------------------------------------------------------------- decisions

    def _prepare(self, task: LeasedTask) -> tuple[Callable[[Any], Any], Any] | tuple[None, str]:
        """The handler and payload of ``task``, or (None, why it cannot run)."""
        handler = self.handlers.get(task.task_name)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            self._count("unknown_task")
            return None, (f"unknown task name {task.task_name!r} (worker {self.name} "
                          f"handles: {known})")
        try:
            return handler, task.payload()
        except ValueError as exc:
            return None, f"payload is not valid JSON: {exc}"

    def _handler_failed(self, task: LeasedTask, exc: Exception) -> str:
        """Log a handler's exception; return the reason recorded with the task."""
        with self._books:
            self._running -= 1
        logger.warning("task %s %r (tenant %r, attempt %d) failed: %s: %s", task.id,
                       task.task_name, task.tenant, task.attempts, type(exc).__name__, exc,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return f"{type(exc).__name__}: {exc}"[:2000]

    def _fail_reported(self, task: LeasedTask, reason: str, outcome: str | None) -> None:
        """Book the answer to a fail call (None: given up, the lease will expire)."""
        self._ended_without_ack(task)
        if outcome is None:
            logger.warning("worker %s: gave up reporting the failure of task %s; its lease "
                           "expires and it is redelivered", self.name, task.id)
        elif outcome == "retried":
            self._count("retried")
        elif outcome == "dead":
            self._count("dead_lettered")
            logger.warning("task %s %r dead-lettered: %s", task.id, task.task_name, reason)
        else:
            self._count("stale_acks")

    def _new_backoff(self) -> Backoff:
        """The delays between resends of one request (jittered, 50 ms doubling to 5 s)."""
        return Backoff(self._backoff_base, self._backoff_cap)

    def _store_error(self, backoff: Backoff, exc: BaseException) -> float:
        """Count and log a failed Redis call; return how long to back off."""
        self._count("store_errors")
        if backoff.attempts == 0:
            logger.warning("worker %s: %s: %s; backing off and retrying", self.name,
                           type(exc).__name__, exc)
        return backoff.next()

    def _outcome(self) -> dict[str, Any]:
        """What ``run()`` returns once stopped: the stats, or WorkerCrashed if a part died."""
        if self._crash is not None:
            part = "coroutine" if self._coroutine_handlers else "thread"
            raise WorkerCrashed(f"worker {self.name} stopped: a {part} died of "
                                f"{type(self._crash).__name__}: {self._crash}") from self._crash
        logger.info("worker %s stopped: %s", self.name, self._counts)
        return self.stats()

    def _record_crash(self, exc: BaseException) -> None:
        logger.error("worker %s: a worker %s died of an unexpected error; stopping",
                     self.name, "coroutine" if self._coroutine_handlers else "thread",
                     exc_info=exc)
        if self._crash is None:
            self._crash = exc
