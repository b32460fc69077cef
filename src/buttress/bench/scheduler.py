"""Scheduler suite: the native PriorityDeque against heapq, TaskScheduler against the stdlib.

Like for like: every baseline keeps the same order (priority, then FIFO), gives
each task a place for its result (a one-element list for the queue loop, a
Future for the executor, a TaskHandle for ours), starts its threads untimed,
and is timed from the first enqueue until the last task has run.
"""

from __future__ import annotations

import functools
import heapq
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from buttress.bench import BenchSession
from buttress.reference.heap import PriorityDeque as TwinDeque
from buttress.reference.scheduler import TaskScheduler as TwinScheduler
from buttress.scheduler import PriorityDeque, TaskScheduler

ORDER = 30

HEAPQ = "heapq (priority, seq, item) tuples"
PRIORITY_QUEUE = "queue.PriorityQueue + 4 threads"
EXECUTOR = "ThreadPoolExecutor(4).submit"
SHALLOW = "buttress @100 queued"


def register(session: BenchSession) -> None:
    _deque_push_pop(session)
    _scheduler_throughput(session)
    _enqueue_at_depth(session)


# -- the work, shared with bench/test_bench_scheduler.py ---------------------------

def deque_push_pop(deque_class: type, priorities: list[int]) -> None:
    """Push every item at its priority, then pop them all, most important first."""
    deque = deque_class()
    push, pop = deque.push, deque.pop
    for item, priority in enumerate(priorities):
        push(item, priority)
    for _ in priorities:
        pop()


def heapq_push_pop(priorities: list[int]) -> None:
    """The same with heapq: (-priority, seq, item) tuples give max first, FIFO by seq."""
    heap: list[tuple[int, int, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    for item, priority in enumerate(priorities):
        push(heap, (-priority, item, item))
    for _ in priorities:
        pop(heap)


def noop() -> None:
    return None


def run_scheduler(scheduler: TaskScheduler, priorities: list[int]) -> None:
    """Enqueue a no-op task per priority, then drain: the last result is in when it returns."""
    enqueue = scheduler.enqueue
    handles = [enqueue(noop, priority) for priority in priorities]
    scheduler.shutdown(drain=True)
    assert handles[-1].done()


PriorityQueueLoop = tuple["queue.PriorityQueue[Any]", list[threading.Thread]]


def start_priority_queue(workers: int = 4) -> PriorityQueueLoop:
    """The baseline: a queue.PriorityQueue and worker threads running what they get."""
    tasks: queue.PriorityQueue[Any] = queue.PriorityQueue()

    def worker() -> None:
        get = tasks.get
        while True:
            _, _, task, holder = get()
            if task is None:
                return
            holder.append(task())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    return tasks, threads


def run_priority_queue(prepared: PriorityQueueLoop, priorities: list[int]) -> None:
    """Put a no-op task (and its result holder) per priority, then stop the workers."""
    tasks, threads = prepared
    put = tasks.put
    holders = []
    for seq, priority in enumerate(priorities):
        holder: list[Any] = []
        holders.append(holder)
        put((-priority, seq, noop, holder))
    for stop in range(len(threads)):
        put((1, len(priorities) + stop, None, None))  # after every task
    for thread in threads:
        thread.join()
    assert holders[-1] == [None]


def run_executor(pool: ThreadPoolExecutor, count: int) -> None:
    """The executor has no priorities: it is the floor any scheduler must clear."""
    submit = pool.submit
    futures = [submit(noop) for _ in range(count)]
    pool.shutdown(wait=True)
    assert futures[-1].done()


# -- the cases ---------------------------------------------------------------------

def _deque_push_pop(session: BenchSession) -> None:
    n = 1_000_000  # the target is stated at 1M items; quick mode keeps it
    rng = random.Random(0)
    priorities = [rng.randrange(1 << 30) for _ in range(n)]
    few = priorities[: n // 10]
    case = session.case("scheduler", f"PriorityDeque push + pop, {n:,} random int priorities",
                        unit="item")
    case.add("buttress", lambda: deque_push_pop(PriorityDeque, priorities), items=n)
    case.add(HEAPQ, lambda: heapq_push_pop(priorities), items=n)
    case.add("reference", lambda: deque_push_pop(TwinDeque, few), items=len(few),
             note=f"{len(few):,} items")
    case.target("buttress", HEAPQ, min_speedup=5)


def _scheduler_throughput(session: BenchSession) -> None:
    n = 100_000 if session.quick else 300_000
    rng = random.Random(1)
    priorities = [rng.randrange(10) for _ in range(n)]

    def start_ours(cls: type[TaskScheduler] = TaskScheduler) -> TaskScheduler:
        return cls(4, high_water=n + 1, max_size=n + 1).start()

    case = session.case("scheduler", f"TaskScheduler, {n:,} no-op tasks through 4 workers",
                        unit="task")
    case.add("buttress", lambda s: run_scheduler(s, priorities), items=n, setup=start_ours)
    case.add(PRIORITY_QUEUE, lambda q: run_priority_queue(q, priorities), items=n,
             setup=start_priority_queue)
    case.add(EXECUTOR, lambda pool: run_executor(pool, n), items=n,
             setup=lambda: ThreadPoolExecutor(4))
    case.add("reference", lambda s: run_scheduler(s, priorities), items=n,
             setup=lambda: start_ours(TwinScheduler))
    case.target("buttress", PRIORITY_QUEUE, min_speedup=3)
    case.target("buttress", EXECUTOR, min_speedup=5)


def _enqueue_at_depth(session: BenchSession) -> None:
    calls = 20_000
    rng = random.Random(2)
    fill_priorities = [rng.randrange(100) for _ in range(100_000)]
    new_priorities = [rng.randrange(100) for _ in range(calls)]
    urgent = [100 + i for i in range(calls)]  # each outranks everything queued: evicts
    # The two depths differ in depth alone: the same fill priorities, the same
    # calls, every one evicting.  At 100k the victims and the lower heap levels
    # are cold, as they are in a real deep queue; that, not the algorithm, is
    # the difference this case measures (docs/scheduler.md takes it apart).

    def filled(depth: int, *, at_limit: bool) -> TaskScheduler:
        # No workers: the queue stays at its depth while enqueue is timed.
        size = depth if at_limit else depth + calls + 1
        scheduler = TaskScheduler(1, high_water=size, max_size=size, shed_below=0)
        for priority in fill_priorities[:depth]:
            scheduler.enqueue(noop, priority)
        return scheduler

    def enqueue_all(wanted: list[int]) -> Any:
        def work(scheduler: TaskScheduler) -> None:
            enqueue = scheduler.enqueue
            for priority in wanted:
                enqueue(noop, priority)
        return work

    for at_limit, title, wanted in (
        (False, "enqueue", new_priorities),
        (True, "enqueue at max_size (each one evicts the lowest)", urgent),
    ):
        deep = functools.partial(filled, 100_000, at_limit=at_limit)
        shallow = functools.partial(filled, 100, at_limit=at_limit)
        case = session.case("scheduler", f"{title}: 100k queued vs 100 queued", unit="call")
        case.add("buttress", enqueue_all(wanted), items=calls, setup=deep, note="100k queued")
        case.add(SHALLOW, enqueue_all(wanted), items=calls, setup=shallow)
        case.target("buttress", SHALLOW, max_ratio=2)
