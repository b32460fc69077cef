"""PriorityDeque against heapq, TaskScheduler against queue.PriorityQueue and ThreadPoolExecutor.

These mirror the cases of ``python -m buttress bench --only scheduler``, which
prints the ratios and judges the targets.
"""

from __future__ import annotations

import heapq
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from buttress.reference.heap import PriorityDeque as TwinDeque
from buttress.scheduler import PriorityDeque, TaskScheduler

N = 1_000_000
_RNG = random.Random(0)
PRIORITIES = [_RNG.randrange(1 << 30) for _ in range(N)]
TASKS = 100_000
TASK_PRIORITIES = [p % 10 for p in PRIORITIES[:TASKS]]


def push_pop(deque_class, count=N):
    deque = deque_class()
    push, pop = deque.push, deque.pop
    for item, priority in enumerate(PRIORITIES[:count]):
        push(item, priority)
    for _ in range(count):
        pop()


def heapq_push_pop():
    heap = []
    push, pop = heapq.heappush, heapq.heappop
    for item, priority in enumerate(PRIORITIES):
        push(heap, (-priority, item, item))
    for _ in range(N):
        pop(heap)


@pytest.mark.benchmark(group="push+pop 1M random int priorities")
def test_native_priority_deque(benchmark):
    benchmark.pedantic(push_pop, args=(PriorityDeque,), rounds=3)


@pytest.mark.benchmark(group="push+pop 1M random int priorities")
def test_heapq_tuples(benchmark):
    benchmark.pedantic(heapq_push_pop, rounds=3)


@pytest.mark.benchmark(group="push+pop 100k random int priorities (twin)")
def test_reference_priority_deque(benchmark):
    benchmark.pedantic(push_pop, args=(TwinDeque, N // 10), rounds=3)


def noop():
    return None


def run_scheduler(scheduler):
    enqueue = scheduler.enqueue
    handles = [enqueue(noop, p) for p in TASK_PRIORITIES]
    scheduler.shutdown(drain=True)
    assert handles[-1].done()


def start_priority_queue():
    tasks = queue.PriorityQueue()

    def worker():
        while True:
            _, _, task, holder = tasks.get()
            if task is None:
                return
            holder.append(task())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    return tasks, threads


def run_priority_queue(prepared):
    tasks, threads = prepared
    for seq, priority in enumerate(TASK_PRIORITIES):
        tasks.put((-priority, seq, noop, []))
    for stop in range(4):
        tasks.put((1, TASKS + stop, None, None))
    for thread in threads:
        thread.join()


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_task_scheduler(benchmark):
    benchmark.pedantic(
        run_scheduler, rounds=3,
        setup=lambda: ((TaskScheduler(4, high_water=TASKS + 1, max_size=TASKS + 1).start(),), {}))


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_priority_queue_and_threads(benchmark):
    benchmark.pedantic(run_priority_queue, rounds=3,
                       setup=lambda: ((start_priority_queue(),), {}))


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_thread_pool_executor(benchmark):
    def run(pool):
        futures = [pool.submit(noop) for _ in TASK_PRIORITIES]
        pool.shutdown(wait=True)
        assert futures[-1].done()

    benchmark.pedantic(run, rounds=3, setup=lambda: ((ThreadPoolExecutor(4),), {}))
