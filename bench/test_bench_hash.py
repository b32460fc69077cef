"""XXH64: native batch hashing against the twin and a loop over the xxhash package."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from buttress import _hash
from buttress.reference import hashing as reference

N = 1_000_000
KEYS = np.random.default_rng(0).integers(0, 2**63, size=N, dtype=np.int64).view(np.uint64)
ENCODED = [k.to_bytes(8, "little") for k in KEYS.tolist()]


@pytest.mark.benchmark(group="xxh64_many 1M uint64")
def test_native_xxh64_many(benchmark):
    benchmark(_hash.xxh64_many, KEYS)


@pytest.mark.benchmark(group="xxh64_many 1M uint64")
def test_xxhash_python_loop(benchmark):
    digest = xxhash.xxh64_intdigest
    benchmark(lambda: [digest(k) for k in ENCODED])


@pytest.mark.benchmark(group="xxh64_many 1M uint64")
def test_reference_xxh64_many(benchmark):
    benchmark.pedantic(reference.xxh64_many, args=(KEYS[:100_000],), rounds=3)
