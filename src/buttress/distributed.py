"""Distributed fair scheduling over Redis: many workers, fair between tenants.

A :class:`FairQueue` keeps one queue per tenant in Redis and serves them by
deficit round robin (DRR) with per-tenant weights, so a tenant that floods the
queue cannot starve the others, while within a tenant higher priority goes
first (FIFO among equals).  A :class:`Worker` leases tasks, runs the handler
registered for the task's name with the task's JSON payload, and acknowledges.

>>> queue = FairQueue(redis.Redis(), "emails", high_water=10_000, low_water=5_000,
...                   lease_ms=30_000)                                  # doctest: +SKIP
>>> queue.enqueue("send", {"to": "a@example.com"}, tenant="acme")      # doctest: +SKIP
>>> Worker(queue, handlers={"send": send}).run()                     # doctest: +SKIP

Everything that must be atomic is one Lua script; every key of a queue shares
the hash tag ``{name}`` so the scripts run on Redis Cluster.  Guarantees:

* **Fairness.** The dequeue script picks the next task by DRR over the ring of
  tenants that have ready work: a tenant's turn gives it ``weight`` tasks.
  Concurrent workers call the same script, so no tenant is served twice for one
  turn or skipped.
* **Leases.** A leased task belongs to one delivery token.  If its worker dies
  the lease expires after ``lease_ms`` and the next dequeue puts the task back
  at the front of its tenant's queue.  Ack and fail compare the token, so a late
  ack from an expired lease cannot complete a task another worker re-took.
* **Bounded retries.** A failed task is retried up to ``max_attempts``
  deliveries in total, then goes to the dead-letter list with its reason
  (:meth:`FairQueue.dead_letters`).
* **Backpressure.** The in-process scheduler's hysteresis, kept in Redis: the
  queue enters SHEDDING when its ready depth reaches ``high_water`` and returns
  to NORMAL when it has fallen to ``low_water``; while SHEDDING, enqueues with
  ``priority < shed_below`` raise :class:`buttress.Rejected`.

Payloads are JSON: no pickled code travels through Redis.  The algorithm, its
cost and the starvation bound are in ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from buttress._validate import require_int
from buttress.errors import Rejected, StoreUnavailable

__all__ = ["DeadLetter", "FairQueue", "LeasedTask", "Worker", "load_handlers"]

logger = logging.getLogger("buttress.distributed")

# Work an idle worker can be woken for: enqueues push at most this many wake tokens.
_MAX_WAKE_TOKENS = 64
# The dequeue script reclaims at most this many expired leases per call (keeps it short).
_RECLAIM_PER_CALL = 100
# Sanity bound on DRR visits in one dequeue call (fractional weights rotate without serving).
_MAX_VISITS = 10_000
_MIN_WEIGHT = 0.01
_MAX_PRIORITY = 2**53  # scores are doubles: larger integers would lose their order
_MAX_RETRY_DELAY_MS = 3_600_000

# --------------------------------------------------------------------------- the queue


class FairQueue:
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

    The water marks are producer settings (each enqueue stores them in Redis for
    the workers' scripts); ``lease_ms``, ``max_attempts``, ``retry_delay_ms``,
    ``max_dead_letters`` and ``completion_log`` are worker settings.  Processes in the same role
    should agree on them.
    """

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
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if "{" in name or "}" in name:
            raise ValueError(
                f"name must not contain '{{' or '}}' (it is the hash tag), got {name!r}")
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
        if not callable(getattr(redis_client, "execute_command", None)):
            raise TypeError(
                f"redis_client must be a redis-py client (redis.Redis or RedisCluster), "
                f"got {type(redis_client).__name__}")
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
        self.prefix = f"buttress:{{{name}}}:"
        self._meta = self.prefix + "meta"
        if weights is not None:
            self.set_weights(weights)

    # ---------------------------------------------------------------- producers

    def enqueue(
        self,
        task_name: str,
        payload: Any,
        *,
        tenant: str,
        priority: int | float = 0,
        deadline: float | None = None,
    ) -> str:
        """Queue a task for ``tenant`` and return its id.

        ``payload`` must be JSON-serialisable (``TypeError`` otherwise; NaN and
        infinities are ``ValueError``).  ``priority``: larger runs first within
        the tenant.  ``deadline``: Unix time (``time.time()`` scale, compared
        with the Redis server's clock) after which the task is not started but
        dead-lettered as expired.  Raises :class:`buttress.Rejected` while the
        queue is SHEDDING and ``priority < shed_below``, and
        :class:`buttress.StoreUnavailable` when Redis cannot be reached.
        """
        if not isinstance(task_name, str) or not task_name:
            raise TypeError(f"task_name must be a non-empty str, got {task_name!r}")
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a str, got {tenant!r}")
        if not tenant:
            raise ValueError("tenant must be a non-empty str, got ''")
        _check_priority("priority", priority)
        deadline_ms = ""
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
                raise TypeError(
                    f"deadline must be a Unix time in seconds or None, got {deadline!r}")
            if not math.isfinite(deadline) or deadline < 1e9:
                raise ValueError(
                    f"deadline must be a Unix time (time.time() + seconds), got {deadline!r}; "
                    "a time.monotonic() value means nothing to other machines")
            deadline_ms = str(int(deadline * 1000))
        try:
            payload_json = json.dumps(payload, allow_nan=False, separators=(",", ":"))
        except TypeError as exc:
            raise TypeError(f"payload must be JSON-serialisable: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"payload must be JSON-serialisable: {exc}") from None
        sheddable = "1" if priority < self.shed_below else "0"
        with self._store():
            reply = _ENQUEUE(self.redis, self._meta, [
                tenant, task_name, payload_json, _number_text(priority),
                _number_text(-priority), deadline_ms, sheddable, self.high_water,
                self.low_water])
        status = _text(reply[0])
        if status == "rejected":
            raise Rejected(
                f"queue {self.name!r} is shedding (ready depth {int(reply[2])} reached "
                f"high_water={self.high_water}; priority {priority!r} < "
                f"shed_below={self.shed_below!r})",
                state="shedding", retry_after=int(reply[1]) / 1000.0)
        return _text(reply[1])

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Set DRR weights (tenant -> quantum per turn, >= 0.01) for everyone using the queue."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of tenant -> weight, got {weights!r}")
        checked: dict[str, str] = {}
        for tenant, weight in weights.items():
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"weights keys must be non-empty tenant names, got {tenant!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"weights[{tenant!r}] must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < _MIN_WEIGHT:
                raise ValueError(
                    f"weights[{tenant!r}] must be finite and >= {_MIN_WEIGHT}, got {weight!r}")
            checked[tenant] = _number_text(weight)
        if checked:
            with self._store():
                self.redis.hset(self.prefix + "weights", mapping=checked)

    # ---------------------------------------------------------------- consumers

    def lease(self, count: int = 1, *, owner: str = "") -> list[LeasedTask]:
        """Lease up to ``count`` tasks, fairly across tenants (empty list: nothing ready)."""
        require_int("count", count, minimum=1)
        return self._lease_and_ack((), count, owner)[1]

    def ack(self, task: LeasedTask) -> bool:
        """Complete a leased task; False if the lease was lost (expired and re-taken)."""
        stale, _ = self._lease_and_ack((task,), 0, "")
        return not stale

    def fail(self, task: LeasedTask, reason: str, *, retry: bool = True) -> str:
        """Record a failed delivery: ``"retried"``, ``"dead"`` (dead-lettered) or ``"stale"``.

        The task is retried while ``retry`` and it has had fewer than
        ``max_attempts`` deliveries, otherwise dead-lettered with ``reason``.
        A retry waits ``retry_delay_ms``, doubled for each earlier attempt
        (capped at an hour), then rejoins the front of its tenant's queue.
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, got {reason!r}")
        delay_ms = min(_MAX_RETRY_DELAY_MS, self.retry_delay_ms * 2 ** max(0, task.attempts - 1))
        with self._store():
            reply = _FAIL(self.redis, self._meta, [
                self.max_attempts, self.max_dead_letters, task.id, task.token, reason,
                "1" if retry else "0", delay_ms])
        return _text(reply)

    def renew(self, tasks: Iterable[LeasedTask]) -> int:
        """Extend the leases of tasks still owned by their tokens; return how many."""
        args: list[Any] = [self.lease_ms]
        for task in tasks:
            args += [task.id, task.token]
        if len(args) == 1:
            return 0
        with self._store():
            return int(_RENEW(self.redis, self._meta, args))

    # ---------------------------------------------------------------- inspection

    def stats(self) -> dict[str, Any]:
        """Depth per tenant and priority, state, lease and dead-letter counts, counters."""
        pipe = self.redis.pipeline(transaction=False)
        for command, key in (("hgetall", "meta"), ("hgetall", "depth"), ("zcard", "leases"),
                             ("zcard", "delayed"), ("llen", "dead"), ("llen", "ring")):
            getattr(pipe, command)(self.prefix + key)
        with self._store():
            meta_raw, depth_raw, leased, delayed, dead, active = pipe.execute()
        meta = {_text(k): _text(v) for k, v in meta_raw.items()}
        by_tenant: dict[str, dict[int | float, int]] = {}
        for field, value in depth_raw.items():
            tenant, _, priority = _text(field).rpartition("\n")
            by_tenant.setdefault(tenant, {})[_parse_number(priority)] = int(value)
        state = meta.get("state", "normal")
        shedding_ms = int(meta.get("shedding_ms", 0))
        counters = ("rejected", "completed", "failed", "retried", "redelivered",
                    "expired", "dead", "revived", "stale_acks", "shed_entries")
        return {
            "queue": self.name,
            "state": state,
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
            "shedding_seconds": shedding_ms / 1000.0,
            **{name: int(meta.get(name, 0)) for name in counters},
            "enqueued": int(meta.get("seq", 0)),  # every admitted task takes a sequence number
        }

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead-lettered tasks, newest first."""
        require_int("limit", limit, minimum=1)

        with self._store():
            ids = self.redis.lrange(self.prefix + "dead", 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(self.prefix + "task:" + _text(task_id))
            records = pipe.execute()
        letters = []
        for task_id, raw in zip(ids, records, strict=True):
            record = {_text(k): _text(v) for k, v in raw.items()}
            if not record:
                continue  # trimmed between the two reads
            letters.append(DeadLetter(
                id=_text(task_id),
                task_name=record.get("name", ""),
                tenant=record.get("tenant", ""),
                priority=_parse_number(record.get("priority", "0")),
                payload=json.loads(record["payload"]) if "payload" in record else None,
                attempts=int(record.get("attempts", 0)),
                reason=record.get("reason", ""),
                last_error=record.get("last_error"),
                dead_at=int(record.get("dead_at", 0)) / 1000.0,
            ))
        return letters

    def retry_dead_letter(self, task_id: str) -> bool:
        """Queue a dead-lettered task again (attempts reset); False if it is not dead-lettered.

        Admission control does not apply: the task was admitted once already.
        """
        if not isinstance(task_id, str) or not task_id:
            raise TypeError(f"task_id must be a non-empty str, got {task_id!r}")
        with self._store():
            return bool(_REVIVE(self.redis, self._meta, [task_id]))

    def completions(self, limit: int | None = None) -> list[tuple[str, str]]:
        """Acknowledged ``(tenant, task id)`` pairs in ack order (needs ``completion_log``)."""
        end = -1 if limit is None else limit - 1
        with self._store():
            raw = self.redis.lrange(self.prefix + "done", 0, end)
        pairs = []
        for entry in raw:
            tenant, _, task_id = _text(entry).rpartition("\n")
            pairs.append((tenant, task_id))
        return pairs

    def __repr__(self) -> str:
        return (f"FairQueue(name={self.name!r}, high_water={self.high_water}, "
                f"low_water={self.low_water}, lease_ms={self.lease_ms})")

    # ---------------------------------------------------------------- I/O helpers

    def _lease_and_ack(
        self, acks: Iterable[LeasedTask], count: int, owner: str
    ) -> tuple[list[str], list[LeasedTask]]:
        """One round trip: ack ``acks``, then lease up to ``count`` tasks."""
        token = os.urandom(8).hex()
        args: list[Any] = [self.lease_ms, self.max_attempts, self.max_dead_letters,
                           self.completion_log, token, owner, count, 0]
        for task in acks:
            args += [task.id, task.token]
        args[7] = (len(args) - 8) // 2
        with self._store():
            reply = _LEASE(self.redis, self._meta, args)
        stale = [_text(i) for i in reply[0]]
        tasks = [
            LeasedTask(
                id=_text(task_id), task_name=_text(name), payload_json=_text(payload),
                tenant=_text(tenant), priority=_parse_number(_text(priority)),
                attempts=int(attempts),
                deadline=int(deadline) / 1000.0 if deadline not in (b"", "") else None,
                token=token,
            )
            for task_id, name, payload, tenant, priority, attempts, deadline in reply[1:]
        ]
        return stale, tasks

    def _wait_for_work(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds until an enqueue leaves a wake token."""
        with self._store():
            self.redis.blpop([self.prefix + "wake"], timeout=timeout)

    @contextlib.contextmanager
    def _store(self) -> Iterator[None]:
        """Turn Redis connection failures into StoreUnavailable (nothing was done)."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis unreachable for queue {self.name!r}: {exc}") from exc

# --------------------------------------------------------------------------- the worker


class Worker:
    """Runs tasks from a :class:`FairQueue` with registered handlers.

    ``handlers`` maps task names to callables taking the task's payload.  A
    handler that raises fails the delivery (retried up to ``max_attempts``); a
    task whose name has no handler is dead-lettered with the reason and the
    worker keeps going.  ``concurrency`` threads each lease ``prefetch`` tasks
    per round trip; an acknowledgement rides on the next lease call.

    :meth:`run` blocks until :meth:`stop` (from another thread) or SIGTERM /
    SIGINT (when run in the main thread: the first signal drains, a second one
    stops at once).  When Redis is unreachable the worker backs off with jitter
    and resumes when it returns.
    """

    def __init__(
        self,
        queue: FairQueue,
        handlers: Mapping[str, Callable[[Any], Any]],
        *,
        concurrency: int = 1,
        prefetch: int = 1,
        idle_wait: float = 0.5,
        name: str | None = None,
    ) -> None:
        if not isinstance(queue, FairQueue):
            raise TypeError(f"queue must be a FairQueue, got {type(queue).__name__}")
        if not isinstance(handlers, Mapping) or not handlers:
            raise TypeError(f"handlers must be a non-empty mapping of task name -> callable, "
                            f"got {handlers!r}")
        for task_name, handler in handlers.items():
            if not isinstance(task_name, str) or not callable(handler):
                raise TypeError(f"handlers[{task_name!r}] must map a str to a callable, "
                                f"got {handler!r}")
        require_int("concurrency", concurrency, minimum=1)
        require_int("prefetch", prefetch, minimum=1)
        if not isinstance(idle_wait, (int, float)) or not 0 < idle_wait <= 60:
            raise ValueError(f"idle_wait must be in (0, 60] seconds, got {idle_wait!r}")
        self.queue = queue
        self.handlers = dict(handlers)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.idle_wait = float(idle_wait)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._draining = threading.Event()  # stop leasing, finish what is held
        self._halt = threading.Event()  # stop now
        self._finished = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self._running: dict[str, tuple[LeasedTask, float]] = {}
        self._counts = dict.fromkeys(
            ("completed", "failed", "retried", "dead_lettered", "unknown_task", "stale_acks",
             "store_errors"), 0)
        self._jitter = random.Random()

    def run(self) -> dict[str, Any]:
        """Serve tasks until stopped; return :meth:`stats`."""
        with self._lock:
            if self._started:
                raise RuntimeError("Worker.run() can only be called once")
            self._started = True
        restore = self._install_signal_handlers()
        threads = [threading.Thread(target=self._serve, name=f"buttress-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        logger.info("worker %s serving queue %r with %d thread(s)", self.name, self.queue.name,
                    self.concurrency)
        try:
            for thread in threads:
                thread.start()
            renew_every = self.queue.lease_ms / 3000.0
            while any(t.is_alive() for t in threads) and not self._halt.is_set():
                # Short waits keep the main thread responsive to signals.
                self._halt.wait(min(renew_every, 0.2))
                self._renew_long_running(renew_every)
            if not self._halt.is_set():
                for thread in threads:
                    thread.join()
        finally:
            self._finished.set()
            restore()
        logger.info("worker %s stopped: %s", self.name, self._counts)
        return self.stats()

    def stop(self, drain: bool = True) -> None:
        """Stop leasing; with ``drain`` finish and acknowledge the tasks held, else return now.

        Without drain, tasks still running are left to their leases: if this
        process exits they are redelivered after ``lease_ms``.
        """
        self._draining.set()
        if not drain:
            self._halt.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            running = len(self._running)
        return {"worker": self.name, "queue": self.queue.name, "running": running,
                "draining": self._draining.is_set(), "stopped": self._finished.is_set(),
                **counts}

    # ---------------------------------------------------------------- internals

    def _serve(self) -> None:
        done: list[LeasedTask] = []  # finished, to acknowledge with the next call
        failures = 0
        give_up_at = math.inf
        while not self._halt.is_set():
            draining = self._draining.is_set()
            if draining and not done:
                return
            try:
                stale, tasks = self.queue._lease_and_ack(
                    done, 0 if draining else self.prefetch, self.name)
            except StoreUnavailable as exc:
                failures += 1
                self._count("store_errors")
                if draining:
                    # Do not hang a shutdown on an outage: once the leases have expired
                    # the acks would be stale anyway, and the tasks are redelivered.
                    give_up_at = min(give_up_at, time.monotonic() + self.queue.lease_ms / 1000)
                    if time.monotonic() > give_up_at:
                        logger.warning("worker %s: Redis still unreachable; %d finished task(s) "
                                       "not acknowledged will be redelivered", self.name,
                                       len(done))
                        return
                self._backoff(failures, exc)
                continue
            if failures:
                logger.info("worker %s: Redis reachable again", self.name)
                failures = 0
            if stale:
                self._count("stale_acks", len(stale))
                logger.warning("worker %s: %d ack(s) came after the lease was lost: %s",
                               self.name, len(stale), stale)
            done = []
            if not tasks:
                if not draining:
                    self._idle()
                continue
            for task in tasks:
                if self._halt.is_set():
                    return
                if self._execute(task):
                    done.append(task)

    def _execute(self, task: LeasedTask) -> bool:
        """Run one task; True if it succeeded and must be acknowledged."""
        handler = self.handlers.get(task.task_name)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            self._count("unknown_task")
            self._report_failure(task, f"unknown task name {task.task_name!r} (worker "
                                       f"{self.name} handles: {known})", retry=False)
            return False
        try:
            payload = task.payload()
        except ValueError as exc:
            self._report_failure(task, f"payload is not valid JSON: {exc}", retry=False)
            return False
        with self._lock:
            self._running[task.id] = (task, time.monotonic())
        try:
            handler(payload)
        except Exception as exc:
            logger.warning("task %s %r (tenant %r, attempt %d) failed: %s: %s", task.id,
                           task.task_name, task.tenant, task.attempts, type(exc).__name__, exc,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            self._report_failure(task, f"{type(exc).__name__}: {exc}"[:2000], retry=True)
            return False
        finally:
            with self._lock:
                self._running.pop(task.id, None)
        self._count("completed")
        return True

    def _report_failure(self, task: LeasedTask, reason: str, *, retry: bool) -> None:
        self._count("failed")
        failures = 0
        deadline = time.monotonic() + self.queue.lease_ms / 1000.0
        while not self._halt.is_set():
            try:
                outcome = self.queue.fail(task, reason, retry=retry)
            except StoreUnavailable as exc:
                failures += 1
                self._count("store_errors")
                if time.monotonic() > deadline:
                    logger.warning("worker %s: gave up reporting failure of task %s; its lease "
                                   "expires and it is redelivered", self.name, task.id)
                    return
                self._backoff(failures, exc)
                continue
            if outcome == "retried":
                self._count("retried")
            elif outcome == "dead":
                self._count("dead_lettered")
                logger.warning("task %s %r dead-lettered: %s", task.id, task.task_name, reason)
            else:
                self._count("stale_acks")
            return

    def _idle(self) -> None:
        # A failure here shows again in the next lease call, which reports it and backs off.
        with contextlib.suppress(StoreUnavailable):
            self.queue._wait_for_work(self.idle_wait)

    def _backoff(self, failures: int, exc: Exception) -> None:
        delay = min(5.0, 0.05 * 2 ** min(failures, 10))
        delay *= self._jitter.uniform(0.5, 1.0)  # jitter: workers do not return in lockstep
        if failures == 1:
            logger.warning("worker %s: %s; backing off", self.name, exc)
        self._halt.wait(delay)

    def _renew_long_running(self, older_than: float) -> None:
        cutoff = time.monotonic() - older_than
        with self._lock:
            held = [task for task, started in self._running.values() if started < cutoff]
        if held:
            try:
                self.queue.renew(held)
            except StoreUnavailable as exc:
                logger.warning("worker %s: could not renew %d lease(s): %s", self.name,
                               len(held), exc)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = (signal.SIGTERM, signal.SIGINT)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            drain = not self._draining.is_set()
            logger.info("worker %s: %s, %s", self.name, signal.Signals(signum).name,
                        "draining" if drain else "stopping now")
            self.stop(drain=drain)

        previous = {s: signal.signal(s, on_signal) for s in signals}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore


def load_handlers(spec: str) -> Mapping[str, Callable[[Any], Any]]:
    """Import ``"package.module:object"`` and return it as a handler mapping.

    The object is a mapping of task name -> callable (or a callable returning one).
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"handlers must look like 'package.module:object', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if callable(target) and not isinstance(target, Mapping):
        target = target()
    if not isinstance(target, Mapping):
        raise TypeError(f"{spec} must be a mapping of task name -> callable, "
                        f"got {type(target).__name__}")
    return target

# --------------------------------------------------------------------------- records


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

# --------------------------------------------------------------------------- scripts
#
# Every script gets one declared key, KEYS[1] = "buttress:{<name>}:meta", and
# builds the queue's other key names from its prefix "buttress:{<name>}:":
#   meta     hash: seq, depth, state, shed_since, counters
#   ring     list: tenants with ready work, in DRR order (head = current turn)
#   deficit  hash: tenant -> DRR deficit counter
#   weights  hash: tenant -> weight (quantum per turn); absent = 1
#   leases   zset: task id, score = lease expiry (ms, Redis server time)
#   delayed  zset: failed task id waiting to be retried, score = when (ms)
#   depth    hash: "tenant\npriority" -> ready tasks
#   dead     list: dead-lettered task ids, newest first
#   done     list: "tenant\nid" of acknowledged tasks (only if completion_log > 0)
#   wake     list: tokens that wake idle workers blocked in BLPOP
#   t:<tenant>  zset: the tenant's ready task ids, score = -priority
#   task:<id>   hash: name, payload, tenant, priority, score, deadline, attempts, lease, ...
# Which tenant and task keys a call touches is only known inside the script (DRR
# picks the tenant), so they cannot all be declared; every one carries the hash
# tag {<name>}, so all live in KEYS[1]'s Redis Cluster slot, which is what
# Redis Cluster requires of a script.  (One declared key also keeps each call
# small: the enqueue is one EVALSHA of 8 arguments.)
#
# Task ids are zero-padded sequence numbers: members with equal score (equal
# priority) sort by id, which is FIFO order.

_COMMON_LUA = """
local META = KEYS[1]
local PREFIX = string.sub(META, 1, -5)  -- strip "meta"
local RING, DEFICIT, WEIGHTS = PREFIX .. 'ring', PREFIX .. 'deficit', PREFIX .. 'weights'
local LEASES, DEPTH, DEAD = PREFIX .. 'leases', PREFIX .. 'depth', PREFIX .. 'dead'
local DONE, WAKE, DELAYED = PREFIX .. 'done', PREFIX .. 'wake', PREFIX .. 'delayed'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function task_key(id) return PREFIX .. 'task:' .. id end
local function tenant_key(tenant) return PREFIX .. 't:' .. tenant end

-- Put a task into its tenant's queue; a tenant that had no ready work joins the ring's tail.
local function make_ready(id, tenant, score, priority)
  local q = tenant_key(tenant)
  if redis.call('ZADD', q, score, id) == 1 and redis.call('ZCARD', q) == 1 then
    redis.call('RPUSH', RING, tenant)
  end
  redis.call('HINCRBY', DEPTH, tenant .. '\\n' .. priority, 1)
  redis.call('HINCRBY', META, 'depth', 1)
  if redis.call('LLEN', WAKE) < """ + str(_MAX_WAKE_TOKENS) + """ then
    redis.call('RPUSH', WAKE, '1')
  end
end

-- The backpressure hysteresis, the same rule as the in-process TaskScheduler, applied
-- after every change of the ready depth: normal -> shedding when depth >= high_water,
-- shedding -> normal when depth <= low_water.  `state` is the stored state (false =
-- normal); returns the state after the rule.  No writes unless the state changes.
local function update_state(state, depth, high, low, now)
  if state == 'shedding' then
    if depth > low then return 'shedding' end
    local since = tonumber(redis.call('HGET', META, 'shed_since')) or now
    redis.call('HSET', META, 'state', 'normal')
    redis.call('HINCRBY', META, 'shedding_ms', now - since)
  elseif depth >= high then
    local leased = tonumber(redis.call('HGET', META, 'leased_total')) or 0
    redis.call('HSET', META, 'state', 'shedding', 'shed_since', now, 'shed_leased', leased)
    redis.call('HINCRBY', META, 'shed_entries', 1)
    return 'shedding'
  end
  return 'normal'
end

-- Workers do not know the producers' water marks: the last enqueue stored them.
local function update_state_from_meta(now)
  local m = redis.call('HMGET', META, 'high_water', 'low_water', 'depth', 'state')
  if m[1] then update_state(m[4], tonumber(m[3]) or 0, tonumber(m[1]), tonumber(m[2]), now) end
end

local function dead_letter(id, reason, now, max_dead)
  local key = task_key(id)
  redis.call('HSET', key, 'reason', reason, 'dead_at', now)
  redis.call('HDEL', key, 'lease', 'owner')
  redis.call('LPUSH', DEAD, id)
  redis.call('HINCRBY', META, 'dead', 1)
  if redis.call('LLEN', DEAD) > max_dead then
    redis.call('DEL', task_key(redis.call('RPOP', DEAD)))
  end
end
"""


class _Scripts:
    """The Lua scripts of a queue (named constants; KEYS[1] is the meta key, see above)."""

    # ENQUEUE: admit one task unless SHEDDING refuses it; evaluates the hysteresis.
    # ARGV: 1 tenant, 2 task name, 3 payload (JSON text), 4 priority (text),
    #       5 score (-priority), 6 deadline ms ("" = none), 7 sheddable "1"/"0",
    #       8 high_water, 9 low_water
    # Returns {"ok", id, depth} or {"rejected", retry_after_ms, depth}.
    ENQUEUE = _COMMON_LUA + """
local now = now_ms()
local high, low = tonumber(ARGV[8]), tonumber(ARGV[9])
local m = redis.call('HMGET', META, 'depth', 'state', 'high_water', 'low_water')
if m[3] ~= ARGV[8] or m[4] ~= ARGV[9] then
  redis.call('HSET', META, 'high_water', ARGV[8], 'low_water', ARGV[9])
end
local depth = tonumber(m[1]) or 0
local state = update_state(m[2], depth, high, low, now)
if state == 'shedding' and ARGV[7] == '1' then
  redis.call('HINCRBY', META, 'rejected', 1)
  -- Hint: time to drain to low_water at the dequeue rate observed since shedding began.
  local r = redis.call('HMGET', META, 'shed_since', 'shed_leased', 'leased_total')
  local elapsed = now - (tonumber(r[1]) or now)
  local drained = (tonumber(r[3]) or 0) - (tonumber(r[2]) or 0)
  local retry_ms = 1000
  if drained > 0 and elapsed > 0 then
    retry_ms = math.min(60000, math.max(10, math.max(1, depth - low) * elapsed / drained))
  end
  return {'rejected', math.floor(retry_ms), depth}
end
local id = string.format('%015d', redis.call('HINCRBY', META, 'seq', 1))
redis.call('HSET', task_key(id), 'name', ARGV[2], 'payload', ARGV[3], 'tenant', ARGV[1],
  'priority', ARGV[4], 'score', ARGV[5], 'deadline', ARGV[6], 'attempts', 0, 'enqueued_at', now)
make_ready(id, ARGV[1], ARGV[5], ARGV[4])
update_state(state, depth + 1, high, low, now)
return {'ok', id, depth + 1}
"""

    # LEASE: acknowledge finished tasks, reclaim expired leases, then lease up to
    # `count` tasks by deficit round robin -- one round trip for a worker's whole cycle.
    # ARGV: 1 lease_ms, 2 max_attempts, 3 max_dead_letters, 4 completion_log,
    #       5 token (new delivery token), 6 owner (worker name), 7 count, 8 n_acks,
    #       then n_acks pairs (task id, its delivery token)
    # Returns {stale_ack_ids, task, task, ...}; task = {id, name, payload, tenant,
    #         priority, attempts, deadline}.
    LEASE = _COMMON_LUA + """
local now = now_ms()
local lease_ms, max_attempts = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_dead, done_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local token, owner, count, n_acks = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])

-- 1. Acknowledgements, each owner-checked by its delivery token.
local stale = {}
for i = 0, n_acks - 1 do
  local id, tok = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  local key = task_key(id)
  local t = redis.call('HMGET', key, 'lease', 'tenant')
  if t[1] == tok then
    redis.call('ZREM', LEASES, id)
    redis.call('DEL', key)
    redis.call('HINCRBY', META, 'completed', 1)
    if done_max > 0 then
      redis.call('RPUSH', DONE, t[2] .. '\\n' .. id)
      if redis.call('LLEN', DONE) > done_max then redis.call('LPOP', DONE) end
    end
  else
    stale[#stale + 1] = id
    redis.call('HINCRBY', META, 'stale_acks', 1)
  end
end

-- 2. Expired leases: back to the front of their tenant's queue, or dead after the last attempt.
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, """ + str(
        _RECLAIM_PER_CALL) + """)
for _, id in ipairs(expired) do
  redis.call('ZREM', LEASES, id)
  local key = task_key(id)
  local t = redis.call('HMGET', key, 'tenant', 'score', 'priority', 'attempts')
  if t[1] then
    redis.call('HDEL', key, 'lease', 'owner')
    redis.call('HINCRBY', META, 'redelivered', 1)
    if tonumber(t[4]) >= max_attempts then
      dead_letter(id, 'lease expired on attempt ' .. t[4] .. ' of ' .. max_attempts ..
        ' (worker lost or handler slower than lease_ms)', now, max_dead)
    else
      make_ready(id, t[1], t[2], t[3])
    end
  end
end

-- 3. Retries whose delay is over join their tenant's queue (ahead of newer tasks).
local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, """ + str(
        _RECLAIM_PER_CALL) + """)
for _, id in ipairs(due) do
  redis.call('ZREM', DELAYED, id)
  local t = redis.call('HMGET', task_key(id), 'tenant', 'score', 'priority')
  if t[1] then make_ready(id, t[1], t[2], t[3]) end
end

-- 4. Deficit round robin.  The ring's head is the tenant whose turn it is; a turn
-- starts (deficit < 1) by adding its quantum (weight), each lease costs 1, and the
-- tenant goes to the tail when its deficit is spent or leaves when it has no work.
local out = {stale}
local visits = 0
while #out - 1 < count and visits < """ + str(_MAX_VISITS) + """ do
  visits = visits + 1
  local tenant = redis.call('LINDEX', RING, 0)
  if not tenant then break end
  local deficit = tonumber(redis.call('HGET', DEFICIT, tenant)) or 0
  if deficit < 1 then
    deficit = deficit + (tonumber(redis.call('HGET', WEIGHTS, tenant)) or 1)
  end
  local q = tenant_key(tenant)
  if deficit >= 1 then
    local popped = redis.call('ZPOPMIN', q)
    local id = popped[1]
    if id then
      local key = task_key(id)
      local t = redis.call('HMGET', key, 'name', 'payload', 'priority', 'deadline', 'attempts')
      if t[1] then
        local field = tenant .. '\\n' .. t[3]
        if redis.call('HINCRBY', DEPTH, field, -1) <= 0 then redis.call('HDEL', DEPTH, field) end
        redis.call('HINCRBY', META, 'depth', -1)
        if t[4] ~= '' and tonumber(t[4]) <= now then
          redis.call('HINCRBY', META, 'expired', 1)
          dead_letter(id, 'expired: deadline passed before the task started', now, max_dead)
        else
          deficit = deficit - 1
          local attempts = tonumber(t[5]) + 1
          redis.call('HSET', key, 'attempts', attempts, 'lease', token, 'owner', owner,
            'leased_at', now)
          redis.call('ZADD', LEASES, now + lease_ms, id)
          redis.call('HINCRBY', META, 'leased_total', 1)
          out[#out + 1] = {id, t[1], t[2], tenant, t[3], attempts, t[4]}
        end
      end
    end
  end
  if redis.call('ZCARD', q) == 0 then
    redis.call('LPOP', RING)
    redis.call('HDEL', DEFICIT, tenant)
  else
    redis.call('HSET', DEFICIT, tenant, deficit)
    if deficit < 1 then redis.call('RPUSH', RING, redis.call('LPOP', RING)) end
  end
end
if redis.call('LLEN', RING) == 0 then redis.call('DEL', WAKE) end
update_state_from_meta(now)
return out
"""

    # FAIL: owner-checked; retry while attempts < max_attempts and the failure is
    # retryable -- after `delay` ms in the delayed set, or at once back to the front of
    # its tenant's queue -- else dead-letter.
    # ARGV: 1 max_attempts, 2 max_dead_letters, 3 task id, 4 token,
    #       5 reason, 6 retryable "1"/"0", 7 retry delay ms
    # Returns "retried", "dead" or "stale".
    FAIL = _COMMON_LUA + """
local now = now_ms()
local id, key = ARGV[3], task_key(ARGV[3])
local t = redis.call('HMGET', key, 'lease', 'tenant', 'score', 'priority', 'attempts')
if t[1] ~= ARGV[4] then
  redis.call('HINCRBY', META, 'stale_acks', 1)
  return 'stale'
end
redis.call('ZREM', LEASES, id)
redis.call('HDEL', key, 'lease', 'owner')
redis.call('HSET', key, 'last_error', ARGV[5])
redis.call('HINCRBY', META, 'failed', 1)
if ARGV[6] == '1' and tonumber(t[5]) < tonumber(ARGV[1]) then
  redis.call('HINCRBY', META, 'retried', 1)
  if tonumber(ARGV[7]) > 0 then
    redis.call('ZADD', DELAYED, now + tonumber(ARGV[7]), id)
  else
    make_ready(id, t[2], t[3], t[4])
    update_state_from_meta(now)
  end
  return 'retried'
end
dead_letter(id, ARGV[5], now, tonumber(ARGV[2]))
return 'dead'
"""

    # RENEW: extend the leases still held by their tokens (long-running handlers).
    # ARGV: 1 lease_ms, then pairs (task id, token).  Returns how many renewed.
    RENEW = _COMMON_LUA + """
local now, renewed = now_ms(), 0
for i = 2, #ARGV, 2 do
  if redis.call('HGET', task_key(ARGV[i]), 'lease') == ARGV[i + 1] then
    redis.call('ZADD', LEASES, now + tonumber(ARGV[1]), ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""

    # REVIVE: put a dead-lettered task back in its tenant's queue with a fresh attempt count.
    # ARGV: 1 task id.  Returns 1, or 0 if the id is not in the dead-letter list.
    REVIVE = _COMMON_LUA + """
local id = ARGV[1]
if redis.call('LREM', DEAD, 1, id) == 0 then return 0 end
local key = task_key(id)
local t = redis.call('HMGET', key, 'tenant', 'score', 'priority')
if not t[1] then return 0 end
redis.call('HDEL', key, 'reason', 'dead_at', 'last_error')
redis.call('HSET', key, 'attempts', 0)
make_ready(id, t[1], t[2], t[3])
redis.call('HINCRBY', META, 'revived', 1)
update_state_from_meta(now_ms())
return 1
"""


class _Script:
    """A Lua script run by EVALSHA, loaded into the server on first use (or after a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: Any, meta_key: str, args: list[Any]) -> Any:
        # execute_command directly: redis-py's Script wrapper costs ~15 us per call.
        try:
            return client.execute_command("EVALSHA", self.sha, 1, meta_key, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.execute_command("EVALSHA", self.sha, 1, meta_key, *args)


_ENQUEUE = _Script(_Scripts.ENQUEUE)
_LEASE = _Script(_Scripts.LEASE)
_FAIL = _Script(_Scripts.FAIL)
_RENEW = _Script(_Scripts.RENEW)
_REVIVE = _Script(_Scripts.REVIVE)

# --------------------------------------------------------------------------- helpers



def _check_priority(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be an int or float, got {value!r}")
    if not math.isfinite(value) or abs(value) > _MAX_PRIORITY:
        raise ValueError(f"{argument} must be finite and within +-2**53, got {value!r}")


def _number_text(value: int | float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

