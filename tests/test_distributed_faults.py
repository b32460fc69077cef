"""The distributed queue under faults, sync and async, against real redis-servers.

The rule the queue lives by: a command that timed out may still run, once or
twice.  These tests resend requests on purpose, pause a private redis-server
(SIGSTOP) longer than the clients' socket timeout, point workers at a
read-only replica, restart Redis without persistence, and kill a worker thread,
and check that no task is dead-lettered without having started, no enqueue
makes two tasks, and no worker dies silently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from buttress import StoreUnavailable, WorkerCrashed
from buttress.bench.distributed import process_stopped
from buttress.distributed import AsyncFairQueue, AsyncWorker, FairQueue, Worker
from buttress.testing import RedisServer
from conftest import wait_until
from test_distributed import _try_enqueue

pytestmark = pytest.mark.redis

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def make_queue(client: Any, name: str, **options: Any) -> FairQueue:
    return FairQueue(client, name, **{"high_water": 10_000, "lease_ms": 10_000, **options})


def run_in_thread(worker: Worker) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


class AsyncWorkerThread:
    """An AsyncWorker on its own event loop in a thread (so a test can drive it from sync code)."""

    def __init__(self, url: str, name: str, handlers: dict[str, Any], *,
                 client_options: dict[str, Any] | None = None, **options: Any) -> None:
        self.url, self.name, self.handlers = url, name, handlers
        self.client_options = client_options or {}
        self.options = options
        self.worker: AsyncWorker | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _main(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url, **self.client_options)
        queue = AsyncFairQueue(client, self.name, lease_ms=self.options.pop("lease_ms", 10_000),
                               max_attempts=self.options.pop("max_attempts", 3),
                               completion_log=self.options.pop("completion_log", 0))
        self.worker = AsyncWorker(queue, self.handlers, **self.options)
        self.ready.set()
        try:
            await self.worker.run()
        except BaseException as exc:
            self.error = exc
        finally:
            await client.aclose()

    def stop(self, drain: bool = True) -> None:
        assert self.worker is not None
        self.worker.stop(drain=drain)
        self.thread.join(20)
        assert not self.thread.is_alive()


class WorkerThread:
    """A Worker in a thread, driven like AsyncWorkerThread (``worker``, ``stop``, ``error``)."""

    def __init__(self, url: str, name: str, handlers: dict[str, Any], *,
                 client_options: dict[str, Any] | None = None, **options: Any) -> None:
        queue = make_queue(redis.Redis.from_url(url, **(client_options or {})), name,
                           **{k: options.pop(k) for k in ("lease_ms", "max_attempts",
                                                          "completion_log") if k in options})
        self.worker = Worker(queue, handlers, **options)
        self.thread, self._errors = run_in_thread(self.worker)

    @property
    def error(self) -> BaseException | None:
        return self._errors[0] if self._errors else None

    def stop(self, drain: bool = True) -> None:
        self.worker.stop(drain=drain)
        self.thread.join(20)
        assert not self.thread.is_alive()


# --------------------------------------------------------------------------- resends


def test_a_resent_enqueue_creates_its_task_once(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    first = queue.enqueue("t", {"n": 1}, tenant="a", request_id="producer-1:call-7")
    again = queue.enqueue("t", {"n": 1}, tenant="a", request_id="producer-1:call-7")
    other = queue.enqueue("t", {"n": 1}, tenant="a")
    assert first == again != other
    stats = queue.stats()
    assert (stats["enqueued"], stats["depth"]) == (2, 2)


def test_a_resent_lease_returns_the_same_tasks_without_using_an_attempt(redis_client,
                                                                         unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=1)
    for n in range(6):
        queue.enqueue("t", n, tenant="a")
    first = queue.lease(4, request_id="lease-1")  # its reply "lost"
    again = queue.lease(4, request_id="lease-1")  # the resend: the same tasks, no more
    assert [t.id for t in again] == [t.id for t in first]
    assert [t.attempts for t in again] == [1, 1, 1, 1]
    assert queue.stats()["leased"] == 4
    for task in again:
        assert queue.ack(task)
    assert queue.stats()["completed"] == 4
    assert [t.payload() for t in queue.lease(5)] == [4, 5]
    assert queue.stats()["dead"] == 0


def test_resent_acks_fails_and_revives_answer_as_the_first_run(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=1, retry_delay_ms=0)
    for n in range(3):
        queue.enqueue("t", n, tenant="a")
    done, failing, _ = queue.lease(3)
    for _ in range(2):  # an ack riding on a lease call, sent twice
        stale, _ = queue._lease_and_ack([done], 0, "w", "ack-call-1")
        assert stale == []
    assert queue.fail(failing, "broken", request_id="fail-1") == "dead"
    assert queue.fail(failing, "broken", request_id="fail-1") == "dead"
    assert queue.retry_dead_letter(failing.id, request_id="revive-1") is True
    assert queue.retry_dead_letter(failing.id, request_id="revive-1") is True
    stats = queue.stats()
    assert (stats["completed"], stats["stale_acks"], stats["dead"], stats["revived"]) == (
        1, 0, 1, 1)


# --------------------------------------------------------------------------- prefetch


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_prefetched_tasks_keep_their_leases_and_run_once(redis_url, unique_name, kind):
    """The issue's repro: handlers longer than lease_ms / prefetch, a second worker waiting."""
    client = redis.Redis.from_url(redis_url)
    queue = make_queue(client, unique_name, lease_ms=1000)
    calls: Counter[int] = Counter()
    for n in range(8):
        queue.enqueue("slow", n, tenant="a")
    if kind == "sync":
        def slow(payload: int) -> None:
            calls[payload] += 1
            time.sleep(0.4)

        workers = [Worker(make_queue(redis.Redis.from_url(redis_url), unique_name,
                                     lease_ms=1000), {"slow": slow}, prefetch=prefetch)
                   for prefetch in (8, 1)]
        threads = [run_in_thread(workers[0])]
        wait_until(lambda: queue.stats()["leased"] == 8, timeout=10, message="A holds 8")
        threads.append(run_in_thread(workers[1]))
        wait_until(lambda: queue.stats()["completed"] == 8, timeout=30, message="8 done")
        for worker in workers:
            worker.stop()
        for thread, errors in threads:
            thread.join(10)
            assert errors == []
        a_stats = workers[0].stats()
    else:
        async def slow_async(payload: int) -> None:
            calls[payload] += 1
            await asyncio.sleep(0.4)

        a = AsyncWorkerThread(redis_url, unique_name, {"slow": slow_async}, prefetch=8,
                              lease_ms=1000)
        wait_until(lambda: queue.stats()["leased"] == 8, timeout=10, message="A holds 8")
        b = AsyncWorkerThread(redis_url, unique_name, {"slow": slow_async}, prefetch=1,
                              lease_ms=1000)
        wait_until(lambda: queue.stats()["completed"] == 8, timeout=30, message="8 done")
        a.stop()
        b.stop()
        assert a.error is None and b.error is None
        assert a.worker is not None
        a_stats = a.worker.stats()
    assert calls == dict.fromkeys(range(8), 1)
    stats = queue.stats()
    assert (stats["redelivered"], stats["stale_acks"], stats["dead"]) == (0, 0, 0)
    assert a_stats["completed"] == 8 and a_stats["held"] == 0
    client.close()


# --------------------------------------------------------------------------- a paused Redis


def pause(server: RedisServer, seconds: float) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault itself: how long Redis stays frozen
    finally:
        os.kill(server.pid, signal.SIGCONT)


def enqueue_resending(queue: FairQueue, n: int, ids: list[str]) -> None:
    """A producer that resends a failed enqueue with the same request id until it lands."""
    for i in range(n):
        request_id = f"producer:{i}"
        while True:
            try:
                ids.append(queue.enqueue("work", {"n": i}, tenant=f"t{i % 3}",
                                         request_id=request_id))
                break
            except StoreUnavailable:
                time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_pausing_redis_past_the_socket_timeout_loses_and_doubles_nothing(kind):
    """Redis frozen 4x the clients' socket timeout while producers and workers are busy."""
    timeout = {"socket_timeout": 0.3, "socket_connect_timeout": 0.3}
    with RedisServer() as server:
        observer = redis.Redis.from_url(server.url)
        name = f"pause-{kind}"
        queue = make_queue(redis.Redis.from_url(server.url, **timeout), name, max_attempts=1,
                           completion_log=10_000, lease_ms=20_000)
        executed: Counter[int] = Counter()
        ids: list[str] = []
        n = 300
        if kind == "sync":
            def work(payload: dict[str, int]) -> None:
                executed[payload["n"]] += 1

            workers = [Worker(make_queue(redis.Redis.from_url(server.url, **timeout), name,
                                         max_attempts=1, completion_log=10_000,
                                         lease_ms=20_000), {"work": work},
                              concurrency=2, prefetch=4) for _ in range(2)]
            threads = [run_in_thread(w) for w in workers]
        else:
            async def work_async(payload: dict[str, int]) -> None:
                executed[payload["n"]] += 1

            async_workers = [AsyncWorkerThread(server.url, name, {"work": work_async},
                                               client_options=timeout, concurrency=2,
                                               prefetch=4, max_attempts=1,
                                               completion_log=10_000, lease_ms=20_000)
                             for _ in range(2)]
        producer = threading.Thread(target=enqueue_resending, args=(queue, n, ids))
        producer.start()
        wait_until(lambda: len(ids) >= 50, timeout=20, message="work under way")
        pause(server, 1.2)
        producer.join(60)
        wait_until(lambda: int(observer.hget(f"buttress:{{{name}}}:meta", "completed") or 0)
                   >= n, timeout=60, message="every task acknowledged")
        if kind == "sync":
            for worker in workers:
                worker.stop()
            for thread, errors in threads:
                thread.join(10)
                assert errors == []
            store_errors = sum(w.stats()["store_errors"] for w in workers)
        else:
            for async_worker in async_workers:
                async_worker.stop()
                assert async_worker.error is None
            store_errors = sum(w.worker.stats()["store_errors"] for w in async_workers
                               if w.worker is not None)
        stats = queue.stats()
        assert len(set(ids)) == len(ids) == n  # one id per enqueue call
        assert (stats["enqueued"], stats["completed"], stats["dead"]) == (n, n, 0)
        assert sorted(task_id for _, task_id in queue.completions()) == sorted(ids)
        assert set(executed) == set(range(n))
        assert store_errors >= 1  # the workers did see the pause
        observer.close()


# --------------------------------------------------------------------------- a read-only replica


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as primary, RedisServer() as replica:
        client = redis.Redis.from_url(replica.url)
        client.replicaof(primary.host, primary.port)
        wait_until(lambda: client.info("replication").get("master_link_status") == "up",
                   timeout=20, message="replica in sync")
        client.close()
        yield primary, replica


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_read_only_replica_is_unavailable_and_workers_resume_on_a_primary(
        primary_and_replica, kind):
    _, replica = primary_and_replica
    client = redis.Redis.from_url(replica.url)
    queue = make_queue(client, "failover")
    with pytest.raises(StoreUnavailable, match="READONLY") as caught:
        queue.enqueue("t", 1, tenant="a")
    assert isinstance(caught.value.__cause__, redis.RedisError)  # chained: READONLY
    done: list[int] = []

    async def record(payload: int) -> None:
        done.append(payload)

    runner = (WorkerThread(replica.url, "failover", {"t": done.append}, idle_wait=0.1)
              if kind == "sync" else
              AsyncWorkerThread(replica.url, "failover", {"t": record}, idle_wait=0.1))
    assert runner.worker is not None
    stats = runner.worker.stats
    wait_until(lambda: stats()["store_errors"] >= 3, timeout=10, message="worker backing off")
    assert runner.thread.is_alive()
    # The failover completes: the server the clients use becomes the primary.
    client.replicaof("NO", "ONE")
    wait_until(lambda: _try_enqueue(queue, 2), timeout=10, message="writes accepted")
    wait_until(lambda: done == [2], timeout=15, message="worker resuming")
    runner.stop()
    assert runner.error is None
    assert stats()["completed"] == 1
    client.close()


# --------------------------------------------------------------------------- restart, crash


def test_async_worker_survives_a_restart_without_persistence():
    with RedisServer() as server:
        queue = make_queue(redis.Redis.from_url(server.url, socket_connect_timeout=1), "restart")
        done: list[int] = []

        async def record(payload: int) -> None:
            done.append(payload)

        worker = AsyncWorkerThread(server.url, "restart", {"t": record}, idle_wait=0.1,
                                   client_options={"socket_connect_timeout": 1})
        queue.enqueue("t", 1, tenant="a")
        wait_until(lambda: done == [1], timeout=10, message="first task")
        server.restart()  # an empty Redis: queues and scripts are gone
        wait_until(lambda: _try_enqueue(queue, 2), timeout=10, message="Redis back")
        wait_until(lambda: done == [1, 2], timeout=15, message="worker resuming")
        worker.stop()
        assert worker.error is None


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_restart_without_persistence_with_tasks_in_flight(kind):
    """Redis restarts empty while the worker holds four tasks: two running, two waiting.

    The outcome docs/distributed.md states: the held tasks run to their end, once;
    their records are gone, so their acks are stale (counted, nothing comes back);
    the worker counts the store errors and keeps serving.  Tasks enqueued after the
    restart take ids from 1 again, the held tasks' ids: they run once each, their
    leases renewed (the worker tells tasks apart by id and delivery token).
    """
    gate = threading.Event()
    started: list[tuple[str, int]] = []
    runs: Counter[tuple[str, int]] = Counter()

    def hold(payload: int) -> None:
        started.append(("old", payload))
        gate.wait(10)
        runs["old", payload] += 1

    def slow(payload: int) -> None:  # outlasts a lease: needs its renewals
        started.append(("new", payload))
        time.sleep(1.3)
        runs["new", payload] += 1

    handlers: dict[str, Any] = {"hold": hold, "slow": slow}
    if kind == "async":
        async def hold_async(payload: int) -> None:
            await asyncio.to_thread(hold, payload)

        async def slow_async(payload: int) -> None:
            started.append(("new", payload))
            await asyncio.sleep(1.3)
            runs["new", payload] += 1

        handlers = {"hold": hold_async, "slow": slow_async}
    with RedisServer() as server:
        queue = make_queue(redis.Redis.from_url(server.url, socket_connect_timeout=1), "inflight")
        for n in range(4):
            queue.enqueue("hold", n, tenant="a")
        runner = (WorkerThread if kind == "sync" else AsyncWorkerThread)(
            server.url, "inflight", handlers, client_options={"socket_connect_timeout": 1},
            concurrency=3, prefetch=2, idle_wait=0.1, lease_ms=900)
        assert runner.worker is not None
        stats = runner.worker.stats
        wait_until(lambda: len(started) == 2 and stats()["held"] == 4, timeout=10,
                   message="two tasks running, two waiting")
        server.stop()  # the fault: Redis gone, then back empty (no persistence)
        wait_until(lambda: stats()["store_errors"] > 0, timeout=10, message="a store error")
        server.start()
        wait_until(lambda: _try_enqueue(queue, 0, task_name="slow"), timeout=10,
                   message="Redis back")
        queue.enqueue("slow", 1, tenant="b")  # ids 1 and 2 again: held by the worker too
        wait_until(lambda: ("new", 0) in started, timeout=10, message="a new task running")
        gate.set()
        wait_until(lambda: queue.stats()["completed"] == 2 and stats()["held"] == 0,
                   timeout=15, message="the new tasks acknowledged")
        in_redis = queue.stats()
        final = stats()
        runner.stop()
        assert runner.error is None
    assert runs == {**{("old", n): 1 for n in range(4)}, ("new", 0): 1, ("new", 1): 1}
    assert final["completed"] == 6 and final["stale_acks"] == 4
    # Nothing came back: the old tasks' acks found no record, no lease expired.
    assert (in_redis["stale_acks"], in_redis["redelivered"], in_redis["depth"]) == (4, 0, 0)


class BrokenQueue(FairQueue):
    """A queue whose second lease call hits a bug (not a Redis error)."""

    calls = 0

    def _lease_and_ack(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("bug in the lease path")
        return super()._lease_and_ack(*args)


def test_a_worker_thread_that_dies_makes_run_raise(redis_client, unique_name):
    queue = BrokenQueue(redis_client, unique_name)
    worker = Worker(queue, {"t": print}, concurrency=2, idle_wait=0.1)
    with pytest.raises(WorkerCrashed, match="bug in the lease path") as caught:
        worker.run()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert worker.stats()["stopped"] is True


def test_an_async_worker_coroutine_that_dies_makes_run_raise(redis_url, unique_name):
    class Fatal(BaseException):
        pass

    async def fatal(payload: Any) -> None:
        raise Fatal("not a task failure")

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = AsyncFairQueue(client, unique_name)
        await queue.enqueue("t", 1, tenant="a")
        with pytest.raises(WorkerCrashed, match="not a task failure"):
            await AsyncWorker(queue, {"t": fatal}, concurrency=2).run()
        await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("extra", [[], ["--async"]])
def test_the_worker_command_exits_non_zero_when_a_worker_dies(redis_url, unique_name, extra):
    queue = make_queue(redis.Redis.from_url(redis_url), unique_name)
    queue.enqueue("fatal", {}, tenant="a")
    handlers = "distributed_handlers:ASYNC_HANDLERS" if extra else \
        "distributed_handlers:HANDLERS"
    result = subprocess.run(
        [sys.executable, "-m", "buttress", "worker", "--redis", redis_url, "--queue",
         unique_name, "--handlers", handlers, *extra],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ["PYTHONPATH"]]),
                 BUTTRESS_TEST_REDIS_URL=redis_url),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Fatal" in result.stderr


# --------------------------------------------------------------------------- sync <-> async


def test_a_sync_producer_feeds_an_async_worker_and_the_reverse(redis_client, redis_url,
                                                               unique_name):
    sync_queue = make_queue(redis_client, unique_name)
    for n in range(5):
        sync_queue.enqueue("t", {"n": n, "from": "sync"}, tenant=f"t{n % 2}")
    seen_async: list[Any] = []

    async def record(payload: Any) -> None:
        seen_async.append(payload)

    async_worker = AsyncWorkerThread(redis_url, unique_name, {"t": record}, idle_wait=0.1)
    wait_until(lambda: len(seen_async) == 5, timeout=10, message="async worker done")
    async_worker.stop()

    async def produce() -> list[str]:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = AsyncFairQueue(client, unique_name)
        ids = [await queue.enqueue("t", {"n": n, "from": "async"}, tenant="x", priority=n)
               for n in range(5)]
        await client.aclose()
        return ids

    ids = asyncio.run(produce())
    seen_sync: list[Any] = []
    worker = Worker(make_queue(redis.Redis.from_url(redis_url), unique_name),
                    {"t": seen_sync.append}, idle_wait=0.1)
    thread, errors = run_in_thread(worker)
    wait_until(lambda: len(seen_sync) == 5, timeout=10, message="sync worker done")
    worker.stop()
    thread.join(10)
    assert errors == []
    assert sorted(p["n"] for p in seen_async) == list(range(5))
    assert [p["n"] for p in seen_sync] == [4, 3, 2, 1, 0]  # priority order, same records
    assert len(set(ids)) == 5
    assert sync_queue.stats()["completed"] == 10


# --------------------------------------------------------------------------- a paused worker


@pytest.mark.slow
def test_pausing_an_async_worker_past_its_socket_timeout_loses_and_repeats_nothing(
        redis_client, redis_url, unique_name):
    queue = make_queue(redis_client, unique_name, completion_log=1000)
    log = unique_name + ":executions"
    worker = subprocess.Popen(
        [sys.executable, "-m", "buttress", "worker", "--async", "--redis",
         redis_url + "?socket_timeout=0.3", "--queue", unique_name, "--handlers",
         "distributed_handlers:ASYNC_HANDLERS", "--concurrency", "2", "--prefetch", "4",
         "--lease-ms", "20000", "--max-attempts", "1", "--completion-log", "1000"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ["PYTHONPATH"]]),
                 BUTTRESS_TEST_REDIS_URL=redis_url),
        stderr=subprocess.PIPE)
    try:
        ids = [queue.enqueue("work", {"n": n, "sleep": 0.01, "log": log}, tenant=f"t{n % 2}")
               for n in range(60)]
        wait_until(lambda: queue.stats()["completed"] >= 10, timeout=20, message="worker busy")
        worker.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_stopped(worker.pid), timeout=10, message="worker stopped")
        time.sleep(1.5)  # the fault: 5x the worker's socket timeout
        worker.send_signal(signal.SIGCONT)
        wait_until(lambda: queue.stats()["completed"] == 60, timeout=30,
                   message="every task acknowledged")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        assert worker.stderr is not None
        worker.stderr.close()
    executions = Counter(int(e.split(b":")[0]) for e in redis_client.lrange(log, 0, -1))
    assert executions == dict.fromkeys(range(60), 1)  # nothing lost, nothing run twice
    stats = queue.stats()
    assert (stats["dead"], stats["redelivered"], stats["stale_acks"]) == (0, 0, 0)
    assert sorted(t for _, t in queue.completions()) == sorted(ids)
