"""Admission of one task: dedupe on its id, enqueue it fairly, say what happened.

Two layers, so the gateway's event loop never blocks on Redis:

* :class:`Admission` is the synchronous core over today's sync components
  (:class:`~buttress.Deduplicator` in ``effectively_once`` mode whose handler
  enqueues on a :class:`~buttress.distributed.FairQueue`).  Every decision
  (which status code, which body) is made here, from the components' results.
* :class:`ThreadedAdmission` is **the one seam** between the async gateway and
  the sync components: it runs the core on a bounded thread pool and refuses
  work (429) when too much is already waiting for a thread.  An asyncio
  version (``AsyncDeduplicator`` and ``AsyncFairQueue`` awaited directly)
  replaces this class alone: the gateway only calls ``await admit(request)``,
  ``await status(task_id)`` and ``close()`` (:class:`AdmissionPort`).
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from buttress.dedupe import DedupeStatus, Deduplicator
from buttress.errors import Rejected, StoreUnavailable
from buttress.service.records import TaskRecords

__all__ = ["Admission", "AdmissionPort", "Outcome", "TaskRequest", "ThreadedAdmission"]


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
    """What the gateway needs from admission (sync components in threads, or async twins)."""

    async def admit(self, request: TaskRequest) -> Outcome: ...

    async def status(self, task_id: str) -> Outcome: ...

    def pending(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Admission:
    """The synchronous admission core (thread-safe; one per gateway process).

    :meth:`admit_batch` admits many requests with one dedupe claim call and one
    "done" call for the whole batch (the queue takes one enqueue per task):
    the seam groups requests that arrive while a batch is in flight (a group
    commit), so under load a request costs little more than its enqueue.
    """

    def __init__(self, queue: Any, dedupe_store: Any, records: TaskRecords, *,
                 ttl: float, lease: float, retry_after: int) -> None:
        self.queue = queue
        self.records = records
        self.retry_after = retry_after
        self.dedupe = Deduplicator(self._enqueue, dedupe_store, ttl=ttl,
                                   mode="effectively_once", lease=min(lease, ttl))
        self._batch = threading.local()  # per committing thread: did Redis fail this batch?

    def admit(self, request: TaskRequest) -> Outcome:
        """Admit one request (a batch of one)."""
        return self.admit_batch([request])[0]

    def admit_batch(self, requests: list[TaskRequest]) -> list[Outcome]:
        """Claim the ids, enqueue each claimed task once, answer each; never raises for Redis."""
        messages = [(r.id, {"tenant": r.tenant, "task": r.task, "priority": r.priority,
                            "payload": r.payload}) for r in requests]
        self._batch.store_error = None
        try:
            results = self.dedupe.process_batch(messages)
        except StoreUnavailable as exc:
            return [self._unavailable(r.id, exc) for r in requests]
        outcomes: list[Outcome | None] = []
        seen: list[int] = []  # positions answered from the workers' records
        for position, (request, result) in enumerate(zip(requests, results, strict=True)):
            outcomes.append(self._decide(request.id, result))
            if result.status is DedupeStatus.DUPLICATE:
                seen.append(position)
        if seen:
            try:
                states = self.records.states([requests[i].id for i in seen])
            except Exception as exc:  # redis errors: the answer is "retry", whatever they are
                for position in seen:
                    outcomes[position] = self._unavailable(requests[position].id, exc)
                return outcomes  # type: ignore[return-value]  # every position is filled
            for position, state in zip(seen, states, strict=True):
                outcomes[position] = Outcome(200, {"id": requests[position].id,
                                                   "duplicate": True,
                                                   "state": state or "queued"}, "duplicate")
        return outcomes  # type: ignore[return-value]  # every position is filled

    def status(self, task_id: str) -> Outcome:
        """The task's state: the workers' record, else the admission claim."""
        try:
            record = self.records.read(task_id)
            claim = self.dedupe.lookup(task_id) if record is None else None
        except Exception as exc:
            return self._unavailable(task_id, exc)
        if record is not None:
            return Outcome(200, {"id": task_id, **record}, "status")
        if claim is None:
            return Outcome(404, {"id": task_id, "error": "not_found",
                                 "detail": "no task with this id (never sent, or expired)"},
                           "not_found")
        state = "queued" if claim.state == "done" else "admitting"
        return Outcome(200, {"id": task_id, "state": state}, "status")

    def stats(self) -> dict[str, Any]:
        return self.dedupe.stats()

    def _decide(self, task_id: str, result: Any) -> Outcome | None:
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
                return self._unavailable(task_id, error)
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

    # The dedupe handler: runs once per claimed id, in the committing thread.
    def _enqueue(self, task_id: str, body: dict[str, Any]) -> str:
        failed = getattr(self._batch, "store_error", None)
        if failed is not None:
            # Redis already failed this batch: do not wait out one timeout per task.
            raise StoreUnavailable(f"not tried: {failed}")
        try:
            return str(self.queue.enqueue(body["task"], {"id": task_id,
                                                         "payload": body["payload"]},
                                          tenant=body["tenant"], priority=body["priority"]))
        except StoreUnavailable as exc:
            self._batch.store_error = exc
            raise

    def _unavailable(self, task_id: str, exc: BaseException) -> Outcome:
        return Outcome(503, {"id": task_id, "error": "unavailable",
                             "detail": f"the task store is unavailable: {exc}"[:500]},
                       "unavailable", self.retry_after)


class ThreadedAdmission:
    """THE SEAM: the sync core on a small thread pool, awaited by the gateway's event loop.

    At most ``committers`` admission batches run at once, each on a pool
    thread; requests that arrive meanwhile wait on the event loop and go
    together in the next batch (up to ``max_batch``), so a busy gateway makes
    one claim call and one done call per batch, not per request.  Past
    ``max_pending`` waiting requests, ``admit`` answers 429 at once (the
    gateway's own backpressure, before Redis sees the request).
    """

    def __init__(self, core: Admission, *, committers: int, max_pending: int,
                 retry_after: int, max_batch: int = 64) -> None:
        self.core = core
        self.committers = committers
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.max_batch = max_batch
        # Committers, plus threads for status reads so a GET never waits behind a batch.
        self._pool = ThreadPoolExecutor(max_workers=committers + 2,
                                        thread_name_prefix="buttress-admit")
        # Touched on the event loop only: no locks.
        self._pending = 0
        self._waiting: list[tuple[TaskRequest, asyncio.Future[Outcome]]] = []
        self._running = 0
        self._batches = 0

    async def admit(self, request: TaskRequest) -> Outcome:
        if self._pending >= self.max_pending:
            return Outcome(429, {"id": request.id, "error": "overloaded",
                                 "detail": "the gateway has too many admissions waiting"},
                           "overloaded", self.retry_after)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Outcome] = loop.create_future()
        self._waiting.append((request, answer))
        self._pending += 1
        try:
            if self._running < self.committers:
                self._commit(loop)
            return await answer
        finally:
            self._pending -= 1

    async def status(self, task_id: str) -> Outcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.core.status, task_id)

    def pending(self) -> int:
        return self._pending

    def stats(self) -> dict[str, Any]:
        return {"pending": self._pending, "batches": self._batches}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _commit(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._waiting[:self.max_batch]
        del self._waiting[:self.max_batch]
        self._running += 1
        self._batches += 1
        work = loop.run_in_executor(self._pool, self.core.admit_batch,
                                    [request for request, _ in batch])
        work.add_done_callback(lambda done: self._answer(loop, batch, done))

    def _answer(self, loop: asyncio.AbstractEventLoop,
                batch: list[tuple[TaskRequest, asyncio.Future[Outcome]]],
                done: asyncio.Future[list[Outcome]]) -> None:
        self._running -= 1
        error = done.exception()
        for position, (_, answer) in enumerate(batch):
            if answer.done():  # the request's task was cancelled (drain deadline)
                continue
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(done.result()[position])
        if self._waiting and self._running < self.committers:
            self._commit(loop)
