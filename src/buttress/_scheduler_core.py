"""The scheduler's rules, written once: admission, hysteresis, accounting, states.

``SchedulerCore`` is sans-I/O (the h11 model): it holds the queue, the
counters and the state, and decides, but it never locks, waits, sleeps,
starts a worker or runs a task.  Two drivers own one each:

* ``buttress.TaskScheduler`` (worker threads) calls it under its lock;
* ``buttress.AsyncTaskScheduler`` (worker coroutines) calls it from its event
  loop's thread, which is all the mutual exclusion a loop needs.

A driver runs tasks, waits where the core says so (``admit`` returning False
under ``overflow="block"``, idle workers, shutdown), and after each call
delivers ``events`` outside its lock: state changes for ``on_state_change``
and finished handles whose listeners must hear of it.  So the rule in
docs/scheduler.md ("Backpressure: the exact rule") lives here alone.

Task handles are the drivers' (``buttress.scheduler.TaskHandle`` and its async
subclass); the core reads ``priority`` and writes ``_entry``, ``_status`` and,
for tasks that end without running, ``_value``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from concurrent.futures import CancelledError
from typing import Any

from buttress._validate import (
    require_callable,
    require_choice,
    require_int,
    require_number,
    require_str,
)
from buttress.errors import Rejected, Shed

__all__ = ["SchedulerCore", "check_deadline", "next_batch_limit"]

# Task statuses (TaskHandle.status).
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
SHED = "shed"
EXPIRED = "expired"

# Scheduler states (stats()["state"], Rejected.state, on_state_change).
NORMAL = "normal"
SHEDDING = "shedding"
SHUTTING_DOWN = "shutting_down"
STOPPED = "stopped"

OVERFLOW_POLICIES = ("shed_lowest", "reject", "block")
# Seconds per sample of the drain rate behind the retry-after hint (it spans 1-2 of them).
RATE_WINDOW = 1.0
# A worker claims a batch of tasks at a time: as many as it ran in about
# BATCH_SECONDS last time, within 1..MAX_BATCH and at most its share of the
# queue.  Fast tasks go in big batches (the lock and the hand-offs are most of
# their cost); slow tasks go one by one, so an urgent task never waits long
# behind a batch a busy worker is sitting on.
MAX_BATCH = 256
BATCH_SECONDS = 0.001


def next_batch_limit(seconds_per_task: float) -> int:
    """How many tasks a worker claims next, given how long each took last time."""
    if seconds_per_task * MAX_BATCH <= BATCH_SECONDS:
        return MAX_BATCH
    return max(1, int(BATCH_SECONDS / seconds_per_task))


class SchedulerCore:
    """Admission, hysteresis, accounting and the state machine of one scheduler (no I/O).

    Validates the configuration (the drivers' constructors pass it through).
    """

    def __init__(
        self,
        queue: Any,
        *,
        workers: Any,
        high_water: Any,
        low_water: Any,
        max_size: Any,
        shed_below: Any,
        overflow: Any,
        block_timeout: Any,
        on_state_change: Any,
        name: Any,
        logger: logging.Logger,
    ) -> None:
        require_int("workers", workers, minimum=1)
        require_int("high_water", high_water, minimum=1)
        if low_water is None:
            low_water = high_water // 2
        require_int("low_water", low_water, minimum=0)
        if max_size is None:
            max_size = 2 * high_water
        require_int("max_size", max_size, minimum=1)
        if low_water >= high_water:
            raise ValueError(f"low_water must be < high_water, got low_water={low_water}, "
                             f"high_water={high_water}")
        if high_water > max_size:
            raise ValueError(f"high_water must be <= max_size, got high_water={high_water}, "
                             f"max_size={max_size}")
        require_choice("overflow", overflow, OVERFLOW_POLICIES)
        if block_timeout != math.inf or isinstance(block_timeout, bool):  # inf: wait for good
            require_number("block_timeout", block_timeout, minimum=0)
        require_callable("on_state_change", on_state_change, allow_none=True)
        require_str("name", name)
        try:
            queue.priority_key(shed_below)  # the same rule as task priorities
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"shed_below: {exc}") from None
        self.queue = queue
        self.workers = int(workers)
        self.high_water = int(high_water)
        self.low_water = int(low_water)
        self.max_size = int(max_size)
        self.shed_below = shed_below
        self.overflow = overflow
        self.block_timeout = float(block_timeout)
        self.name = name
        self.on_state_change = on_state_change
        self.logger = logger

        self.state = NORMAL
        self.closing = False
        self.alive = 0  # worker loops running (the driver counts them in and out)
        self.stopping = 0  # of those, workers whose task is inside shutdown()
        # Queue length that starts SHEDDING: high_water in NORMAL, never otherwise,
        # so the hot path tests one number.
        self.shed_at: float = self.high_water
        # What the driver delivers outside its lock, in order: (old, new) state
        # changes (only with on_state_change) and finished handles with listeners.
        self.events: list[Any] = []
        self.shedding_since: float | None = None
        self.shedding_seconds = 0.0
        # Two (dequeued, when) samples for the retry-after hint's drain rate: the older
        # one is 1-2 RATE_WINDOW old once the shedding has lasted that long.
        start = (0, time.monotonic())
        self.rate_marks = (start, start)
        self.dequeued = 0
        self.running = 0
        self.accepted = self.rejected = self.shed = self.expired = 0
        self.cancelled = self.completed = self.failed = 0

    # -- admission ---------------------------------------------------------------

    def push(self, handle: Any) -> None:
        """Admit ``handle`` (the caller has checked ``state is NORMAL`` or called ``admit``).

        TaskScheduler.enqueue inlines these four lines (a method call is ~8% of a
        no-op task there); a change here is a change there.
        """
        queue = self.queue
        handle._entry = queue.push(handle, handle.priority)  # bad priorities raise here
        self.accepted += 1
        if len(queue) >= self.shed_at:
            self.set_state(SHEDDING)

    def admit(self, handle: Any) -> bool:
        """Admission outside NORMAL, rule 2: True to push now, False to wait for room.

        Raises ``Rejected`` (counted) when the task is refused, and
        ``TypeError``/``ValueError`` (not counted) for a bad priority.  False
        only under ``overflow="block"`` with a full queue: the driver waits up to
        ``block_timeout`` for room, then calls ``admit_after_wait``.
        """
        queue = self.queue
        priority = handle.priority
        queue.priority_key(priority)  # bad input is an error, not a rejection
        if self.closing:
            self.reject("scheduler is shutting down", retry=False)
        if self.state is SHEDDING and priority < self.shed_below:
            self.reject(f"shedding: queue reached high_water={self.high_water}; "
                        f"priority {priority!r} < shed_below={self.shed_below!r}")
        if len(queue) < self.max_size:
            return True
        if self.overflow == "shed_lowest":
            if queue.peek_lowest().priority < priority:
                victim = queue.pop_lowest()
                self.shed += 1
                self.settle(victim, SHED, Shed(f"evicted at max_size={self.max_size} by a "
                                               f"task of priority {priority!r}"))
                return True
            self.reject(f"queue full (max_size={self.max_size}) and the task is not "
                        f"more important than any queued task")
        if self.overflow == "block":
            return False
        self.reject(f"queue full (max_size={self.max_size})")
        raise AssertionError("unreachable")  # reject() raises

    def has_room(self) -> bool:
        return len(self.queue) < self.max_size

    def would_wait(self, priority: Any) -> bool:
        """Whether admitting ``priority`` now is a wait for room (rule 2.3, ``block``).

        False whenever the rule refuses first (shutting down, shedding below
        ``shed_below``) or admits at once.
        """
        self.queue.priority_key(priority)  # bad input is an error, not a wait
        return (self.overflow == "block" and not self.closing
                and len(self.queue) >= self.max_size
                and not (self.state is SHEDDING and priority < self.shed_below))

    def admit_after_wait(self) -> None:
        """After a ``block`` wait: admit if there is room now, else refuse."""
        if self.closing:
            self.reject("scheduler is shutting down", retry=False)
        if len(self.queue) >= self.max_size:
            self.reject(f"queue full (max_size={self.max_size}) after waiting "
                        f"block_timeout={self.block_timeout}s for room")

    def reject(self, reason: str, *, retry: bool = True) -> None:
        """Count a refusal and raise it."""
        self.rejected += 1
        state = SHUTTING_DOWN if self.closing else self.state
        raise Rejected(reason, state=state, retry_after=self.retry_after() if retry else None)

    def retry_after(self) -> float:
        """Seconds until the queue is likely back at low_water, at the recent drain rate."""
        # The rate of the last 1-2 windows, not the average since shedding began: a
        # stall early in the shedding would otherwise lengthen every later hint.
        now = time.monotonic()
        older, newer = self.rate_marks
        if now - newer[1] >= RATE_WINDOW:
            older, newer = newer, (self.dequeued, now)
            self.rate_marks = (older, newer)
        dequeued, since = older
        elapsed = now - since
        rate = (self.dequeued - dequeued) / elapsed if elapsed > 0 else 0.0
        excess = max(1, len(self.queue) - self.low_water)
        return min(60.0, max(0.01, excess / rate)) if rate > 0 else 1.0

    # -- workers -----------------------------------------------------------------

    def exchange(self, finished: int, failed: int, expired: int, cancelled: int,
                 limit: int) -> list[Any]:
        """A worker's turn: fold in its ended batch, then claim the next one.

        ``finished`` tasks of the last batch have ended, ``failed``, ``expired``
        and ``cancelled`` of them that way, the rest completed.  Claims up to
        ``limit`` tasks, and at most the worker's share of the queue, most
        important first; they count as running from now.  One call per batch
        (the thread driver holds its lock around it).
        """
        if finished:
            self.completed += finished - failed - expired - cancelled
            self.failed += failed
            self.expired += expired
            self.cancelled += cancelled
            self.running -= finished
        queue = self.queue
        size = len(queue)
        if not size:
            return []
        batch = queue.pop_many(min(limit, size // self.workers + 1))
        for handle in batch:
            handle._status = RUNNING
        self.running += len(batch)
        self.dequeued += len(batch)
        if self.state is SHEDDING and len(queue) <= self.low_water:  # after_dequeue, inlined
            self.set_state(NORMAL)
        return batch

    def after_dequeue(self) -> None:
        """The queue got shorter: rule 1, leave SHEDDING at low_water."""
        if self.state is SHEDDING and len(self.queue) <= self.low_water:
            self.set_state(NORMAL)

    # -- cancellation and shutdown -----------------------------------------------

    def cancel(self, handle: Any) -> bool:
        """Cancel a queued task; False if it is no longer queued."""
        if handle._status is not QUEUED:
            return False
        self.queue.remove(handle._entry)
        self.cancelled += 1
        self.settle(handle, CANCELLED, CancelledError("cancelled"))
        self.after_dequeue()
        return True

    def cancel_queued(self) -> int:
        """Cancel everything queued (shutdown); return how many."""
        cancelled = 0
        queue = self.queue
        while queue:
            self.settle(queue.pop(), CANCELLED, CancelledError("cancelled by shutdown"))
            cancelled += 1
        self.cancelled += cancelled
        self.after_dequeue()
        return cancelled

    def close(self, drain: bool) -> None:
        """Stop admitting (from the first call on)."""
        if not self.closing:
            self.logger.info("%s: shutting down (drain=%s)", self.name, drain)
            self.closing = True
            self.set_state(SHUTTING_DOWN)

    def worker_exited(self) -> None:
        """A worker loop ended; the last one out after ``close`` stops the scheduler."""
        self.alive -= 1
        if not self.alive and self.closing:
            self.set_state(STOPPED)

    def waits_for_workers(self, in_worker: bool) -> bool:
        """Whether a shutdown() call still waits: for every worker, or from a task's own
        worker, for every other worker except those whose task is inside shutdown() too
        (two such tasks would otherwise wait for each other for good)."""
        return self.alive > (self.stopping if in_worker else 0)

    def shutdown_summary(self, *, timed_out: bool, cancelled: int, workers: int,
                         idle_workers: int) -> dict[str, Any]:
        """End a shutdown() call's wait: cancel what is still queued if it timed out,
        stop if no worker is left, and sum up (``stats`` plus two fields)."""
        if timed_out and len(self.queue):
            cancelled += self.cancel_queued()
        if not self.alive:
            self.set_state(STOPPED)
        summary = self.stats(workers=workers, idle_workers=idle_workers)
        summary["timed_out"] = timed_out
        summary["cancelled_by_shutdown"] = cancelled
        if timed_out:
            self.logger.warning("%s: shutdown timed out with %d task(s) still running",
                                self.name, summary["running"])
        return summary

    # -- state and observability -------------------------------------------------

    def settle(self, handle: Any, status: str, outcome: BaseException) -> None:
        """End a task that will not run (shed, cancelled): record why, tell listeners later."""
        handle._value = outcome
        handle._status = status
        if handle._cond is not None or handle._aio is not None:
            self.events.append(handle)

    def set_state(self, new: str) -> None:
        old = self.state
        if old in (new, STOPPED):
            return
        now = time.monotonic()
        if old == SHEDDING and self.shedding_since is not None:
            self.shedding_seconds += now - self.shedding_since
            self.shedding_since = None
        if new == SHEDDING:
            self.shedding_since = now
            self.rate_marks = ((self.dequeued, now), (self.dequeued, now))
        self.state = new
        self.shed_at = self.high_water if new == NORMAL else math.inf
        self.logger.log(logging.INFO if new != SHEDDING else logging.WARNING,
                        "%s: %s -> %s (queued %d)", self.name, old, new, len(self.queue))
        if self.on_state_change is not None:
            self.events.append((old, new))

    def take_events(self) -> list[Any]:
        events, self.events = self.events, []
        return events

    def deliver(self, events: list[Any]) -> None:
        """Call on_state_change and wake handle listeners, in order (outside any lock)."""
        for event in events:
            if type(event) is tuple:
                old, new = event
                try:
                    self.on_state_change(old, new)
                except Exception:
                    self.logger.exception("%s: on_state_change(%r, %r) raised",
                                          self.name, old, new)
            else:
                event._notify()

    def stats(self, *, workers: int, idle_workers: int) -> dict[str, Any]:
        # Counted in C, no object per queued task: this runs under the driver's lock at every
        # metrics scrape, and building (priority, item) pairs held it 0.1-0.2 s at 100k queued.
        by_priority = self.queue.priority_counts()
        shedding = self.shedding_seconds
        if self.shedding_since is not None:
            shedding += time.monotonic() - self.shedding_since
        return {
            "state": self.state,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "shed": self.shed,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "failed": self.failed,
            "queued": len(self.queue),
            "running": self.running,
            "queued_by_priority": {
                (int(k) if k.is_integer() else k): n for k, n in sorted(by_priority.items())},
            "shedding_seconds": shedding,
            "workers": workers,
            "idle_workers": idle_workers,
            "high_water": self.high_water,
            "low_water": self.low_water,
            "max_size": self.max_size,
        }


def check_deadline(deadline: Any) -> None:
    """A deadline is a time.monotonic() value: a real number, not NaN (infinities allowed)."""
    if isinstance(deadline, bool) or not isinstance(deadline, numbers.Real):
        raise TypeError(f"deadline must be a time.monotonic() value or None, "
                        f"got {type(deadline).__name__}: {deadline!r}")
    if math.isnan(deadline):
        raise ValueError("deadline must not be NaN")
