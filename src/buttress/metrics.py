"""Prometheus metrics for every long-lived buttress object: one call, read at scrape time.

>>> from prometheus_client import CollectorRegistry, generate_latest   # doctest: +SKIP
>>> registry = CollectorRegistry()                                     # doctest: +SKIP
>>> register(scheduler, registry=registry, name="ingest")              # doctest: +SKIP
>>> generate_latest(registry)                                          # doctest: +SKIP

:func:`register` adds the object to a collector that calls its ``stats()``
when Prometheus scrapes, and turns the dict into metrics.  Nothing is added to
the object's hot path: no counter is incremented per task or per message by
this module; the object's own ``stats()`` counters are the source.

Conventions (https://prometheus.io/docs/practices/naming/): every name starts
with ``buttress_``; counters end in ``_total``; times are in seconds; an
outcome or a state is a label, not a name; the object is told apart by one
label named after its kind (``scheduler``, ``filter``, ``deduplicator``,
``election``, ``queue``, ``service``).  Per-tenant series are capped at
``max_tenants`` per queue (the deepest tenants keep their own series, the rest
are summed under ``tenant="__other__"``).  docs/metrics.md lists every name.

Objects are matched to a kind by class name (walking the MRO), else by the
keys of their ``stats()`` (:data:`SHAPES`), so an asyncio twin that keeps its
sync class's ``stats()`` contract is exported with no change here;
:func:`add_kind` registers a new class or kind from outside.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from buttress._validate import require_int, require_str

__all__ = ["KINDS", "OTHER_TENANTS", "SHAPES", "add_kind", "kind_of", "register", "unregister"]

logger = logging.getLogger("buttress.metrics")

OTHER_TENANTS = "__other__"  # the label value that sums tenants beyond the cap

# A kind turns one object's stats() into samples: emit(stats, label_value, families).
Emit = Callable[[Mapping[str, Any], str, "_Families"], None]


def register(obj: Any, registry: CollectorRegistry | None = None, *, name: str | None = None,
             max_tenants: int = 20) -> Any:
    """Export ``obj``'s ``stats()`` as Prometheus metrics in ``registry`` (default: global).

    ``name`` is the value of the object's label (default: the object's own
    ``name`` or ``queue`` attribute, else its kind).  Two objects of one kind
    in one registry must have different names (ValueError).  Returns ``obj``.
    ``max_tenants`` caps the per-tenant series of a queue.
    """
    registry = REGISTRY if registry is None else registry
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, "
                        f"got {type(registry).__name__}")
    kind = kind_of(obj)
    if name is None:
        name = _default_name(obj, kind)
    require_str("name", name, max_bytes=200)
    require_int("max_tenants", max_tenants, minimum=1, maximum=10_000)
    _collector_for(registry).add(kind, name, obj, max_tenants)
    return obj


def unregister(obj: Any, registry: CollectorRegistry | None = None) -> bool:
    """Stop exporting ``obj``; False if it was not registered there."""
    registry = REGISTRY if registry is None else registry
    collector = _BY_REGISTRY.get(registry)
    return collector.remove(obj) if collector is not None else False


def kind_of(obj: Any) -> str:
    """The kind ``register`` would use for ``obj`` (TypeError if it has none).

    By class name along the MRO first; a class not known by name is matched by
    the shape of its ``stats()`` (the kind whose keys it has, the most specific
    one), so a new class that keeps an existing ``stats()`` contract needs no
    registration of its own.  That fallback calls ``stats()`` once.
    """
    for cls in type(obj).__mro__:
        kind = _CLASS_KINDS.get(cls.__name__)
        if kind is not None:
            return kind
    stats = getattr(obj, "stats", None)
    if callable(stats):
        keys = stats()
        if isinstance(keys, Mapping):
            fits = [kind for kind, shape in SHAPES.items() if shape <= keys.keys()]
            if fits:
                return max(fits, key=lambda kind: len(SHAPES[kind]))
    raise TypeError(
        f"no metrics for {type(obj).__name__}: register() knows "
        f"{', '.join(sorted(_CLASS_KINDS))} and the stats() shapes of "
        f"{', '.join(sorted(SHAPES))}; add others with buttress.metrics.add_kind()")


def add_kind(class_name: str, kind: str, emit: Emit | None = None, *,
             label: str | None = None) -> None:
    """Export objects of class ``class_name`` as ``kind`` (an existing kind, or a new one).

    A new kind needs ``emit(stats, name, families)``; its objects are told apart by
    the label ``label`` (default: the kind).  Kinds that emit the same metric must
    use the same label (a new kind that also emits queue metrics uses ``"queue"``).
    """
    require_str("class_name", class_name)
    require_str("kind", kind)
    if kind not in KINDS:
        if emit is None:
            raise ValueError(f"kind {kind!r} is new: give its emit function")
        KINDS[kind] = (require_str("label", label or kind), emit)
    _CLASS_KINDS[class_name] = kind


# --------------------------------------------------------------------------- the collector


class _Families:
    """The metric families of one scrape, created on first use, in a stable order.

    One member's samples are staged and kept only if its emitter finishes, so a
    stats() dict missing a key exports nothing half-done.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.max_tenants = 20
        self._families: dict[str, Any] = {}
        self._labels: dict[str, str] = {}
        self._staged: list[tuple[Any, str, str, str, list[str], dict[str, str], float]] = []

    def counter(self, name: str, doc: str, value: float, item: str,
                **labels: str) -> None:
        self._staged.append((CounterMetricFamily, name, doc, self.label, [item], labels,
                             float(value)))

    def gauge(self, name: str, doc: str, value: float, item: str, **labels: str) -> None:
        self._staged.append((GaugeMetricFamily, name, doc, self.label, [item], labels,
                             float(value)))

    def commit(self) -> None:
        staged, self._staged = self._staged, []
        for factory, name, doc, label, item, labels, value in staged:
            family = self._families.get(name)
            if family is None:
                family = factory(name, doc, labels=[label, *labels])
                self._families[name] = family
                self._labels[name] = label
            elif self._labels[name] != label:
                raise ValueError(f"metric {name} is labelled by {self._labels[name]!r} and "
                                 f"{label!r}: kinds that share a metric share its label")
            family.add_metric([*item, *labels.values()], value)

    def rollback(self) -> None:
        self._staged = []

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class _RegistryCollector:
    """Every registered object of one registry: one family per metric name, whatever kinds
    share it (a BloomGuard and a BloomFilter both export ``buttress_bloom_bits``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[tuple[str, str], tuple[Any, int]] = {}
        self.errors: dict[str, int] = {}

    def add(self, kind: str, name: str, obj: Any, max_tenants: int) -> None:
        with self._lock:
            held = self._members.get((kind, name))
            if held is not None and held[0] is not obj:
                raise ValueError(f"a {kind} named {name!r} is already registered in this "
                                 f"registry; pass register(..., name=...) to tell them apart")
            self._members[kind, name] = (obj, max_tenants)
            self.errors.setdefault(kind, 0)

    def remove(self, obj: Any) -> bool:
        with self._lock:
            for key, (held, _) in list(self._members.items()):
                if held is obj:
                    del self._members[key]
                    return True
        return False

    def describe(self) -> Iterable[Metric]:
        return ()  # names depend on the members; never call stats() at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            members = sorted(self._members.items(), key=lambda item: item[0])
        families = _Families("")
        for (kind, name), (obj, max_tenants) in members:
            label, emit = KINDS[kind]
            try:
                stats = obj.stats()
                families.label, families.max_tenants = label, max_tenants
                emit(stats, name, families)
                families.commit()
            except Exception as exc:  # one broken member must not hide the others
                families.rollback()
                with self._lock:
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                logger.warning("metrics: stats() of %s %r failed: %r", kind, name, exc)
        yield from families
        errors = CounterMetricFamily(
            "buttress_metrics_collect_errors", "stats() calls that raised during a scrape",
            labels=["kind"])
        for kind, count in sorted(self.errors.items()):
            errors.add_metric([kind], count)
        yield errors


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector] = \
    weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _default_name(obj: Any, kind: str) -> str:
    """The label value when register() is given no name: what the object calls itself."""
    for path in (("election", "name"), ("queue", "name"), ("name",)):
        value: Any = obj
        for attribute in path:
            value = getattr(value, attribute, None)
        if isinstance(value, str) and value:
            return value
    return kind


def _collector_for(registry: CollectorRegistry) -> _RegistryCollector:
    with _REGISTRY_LOCK:
        collector = _BY_REGISTRY.get(registry)
        if collector is None:
            collector = _BY_REGISTRY[registry] = _RegistryCollector()
            registry.register(collector)
        return collector


# --------------------------------------------------------------------------- the kinds
# Each reads the keys its class's stats() returns; tests/test_metrics.py checks every key
# against the real objects, so a renamed key fails a test instead of vanishing from dashboards.


def _states(f: _Families, name: str, doc: str, item: str, current: str,
            states: Iterable[str]) -> None:
    for state in states:
        f.gauge(name, doc, 1.0 if state == current else 0.0, item, state=state)


SCHEDULER_OUTCOMES = ("accepted", "rejected", "shed", "expired", "cancelled", "completed",
                      "failed")
SCHEDULER_STATES = ("normal", "shedding", "shutting_down", "stopped")


def _scheduler(s: Mapping[str, Any], item: str, f: _Families) -> None:
    for outcome in SCHEDULER_OUTCOMES:
        f.counter("buttress_scheduler_tasks", "Tasks by outcome (accepted counts admissions)",
                  s[outcome], item, outcome=outcome)
    f.gauge("buttress_scheduler_queued", "Tasks waiting in the queue", s["queued"], item)
    f.gauge("buttress_scheduler_running", "Tasks running now", s["running"], item)
    f.gauge("buttress_scheduler_workers", "Worker threads or coroutines alive", s["workers"],
            item)
    f.gauge("buttress_scheduler_high_water", "Queue depth that starts shedding",
            s["high_water"], item)
    f.gauge("buttress_scheduler_low_water", "Queue depth that ends shedding", s["low_water"],
            item)
    f.counter("buttress_scheduler_shedding_seconds", "Time spent in the shedding state",
              s["shedding_seconds"], item)
    _states(f, "buttress_scheduler_state", "1 for the current admission state", item,
            s["state"], SCHEDULER_STATES)


def _bloom(s: Mapping[str, Any], item: str, f: _Families) -> None:
    f.gauge("buttress_bloom_hash_functions", "Bits probed per key", s["num_hashes"], item)
    f.gauge("buttress_bloom_bytes", "Memory of the bit array", s["bytes"], item)
    f.gauge("buttress_bloom_fill_ratio", "Fraction of bits set", s["fill_ratio"], item)
    f.gauge("buttress_bloom_estimated_false_positive_rate",
            "False-positive rate implied by the fill", s["estimated_fp_rate"], item)
    f.gauge("buttress_bloom_approx_keys", "Distinct keys estimated from the fill",
            s["approx_count"], item)
    f.counter("buttress_bloom_keys_inserted", "Keys passed to insert calls (repeats included)",
              s["keys_inserted"], item)


def _bloom_guard(s: Mapping[str, Any], item: str, f: _Families) -> None:
    f.counter("buttress_bloom_guard_lookups", "Lookups through the guard", s["lookups"], item)
    f.counter("buttress_bloom_guard_backend_calls", "Lookups that reached the backend",
              s["backend_calls"], item)
    f.counter("buttress_bloom_guard_backend_calls_avoided",
              "Lookups the filter answered as missing", s["backend_calls_avoided"], item)
    f.counter("buttress_bloom_guard_false_positive_hits",
              "Backend calls for keys the backend did not have", s["false_positive_hits"], item)
    _bloom(s["filter"], item, f)


DEDUPE_OUTCOMES = ("processed", "duplicate", "in_progress", "failed", "conflict")
# The store's counters, by store kind: stats key -> metric name.
DEDUPE_STORE_COUNTERS = {
    "redis": {"script_calls": "buttress_dedupe_store_script_calls",
              "set_claims": "buttress_dedupe_store_set_claims"},
    "sqlite": {"transactions": "buttress_dedupe_store_transactions",
               "lock_retries": "buttress_dedupe_store_lock_retries",
               "swept": "buttress_dedupe_store_swept_records"},
}


def _dedupe(s: Mapping[str, Any], item: str, f: _Families) -> None:
    for outcome in DEDUPE_OUTCOMES:
        f.counter("buttress_dedupe_messages", "Messages by outcome", s[outcome], item,
                  outcome=outcome)
    f.counter("buttress_dedupe_fenced", "Handled messages whose lease was taken over first",
              s["fenced"], item)
    f.counter("buttress_dedupe_takeovers", "Claims that took over a lapsed lease",
              s["takeovers"], item)
    f.counter("buttress_dedupe_store_calls", "Round trips or transactions to the store",
              s["store_calls"], item)
    f.gauge("buttress_dedupe_ttl_seconds", "How long an id is remembered", s["ttl"], item)
    store = s["store"]
    for key, metric in DEDUPE_STORE_COUNTERS.get(store["store"], {}).items():
        f.counter(metric, f"Store counter {key!r}", store[key], item, store=store["store"])


LEADER_EVENTS = ("terms_won", "terms_lost")
LEADER_ERRORS = {"renew_errors": "renew", "acquire_errors": "acquire",
                 "callback_errors": "callback"}


def _leader(s: Mapping[str, Any], item: str, f: _Families) -> None:
    election = s["election"]
    f.gauge("buttress_leader_is_leader", "1 while this instance holds the term",
            1.0 if s["is_leader"] else 0.0, item)
    f.gauge("buttress_leader_fencing_token", "Fencing token of the current or last term",
            s["fencing_token"] or 0, item)
    f.gauge("buttress_leader_ttl_seconds", "Lease length of the election",
            election["ttl_ms"] / 1000.0, item)
    f.counter("buttress_leader_terms_won", "Terms this instance won", s["terms_won"], item)
    f.counter("buttress_leader_terms_lost", "Terms this instance lost or gave up",
              s["terms_lost"], item)
    for key, operation in LEADER_ERRORS.items():
        f.counter("buttress_leader_errors", "Failed election calls and callbacks", s[key], item,
                  operation=operation)
    f.counter("buttress_leader_renewals", "Successful lease renewals", election["renewals"],
              item)
    f.counter("buttress_leader_store_errors", "Redis errors seen by the election",
              election["store_errors"], item)


QUEUE_OUTCOMES = ("completed", "failed", "retried", "redelivered", "expired", "dead", "revived",
                  "stale_acks", "rejected")
QUEUE_STATES = ("normal", "shedding")


def _queue(s: Mapping[str, Any], item: str, f: _Families) -> None:
    f.counter("buttress_queue_enqueued", "Tasks admitted to the queue", s["enqueued"], item)
    for outcome in QUEUE_OUTCOMES:
        f.counter("buttress_queue_tasks", "Task events by outcome (queue-wide, from Redis)",
                  s[outcome], item, outcome=outcome)
    f.gauge("buttress_queue_depth", "Ready tasks (queued, not leased)", s["depth"], item)
    f.gauge("buttress_queue_leased", "Tasks leased to workers", s["leased"], item)
    f.gauge("buttress_queue_delayed_retries", "Failed tasks waiting for their retry",
            s["delayed_retries"], item)
    f.gauge("buttress_queue_dead_letters", "Tasks in the dead-letter list", s["dead_letters"],
            item)
    f.gauge("buttress_queue_active_tenants", "Tenants with ready work", s["active_tenants"],
            item)
    f.gauge("buttress_queue_high_water", "Ready depth that starts shedding", s["high_water"],
            item)
    f.counter("buttress_queue_shedding_seconds", "Time the queue spent shedding",
              s["shedding_seconds"], item)
    f.counter("buttress_queue_shed_entries", "Times the queue entered shedding",
              s["shed_entries"], item)
    _states(f, "buttress_queue_state", "1 for the current admission state", item, s["state"],
            QUEUE_STATES)
    for tenant, depth in capped_tenants(s["depth_by_tenant"], f.max_tenants):
        f.gauge("buttress_queue_tenant_depth", "Ready tasks per tenant (capped)", depth, item,
                tenant=tenant)


def capped_tenants(by_tenant: Mapping[str, float], limit: int,
                   combine: Callable[[Iterable[float]], float] = sum) -> list[tuple[str, float]]:
    """The ``limit`` largest tenants by value; the rest as one ``__other__`` series.

    ``combine`` folds the rest: ``sum`` for counts such as depth (the default),
    ``max`` for ages (a sum of ages means nothing).  At most ``limit + 1``
    series whatever the number of tenants; ties are broken by tenant name, so
    the series kept do not flap between scrapes.  A tenant that is itself named
    ``__other__`` (tenant names are the clients' choice) is always folded into
    the rest: kept as its own series it would repeat the label set of the rest's
    series, and a scrape must not hold one series twice.
    """
    ranked = sorted(((tenant, value) for tenant, value in by_tenant.items()
                     if tenant != OTHER_TENANTS), key=lambda pair: (-pair[1], pair[0]))
    kept = ranked[:limit]
    rest = [value for _, value in ranked[limit:]]
    if OTHER_TENANTS in by_tenant:
        rest.append(by_tenant[OTHER_TENANTS])
    if rest:
        kept.append((OTHER_TENANTS, combine(rest)))
    return kept


WORKER_OUTCOMES = ("completed", "failed", "retried", "dead_lettered", "unknown_task",
                   "stale_acks")


def _worker(s: Mapping[str, Any], item: str, f: _Families) -> None:
    for outcome in WORKER_OUTCOMES:
        f.counter("buttress_worker_tasks", "Tasks this worker process finished, by outcome",
                  s[outcome], item, outcome=outcome)
    f.counter("buttress_worker_store_errors", "Redis errors the worker retried",
              s["store_errors"], item)
    f.gauge("buttress_worker_running", "Handlers running now", s["running"], item)
    f.gauge("buttress_worker_draining", "1 once the worker stopped leasing",
            1.0 if s["draining"] else 0.0, item)


SHUTDOWN_STATES = ("starting", "ready", "draining", "stopped")


def _shutdown(s: Mapping[str, Any], item: str, f: _Families) -> None:
    f.gauge("buttress_http_in_flight", "HTTP requests in flight", s["in_flight"], item)
    f.counter("buttress_http_requests", "HTTP requests served (probes excluded)",
              s["requests_total"], item)
    f.counter("buttress_http_requests_aborted", "Requests cut at the drain deadline",
              s["requests_aborted"], item)
    _states(f, "buttress_http_state", "1 for the current lifecycle state", item, s["state"],
            SHUTDOWN_STATES)
    f.gauge("buttress_http_drain_timeout_seconds", "Drain budget for in-flight requests",
            s["budget"]["drain_timeout"], item)


# kind -> (label name, emit); class name -> kind.
KINDS: dict[str, tuple[str, Emit]] = {
    "scheduler": ("scheduler", _scheduler),
    "bloom": ("filter", _bloom),
    "bloom_guard": ("filter", _bloom_guard),
    "dedupe": ("deduplicator", _dedupe),
    "leader": ("election", _leader),
    "queue": ("queue", _queue),
    "worker": ("queue", _worker),
    "shutdown": ("service", _shutdown),
}
# The stats() keys that identify a kind when the class name does not.
SHAPES: dict[str, frozenset[str]] = {
    "scheduler": frozenset((*SCHEDULER_OUTCOMES, "queued", "running", "state", "workers",
                            "queued_by_priority")),
    "bloom": frozenset(("num_bits", "num_hashes", "fill_ratio", "estimated_fp_rate",
                        "keys_inserted")),
    "bloom_guard": frozenset(("lookups", "backend_calls_avoided", "false_positive_hits",
                              "filter")),
    "dedupe": frozenset((*DEDUPE_OUTCOMES, "fenced", "takeovers", "store_calls", "store")),
    "leader": frozenset(("is_leader", "fencing_token", "terms_won", "terms_lost",
                         "election")),
    "queue": frozenset((*QUEUE_OUTCOMES, "depth", "depth_by_tenant", "leased", "enqueued")),
    "worker": frozenset((*WORKER_OUTCOMES, "worker", "running", "draining")),
    "shutdown": frozenset(("state", "in_flight", "requests_total", "requests_aborted",
                           "budget")),
}
_CLASS_KINDS: dict[str, str] = {
    "TaskScheduler": "scheduler",
    "AsyncTaskScheduler": "scheduler",
    "BloomFilterBase": "bloom",
    "BloomFilter": "bloom",
    "BloomGuard": "bloom_guard",
    "Deduplicator": "dedupe",
    "AsyncDeduplicator": "dedupe",
    "ElectorCore": "leader",
    "LeaderElector": "leader",
    "AsyncLeaderElector": "leader",
    "FairQueue": "queue",
    "AsyncFairQueue": "queue",
    "Worker": "worker",
    "AsyncWorker": "worker",
    "GracefulShutdown": "shutdown",
}
