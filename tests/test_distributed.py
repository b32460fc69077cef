"""FairQueue and Worker against the real Redis of the test run (in-process).

Worker processes, kill -9 and fairness under 4 processes are in
test_distributed_workers.py.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import socket
import threading
import time
from collections import Counter, deque
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

import distributed_handlers
from buttress import Rejected, StoreUnavailable
from buttress.distributed import (
    AsyncFairQueue,
    AsyncWorker,
    FairQueue,
    LeasedTask,
    Worker,
    load_handlers,
)
from buttress.testing import RedisServer, free_port
from conftest import wait_until

pytestmark = pytest.mark.redis


def make_queue(client: Any, name: str, **options: Any) -> FairQueue:
    settings_ = {"high_water": 1000, "low_water": 500, "lease_ms": 10_000, **options}
    return FairQueue(client, name, **settings_)


def lease_all(queue: FairQueue, n: int) -> list[LeasedTask]:
    tasks: list[LeasedTask] = []
    while len(tasks) < n:
        got = queue.lease(min(50, n - len(tasks)))
        if not got:
            break
        tasks += got
    return tasks


# --------------------------------------------------------------------------- bad input


BAD_ENQUEUES = [
    (({"when": object()},), {"tenant": "a"}, TypeError, "payload must be JSON"),
    ((b"bytes",), {"tenant": "a"}, TypeError, "payload must be JSON"),
    (({"x": float("nan")},), {"tenant": "a"}, ValueError, "payload must be JSON"),
    (({},), {}, TypeError, "tenant"),
    (({},), {"tenant": None}, TypeError, "tenant must be a str"),
    (({},), {"tenant": ""}, ValueError, "tenant must not be empty"),
    (({},), {"tenant": "a", "priority": "high"}, TypeError, "priority must be a number"),
    (({},), {"tenant": "a", "priority": True}, TypeError, "priority must be a number"),
    (({},), {"tenant": "a", "priority": float("nan")}, ValueError, "priority must be a finite"),
    (({},), {"tenant": "a", "priority": 2**60}, ValueError, "priority must be in"),
    (({},), {"tenant": "a", "deadline": time.monotonic() + 5}, ValueError, r"time\.monotonic"),
    (({},), {"tenant": "a", "deadline": "soon"}, TypeError, "deadline must be a number"),
    (({},), {"tenant": "a", "request_id": 7}, TypeError, "request_id must be a str"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), BAD_ENQUEUES)
def test_enqueue_rejects_bad_input(redis_client, unique_name, args, kwargs, error, match):
    queue = make_queue(redis_client, unique_name)
    with pytest.raises(error, match=match):
        queue.enqueue("t", *args, **kwargs)
    with pytest.raises(ValueError, match="task_name must not be empty"):
        queue.enqueue("", {}, tenant="a")
    with pytest.raises(TypeError, match="task_name must be a str"):
        queue.enqueue(5, {}, tenant="a")  # type: ignore[arg-type]
    assert queue.stats()["enqueued"] == 0  # nothing reached Redis


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), BAD_ENQUEUES)
def test_async_enqueue_rejects_the_same_bad_input(redis_url, unique_name, args, kwargs, error,
                                                  match):
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        queue = AsyncFairQueue(client, unique_name)
        with pytest.raises(error, match=match):
            await queue.enqueue("t", *args, **kwargs)
        assert (await queue.stats())["enqueued"] == 0
        await client.aclose()

    asyncio.run(main())


BAD_SETTINGS = [
    ({"high_water": 10, "low_water": 10}, ValueError, "low_water must be < high_water"),
    ({"high_water": 0, "low_water": 0}, ValueError, "high_water must be >= 1"),
    ({"high_water": "10"}, TypeError, "high_water must be an int"),
    ({"lease_ms": 0}, ValueError, "lease_ms must be >= 1"),
    ({"lease_ms": 1.5}, TypeError, "lease_ms must be an int"),
    ({"lease_ms": True}, TypeError, "lease_ms must be an int"),
    ({"max_attempts": 0}, ValueError, "max_attempts must be >= 1"),
    ({"resend_window_ms": 0}, ValueError, "resend_window_ms must be >= 1"),
    ({"weights": {"a": 0}}, ValueError, r"weights\['a'\] must be >= 0.01"),
    ({"weights": {"a": "2"}}, TypeError, r"weights\['a'\] must be a number"),
    ({"weights": [("a", 1)]}, TypeError, "weights must be a mapping"),
]


@pytest.mark.parametrize("queue_class", ["FairQueue", "AsyncFairQueue"])
@pytest.mark.parametrize(("options", "error", "match"), BAD_SETTINGS)
def test_constructor_rejects_bad_settings(redis_url, unique_name, queue_class, options, error,
                                          match):
    client = (redis.Redis if queue_class == "FairQueue" else redis.asyncio.Redis).from_url(
        redis_url)
    settings_ = {"high_water": 1000, "low_water": 500, "lease_ms": 10_000, **options}
    with pytest.raises(error, match=match):
        {"FairQueue": FairQueue, "AsyncFairQueue": AsyncFairQueue}[queue_class](
            client, unique_name, **settings_)


def test_name_and_client_are_checked(redis_client, redis_url):
    with pytest.raises(ValueError, match="must not contain"):
        make_queue(redis_client, "a{b}")
    with pytest.raises(ValueError, match="must not be empty"):
        make_queue(redis_client, "")
    with pytest.raises(TypeError, match="name must be a str"):
        make_queue(redis_client, 5)
    with pytest.raises(TypeError, match="sync redis-py client"):
        make_queue(object(), "q")
    async_client = redis.asyncio.Redis.from_url(redis_url)
    with pytest.raises(TypeError, match=r"FairQueue needs a sync .*redis\.asyncio.*AsyncFairQueue"):
        FairQueue(async_client, "q")
    with pytest.raises(TypeError, match=r"AsyncFairQueue needs a redis\.asyncio client.*"
                                        r"redis\.client\.Redis.*use FairQueue"):
        AsyncFairQueue(redis_client, "q")


def test_redis_unreachable_is_a_clear_error():
    # No client-side retries: the error comes at once (redis-py's default retries ~10x first).
    client = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    queue = make_queue(client, "nowhere")
    with pytest.raises(StoreUnavailable, match="unavailable for queue 'nowhere'") as caught:
        queue.enqueue("t", {"x": 1}, tenant="a")
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    with pytest.raises(StoreUnavailable):
        queue.stats()


def test_worker_rejects_bad_arguments(redis_client, redis_url, unique_name):
    queue = make_queue(redis_client, unique_name)
    with pytest.raises(TypeError, match="handlers"):
        Worker(queue, {})
    with pytest.raises(TypeError, match="callable"):
        Worker(queue, {"t": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        Worker(queue, {"t": print}, concurrency=0)
    with pytest.raises(TypeError, match="prefetch must be an int"):
        Worker(queue, {"t": print}, prefetch="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_wait must be > 0"):
        Worker(queue, {"t": print}, idle_wait=0)
    with pytest.raises(TypeError, match="queue must be a FairQueue"):
        Worker("q", {"t": print})  # type: ignore[arg-type]

    async def coroutine(payload: Any) -> None:
        pass

    with pytest.raises(TypeError, match=r"coroutine function.*use AsyncWorker"):
        Worker(queue, {"t": coroutine})
    async_queue = AsyncFairQueue(redis.asyncio.Redis.from_url(redis_url), unique_name)
    with pytest.raises(TypeError, match="queue must be an AsyncFairQueue"):
        AsyncWorker(queue, {"t": coroutine})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be a coroutine function \(async def\)"):
        AsyncWorker(async_queue, {"t": print})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        AsyncWorker(async_queue, {"t": coroutine}, concurrency=0)
    with pytest.raises(TypeError, match="prefetch must be an int"):
        AsyncWorker(async_queue, {"t": coroutine}, prefetch=1.0)  # type: ignore[arg-type]


def test_handler_spec_is_one_rule():
    assert load_handlers("distributed_handlers:HANDLERS") is distributed_handlers.HANDLERS
    assert set(load_handlers("distributed_handlers:make_handlers")) == {"noop"}
    with pytest.raises(ValueError, match=r"package\.module:object"):
        load_handlers("no_colon")
    with pytest.raises(TypeError, match=r"names a function, not a mapping.*handler_factory"):
        load_handlers("json:dumps")
    with pytest.raises(TypeError, match="names a function"):
        load_handlers("distributed_handlers:noop")  # unmarked functions are never called
    with pytest.raises(ValueError, match="has no attribute 'NOPE'"):
        load_handlers("distributed_handlers:NOPE")
    with pytest.raises(ValueError, match="cannot import"):
        load_handlers("no_such_module_anywhere:HANDLERS")
    with pytest.raises(TypeError, match="handlers must be a str"):
        load_handlers(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ordering


def test_priority_first_then_fifo_within_a_tenant(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    order = [(0, "a"), (5, "b"), (0, "c"), (5, "d"), (-1, "e"), (2.5, "f")]
    for priority, label in order:
        queue.enqueue("t", label, tenant="x", priority=priority)
    got = [t.payload() for t in lease_all(queue, 6)]
    assert got == ["b", "d", "f", "a", "c", "e"]


def test_round_robin_with_weights_is_exact(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, weights={"a": 2, "b": 1, "c": 1})
    for i in range(12):
        for tenant in "abc":
            queue.enqueue("t", i, tenant=tenant)
    got = "".join(t.tenant for t in lease_all(queue, 20))
    assert got == "aabc" * 5


def test_flooding_tenant_does_not_delay_a_newcomer(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    for i in range(100):
        queue.enqueue("t", i, tenant="flood")
    queue.lease(3)
    queue.enqueue("t", "late", tenant="small")
    got = [t.tenant for t in queue.lease(2)]
    assert "small" in got  # served within one round, not after the 97 queued ahead


def test_concurrent_leases_never_double_serve(redis_url, unique_name):
    producer = redis.Redis.from_url(redis_url)
    queue = make_queue(producer, unique_name)
    ids = {queue.enqueue("t", i, tenant=f"t{i % 5}", priority=i % 3) for i in range(600)}
    leased: list[list[str]] = []

    def consume() -> None:
        client = redis.Redis.from_url(redis_url)
        mine = make_queue(client, unique_name)
        got: list[str] = []
        while batch := mine.lease(3):
            got += [t.id for t in batch]
        leased.append(got)
        client.close()

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = [task_id for got in leased for task_id in got]
    assert len(everything) == len(set(everything)) == 600
    assert set(everything) == ids
    producer.close()


class DrrModel:
    """Deficit round robin in plain Python: the oracle for the Lua script."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.ring: deque[str] = deque()
        self.deficit: dict[str, float] = {}
        self.queues: dict[str, list[tuple[float, int, str]]] = {}
        self.seq = 0

    def enqueue(self, tenant: str, priority: float, label: str) -> None:
        heap = self.queues.setdefault(tenant, [])
        if not heap:
            self.ring.append(tenant)
        self.seq += 1
        heapq.heappush(heap, (-priority, self.seq, label))

    def lease(self) -> str | None:
        while self.ring:
            tenant = self.ring[0]
            deficit = self.deficit.get(tenant, 0.0)
            if deficit < 1:
                deficit += self.weights.get(tenant, 1)
            served = None
            if deficit >= 1:
                served = heapq.heappop(self.queues[tenant])[2]
                deficit -= 1
            if not self.queues[tenant]:
                self.ring.popleft()
                self.deficit.pop(tenant, None)
            else:
                self.deficit[tenant] = deficit
                if deficit < 1:
                    self.ring.rotate(-1)
            if served is not None:
                return served
        return None


operations = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.sampled_from("abcd"), st.integers(-2, 2)),
        st.tuples(st.just("lease"), st.integers(1, 4), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=40)
@given(ops=operations, weights=st.dictionaries(st.sampled_from("abcd"),
                                               st.sampled_from([0.25, 0.5, 1, 2, 3])))
def test_lease_order_matches_the_drr_model(redis_url, ops, weights):
    client = redis.Redis.from_url(redis_url)
    name = f"test:drr-model:{time.monotonic_ns()}"
    queue = make_queue(client, name, weights=weights or None)
    model = DrrModel(weights)
    try:
        for n, (op, arg, priority) in enumerate(ops):
            if op == "enqueue":
                label = f"{arg}{n}"
                queue.enqueue("t", label, tenant=arg, priority=priority)
                model.enqueue(arg, priority, label)
            else:
                got = [t.payload() for t in queue.lease(arg)]
                expected = [x for x in (model.lease() for _ in range(arg)) if x is not None]
                assert got == expected
    finally:
        client.close()


# --------------------------------------------------------------------------- leases


def test_late_ack_from_an_expired_lease_cannot_complete_a_retaken_task(redis_client,
                                                                        unique_name):
    queue = make_queue(redis_client, unique_name, lease_ms=150, max_attempts=5)
    task_id = queue.enqueue("t", {"n": 1}, tenant="a")
    first = queue.lease()[0]
    # The first worker stalls past its lease; the next lease call reclaims and re-delivers.
    second = wait_until(lambda: queue.lease(), timeout=10, message="redelivery")[0]
    assert (second.id, second.attempts) == (task_id, 2)
    assert second.token != first.token
    assert queue.ack(first) is False  # stale: does not complete the second delivery
    stats = queue.stats()
    assert (stats["completed"], stats["leased"], stats["stale_acks"]) == (0, 1, 1)
    assert queue.fail(first, "late failure") == "stale"
    assert queue.ack(second) is True
    stats = queue.stats()
    assert (stats["completed"], stats["leased"], stats["redelivered"]) == (1, 0, 1)


def test_renew_keeps_a_lease_alive(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, lease_ms=1000)
    queue.enqueue("t", 1, tenant="a")
    task = queue.lease()[0]
    deadline = time.monotonic() + 1.5  # outlives the lease unless renewed
    while time.monotonic() < deadline:
        assert queue.renew([task]) == 1
        assert queue.lease() == []  # still ours, not redelivered
        time.sleep(0.05)
    assert queue.ack(task) is True


def test_lease_expiring_on_the_last_attempt_dead_letters(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, lease_ms=100, max_attempts=2)
    queue.enqueue("t", {"n": 1}, tenant="a")
    queue.lease()
    wait_until(lambda: queue.lease(), timeout=10, message="second delivery")
    wait_until(lambda: queue.stats()["dead"] == 1 or queue.lease(), timeout=10,
               message="dead letter")
    [letter] = queue.dead_letters()
    assert letter.attempts == 2
    assert "lease expired on attempt 2 of 2" in letter.reason
    assert queue.stats()["leased"] == 0


# --------------------------------------------------------------------------- failures


def test_failures_retry_then_dead_letter_with_the_reason(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=3, retry_delay_ms=0)
    task_id = queue.enqueue("t", {"n": 7}, tenant="a", priority=2)
    outcomes = []
    for _ in range(3):
        [task] = queue.lease()
        outcomes.append(queue.fail(task, f"attempt {task.attempts} broke"))
    assert outcomes == ["retried", "retried", "dead"]
    assert queue.lease() == []
    [letter] = queue.dead_letters()
    assert (letter.id, letter.task_name, letter.tenant, letter.priority) == (task_id, "t", "a", 2)
    assert (letter.payload, letter.attempts, letter.reason) == ({"n": 7}, 3, "attempt 3 broke")
    stats = queue.stats()
    assert (stats["failed"], stats["retried"], stats["dead"], stats["dead_letters"]) == (3, 2, 1, 1)


def test_retries_wait_their_delay_doubling_per_attempt(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=3, retry_delay_ms=300)
    queue.enqueue("t", "flaky", tenant="a")
    queue.enqueue("t", "steady", tenant="a")
    first = queue.lease()[0]
    failed_at = time.monotonic()
    assert queue.fail(first, "try again") == "retried"
    assert queue.stats()["delayed_retries"] == 1
    assert [t.payload() for t in queue.lease(5)] == ["steady"]  # the retry is not due yet
    second = wait_until(lambda: queue.lease(), timeout=10, message="retry after its delay")[0]
    assert time.monotonic() - failed_at >= 0.25  # Redis time vs ours: a little slack
    assert (second.payload(), second.attempts) == ("flaky", 2)
    failed_at = time.monotonic()
    queue.fail(second, "again")
    third = wait_until(lambda: queue.lease(), timeout=10, message="second retry")[0]
    assert time.monotonic() - failed_at >= 0.55  # 300 ms doubled
    assert third.attempts == 3 and queue.stats()["delayed_retries"] == 0


def test_a_dead_letter_can_be_retried(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=1)
    task_id = queue.enqueue("t", {"n": 1}, tenant="a", priority=3)
    queue.fail(queue.lease()[0], "broken dependency")
    assert queue.retry_dead_letter(task_id) is True
    assert queue.retry_dead_letter(task_id) is False  # no longer dead-lettered
    assert queue.dead_letters() == []
    [task] = queue.lease()
    assert (task.id, task.attempts, task.priority, task.payload()) == (task_id, 1, 3, {"n": 1})
    assert queue.ack(task)
    stats = queue.stats()
    assert (stats["dead"], stats["revived"], stats["completed"]) == (1, 1, 1)


def test_dead_letter_list_is_bounded(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_dead_letters=3)
    for i in range(5):
        queue.enqueue("t", i, tenant="a")
    for task in lease_all(queue, 5):
        queue.fail(task, "no", retry=False)
    assert [d.payload for d in queue.dead_letters()] == [4, 3, 2]
    assert queue.stats()["dead"] == 5
    assert redis_client.exists(f"buttress:{{{unique_name}}}:task:000000000000001") == 0


def test_expired_deadline_is_dead_lettered_not_run(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    queue.enqueue("t", "stale", tenant="a", deadline=time.time() - 1)
    queue.enqueue("t", "fresh", tenant="a", deadline=time.time() + 60)
    [task] = queue.lease(5)
    assert task.payload() == "fresh"
    assert task.deadline is not None and task.deadline > time.time()
    [letter] = queue.dead_letters()
    assert letter.payload == "stale" and letter.reason.startswith("expired")
    assert queue.stats()["expired"] == 1


# --------------------------------------------------------------------------- backpressure


def test_shedding_hysteresis(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, high_water=10, low_water=5, shed_below=1)
    for i in range(10):
        queue.enqueue("t", i, tenant=f"t{i % 3}")
    assert queue.stats()["state"] == "shedding"  # depth reached high_water
    with pytest.raises(Rejected) as caught:
        queue.enqueue("t", "low", tenant="t0", priority=0)
    assert caught.value.state == "shedding"
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    queue.enqueue("t", "urgent", tenant="t0", priority=1)  # not sheddable: admitted (depth 11)
    queue.lease(5)  # depth 6: still above low_water, still shedding
    with pytest.raises(Rejected):
        queue.enqueue("t", "low", tenant="t1")
    assert queue.stats()["state"] == "shedding"
    queue.lease(1)  # depth 5 == low_water: back to normal, evaluated by the lease script
    assert queue.stats()["state"] == "normal"
    queue.enqueue("t", "readmitted", tenant="t1")
    stats = queue.stats()
    assert stats["state"] == "normal"
    assert (stats["rejected"], stats["shed_entries"], stats["depth"]) == (2, 1, 6)
    assert stats["shedding_seconds"] >= 0


def test_low_water_defaults_to_half_of_high_water(redis_client, unique_name):
    assert make_queue(redis_client, unique_name, high_water=9, low_water=None).low_water == 4


def test_retry_after_follows_the_drain_rate(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, high_water=20, low_water=10)
    for i in range(20):
        queue.enqueue("t", i, tenant="a")
    time.sleep(0.2)
    queue.lease(2)  # 2 tasks in >= 0.2 s: about 10/s or slower; 8 more to drain
    with pytest.raises(Rejected) as caught:
        queue.enqueue("t", "x", tenant="a")
    assert caught.value.retry_after is not None and caught.value.retry_after >= 0.5


def test_retry_after_follows_the_recent_drain_rate_not_the_average_since_shedding(
        redis_client, unique_name):
    """Workers that stalled (or started late) do not inflate every later hint."""
    queue = make_queue(redis_client, unique_name, high_water=100, low_water=10)
    for i in range(100):
        queue.enqueue("t", i, tenant="a")
    shedding_began = time.monotonic()
    time.sleep(2.0)  # the workers stall: nothing drains
    with pytest.raises(Rejected):
        queue.enqueue("t", "x", tenant="a")
    queue.lease(40)  # then they drain fast: 40 tasks in about a second
    time.sleep(1.05)
    with pytest.raises(Rejected) as caught:
        queue.enqueue("t", "y", tenant="a")
    # The average since shedding began would say 50 excess tasks at 40 per (>= 3 s).
    average_hint = 50 * (time.monotonic() - shedding_began) / 40
    hint = caught.value.retry_after
    assert hint is not None and 0.5 <= hint <= 0.6 * average_hint


def test_stats_report_depth_by_tenant_and_priority(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    queue.enqueue("t", 1, tenant="a", priority=1)
    queue.enqueue("t", 2, tenant="a", priority=1)
    queue.enqueue("t", 3, tenant="a", priority=-0.5)
    queue.enqueue("t", 4, tenant="b")
    stats = queue.stats()
    assert stats["depth"] == 4
    assert stats["depth_by_tenant"] == {"a": 3, "b": 1}
    assert stats["depth_by_tenant_priority"] == {"a": {1: 2, -0.5: 1}, "b": {0: 1}}
    assert stats["active_tenants"] == 2
    assert json.dumps(stats)  # plain data


# --------------------------------------------------------------------------- worker in-process


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_worker_dead_letters_unknown_tasks_and_keeps_running(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, max_attempts=2, retry_delay_ms=50)
    seen: list[Any] = []

    def fragile(payload: Any) -> None:
        if payload == "bad":
            raise RuntimeError("cannot")
        seen.append(payload)

    worker = Worker(queue, {"ok": seen.append, "fragile": fragile}, concurrency=2)
    thread = run_in_thread(worker)
    queue.enqueue("nobody-handles-this", {"x": 1}, tenant="a")
    queue.enqueue("fragile", "bad", tenant="a")
    for i in range(20):
        queue.enqueue("ok", i, tenant="b")
    wait_until(lambda: queue.stats()["completed"] == 20 and queue.stats()["dead"] == 2,
               timeout=20, message="work done and two dead letters")
    worker.stop(drain=True)
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(seen) == list(range(20))
    reasons = {d.task_name: d.reason for d in queue.dead_letters()}
    assert reasons["nobody-handles-this"].startswith("unknown task name 'nobody-handles-this'")
    assert reasons["fragile"] == "RuntimeError: cannot"
    stats = worker.stats()
    assert (stats["completed"], stats["unknown_task"], stats["dead_lettered"]) == (20, 1, 2)
    assert stats["stopped"] is True


def test_stop_with_drain_finishes_and_acks_running_tasks(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name)
    started = threading.Event()
    release = threading.Event()

    def slow(payload: Any) -> None:
        started.set()
        release.wait(10)

    worker = Worker(queue, {"slow": slow})
    thread = run_in_thread(worker)
    queue.enqueue("slow", 1, tenant="a")
    queue.enqueue("slow", 2, tenant="a")
    assert started.wait(10)
    worker.stop(drain=True)
    release.set()
    thread.join(10)
    stats = queue.stats()
    assert (stats["completed"], stats["leased"], stats["depth"]) == (1, 0, 1)


def test_long_handler_keeps_its_lease(redis_client, unique_name):
    queue = make_queue(redis_client, unique_name, lease_ms=1000)
    calls = Counter[int]()

    def slow(payload: int) -> None:
        calls[payload] += 1
        time.sleep(2.0)  # two lease lengths: renewals (every lease_ms / 3) keep it ours

    worker = Worker(queue, {"slow": slow}, concurrency=2)
    thread = run_in_thread(worker)
    queue.enqueue("slow", 1, tenant="a")
    wait_until(lambda: queue.stats()["completed"] == 1, timeout=15, message="completion")
    worker.stop()
    thread.join(10)
    assert calls == {1: 1}
    assert queue.stats()["redelivered"] == 0


def test_worker_backs_off_while_redis_is_down_and_resumes():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
        queue = make_queue(client, "outage")
        done: list[int] = []
        worker = Worker(queue, {"t": done.append}, idle_wait=0.2)
        thread = run_in_thread(worker)
        queue.enqueue("t", 1, tenant="a")
        wait_until(lambda: done == [1], timeout=10, message="first task")
        server.stop()
        with pytest.raises(StoreUnavailable):
            queue.enqueue("t", 2, tenant="a")
        wait_until(lambda: worker.stats()["store_errors"] >= 2, timeout=10,
                   message="worker noticing the outage")
        assert thread.is_alive()
        server.start()  # same port, no persistence: an empty Redis
        wait_until(lambda: _try_enqueue(queue, 3), timeout=10, message="Redis back")
        wait_until(lambda: done == [1, 3], timeout=15, message="worker resuming")
        worker.stop()
        thread.join(10)
        assert not thread.is_alive()


def _try_enqueue(queue: FairQueue, payload: int, task_name: str = "t") -> bool:
    try:
        queue.enqueue(task_name, payload, tenant="a")
    except StoreUnavailable:
        return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free as well.

    An ephemeral port above 55535 has no bus port: redis-server exits at once.
    """
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port with a free cluster bus port found")


def test_runs_on_redis_cluster(tmp_path):
    """A one-node Redis Cluster: scripts, pipelines and the worker go through RedisCluster."""
    from redis.cluster import RedisCluster

    config = {"cluster-enabled": "yes", "cluster-config-file": str(tmp_path / "nodes.conf")}
    with RedisServer(port=cluster_port(), config=config) as server:
        plain = redis.Redis.from_url(server.url)
        plain.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        wait_until(lambda: plain.cluster("info")["cluster_state"] == "ok", timeout=20,
                   message="cluster state ok")
        client = RedisCluster(host=server.host, port=server.port)
        queue = make_queue(client, "clustered", max_attempts=1)
        for i in range(6):
            queue.enqueue("t", i, tenant="ab"[i % 2])
        tasks = queue.lease(3)
        assert [t.tenant for t in tasks] == ["a", "b", "a"]
        assert queue.ack(tasks[0]) is True
        assert queue.fail(tasks[1], "no") == "dead"
        assert [d.payload for d in queue.dead_letters()] == [1]
        done: list[int] = []
        worker = Worker(queue, {"t": done.append})
        thread = run_in_thread(worker)
        wait_until(lambda: len(done) == 3, timeout=10, message="worker on the cluster")
        worker.stop()
        thread.join(10)
        stats = queue.stats()
        assert (stats["completed"], stats["dead"], stats["leased"]) == (4, 1, 1)
        client.close()


def test_drain_does_not_hang_on_an_outage():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1,
                                      retry=Retry(NoBackoff(), 0))
        queue = make_queue(client, "outage-drain", lease_ms=1000)
        release = threading.Event()
        worker = Worker(queue, {"t": lambda payload: release.wait(10)})
        thread = run_in_thread(worker)
        queue.enqueue("t", 1, tenant="a")
        wait_until(lambda: worker.stats()["running"] == 1, timeout=10, message="task running")
        server.stop()
        worker.stop(drain=True)
        release.set()  # the task finishes, but its ack cannot be delivered
        thread.join(15)
        assert not thread.is_alive()  # gave up after about lease_ms, did not hang
        assert worker.stats()["completed"] == 1 and worker.stats()["store_errors"] >= 1
