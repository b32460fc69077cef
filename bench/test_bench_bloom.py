"""Bloom filter: native batch API against the peers' batch APIs and the twin (1M uint64 keys).

``python -m buttress bench --only bloom`` runs the same comparisons side by side
and judges the targets; this suite is for pytest-benchmark's history and plots.
"""

from __future__ import annotations

import numpy as np
import pytest

from buttress.bloom import BloomFilter
from buttress.reference.bloom import BloomFilter as TwinBloomFilter

N = 1_000_000
FP_RATE = 0.01
KEYS = np.random.default_rng(0).integers(0, 2**63, size=N, dtype=np.int64).view(np.uint64)
KEY_LIST = KEYS.tolist()
WORDS = [f"user-{i:08d}@example.com" for i in range(N)]


@pytest.mark.parametrize("layout", ["split_block", "classic"])
@pytest.mark.benchmark(group="insert_many 1M uint64")
def test_buttress_insert_many(benchmark, layout):
    benchmark.pedantic(lambda bf: bf.insert_many(KEYS), rounds=5,
                       setup=lambda: ((BloomFilter.for_capacity(N, FP_RATE, layout=layout),), {}))


@pytest.mark.parametrize("layout", ["split_block", "classic"])
@pytest.mark.benchmark(group="contains_many 1M uint64")
def test_buttress_contains_many(benchmark, layout):
    bf = BloomFilter.for_capacity(N, FP_RATE, layout=layout)
    bf.insert_many(KEYS[: N // 2])
    benchmark(bf.contains_many, KEYS)


@pytest.mark.benchmark(group="insert_many 1M uint64")
def test_rbloom_update(benchmark):
    rbloom = pytest.importorskip("rbloom")
    benchmark.pedantic(lambda b: b.update(KEY_LIST), rounds=5,
                       setup=lambda: ((rbloom.Bloom(N, FP_RATE),), {}))


@pytest.mark.benchmark(group="insert_many 1M uint64")
def test_fastbloom_add_int_batch(benchmark):
    fastbloom = pytest.importorskip("fastbloom_rs")

    def fresh():
        return (fastbloom.FilterBuilder(N, FP_RATE).build_bloom_filter(),), {}

    benchmark.pedantic(lambda b: b.add_int_batch(KEY_LIST), rounds=5, setup=fresh)


@pytest.mark.benchmark(group="contains_many 1M uint64")
def test_fastbloom_contains_int_batch(benchmark):
    fastbloom = pytest.importorskip("fastbloom_rs")
    fb = fastbloom.FilterBuilder(N, FP_RATE).build_bloom_filter()
    fb.add_int_batch(KEY_LIST[: N // 2])
    benchmark(fb.contains_int_batch, KEY_LIST)


@pytest.mark.benchmark(group="insert_many 1M uint64")
def test_twin_insert_many_10k_slice(benchmark):
    small = KEYS[:10_000]
    benchmark.pedantic(lambda bf: bf.insert_many(small), rounds=3,
                       setup=lambda: ((TwinBloomFilter.for_capacity(N, FP_RATE,
                                                                    layout="split_block"),), {}))


@pytest.mark.benchmark(group="insert_many 1M str")
def test_buttress_insert_many_str(benchmark):
    benchmark.pedantic(lambda bf: bf.insert_many(WORDS), rounds=5,
                       setup=lambda: ((BloomFilter.for_capacity(N, FP_RATE,
                                                                layout="split_block"),), {}))


@pytest.mark.benchmark(group="insert_many 1M str")
def test_rbloom_update_str(benchmark):
    rbloom = pytest.importorskip("rbloom")
    benchmark.pedantic(lambda b: b.update(WORDS), rounds=5,
                       setup=lambda: ((rbloom.Bloom(N, FP_RATE),), {}))
