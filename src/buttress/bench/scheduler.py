"""Scheduler suite: the native PriorityDeque against heapq, TaskScheduler against the stdlib,
AsyncTaskScheduler against asyncio.PriorityQueue (on asyncio and on uvloop).

Like for like: every baseline keeps the same order (priority, then FIFO), gives
each task a place for its result (a one-element list for the queue loops, a
Future for the executor, a TaskHandle for ours), starts its threads or
consumer tasks untimed, and is timed from the first enqueue until the last
task has run.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import queue
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from buttress.bench import BenchSession
from buttress.reference.heap import PriorityDeque as TwinDeque
from buttress.reference.scheduler import TaskScheduler as TwinScheduler
from buttress.scheduler import PriorityDeque, TaskScheduler
from buttress.scheduler_async import AsyncTaskScheduler

ORDER = 30

HEAPQ = "heapq (priority, seq, item) tuples"
PRIORITY_QUEUE = "queue.PriorityQueue + 4 threads"
EXECUTOR = "ThreadPoolExecutor(4).submit"
SHALLOW = "buttress @100 queued"
ASYNC_PRIORITY_QUEUE = "asyncio.PriorityQueue + 4 consumer tasks"


def register(session: BenchSession) -> None:
    _deque_push_pop(session)
    _scheduler_throughput(session)
    _enqueue_at_depth(session)
    for loop_name, loop_factory in _event_loops(session):
        _async_throughput(session, loop_name, loop_factory)
    _async_enqueue_at_depth(session)


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


# -- AsyncTaskScheduler --------------------------------------------------------------

async def async_noop() -> None:
    return None


def _event_loops(session: BenchSession) -> list[tuple[str, Callable[[], Any]]]:
    loops: list[tuple[str, Callable[[], Any]]] = [("asyncio", asyncio.new_event_loop)]
    uvloop = session.peer("uvloop")
    if uvloop is not None:
        loops.append(("uvloop", uvloop.new_event_loop))
    else:
        session.case("scheduler", "AsyncTaskScheduler on uvloop", unit="task").skip(
            "buttress", "uvloop is not installed (pip install uvloop)")
    return loops


def run_async_scheduler(prepared: tuple[Any, AsyncTaskScheduler], priorities: list[int]) -> None:
    """Enqueue a no-op coroutine per priority, then drain; closes the loop."""
    loop, scheduler = prepared

    async def main() -> None:
        enqueue = scheduler.enqueue
        handles = [enqueue(async_noop, priority) for priority in priorities]
        await scheduler.shutdown(drain=True)
        assert handles[-1].done()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def run_async_priority_queue(prepared: tuple[Any, Any], priorities: list[int]) -> None:
    """The baseline: put (priority, seq, task, holder) per task; N consumers await each task."""
    loop, start_consumers = prepared

    async def main() -> None:
        tasks, consumers = start_consumers()
        put = tasks.put_nowait
        holders = []
        for seq, priority in enumerate(priorities):
            holder: list[Any] = []
            holders.append(holder)
            put((-priority, seq, async_noop, holder))
        for stop in range(len(consumers)):
            put((1, len(priorities) + stop, None, None))  # after every task
        await asyncio.gather(*consumers)
        assert holders[-1] == [None]

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _async_throughput(session: BenchSession, loop_name: str,
                      loop_factory: Callable[[], Any]) -> None:
    n = 100_000  # the target is stated at 100k tasks; quick mode keeps it
    workers = 4
    rng = random.Random(3)
    priorities = [rng.randrange(10) for _ in range(n)]

    def start_ours(cls: type[AsyncTaskScheduler] = AsyncTaskScheduler
                   ) -> tuple[Any, AsyncTaskScheduler]:
        loop = loop_factory()

        async def start() -> AsyncTaskScheduler:
            scheduler = cls(workers, high_water=n + 1, max_size=n + 1).start()
            await asyncio.sleep(0)  # the workers start and go idle, untimed
            return scheduler

        return loop, loop.run_until_complete(start())

    def start_baseline() -> tuple[Any, Any]:
        loop = loop_factory()

        def start_consumers() -> tuple[Any, list[Any]]:
            tasks: asyncio.PriorityQueue[Any] = asyncio.PriorityQueue()

            async def consumer() -> None:
                get = tasks.get
                while True:
                    _, _, task, holder = await get()
                    if task is None:
                        return
                    holder.append(await task())

            return tasks, [loop.create_task(consumer()) for _ in range(workers)]

        return loop, start_consumers

    case = session.case(
        "scheduler", f"AsyncTaskScheduler on {loop_name}, {n:,} no-op coroutines through "
        f"{workers} workers", unit="task")
    case.add("buttress", lambda p: run_async_scheduler(p, priorities), items=n, setup=start_ours)
    case.add(ASYNC_PRIORITY_QUEUE, lambda p: run_async_priority_queue(p, priorities), items=n,
             setup=start_baseline)
    case.target("buttress", ASYNC_PRIORITY_QUEUE, min_speedup=2)


def _async_enqueue_at_depth(session: BenchSession) -> None:
    calls = 20_000
    rng = random.Random(4)
    fill_priorities = [rng.randrange(100) for _ in range(100_000)]
    new_priorities = [rng.randrange(100) for _ in range(calls)]
    leftovers: list[tuple[Any, asyncio.Event]] = []

    def close_leftovers() -> None:
        while leftovers:
            loop, release = leftovers.pop()
            release.set()
            loop.run_until_complete(asyncio.sleep(0))
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    session.on_close(close_leftovers)

    def filled(depth: int) -> tuple[Any, AsyncTaskScheduler]:
        # Its one worker is busy (held on an event), as in a deep queue: the queue
        # keeps its depth while enqueue is timed.
        close_leftovers()
        loop = asyncio.new_event_loop()
        release = asyncio.Event()
        leftovers.append((loop, release))

        async def prepare() -> AsyncTaskScheduler:
            scheduler = AsyncTaskScheduler(1, high_water=depth + calls + 1,
                                           max_size=depth + calls + 1, shed_below=0).start()
            entered = asyncio.Event()

            async def hold() -> None:
                entered.set()
                await release.wait()

            scheduler.enqueue(hold, 1_000)
            await entered.wait()
            for priority in fill_priorities[:depth]:
                scheduler.enqueue(async_noop, priority)
            return scheduler

        return loop, loop.run_until_complete(prepare())

    def enqueue_all(prepared: tuple[Any, AsyncTaskScheduler]) -> None:
        loop, scheduler = prepared

        async def work() -> None:
            enqueue = scheduler.enqueue
            for priority in new_priorities:
                enqueue(async_noop, priority)

        loop.run_until_complete(work())

    case = session.case("scheduler", "AsyncTaskScheduler.enqueue: 100k queued vs 100 queued",
                        unit="call")
    case.add("buttress", enqueue_all, items=calls, setup=lambda: filled(100_000),
             note="100k queued")
    case.add(SHALLOW, enqueue_all, items=calls, setup=lambda: filled(100))
    case.target("buttress", SHALLOW, max_ratio=2)
