"""Distributed fair queue: drain no-op tasks with 4 worker processes, against RQ and huey.

The same harness as ``python -m buttress bench --only distributed`` (see
``buttress.bench.distributed``): workers are started once per implementation and
paused while the tasks are enqueued; a round times SIGCONT until all are done.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from buttress.bench import distributed as suite
from buttress.testing import redis_url

N = 2_000


@pytest.fixture(scope="module")
def implementations() -> Iterator[dict[str, suite.Implementation]]:
    with redis_url() as url:
        counters = suite.RoundTrips(tempfile.mkstemp(prefix="buttress-bench-rt-")[1],
                                    slots=len(suite.IMPLEMENTATIONS) * (suite.WORKERS + 1))
        built: dict[str, suite.Implementation] = {}
        for index, (label, cls) in enumerate(suite.IMPLEMENTATIONS.items()):
            module = suite.PEER_MODULES.get(label)
            if module:
                pytest.importorskip(module)
            built[label] = cls(url, f"pytest-bench-{label.replace(' ', '-')}", counters,
                               index * (suite.WORKERS + 1))
        try:
            yield built
        finally:
            for impl in built.values():
                impl.close()
            counters.close()


@pytest.mark.parametrize("label", list(suite.IMPLEMENTATIONS))
@pytest.mark.benchmark(group=f"drain {N} no-op tasks, 4 worker processes")
def test_drain(benchmark, implementations, label):
    impl = implementations[label]
    benchmark.pedantic(impl.timed_drain, setup=lambda: ((impl.prepare_drain(N),), {}),
                       rounds=3)
    benchmark.extra_info["worker_round_trips_per_task"] = sum(impl.drain_rt) / (
        N * len(impl.drain_rt))


@pytest.mark.parametrize("label", list(suite.IMPLEMENTATIONS))
@pytest.mark.benchmark(group=f"enqueue {N} tasks, one producer")
def test_enqueue(benchmark, implementations, label):
    impl = implementations[label]
    benchmark.pedantic(impl.timed_enqueue, args=(N,), setup=impl.prepare_enqueue, rounds=3)
    benchmark.extra_info["producer_round_trips_per_task"] = impl.enqueue_rt[-1]
