"""Real worker processes (``python -m buttress worker``) on the real Redis of the test run.

Fairness is measured on the order of *acknowledged* completions, which the
queue records in Redis (``completion_log``), over the window in which every
tenant is still backlogged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from buttress.bench.distributed import process_stopped
from buttress.distributed import FairQueue
from conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
HANDLERS = "distributed_handlers:HANDLERS"
ASYNC_HANDLERS = "distributed_handlers:ASYNC_HANDLERS"
# The same races against the thread workers and the asyncio workers (--async).
KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


def kind_args(kind: str) -> list[str]:
    return ["--async", "--handlers", ASYNC_HANDLERS] if kind == "async" else []


class WorkerPool:
    """``n`` worker processes serving one queue."""

    def __init__(self, redis_url: str, queue: str, n: int, *extra: str) -> None:
        self.env = dict(os.environ, BUTTRESS_TEST_REDIS_URL=redis_url, PYTHONPATH=os.pathsep.join(
            [TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
        self.command = [sys.executable, "-m", "buttress", "worker", "--redis", redis_url,
                        "--queue", queue, "--handlers", HANDLERS, "--completion-log", "100000",
                        *extra]  # a later --handlers wins
        self.processes: list[subprocess.Popen[bytes]] = []
        self.add(n)

    def add(self, n: int) -> None:
        self.processes += [subprocess.Popen(self.command, env=self.env, stderr=subprocess.PIPE)
                           for _ in range(n)]

    def start_together(self, redis_client, queue: str) -> None:
        """Wait until every worker idles on ``queue``, then pause them all.

        ``resume()`` then releases them at once: no early starter gets a head start.
        """
        def idle_workers() -> bool:
            idle = {c["name"] for c in redis_client.client_list()
                    if c["name"].startswith(f"buttress-worker:{queue}:") and c["cmd"] == "blpop"}
            return len(idle) == len(self.processes)

        wait_until(idle_workers, timeout=60, message="every worker idle")
        for process in self.processes:
            process.send_signal(signal.SIGSTOP)
        wait_until(lambda: all(process_stopped(p.pid) for p in self.processes), timeout=10,
                   message="workers stopped")

    def resume(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGCONT)

    def terminate_and_wait(self, timeout: float = 30) -> list[int | None]:
        """SIGTERM (drain) every live worker; return the exit codes."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
        return codes

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()
            if process.stderr is not None:
                process.stderr.close()


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    started: list[WorkerPool] = []
    yield started
    for pool in started:
        pool.kill()


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def backlogged_window(completions: list[tuple[str, str]], enqueued: dict[str, int],
                      fraction: float = 0.75) -> list[str]:
    """Tenants of the completions before any tenant finished ``fraction`` of its tasks.

    Until then every tenant still had at least ``1 - fraction`` of its tasks queued
    or running, far more than the 4 workers hold at once: all stayed backlogged.
    """
    done: Counter[str] = Counter()
    window = []
    for tenant, _ in completions:
        if done[tenant] + 1 > fraction * enqueued[tenant]:
            break
        done[tenant] += 1
        window.append(tenant)
    return window


def enqueue_interleaved(queue: FairQueue, ratio: dict[str, int], rounds: int,
                        log: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for n in range(rounds):
        for tenant, per_round in ratio.items():
            for _ in range(per_round):
                queue.enqueue("work", {"n": n, "log": log}, tenant=tenant)
                counts[tenant] += 1
    return dict(counts)


def measure_shares(redis_client, redis_url, pools, name, *, weights, ratio, rounds,
                   kind="sync"):
    queue = FairQueue(redis_client, name, high_water=100_000, low_water=50_000,
                      lease_ms=10_000, weights=weights)
    pool = WorkerPool(redis_url, name, 4, *kind_args(kind))
    pools.append(pool)
    pool.start_together(redis_client, name)
    log = name + ":executions"
    enqueued = enqueue_interleaved(queue, ratio, rounds, log)
    total = sum(enqueued.values())
    pool.resume()
    wait_until(lambda: queue.stats()["completed"] == total, timeout=90,
               message=f"{total} completions")
    assert pool.terminate_and_wait() == [0, 0, 0, 0]
    window = backlogged_window(queue.completions(), enqueued)
    assert len(window) >= 300
    workers = {e.split(b":")[1] for e in redis_client.lrange(log, 0, len(window))}
    assert len(workers) >= 3  # the processes really competed (a starved one may miss out)
    counts = Counter(window)
    return {t: counts[t] / len(window) for t in sorted(ratio)}


@KINDS
def test_equal_weights_share_equally_under_a_10_1_1_flood(redis_client, redis_url, pools,
                                                          unique_name, kind):
    shares = measure_shares(redis_client, redis_url, pools, unique_name, weights=None,
                            ratio={"a": 10, "b": 1, "c": 1}, rounds=200, kind=kind)
    for tenant, share in shares.items():
        assert abs(share - 1 / 3) <= 0.1 / 3, (tenant, shares)
    assert jain(list(shares.values())) >= 0.95, shares


def test_weighted_shares_follow_the_weights(redis_client, redis_url, pools, unique_name):
    # b has weight 2 and enqueues twice c's work, a floods: expected shares 1/4, 1/2, 1/4.
    shares = measure_shares(redis_client, redis_url, pools, unique_name,
                            weights={"a": 1, "b": 2, "c": 1},
                            ratio={"a": 10, "b": 2, "c": 1}, rounds=200)
    expected = {"a": 0.25, "b": 0.5, "c": 0.25}
    for tenant, share in shares.items():
        assert abs(share - expected[tenant]) <= 0.1 * expected[tenant], (tenant, shares)


def lease_owners(redis_client, name: str) -> dict[str, int]:
    """task id -> pid of the worker holding its lease."""
    prefix = f"buttress:{{{name}}}:"
    owners = {}
    for task_id in redis_client.zrange(prefix + "leases", 0, -1):
        owner = redis_client.hget(prefix + "task:" + task_id.decode(), "owner")
        if owner:
            owners[task_id.decode()] = int(owner.decode().split(":")[1])
    return owners


@KINDS
def test_kill_9_worker_holding_leases_loses_nothing(redis_client, redis_url, pools,
                                                    unique_name, kind):
    queue = FairQueue(redis_client, unique_name, lease_ms=1500, max_attempts=5)
    log = unique_name + ":executions"
    ids = [queue.enqueue("work", {"n": n, "sleep": 0.02, "log": log}, tenant=f"t{n % 3}")
           for n in range(240)]
    # The victim starts first, so it is surely working when the others join.
    pool = WorkerPool(redis_url, unique_name, 1, "--concurrency", "2", "--lease-ms", "1500",
                      "--max-attempts", "5", *kind_args(kind))
    pools.append(pool)
    victim = pool.processes[0]

    def victim_holds_leases() -> dict[str, int]:
        return {t: pid for t, pid in lease_owners(redis_client, unique_name).items()
                if pid == victim.pid}

    wait_until(victim_holds_leases, timeout=30, message="victim working")
    pool.add(3)
    held = wait_until(lambda: queue.stats()["completed"] >= 20 and victim_holds_leases(),
                      timeout=30, message="victim holding leases after 20 completions")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    wait_until(lambda: queue.stats()["completed"] == len(ids), timeout=60,
               message="every task acknowledged")
    completions = queue.completions()
    completed_ids = [task_id for _, task_id in completions]
    assert sorted(completed_ids) == sorted(ids)  # each exactly once, none lost
    stats = queue.stats()
    assert (stats["completed"], stats["dead"], stats["depth"], stats["leased"]) == (240, 0, 0, 0)
    assert stats["redelivered"] >= 1
    assert set(held) <= set(completed_ids)
    executions = Counter(int(e.split(b":")[0]) for e in redis_client.lrange(log, 0, -1))
    assert set(executions) == set(range(240))  # at least once each (redelivery may repeat)
    assert pool.terminate_and_wait()[1:] == [0, 0, 0]  # survivors drain and exit cleanly


def test_worker_command_reports_bad_handlers(redis_url):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ["PYTHONPATH"]]))
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "worker", "--redis", redis_url, "--queue", "q",
         "--handlers", "distributed_handlers:NOPE"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "NOPE" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "worker", "--redis", redis_url, "--queue", "q",
         "--handlers", "json:dumps"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not a mapping of task name -> handler" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "worker", "--redis", redis_url, "--queue", "q",
         "--handlers", HANDLERS, "--async"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "must be a coroutine function" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "worker", "--redis", redis_url, "--queue", "q",
         "--handlers", HANDLERS, "--prefetch", "0"], env=env, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2
    assert "--prefetch must be >= 1, got 0" in result.stderr


@KINDS
def test_sigterm_drains_a_busy_worker(redis_client, redis_url, pools, unique_name, kind):
    queue = FairQueue(redis_client, unique_name)
    log = unique_name + ":executions"
    for n in range(3):
        queue.enqueue("work", {"n": n, "sleep": 1.0, "log": log}, tenant="a")
    pool = WorkerPool(redis_url, unique_name, 1, *kind_args(kind))
    pools.append(pool)
    wait_until(lambda: queue.stats()["leased"] == 1, timeout=30, message="a task running")
    started = time.monotonic()
    assert pool.terminate_and_wait() == [0]
    stats = queue.stats()
    # The running task finished and was acknowledged; the rest stay queued.
    assert (stats["completed"], stats["leased"], stats["depth"]) == (1, 0, 2)
    assert time.monotonic() - started < 20
