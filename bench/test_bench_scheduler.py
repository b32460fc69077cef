"""PriorityDeque against heapq, TaskScheduler against queue.PriorityQueue and ThreadPoolExecutor.

These time the same work as ``python -m buttress bench --only scheduler`` (the
functions are shared), which prints the ratios and judges the targets.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from buttress.bench.scheduler import (
    deque_push_pop,
    heapq_push_pop,
    run_executor,
    run_priority_queue,
    run_scheduler,
    start_priority_queue,
)
from buttress.reference.heap import PriorityDeque as TwinDeque
from buttress.scheduler import PriorityDeque, TaskScheduler

_RNG = random.Random(0)
PRIORITIES = [_RNG.randrange(1 << 30) for _ in range(1_000_000)]
TASKS = 100_000
TASK_PRIORITIES = [p % 10 for p in PRIORITIES[:TASKS]]


@pytest.mark.benchmark(group="push+pop 1M random int priorities")
def test_native_priority_deque(benchmark):
    benchmark.pedantic(deque_push_pop, args=(PriorityDeque, PRIORITIES), rounds=3)


@pytest.mark.benchmark(group="push+pop 1M random int priorities")
def test_heapq_tuples(benchmark):
    benchmark.pedantic(heapq_push_pop, args=(PRIORITIES,), rounds=3)


@pytest.mark.benchmark(group="push+pop 100k random int priorities (twin)")
def test_reference_priority_deque(benchmark):
    benchmark.pedantic(deque_push_pop, args=(TwinDeque, PRIORITIES[:100_000]), rounds=3)


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_task_scheduler(benchmark):
    def setup():
        scheduler = TaskScheduler(4, high_water=TASKS + 1, max_size=TASKS + 1).start()
        return (scheduler, TASK_PRIORITIES), {}

    benchmark.pedantic(run_scheduler, setup=setup, rounds=3)


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_priority_queue_and_threads(benchmark):
    benchmark.pedantic(run_priority_queue, rounds=3,
                       setup=lambda: ((start_priority_queue(), TASK_PRIORITIES), {}))


@pytest.mark.benchmark(group="100k no-op tasks, 4 workers")
def test_thread_pool_executor(benchmark):
    benchmark.pedantic(run_executor, rounds=3,
                       setup=lambda: ((ThreadPoolExecutor(4), TASKS), {}))
