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
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from buttress.dedupe import DedupeStatus, Deduplicator
from buttress.errors import Rejected, StoreUnavailable
from buttress.service.records import TaskRecords

__all__ = ["Admission", "AdmissionPort", "Outcome", "TaskRequest", "ThreadedAdmission"]

# How long a request whose id another gateway is admitting right now waits for that
# admission to finish before it is told to retry (503 + Retry-After).
_IN_PROGRESS_WAIT = 0.25


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

    def close(self) -> None: ...


class Admission:
    """The synchronous admission core (thread-safe; one per gateway process)."""

    def __init__(self, queue: Any, dedupe_store: Any, records: TaskRecords, *,
                 ttl: float, lease: float, retry_after: int) -> None:
        self.queue = queue
        self.records = records
        self.retry_after = retry_after
        self.dedupe = Deduplicator(self._enqueue, dedupe_store, ttl=ttl,
                                   mode="effectively_once", lease=min(lease, ttl))

    def admit(self, request: TaskRequest) -> Outcome:
        """Claim the id, enqueue once, and answer; never raises for Redis trouble."""
        fingerprinted = {"tenant": request.tenant, "task": request.task,
                         "priority": request.priority, "payload": request.payload}
        try:
            result = self.dedupe.process_message(request.id, fingerprinted)
        except StoreUnavailable as exc:
            return self._unavailable(request.id, exc)
        status = result.status
        if status is DedupeStatus.PROCESSED:
            return Outcome(202, {"id": request.id, **result.value}, "accepted")
        if status is DedupeStatus.FAILED:
            error = result.error
            if isinstance(error, Rejected):
                wait = max(1, math.ceil(error.retry_after or self.retry_after))
                return Outcome(429, {"id": request.id, "error": "shedding",
                                     "detail": str(error)}, "shed", wait)
            if isinstance(error, StoreUnavailable):
                return self._unavailable(request.id, error)
            assert error is not None
            raise error  # not Redis, not backpressure: a bug; the gateway answers 500, logs it
        if status is DedupeStatus.CONFLICT:
            return Outcome(409, {"id": request.id, "error": "conflict",
                                 "detail": "this id was first sent with a different tenant, "
                                           "task, priority or payload"}, "conflict")
        try:
            record = self.records.read(request.id)
            deadline = time.monotonic() + _IN_PROGRESS_WAIT
            while record is None and status is DedupeStatus.IN_PROGRESS \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
                record = self.records.read(request.id)
        except Exception as exc:  # redis errors: the answer is "retry", whatever they are
            return self._unavailable(request.id, exc)
        if record is not None:
            return Outcome(200, {"id": request.id, "duplicate": True, **record}, "duplicate")
        if status is DedupeStatus.IN_PROGRESS:
            return Outcome(503, {"id": request.id, "error": "in_progress",
                                 "detail": "another request with this id is being admitted; "
                                           "retry"}, "in_progress", self.retry_after)
        # Done but no record: admitted by a gateway whose record write was lost.
        return Outcome(200, {"id": request.id, "duplicate": True, "state": "accepted"},
                       "duplicate")

    def status(self, task_id: str) -> Outcome:
        try:
            record = self.records.read(task_id)
        except Exception as exc:
            return self._unavailable(task_id, exc)
        if record is None:
            return Outcome(404, {"id": task_id, "error": "not_found",
                                 "detail": "no task with this id (never sent, or expired)"},
                           "not_found")
        return Outcome(200, {"id": task_id, **record}, "status")

    def stats(self) -> dict[str, Any]:
        return self.dedupe.stats()

    # The dedupe handler: runs once per id (per lease), in the claiming thread.
    def _enqueue(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        queue_id = self.queue.enqueue(body["task"], {"id": task_id, "payload": body["payload"]},
                                      tenant=body["tenant"], priority=body["priority"])
        record = {"state": "queued", "tenant": body["tenant"], "task": body["task"],
                  "queue_id": queue_id, "accepted_at": round(time.time(), 3)}
        self.records.write(task_id, record)
        return record

    def _unavailable(self, task_id: str, exc: BaseException) -> Outcome:
        return Outcome(503, {"id": task_id, "error": "unavailable",
                             "detail": f"the task store is unavailable: {exc}"[:500]},
                       "unavailable", self.retry_after)


class ThreadedAdmission:
    """THE SEAM: the sync core on a bounded pool, awaited by the gateway's event loop.

    ``threads`` run Redis calls; at most ``max_pending`` admissions wait for
    one, past that ``admit`` answers 429 at once (the gateway's own
    backpressure, before Redis sees the request).
    """

    def __init__(self, core: Admission, *, threads: int, max_pending: int,
                 retry_after: int) -> None:
        self.core = core
        self.max_pending = max_pending
        self.retry_after = retry_after
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="buttress-admit")
        self._pending = 0

    async def admit(self, request: TaskRequest) -> Outcome:
        if self._pending >= self.max_pending:  # read and written on the event loop only
            return Outcome(429, {"id": request.id, "error": "overloaded",
                                 "detail": "the gateway has too many admissions waiting"},
                           "overloaded", self.retry_after)
        return await self._run(self.core.admit, request)

    async def status(self, task_id: str) -> Outcome:
        return await self._run(self.core.status, task_id)

    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    async def _run(self, function: Any, argument: Any) -> Outcome:
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, function, argument)
        finally:
            self._pending -= 1
