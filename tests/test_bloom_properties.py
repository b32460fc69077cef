"""Properties of the Bloom filter: no false negatives, native == twin bit for bit,
a stateful run against Python's set, false-positive rates against the theory,
and fuzzed persistence input.  All randomness is seeded (hypothesis derandomized)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import buttress
import buttress.reference
from buttress.bloom import classic_fp_rate, split_block_fp_rate

NATIVE = buttress.BloomFilter
TWIN = buttress.reference.BloomFilter
LAYOUTS = ["classic", "split_block"]

keys = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)


def make(impl, layout, capacity, fp_rate=0.01):
    return impl.for_capacity(max(1, capacity), fp_rate, layout=layout)


@pytest.mark.parametrize("impl", [NATIVE, TWIN], ids=["native", "twin"])
@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=60)
@given(items=st.lists(keys, max_size=120), fp_rate=st.sampled_from([0.5, 0.01, 1e-4]))
def test_no_false_negatives(impl, layout, items, fp_rate):
    bf = make(impl, layout, len(items) // 2, fp_rate)  # over capacity on purpose
    half = len(items) // 2
    bf.insert_many(items[:half])
    for key in items[half:]:
        bf.insert(key)
    assert all(key in bf for key in items)
    assert bf.contains_many(items).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=60)
@given(items=st.lists(keys, max_size=80), num_bits=st.integers(1, 5000),
       num_hashes=st.integers(1, 64))
def test_native_and_twin_give_the_same_bytes(layout, items, num_bits, num_hashes):
    if layout == "split_block":
        num_hashes = 8
    native = NATIVE(num_bits, num_hashes, layout=layout)
    twin = TWIN(num_bits, num_hashes, layout=layout)
    native.insert_many(items)
    for key in items:
        twin.insert(key)
    assert native.to_bytes() == twin.to_bytes()
    probes = [*items, "absent", 123456789]
    assert native.contains_many(probes).tolist() == twin.contains_many(probes).tolist()
    assert native.approx_count() == twin.approx_count()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_native_and_twin_agree_on_numpy_batches(layout):
    rng = np.random.default_rng(7)
    ints = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    raw = np.array([rng.bytes(int(n)) for n in rng.integers(1, 12, size=1000)], dtype="S12")
    native = NATIVE.for_capacity(4000, layout=layout)
    twin = TWIN.for_capacity(4000, layout=layout)
    for bf in (native, twin):
        bf.insert_many(ints)
        bf.insert_many(raw)
    assert native.to_bytes() == twin.to_bytes()


class FilterAgainstSet(RuleBasedStateMachine):
    """Native and twin filters in lockstep with a set: every member is found,
    both hold the same bits, and the counters follow the inserts."""

    def __init__(self) -> None:
        super().__init__()
        self.model: set[object] = set()
        self.inserted = 0
        self.filters: list = []

    @precondition(lambda self: not self.filters)
    @rule(layout=st.sampled_from(LAYOUTS), capacity=st.integers(1, 300))
    def create(self, layout, capacity):
        self.filters = [make(NATIVE, layout, capacity), make(TWIN, layout, capacity)]

    @precondition(lambda self: self.filters)
    @rule(key=keys)
    def insert(self, key):
        for bf in self.filters:
            bf.insert(key)
        self.model.add(key)
        self.inserted += 1

    @precondition(lambda self: self.filters)
    @rule(batch=st.lists(keys, max_size=20))
    def insert_many(self, batch):
        for bf in self.filters:
            bf.insert_many(batch)
        self.model.update(batch)
        self.inserted += len(batch)

    @precondition(lambda self: self.filters)
    @rule(key=keys)
    def lookup(self, key):
        found = [key in bf for bf in self.filters]
        assert found[0] == found[1]
        if key in self.model:
            assert found[0]

    @precondition(lambda self: self.filters)
    @rule()
    def round_trip(self):
        native, twin = self.filters
        self.filters = [NATIVE.from_bytes(twin.to_bytes()), TWIN.from_bytes(native.to_bytes())]
        self.inserted = 0  # counters are per object, not persisted

    @precondition(lambda self: self.filters)
    @rule()
    def clear(self):
        for bf in self.filters:
            bf.clear()
        self.model.clear()
        self.inserted = 0

    @invariant()
    def same_bits_and_all_members(self):
        if not self.filters:
            return
        native, twin = self.filters
        assert native.bitset() == twin.bitset()
        if self.model:
            assert native.contains_many(list(self.model)).all()
        assert native.stats()["keys_inserted"] == self.inserted


FilterAgainstSet.TestCase.settings = settings(max_examples=40, stateful_step_count=25)
TestFilterAgainstSet = FilterAgainstSet.TestCase


def key_distribution(name, start, count, rng):
    """Inserted (start=0) or never-inserted (start > 0) keys of one kind."""
    if name == "sequential ints":
        return np.arange(start, start + count, dtype=np.int64)
    if name == "random bytes":
        # 16 random bytes; a different seed for members and non-members
        return np.frombuffer(rng.bytes(16 * count), dtype="S16")
    return [f"user-{i:012d}@example.com" for i in range(start, start + count)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fp_rate", [0.01, 0.001])
@pytest.mark.parametrize("distribution", ["sequential ints", "random bytes",
                                          "near-identical strings"])
def test_false_positive_rate_matches_theory(layout, fp_rate, distribution):
    n = 50_000
    queries = 300_000 if fp_rate == 0.01 else 1_000_000  # >= 300 expected hits
    bf = NATIVE.for_capacity(n, fp_rate, layout=layout)
    bf.insert_many(key_distribution(distribution, 0, n, np.random.default_rng(1)))
    outsiders = key_distribution(distribution, 10**9, queries, np.random.default_rng(2))
    measured = float(bf.contains_many(outsiders).mean())
    if layout == "classic":
        theory = classic_fp_rate(n, bf._modulus, bf.num_hashes)
    else:
        theory = split_block_fp_rate(n, bf.num_bits)
    assert abs(measured - theory) <= 0.2 * theory, (measured, theory)
    assert measured <= 1.2 * fp_rate
    assert abs(bf.estimated_fp_rate() - theory) <= 0.2 * theory


@pytest.mark.parametrize("impl", [NATIVE, TWIN], ids=["native", "twin"])
@settings(max_examples=150)
@given(data=st.one_of(
    st.binary(max_size=200),
    # past the magic, so the header checks and the length arithmetic get exercised
    st.binary(min_size=2, max_size=300).map(lambda rest: b"BTRSBLM\x00\x01\x00" + rest),
))
def test_from_bytes_fuzz_random_input(impl, data):
    try:
        bf = impl.from_bytes(data)
    except ValueError:
        return
    assert bf.to_bytes() == data  # accepted only if it is a well-formed filter


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=200)
@given(position=st.integers(0, 64 + 127), flip=st.integers(1, 255),
       cut=st.integers(0, 64 + 128))
def test_from_bytes_fuzz_damaged_filters(layout, position, flip, cut):
    bf = NATIVE(1024, 8 if layout == "split_block" else 3, layout=layout)
    bf.insert_many(range(50))
    good = bf.to_bytes()
    damaged = bytearray(good)
    damaged[position] ^= flip
    with pytest.raises(ValueError):
        NATIVE.from_bytes(bytes(damaged))
    if cut < len(good):
        with pytest.raises(ValueError):
            NATIVE.from_bytes(good[:cut])
