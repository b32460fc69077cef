"""Admission of one task: dedupe on its id, enqueue it fairly, say what happened.

Decide once, do I/O once (docs/service.md, "The request flow"):

* :class:`AdmissionCore` makes every decision and does no I/O: what the
  dedupe results of a batch mean (202, 200 duplicate with the first outcome,
  409, 429 shedding, 503 unavailable or in progress), a GET's answer from the
  task record and the claim, the gateway's own 429 when too many requests wait,
  and the rule that a batch whose first enqueue found Redis down does not wait
  out one more timeout per task.
* :class:`GroupCommit` batches the requests that arrive while a batch is in
  flight (a group commit: one dedupe claim call and one done call per batch,
  one enqueue script call per new task), on the event loop.
* Two I/O shells, chosen by the ``--admission`` setting (docs/service.md has
  the figures behind the default):
  :class:`ThreadedAdmission` (``threads``, the default) runs the steps with the
  sync components (:class:`Admission`: :class:`~buttress.Deduplicator` whose
  handler calls :meth:`~buttress.distributed.FairQueue.enqueue`) on a pool
  thread, one hop per batch, so Redis I/O runs beside the event loop's HTTP
  work; :class:`AsyncAdmission` (``async``) awaits the asyncio twins
  (:class:`~buttress.AsyncDeduplicator`,
  :class:`~buttress.distributed.AsyncFairQueue`) on the server's event loop:
  no thread at all, a lower tail latency, less throughput on 2+ cores.

The gateway only calls ``await admit(request)``, ``await status(task_id)``,
``pending()``, ``stats()`` and ``await aclose()`` (:class:`AdmissionPort`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from buttress._validate import require_int
from buttress.dedupe import AsyncDeduplicator, DedupeStatus, Deduplicator
from buttress.errors import Rejected, StoreUnavailable
from buttress.service.records import AsyncTaskRecords, TaskRecords

__all__ = ["STATUS_READS", "Admission", "AdmissionCore", "AdmissionPort", "AsyncAdmission",
           "GroupCommit", "Outcome", "TaskRequest", "ThreadedAdmission", "async_client",
           "enqueue_request_id"]

# Status reads (GET /v1/tasks/{id}) in flight at once per gateway: the read pool's threads,
# or AsyncAdmission's semaphore.  Each read holds a Redis connection for up to the socket
# timeout: unbounded, every client connection asking for a status while Redis was slow
# held a Redis connection of its own (300 GETs, 302 connections), so enough clients could
# fill Redis's maxclients for every other client of that Redis, workers included.
STATUS_READS = 2


class TaskRequest(NamedTuple):
    """A validated ``POST /v1/tasks`` body."""

    id: str
    tenant: str
    task: str
    priority: int
    payload: Any


class Outcome(NamedTuple):
    """What the gateway answers: status code, JSON body, Retry-After, and a metrics label."""

    status: int
    body: dict[str, Any]
    outcome: str  # accepted, duplicate, conflict, shed, overloaded, unavailable, in_progress
    retry_after: int | None = None


class AdmissionPort(Protocol):
    """What the gateway needs from admission."""

    async def admit(self, request: TaskRequest) -> Outcome: ...

    async def status(self, task_id: str) -> Outcome: ...

    def pending(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


# The store error that ended the batch being committed, so its other new tasks are not
# even tried.  A context variable: each batch runs in an asyncio task of its own (with its
# own copy of the context), or on a pool thread (one context per thread).
_batch_failure: contextvars.ContextVar[StoreUnavailable | None] = contextvars.ContextVar(
    "buttress_admission_batch_failure", default=None)


def enqueue_request_id(task_id: str) -> str:
    """The request id of the gateway's enqueue of ``task_id``: the same for every try.

    An enqueue that timed out on the gateway may still have run in Redis.  The
    client's retry is claimed again and enqueued again; with the same request
    id, the queue answers it with the first task's id and creates nothing, for
    ``resend_window_ms`` (10 minutes by default).  A digest, not the id itself:
    ids may be 512 bytes and request ids 200; 128 bits make a collision between
    two ids in one window (which would drop the second) vanishingly unlikely.
    """
    return "gw:" + hashlib.blake2b(task_id.encode(), digest_size=16).hexdigest()


class AdmissionCore:
    """Every admission decision, and no I/O (one per gateway process)."""

    def __init__(self, *, retry_after: int) -> None:
        self.retry_after = require_int("retry_after", retry_after, minimum=1)

    @staticmethod
    def messages(requests: list[TaskRequest]) -> list[tuple[str, dict[str, Any]]]:
        """The dedupe messages of a batch: the id, and the content a duplicate must match."""
        return [(r.id, {"tenant": r.tenant, "task": r.task, "priority": r.priority,
                        "payload": r.payload}) for r in requests]

    def begin_batch(self) -> None:
        _batch_failure.set(None)

    def enqueue_call(self, task_id: str, body: dict[str, Any]) -> tuple[tuple[Any, ...],
                                                                         dict[str, Any]]:
        """The queue's enqueue arguments for one claimed task (raises if the batch failed)."""
        failed = _batch_failure.get()
        if failed is not None:
            # Redis already failed this batch: do not wait out one timeout per task.
            raise StoreUnavailable(f"not tried: {failed}")
        return ((body["task"], {"id": task_id, "payload": body["payload"]}),
                {"tenant": body["tenant"], "priority": body["priority"],
                 "request_id": enqueue_request_id(task_id)})

    @staticmethod
    def enqueue_failed(exc: StoreUnavailable) -> None:
        _batch_failure.set(exc)

    def answers(self, requests: list[TaskRequest], results: list[Any]
                ) -> tuple[list[Outcome | None], list[int]]:
        """Each request's answer from its dedupe result, and the duplicates' positions.

        A duplicate is answered with the first outcome, read from the workers'
        records: :meth:`duplicates` fills those positions in.
        """
        outcomes: list[Outcome | None] = []
        duplicates: list[int] = []
        for position, (request, result) in enumerate(zip(requests, results, strict=True)):
            outcomes.append(self.decide(request.id, result))
            if result.status is DedupeStatus.DUPLICATE:
                duplicates.append(position)
        return outcomes, duplicates

    @staticmethod
    def duplicates(requests: list[TaskRequest], outcomes: list[Outcome | None],
                   positions: list[int], states: list[str | None]) -> list[Outcome]:
        for position, state in zip(positions, states, strict=True):
            outcomes[position] = Outcome(200, {"id": requests[position].id, "duplicate": True,
                                               "state": state or "queued"}, "duplicate")
        return outcomes  # type: ignore[return-value]  # every position is filled now

    def duplicates_unknown(self, requests: list[TaskRequest], outcomes: list[Outcome | None],
                           positions: list[int], exc: BaseException) -> list[Outcome]:
        """The records could not be read: the duplicates are told to retry."""
        for position in positions:
            outcomes[position] = self.unavailable(requests[position].id, exc)
        return outcomes  # type: ignore[return-value]  # every position is filled now

    def all_unavailable(self, requests: list[TaskRequest], exc: BaseException) -> list[Outcome]:
        return [self.unavailable(r.id, exc) for r in requests]

    def decide(self, task_id: str, result: Any) -> Outcome | None:
        """The answer for one message's dedupe result (None: a duplicate, answered after)."""
        status = result.status
        if status is DedupeStatus.PROCESSED:
            return Outcome(202, {"id": task_id, "state": "queued"}, "accepted")
        if status is DedupeStatus.FAILED:
            error = result.error
            if isinstance(error, Rejected):
                wait = max(1, math.ceil(error.retry_after or self.retry_after))
                return Outcome(429, {"id": task_id, "error": "shedding",
                                     "detail": str(error)}, "shed", wait)
            if isinstance(error, StoreUnavailable):
                return self.unavailable(task_id, error)
            assert error is not None
            raise error  # not Redis, not backpressure: a bug; the gateway answers 500, logs it
        if status is DedupeStatus.CONFLICT:
            return Outcome(409, {"id": task_id, "error": "conflict",
                                 "detail": "this id was first sent with a different tenant, "
                                           "task, priority or payload"}, "conflict")
        if status is DedupeStatus.IN_PROGRESS:
            return Outcome(503, {"id": task_id, "error": "in_progress",
                                 "detail": "another request with this id is being admitted "
                                           "right now; retry"}, "in_progress", self.retry_after)
        return None

    @staticmethod
    def status_answer(task_id: str, record: dict[str, Any] | None, claim: Any) -> Outcome:
        """A GET's answer: the workers' record, else the admission claim, else 404."""
        if record is not None:
            return Outcome(200, {"id": task_id, **record}, "status")
        if claim is None:
            return Outcome(404, {"id": task_id, "error": "not_found",
                                 "detail": "no task with this id (never sent, or expired)"},
                           "not_found")
        state = "queued" if claim.state == "done" else "admitting"
        return Outcome(200, {"id": task_id, "state": state}, "status")

    def overloaded(self, task_id: str) -> Outcome:
        return Outcome(429, {"id": task_id, "error": "overloaded",
                             "detail": "the gateway has too many admissions waiting"},
                       "overloaded", self.retry_after)

    def unavailable(self, task_id: str, exc: BaseException) -> Outcome:
        return Outcome(503, {"id": task_id, "error": "unavailable",
                             "detail": f"the task store is unavailable: {exc}"[:500]},
                       "unavailable", self.retry_after)


class GroupCommit:
    """Batches requests on the event loop: at most ``committers`` batches in flight.

    Requests that arrive while ``committers`` batches are being admitted wait
    and go together in the next batch (up to ``max_batch``), so a busy gateway
    makes one claim call and one done call per batch, not per request.  Past
    ``max_pending`` requests waiting or in flight, :meth:`admit` answers 429 at
    once (the gateway's own backpressure, before Redis sees the request).
    ``commit`` admits one batch and answers each request, in order.
    """

    def __init__(self, core: AdmissionCore,
                 commit: Callable[[list[TaskRequest]], Awaitable[list[Outcome]]], *,
                 committers: int, max_pending: int, max_batch: int = 64) -> None:
        self.core = core
        self.commit = commit
        self.committers = require_int("committers", committers, minimum=1)
        self.max_pending = require_int("max_pending", max_pending, minimum=1)
        self.max_batch = require_int("max_batch", max_batch, minimum=1)
        # Touched on the event loop only: no locks.
        self._pending = 0
        self._waiting: list[tuple[TaskRequest, asyncio.Future[Outcome]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._batches = 0

    async def admit(self, request: TaskRequest) -> Outcome:
        if self._pending >= self.max_pending:
            return self.core.overloaded(request.id)
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer))
        self._pending += 1
        try:
            if len(self._running) < self.committers:
                self._start()
            # A request cut at the drain deadline leaves its batch running: the others in
            # it still get their answers, and its own id is admitted or released.
            return await answer
        finally:
            self._pending -= 1

    def pending(self) -> int:
        return self._pending

    def stats(self) -> dict[str, Any]:
        return {"pending": self._pending, "batches": self._batches}

    async def wait_idle(self) -> None:
        """Wait for the batches in flight (at shutdown)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _start(self) -> None:
        batch = self._waiting[:self.max_batch]
        del self._waiting[:self.max_batch]
        self._batches += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)

    async def _run(self, batch: list[tuple[TaskRequest, asyncio.Future[Outcome]]]) -> None:
        try:
            outcomes = await self.commit([request for request, _ in batch])
        except Exception as exc:  # a bug below: every request of the batch answers 500
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
        else:
            for (_, answer), outcome in zip(batch, outcomes, strict=True):
                if not answer.done():  # done: the request's task was cancelled (drain)
                    answer.set_result(outcome)
        finally:
            self._running.discard(asyncio.current_task())
            if self._waiting and len(self._running) < self.committers:
                self._start()


class _Grouped:
    """What both shells share: the group commit in front of ``admit_batch``."""

    core: AdmissionCore
    group: GroupCommit

    async def admit(self, request: TaskRequest) -> Outcome:
        """Admit one request, in the next group commit."""
        return await self.group.admit(request)

    def pending(self) -> int:
        return self.group.pending()

    def stats(self) -> dict[str, Any]:
        return self.group.stats()


class AsyncAdmission(_Grouped):
    """Admission on the server's event loop: AsyncDeduplicator, AsyncFairQueue, records.

    ``queue`` is an :class:`~buttress.distributed.AsyncFairQueue`;
    ``dedupe_store`` an :class:`~buttress.AsyncRedisStore` or
    :class:`~buttress.AsyncSQLiteStore`; ``records`` the task records on the
    same ``redis.asyncio`` client (:func:`async_client` makes one).  Every
    Redis error becomes a 503 answer; nothing here raises for Redis.
    """

    def __init__(self, queue: Any, dedupe_store: Any, records: AsyncTaskRecords, *,
                 ttl: float, lease: float, retry_after: int, committers: int = 2,
                 max_pending: int = 512, max_batch: int = 64) -> None:
        self.queue = queue
        self.records = records
        self.core = AdmissionCore(retry_after=retry_after)
        self.dedupe = AsyncDeduplicator(self._enqueue, dedupe_store, ttl=ttl,
                                        mode="effectively_once", lease=min(lease, ttl))
        self._reads = asyncio.Semaphore(STATUS_READS)
        self.group = GroupCommit(self.core, self.admit_batch, committers=committers,
                                 max_pending=max_pending, max_batch=max_batch)

    async def admit_batch(self, requests: list[TaskRequest]) -> list[Outcome]:
        """Claim the ids, enqueue each claimed task once, answer each; never raises for Redis."""
        core = self.core
        core.begin_batch()
        try:
            results = await self.dedupe.process_batch(core.messages(requests))
        except StoreUnavailable as exc:
            return core.all_unavailable(requests, exc)
        outcomes, duplicates = core.answers(requests, results)
        if not duplicates:
            return outcomes  # type: ignore[return-value]  # no duplicate: all filled
        try:
            states = await self.records.states([requests[i].id for i in duplicates])
        except Exception as exc:  # redis errors: the answer is "retry", whatever they are
            return core.duplicates_unknown(requests, outcomes, duplicates, exc)
        return core.duplicates(requests, outcomes, duplicates, states)

    async def status(self, task_id: str) -> Outcome:
        """The task's state: the workers' record, else the admission claim."""
        async with self._reads:  # at most STATUS_READS Redis connections for reads
            try:
                record = await self.records.read(task_id)
                claim = await self.dedupe.lookup(task_id) if record is None else None
            except Exception as exc:
                return self.core.unavailable(task_id, exc)
        return self.core.status_answer(task_id, record, claim)

    async def aclose(self) -> None:
        """Let the batches in flight finish (their requests are answered)."""
        await self.group.wait_idle()

    # The dedupe handler: runs once per claimed id, in the batch's task.
    async def _enqueue(self, task_id: str, body: dict[str, Any]) -> str:
        args, kwargs = self.core.enqueue_call(task_id, body)
        try:
            return str(await self.queue.enqueue(*args, **kwargs))
        except StoreUnavailable as exc:
            self.core.enqueue_failed(exc)
            raise


class Admission:
    """The same steps as :class:`AsyncAdmission` with the sync components (thread-safe).

    :class:`~buttress.Deduplicator` whose handler calls
    :meth:`~buttress.distributed.FairQueue.enqueue`, and :class:`TaskRecords`,
    all on one redis-py client; :class:`ThreadedAdmission` runs it on threads.
    """

    def __init__(self, core: AdmissionCore, queue: Any, dedupe_store: Any,
                 records: TaskRecords, *, ttl: float, lease: float) -> None:
        self.core = core
        self.queue = queue
        self.records = records
        self.dedupe = Deduplicator(self._enqueue, dedupe_store, ttl=ttl,
                                   mode="effectively_once", lease=min(lease, ttl))

    def admit_batch(self, requests: list[TaskRequest]) -> list[Outcome]:
        """Claim the ids, enqueue each claimed task once, answer each; never raises for Redis."""
        core = self.core
        core.begin_batch()
        try:
            results = self.dedupe.process_batch(core.messages(requests))
        except StoreUnavailable as exc:
            return core.all_unavailable(requests, exc)
        outcomes, duplicates = core.answers(requests, results)
        if not duplicates:
            return outcomes  # type: ignore[return-value]  # no duplicate: all filled
        try:
            states = self.records.states([requests[i].id for i in duplicates])
        except Exception as exc:  # redis errors: the answer is "retry", whatever they are
            return core.duplicates_unknown(requests, outcomes, duplicates, exc)
        return core.duplicates(requests, outcomes, duplicates, states)

    def status(self, task_id: str) -> Outcome:
        """The task's state: the workers' record, else the admission claim."""
        try:
            record = self.records.read(task_id)
            claim = self.dedupe.lookup(task_id) if record is None else None
        except Exception as exc:
            return self.core.unavailable(task_id, exc)
        return self.core.status_answer(task_id, record, claim)

    def _enqueue(self, task_id: str, body: dict[str, Any]) -> str:
        args, kwargs = self.core.enqueue_call(task_id, body)
        try:
            return str(self.queue.enqueue(*args, **kwargs))
        except StoreUnavailable as exc:
            self.core.enqueue_failed(exc)
            raise


class ThreadedAdmission(_Grouped):
    """:class:`Admission` (sync components) on a thread pool, awaited by the event loop.

    At most ``committers`` batches run at once, each on a thread of their
    own pool; GET reads run on a second pool of STATUS_READS threads.  Two pools, not
    one: in a shared queue a batch waited behind every status read queued
    before it (24 reads while Redis was slow held a POST for 4 s), so a flood
    of GETs starved admission, and the reads never waited behind a batch.
    """

    def __init__(self, admission: Admission, *, committers: int = 2, max_pending: int = 512,
                 max_batch: int = 64) -> None:
        self.admission = admission
        self.core = admission.core
        self.dedupe = admission.dedupe
        self.group = GroupCommit(self.core, self._commit, committers=committers,
                                 max_pending=max_pending, max_batch=max_batch)
        self._pool = ThreadPoolExecutor(max_workers=committers,
                                        thread_name_prefix="buttress-admit")
        self._reads = ThreadPoolExecutor(max_workers=STATUS_READS,
                                         thread_name_prefix="buttress-status")

    async def status(self, task_id: str) -> Outcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, self.admission.status, task_id)

    async def aclose(self) -> None:
        """Let the batches in flight finish, then stop the threads."""
        await self.group.wait_idle()
        self.close()

    def close(self) -> None:
        """Stop the threads (after the batches and reads they run)."""
        self._pool.shutdown(wait=True)
        self._reads.shutdown(wait=True)

    async def _commit(self, requests: list[TaskRequest]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.admission.admit_batch, requests)


def async_client(url: str, **options: Any) -> Any:
    """A ``redis.asyncio`` client for admission: connections handed out without a read.

    redis-py's asyncio pool checks every connection it hands out for unread
    data (a zero-timeout read under the pool's lock): on the gateway that was
    a third of each command's cost.  A connection never comes back with unread
    data here (redis-py disconnects one whose command was interrupted, by a
    timeout or a cancelled request), so this pool skips the check.
    With a redis-py without ``get_available_connection`` or ``Redis.from_pool``,
    the standard pool is used.
    """
    import redis.asyncio

    base = redis.asyncio.ConnectionPool
    if not (hasattr(base, "get_available_connection")
            and hasattr(redis.asyncio.Redis, "from_pool")):  # redis-py 5.0.0 has neither
        return redis.asyncio.Redis.from_url(url, **options)

    class CheckoutPool(base):  # type: ignore[misc, valid-type]
        async def get_connection(self, command_name: Any = None, *keys: Any,
                                 **kwargs: Any) -> Any:
            connection = self.get_available_connection()
            try:
                await connection.connect()  # at once if connected; reconnects a dropped one
            except BaseException:
                await self.release(connection)
                raise
            return connection

    return redis.asyncio.Redis.from_pool(CheckoutPool.from_url(url, **options))
