"""Bloom filter suite: buttress against rbloom, fastbloom-rs, pybloomfiltermmap3 and the twin.

Every case times the same keys side by side.  Peers take Python lists (their
batch APIs do not read numpy arrays); building those lists is not timed.
rbloom uses its default hash (Python's built-in ``hash``, its fastest form).
The twin runs on a 10,000-key slice so the suite stays fast; per-key times
compare fairly because the filter has the full size.

Also: a 100M-key split-block lookup (full runs only; nanoseconds per key and
peak memory go to the notes) and BloomGuard in front of a real SQLite table
under a mostly-negative workload (lookups saved and false-positive hits,
measured against the prediction, go to the notes).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
from typing import Any

import numpy as np

from buttress.bench import BenchSession
from buttress.bloom import BloomFilter, BloomGuard
from buttress.reference.bloom import BloomFilter as TwinBloomFilter

ORDER = 20

N = 1_000_000
FP_RATE = 0.01
TWIN_KEYS = 10_000
# The promises, per layout: speedup over the fastest peer's batch API.
PEER_SPEEDUP = {"split_block": 5.0, "classic": 2.0}
TWIN_SPEEDUP = 100.0
# The 1M-key cases take milliseconds each: extra repeats are cheap and keep the
# medians clear of page faults and neighbours' bursts on a shared machine.
MIN_REPEATS = 7


def register(session: BenchSession) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, size=N, dtype=np.int64).view(np.uint64)
    key_list = keys.tolist()
    # half members, half never inserted, shuffled: a lookup workload with misses
    queries = np.concatenate([keys[: N // 2],
                              rng.integers(0, 2**63, size=N // 2, dtype=np.int64).view(np.uint64)])
    rng.shuffle(queries)
    query_list = queries.tolist()
    peers = _Peers(session)

    for layout in ("split_block", "classic"):
        _uint64_cases(session, peers, layout, keys, key_list, queries, query_list)
    _str_cases(session, peers)
    _single_lookup_cases(session, peers, keys, key_list, query_list)
    if not session.quick:
        _hundred_million(session)
    _guard_case(session)


class _Peers:
    """The installed comparison libraries; a missing one is skipped with a reason."""

    def __init__(self, session: BenchSession) -> None:
        self.rbloom = session.peer("rbloom")
        self.fastbloom = session.peer("fastbloom_rs")
        self.pybloomfilter = session.peer("pybloomfilter")

    def rbloom_filter(self, capacity: int = N) -> Any:
        assert self.rbloom is not None
        return self.rbloom.Bloom(capacity, FP_RATE)

    def fastbloom_filter(self, capacity: int = N) -> Any:
        assert self.fastbloom is not None
        return self.fastbloom.FilterBuilder(capacity, FP_RATE).build_bloom_filter()

    def pybloom_filter(self, capacity: int = N) -> Any:
        assert self.pybloomfilter is not None
        return self.pybloomfilter.BloomFilter(capacity, FP_RATE)

    def missing(self, case: Any, **wanted: Any) -> dict[str, Any]:
        """Skip-and-say the peers that are not installed; return the installed ones."""
        names = {"rbloom": "rbloom", "fastbloom": "fastbloom-rs",
                 "pybloomfilter": "pybloomfiltermmap3"}
        present = {}
        for attr, label in wanted.items():
            if getattr(self, attr) is None:
                case.skip(label, f"{names[attr]} is not installed (pip install {names[attr]})")
            else:
                present[attr] = label
        return present


def _uint64_cases(session: BenchSession, peers: _Peers, layout: str, keys: np.ndarray,
                  key_list: list[int], queries: np.ndarray, query_list: list[int]) -> None:
    twin_keys = keys[:TWIN_KEYS]
    twin_queries = queries[:TWIN_KEYS]
    speedup = PEER_SPEEDUP[layout]

    repeats = max(session.repeats, MIN_REPEATS)
    case = session.case("bloom", f"{layout} insert_many, 1M uint64 keys, p=1%", unit="key",
                        repeats=repeats)
    case.add("buttress", lambda bf: bf.insert_many(keys), items=N,
             setup=lambda: BloomFilter.for_capacity(N, FP_RATE, layout=layout))
    case.add("reference", lambda bf: bf.insert_many(twin_keys), items=TWIN_KEYS,
             setup=lambda: TwinBloomFilter.for_capacity(N, FP_RATE, layout=layout),
             note="10k-key slice")
    present = peers.missing(case, rbloom="rbloom update", fastbloom="fastbloom-rs add_int_batch",
                            pybloomfilter="pybloomfiltermmap3 update")
    if "rbloom" in present:
        case.add("rbloom update", lambda b: b.update(key_list), items=N,
                 setup=peers.rbloom_filter, note="list of ints")
    if "fastbloom" in present:
        case.add("fastbloom-rs add_int_batch", lambda b: b.add_int_batch(key_list), items=N,
                 setup=peers.fastbloom_filter, note="list of ints")
    if "pybloomfilter" in present:
        case.add("pybloomfiltermmap3 update", lambda b: b.update(key_list), items=N,
                 setup=peers.pybloom_filter, note="list of ints")
    for label in present.values():
        if not label.startswith("pybloom"):
            case.target("buttress", label, min_speedup=speedup)
    case.target("buttress", "reference", min_speedup=TWIN_SPEEDUP)

    ours = BloomFilter.for_capacity(N, FP_RATE, layout=layout)
    ours.insert_many(keys)
    twin = TwinBloomFilter.from_bytes(ours.to_bytes())
    case = session.case("bloom", f"{layout} contains_many, 1M uint64 keys (half absent)",
                        unit="key", repeats=repeats)
    case.add("buttress", lambda: ours.contains_many(queries), items=N)
    case.add("reference", lambda: twin.contains_many(twin_queries), items=TWIN_KEYS,
             note="10k-key slice")
    present = peers.missing(case, rbloom="rbloom `in` loop",
                            fastbloom="fastbloom-rs contains_int_batch",
                            pybloomfilter="pybloomfiltermmap3 `in` loop")
    if "rbloom" in present:
        rb = peers.rbloom_filter()
        rb.update(key_list)
        case.add("rbloom `in` loop", lambda: [k in rb for k in query_list], items=N,
                 note="no batch lookup API")
    if "fastbloom" in present:
        fb = peers.fastbloom_filter()
        fb.add_int_batch(key_list)
        case.add("fastbloom-rs contains_int_batch", lambda: fb.contains_int_batch(query_list),
                 items=N, note="list of ints")
    if "pybloomfilter" in present:
        pb = peers.pybloom_filter()
        pb.update(key_list)
        case.add("pybloomfiltermmap3 `in` loop", lambda: [k in pb for k in query_list],
                 items=N)
    for label in present.values():
        if not label.startswith("pybloom"):
            case.target("buttress", label, min_speedup=speedup)
    case.target("buttress", "reference", min_speedup=TWIN_SPEEDUP)


def _str_cases(session: BenchSession, peers: _Peers) -> None:
    words = [f"user-{i:08d}@example.com" for i in range(N)]
    half = N // 2
    queries = words[:half] + [f"guest-{i:08d}@example.com" for i in range(half)]

    repeats = max(session.repeats, MIN_REPEATS)
    case = session.case("bloom", "split_block insert_many, list of 1M str keys", unit="key",
                        repeats=repeats)
    case.add("buttress", lambda bf: bf.insert_many(words), items=N,
             setup=lambda: BloomFilter.for_capacity(N, FP_RATE, layout="split_block"))
    present = peers.missing(case, rbloom="rbloom update", fastbloom="fastbloom-rs add_str_batch")
    if "rbloom" in present:
        case.add("rbloom update", lambda b: b.update(words), items=N, setup=peers.rbloom_filter)
        case.target("buttress", "rbloom update", min_speedup=1.5)
    if "fastbloom" in present:
        case.add("fastbloom-rs add_str_batch", lambda b: b.add_str_batch(words), items=N,
                 setup=peers.fastbloom_filter)

    ours = BloomFilter.for_capacity(N, FP_RATE, layout="split_block")
    ours.insert_many(words)
    case = session.case("bloom", "split_block contains_many, list of 1M str keys (half absent)",
                        unit="key", repeats=repeats)
    case.add("buttress", lambda: ours.contains_many(queries), items=N)
    present = peers.missing(case, rbloom="rbloom `in` loop",
                            fastbloom="fastbloom-rs contains_str_batch")
    if "rbloom" in present:
        rb = peers.rbloom_filter()
        rb.update(words)
        case.add("rbloom `in` loop", lambda: [w in rb for w in queries], items=N)
        case.target("buttress", "rbloom `in` loop", min_speedup=3.0)
    if "fastbloom" in present:
        fb = peers.fastbloom_filter()
        fb.add_str_batch(words)
        case.add("fastbloom-rs contains_str_batch", lambda: fb.contains_str_batch(queries),
                 items=N)


def _single_lookup_cases(session: BenchSession, peers: _Peers, keys: np.ndarray,
                         key_list: list[int], query_list: list[int]) -> None:
    count = 200_000
    int_queries = query_list[:count]
    str_queries = [f"user-{i:08d}@example.com" for i in range(0, 2 * count, 2)]
    for kind, probe in (("int", int_queries), ("str", str_queries)):
        ours = BloomFilter.for_capacity(N, FP_RATE, layout="split_block")
        ours.insert_many(key_list[:count] if kind == "int" else probe[::2])
        case = session.case("bloom", f"single `key in bf` ({kind} keys), Python loop",
                            unit="lookup", repeats=max(session.repeats, MIN_REPEATS))
        case.add("buttress", lambda bf=ours, q=probe: [k in bf for k in q], items=count)
        if peers.missing(case, rbloom="rbloom"):
            rb = peers.rbloom_filter()
            rb.update(key_list[:count] if kind == "int" else probe[::2])
            case.add("rbloom", lambda b=rb, q=probe: [k in b for k in q], items=count)
            case.target("buttress", "rbloom", max_ratio=1.0)


def _hundred_million(session: BenchSession) -> None:
    """100M uint64 keys, split_block: lookups per key and memory (full runs only)."""
    n = 100_000_000
    keys = np.random.default_rng(1).integers(0, 2**63, size=n, dtype=np.int64).view(np.uint64)
    bf = BloomFilter.for_capacity(n, FP_RATE, layout="split_block")
    started = time.perf_counter()
    bf.insert_many(keys)
    insert_ns = (time.perf_counter() - started) / n * 1e9
    tracemalloc.start()
    found = bf.contains_many(keys)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert bool(found.all()), "a 100M filter lost a key"
    del found
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        bf.contains_many(keys)
        timings.append((time.perf_counter() - started) / n * 1e9)
    contains_ns = statistics.median(timings)
    case = session.case("bloom", "split_block contains_many, 100M uint64 keys", unit="key",
                        repeats=3)
    case.add("buttress", lambda: bf.contains_many(keys), items=n)
    session.notes.append(
        f"bloom 100M: split_block bitset {bf.stats()['bytes'] / 2**20:.0f} MiB, input array "
        f"{keys.nbytes / 2**20:.0f} MiB; insert_many {insert_ns:.1f} ns/key; contains_many "
        f"allocated {peak / 2**20:.0f} MiB at peak (the bool result is {n / 2**20:.0f} MiB: "
        f"no per-key objects); contains_many median of 3 warm runs {contains_ns:.1f} ns/key "
        f"(target <= 20 ns/key: {'MET' if contains_ns <= 20 else 'MISSED'})"
    )


def _guard_case(session: BenchSession) -> None:
    """BloomGuard in front of a real SQLite table, 90% of lookups for absent keys."""
    stored = 20_000 if session.quick else 100_000
    lookups = 50_000 if session.quick else 200_000
    directory = tempfile.TemporaryDirectory(prefix="buttress-bench-bloom-")
    db = sqlite3.connect(os.path.join(directory.name, "store.db"), check_same_thread=False)
    session.on_close(directory.cleanup)
    session.on_close(db.close)  # runs first: LIFO
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT)")
    with db:
        db.executemany("INSERT INTO users VALUES (?, ?)",
                       ((f"user:{i}", f"name {i}") for i in range(stored)))
    rng = np.random.default_rng(3)
    present = rng.integers(0, stored, size=lookups // 10)
    absent = rng.integers(stored, 100 * stored, size=lookups - len(present))
    workload = [f"user:{i}" for i in np.concatenate([present, absent]).tolist()]
    rng.shuffle(workload)

    def lookup(key: str) -> str | None:
        row = db.execute("SELECT name FROM users WHERE id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    bloom = BloomFilter.for_capacity(stored, FP_RATE, layout="split_block")
    bloom.insert_many([f"user:{i}" for i in range(stored)])

    guard = BloomGuard(lookup, bloom)
    for key in workload:
        guard.get(key)
    stats = guard.stats()
    session.notes.append(
        f"bloom guard (SQLite, {stored:,} rows, {lookups:,} lookups, 90% absent): "
        f"{stats['backend_calls_avoided']:,} backend calls avoided "
        f"({stats['backend_calls_avoided'] / lookups:.1%} of lookups); false-positive backend "
        f"hits {stats['false_positive_hits']:,} measured vs "
        f"{stats['predicted_false_positive_hits']:.0f} predicted "
        f"(estimated fp rate {stats['estimated_fp_rate']:.3%}, observed "
        f"{stats['observed_fp_rate']:.3%})"
    )

    case = session.case("bloom", f"BloomGuard over SQLite, {lookups:,} lookups, 90% absent",
                        unit="lookup")
    case.add("buttress", lambda g: [g.get(k) for k in workload], items=lookups,
             setup=lambda: BloomGuard(lookup, bloom), note="BloomGuard.get")
    case.add("sqlite direct", lambda: [lookup(k) for k in workload], items=lookups)
