"""buttress.metrics: each collector against the real object's stats() keys.

The emitters index stats() by key, so a renamed key raises here (the strict
check calls the emitter directly) instead of silently vanishing from a
dashboard.  Expositions are also linted by promtool (Prometheus conventions).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from buttress import (
    BloomFilter,
    BloomGuard,
    Deduplicator,
    GracefulShutdown,
    LeaderElection,
    LeaderElector,
    RedisStore,
    SQLiteStore,
    TaskScheduler,
)
from buttress.distributed import FairQueue, Worker
from buttress.metrics import (
    KINDS,
    OTHER_TENANTS,
    SHAPES,
    _Families,
    capped_tenants,
    kind_of,
    register,
    unregister,
)
from buttress.reference.heap import PriorityDeque as TwinDeque
from buttress.scheduler import PriorityDeque
from conftest import wait_until

PROMTOOL = shutil.which("promtool")


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape, checking the text format."""
    text = generate_latest(registry).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), f"a metric family appears twice: {sorted(types)}"
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def strict(obj: Any, name: str = "x") -> _Families:
    """Run the object's emitter on its real stats(): a missing key raises KeyError here."""
    kind = kind_of(obj)
    label, emit = KINDS[kind]
    families = _Families(label)
    stats = obj.stats()
    assert SHAPES[kind] <= stats.keys(), f"{kind}: {sorted(SHAPES[kind] - stats.keys())}"
    emit(stats, name, families)
    families.commit()
    return families


def lint(registry: CollectorRegistry) -> None:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=generate_latest(registry),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_scheduler_counters_follow_stats() -> None:
    registry = CollectorRegistry()
    scheduler = TaskScheduler(workers=2, name="ingest").start()
    try:
        handles = [scheduler.enqueue(lambda: None, priority=p) for p in range(10)]
        for handle in handles:
            handle.result(timeout=10)
        register(scheduler, registry)
        strict(scheduler)
        samples = scrape(registry)
        stats = scheduler.stats()
        for outcome in ("accepted", "completed", "rejected", "shed", "failed"):
            key = ("buttress_scheduler_tasks_total",
                   (("outcome", outcome), ("scheduler", "ingest")))
            assert samples[key] == stats[outcome]
        assert samples["buttress_scheduler_tasks_total",
                       (("outcome", "completed"), ("scheduler", "ingest"))] == 10
        assert samples["buttress_scheduler_state",
                       (("scheduler", "ingest"), ("state", "normal"))] == 1
        assert samples["buttress_scheduler_workers", (("scheduler", "ingest"),)] == 2
        lint(registry)
    finally:
        scheduler.shutdown()


def test_bloom_filter_and_guard() -> None:
    registry = CollectorRegistry()
    bloom = BloomFilter.for_capacity(1000, 0.01)
    backend = {f"k{i}": i for i in range(100)}
    guard = BloomGuard(backend.get, bloom)
    for key in backend:
        guard.add(key)
    for i in range(300):
        guard.get(f"k{i}")
    register(guard, registry, name="users")
    other = BloomFilter(1 << 12, 3)
    register(other, registry, name="plain")
    strict(guard)
    strict(other)
    samples = scrape(registry)
    stats = guard.stats()
    assert samples["buttress_bloom_guard_lookups_total", (("filter", "users"),)] == 300
    assert samples["buttress_bloom_guard_backend_calls_avoided_total", (("filter", "users"),)] \
        == stats["backend_calls_avoided"]
    assert samples["buttress_bloom_keys_inserted_total", (("filter", "users"),)] == 100
    assert samples["buttress_bloom_bytes", (("filter", "plain"),)] == other.stats()["bytes"]
    lint(registry)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_deduplicator_outcomes(backend: str, tmp_path: Any, redis_client: Any,
                               unique_name: str) -> None:
    store: Any = (SQLiteStore(tmp_path / "d.db") if backend == "sqlite"
                  else RedisStore(redis_client, namespace=unique_name))
    dedupe = Deduplicator(lambda msg_id, payload: payload, store, mode="effectively_once")
    for msg_id, payload in [("a", 1), ("b", 2), ("a", 1), ("a", 3)]:
        dedupe.process_message(msg_id, payload)
    registry = CollectorRegistry()
    register(dedupe, registry, name="orders")
    strict(dedupe)
    samples = scrape(registry)

    def messages(outcome: str) -> float:
        return samples["buttress_dedupe_messages_total",
                       (("deduplicator", "orders"), ("outcome", outcome))]

    assert (messages("processed"), messages("duplicate"), messages("conflict")) == (2, 1, 1)
    assert samples["buttress_dedupe_store_calls_total", (("deduplicator", "orders"),)] \
        == dedupe.stats()["store_calls"]
    store_metric = {"sqlite": "buttress_dedupe_store_transactions_total",
                    "redis": "buttress_dedupe_store_script_calls_total"}[backend]
    assert (store_metric, (("deduplicator", "orders"), ("store", backend))) in samples
    lint(registry)
    store.close()


def test_leader_elector(redis_client: Any, unique_name: str) -> None:
    election = LeaderElection(redis_client, unique_name, ttl_ms=400)
    redis_client.set(election.fence_key, 0)  # skip the first-use quarantine
    elector = LeaderElector(election, "node-a").start()
    try:
        wait_until(elector.is_leader, timeout=10, message="node-a elected")
        registry = CollectorRegistry()
        register(elector, registry)
        strict(elector)
        samples = scrape(registry)
        labels = (("election", unique_name),)
        assert samples["buttress_leader_is_leader", labels] == 1
        assert samples["buttress_leader_terms_won_total", labels] >= 1
        assert samples["buttress_leader_ttl_seconds", labels] == 0.4
        assert samples["buttress_leader_fencing_token", labels] == elector.fencing_token
        lint(registry)
    finally:
        elector.stop()
    assert scrape(registry)["buttress_leader_is_leader", labels] == 0


def test_queue_and_worker_with_tenant_cap(redis_client: Any, unique_name: str) -> None:
    name = unique_name.replace(":", "-")
    queue = FairQueue(redis_client, name, high_water=1000)
    for tenant_number in range(5):
        for _ in range(tenant_number + 1):
            queue.enqueue("noop", {}, tenant=f"t{tenant_number}")
    registry = CollectorRegistry()
    register(queue, registry, max_tenants=2)
    strict(queue)
    samples = scrape(registry)
    labels = (("queue", name),)
    assert samples["buttress_queue_depth", labels] == 15
    assert samples["buttress_queue_enqueued_total", labels] == 15
    tenants = {dict(key[1])["tenant"]: value for key, value in samples.items()
               if key[0] == "buttress_queue_tenant_depth"}
    assert tenants == {"t4": 5, "t3": 4, OTHER_TENANTS: 6}  # capped at 2 + the rest
    worker = Worker(queue, {"noop": lambda payload: None}, idle_wait=0.05)
    register(worker, registry)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until(lambda: queue.stats()["completed"] == 15, timeout=20)
    finally:
        worker.stop()
        thread.join(10)
    strict(worker)
    samples = scrape(registry)
    assert samples["buttress_worker_tasks_total", (("outcome", "completed"), *labels)] == 15
    assert samples["buttress_queue_tasks_total", (("outcome", "completed"), *labels)] == 15
    assert samples["buttress_worker_draining", labels] == 1
    lint(registry)


def test_shutdown_controller() -> None:
    controller = GracefulShutdown()
    controller.request_started()
    registry = CollectorRegistry()
    register(controller, registry, name="api")
    strict(controller)
    samples = scrape(registry)
    assert samples["buttress_http_in_flight", (("service", "api"),)] == 1
    assert samples["buttress_http_state", (("service", "api"), ("state", "starting"))] == 1
    controller.request_finished()
    assert scrape(registry)["buttress_http_requests_total", (("service", "api"),)] == 1
    lint(registry)


def test_registration_rules() -> None:
    registry = CollectorRegistry()
    first, second = BloomFilter(1024, 3), BloomFilter(1024, 3)
    register(first, registry, name="f")
    register(first, registry, name="f")  # the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        register(second, registry, name="f")
    with pytest.raises(TypeError, match="no metrics for dict"):
        register({}, registry)

    class Unknown:
        def stats(self) -> dict[str, Any]:
            return {"something": 1}

    with pytest.raises(TypeError, match="stats\\(\\) shapes"):
        register(Unknown(), registry)
    with pytest.raises(TypeError, match="CollectorRegistry"):
        register(first, registry="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tenants"):
        register(second, registry, name="g", max_tenants=0)
    assert unregister(first, registry)
    assert not unregister(first, registry)
    assert not any(key[0].startswith("buttress_bloom") for key in scrape(registry))


def test_a_failing_stats_is_counted_and_hides_nothing_else() -> None:
    class BrokenScheduler(TaskScheduler):
        def stats(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    good = TaskScheduler(workers=1, name="good")
    register(good, registry)
    register(BrokenScheduler(workers=1, name="bad"), registry)
    samples = scrape(registry)
    assert samples["buttress_metrics_collect_errors_total", (("kind", "scheduler"),)] == 1
    assert ("buttress_scheduler_queued", (("scheduler", "good"),)) in samples
    assert ("buttress_scheduler_queued", (("scheduler", "bad"),)) not in samples


def test_a_new_class_is_matched_by_the_shape_of_its_stats() -> None:
    """An unknown class with a known stats() contract (as an asyncio twin would have)."""

    class PlannedAsyncScheduler:  # not a known class name: matched by its stats() keys
        def __init__(self, inner: TaskScheduler) -> None:
            self.inner = inner
            self.name = "twin"

        def stats(self) -> dict[str, Any]:
            return self.inner.stats()

    scheduler = TaskScheduler(workers=1)
    twin = PlannedAsyncScheduler(scheduler)
    assert kind_of(twin) == "scheduler"
    assert kind_of(GracefulShutdown()) == "shutdown"
    registry = CollectorRegistry()
    register(twin, registry)
    samples = scrape(registry)
    assert samples["buttress_scheduler_queued", (("scheduler", "twin"),)] == 0
    for kind, shape in SHAPES.items():
        others = [other for other, keys in SHAPES.items() if other != kind and keys == shape]
        assert not others, f"{kind} and {others} have the same stats() shape"


def test_tenant_series_are_capped_whatever_the_number_of_tenants() -> None:
    depths = {f"tenant-{i:04d}": float(i % 50) for i in range(5000)}
    kept = capped_tenants(depths, 20)
    assert len(kept) == 21 and kept[-1][0] == OTHER_TENANTS
    assert sum(value for _, value in kept) == sum(depths.values())  # nothing lost, only folded
    assert [name for name, _ in kept[:2]] == ["tenant-0049", "tenant-0099"]  # ties: by name
    assert capped_tenants(depths, 20) == kept  # the same series every scrape
    ages = capped_tenants({"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}, 1, combine=max)
    assert ages == [("a", 3.0), (OTHER_TENANTS, 2.0)]
    assert capped_tenants({"a": 1.0}, 20) == [("a", 1.0)]  # under the cap: no __other__


@pytest.mark.parametrize("deque_class", [PriorityDeque, TwinDeque])
def test_priority_counts_match_items(deque_class: type) -> None:
    """What a scheduler's stats() reads at every scrape: counts, no object per queued task."""
    deque = deque_class()
    assert deque.priority_counts() == {}
    handles = [deque.push(i, (i % 40) + (0.5 if i % 3 == 0 else 0)) for i in range(2000)]
    for handle in handles[::7]:
        deque.remove(handle)
    for _ in range(100):
        deque.pop()
        deque.pop_lowest()
    expected: dict[float, int] = {}
    for priority, _ in deque.items():
        expected[priority] = expected.get(priority, 0) + 1
    assert len(expected) > 32  # past the native deque's table of distinct priorities
    assert deque.priority_counts() == expected


def test_a_scrape_reads_queued_by_priority_from_counts() -> None:
    release = threading.Event()
    scheduler = TaskScheduler(workers=1, high_water=1000).start()
    try:
        scheduler.enqueue(release.wait, priority=100)
        wait_until(lambda: scheduler.stats()["running"] == 1)
        for i in range(30):
            scheduler.enqueue(lambda: None, priority=i % 3 + (0.5 if i == 0 else 0))
        assert scheduler.stats()["queued_by_priority"] == {0.5: 1, 0: 9, 1: 10, 2: 10}
        registry = CollectorRegistry()
        register(scheduler, registry, name="held")
        assert scrape(registry)["buttress_scheduler_queued", (("scheduler", "held"),)] == 30
    finally:
        release.set()
        scheduler.shutdown()
