"""Bloom filter suite: buttress against rbloom, fastbloom-rs, pybloomfiltermmap3 and the twin.

Every case times the same keys side by side.  Peers take Python lists (their
batch APIs do not read numpy arrays); building those lists is not timed.
rbloom uses its default hash (Python's built-in ``hash``, its fastest form).
The twin runs on a 10,000-key slice so the suite stays fast; per-key times
compare fairly because the filter has the full size.

Also: a 100M-key split-block lookup, one thread against every core (10M keys
in quick runs; nanoseconds per key, peak memory and the machine's load go to
the notes); columnar keys (a 10M-id Arrow string column against the
fixed-width 'S' array, a list of str and rbloom; 1M in quick runs) and a
filter built straight from a Parquet file, with peak memory measured; and
BloomGuard in front of a real SQLite table under a mostly-negative workload
(lookups saved and false-positive hits, measured against the prediction, go to
the notes).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
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
    _hundred_million(session)
    _columnar_cases(session, peers)
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
    """100M uint64 keys, split_block: lookups per key and memory, one thread and all cores.

    Quick runs use 10M keys (the filter still outgrows the caches).
    """
    n = 10_000_000 if session.quick else 100_000_000
    label = f"{n // 1_000_000}M"
    keys = np.random.default_rng(1).integers(0, 2**63, size=n, dtype=np.int64).view(np.uint64)
    bf = BloomFilter.for_capacity(n, FP_RATE, layout="split_block")
    started = time.perf_counter()
    bf.insert_many(keys)
    insert_ns = (time.perf_counter() - started) / n * 1e9
    tracemalloc.start()
    found = bf.contains_many(keys)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert bool(found.all()), f"a {label} filter lost a key"
    del found
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        bf.contains_many(keys)
        timings.append((time.perf_counter() - started) / n * 1e9)
    contains_ns = statistics.median(timings)
    cores = _usable_cores()
    load = os.getloadavg()
    case = session.case("bloom", f"split_block contains_many, {label} uint64 keys, threads",
                        unit="key", repeats=3)
    case.add("buttress", lambda: bf.contains_many(keys), items=n, note="threads=1")
    all_cores = f"buttress threads=0 ({cores} cores)"
    case.add(all_cores, lambda: bf.contains_many(keys, threads=0), items=n)
    case.target(all_cores, "buttress", min_speedup=1.7)
    session.notes.append(
        f"bloom {label} threads: load average {load[0]:.1f} (1 min) / {load[1]:.1f} (5 min) "
        f"when the case was set up, on {os.cpu_count()} CPUs; this benchmark itself adds about "
        f"1, so a load above {max(1, cores - 1)} means other processes shared the cores and the "
        f"threads=0 speedup is contaminated (a lower bound)")
    session.notes.append(
        f"bloom {label}: split_block bitset {bf.stats()['bytes'] / 2**20:.0f} MiB, input array "
        f"{keys.nbytes / 2**20:.0f} MiB; insert_many {insert_ns:.1f} ns/key; contains_many "
        f"allocated {peak / 2**20:.0f} MiB at peak (the bool result is {n / 2**20:.0f} MiB: "
        f"no per-key objects); contains_many median of 3 warm runs {contains_ns:.1f} ns/key "
        f"(target <= 20 ns/key: {'MET' if contains_ns <= 20 else 'MISSED'})"
    )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _user_ids(n: int, seed: int) -> Any:
    """An Arrow string column of ids like ``"user:12345678"``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    numbers = np.random.default_rng(seed).integers(0, 10**8, size=n)
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), 8, "0")
    return pc.binary_join_element_wise("user:", digits, "")


def _columnar_cases(session: BenchSession, peers: _Peers) -> None:
    """A 10M-id Arrow string column (1M quick) and the same ids from a Parquet file."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        session.notes.append("bloom columnar cases skipped: pyarrow is not installed "
                             "(pip install 'buttress[arrow]')")
        return
    n = 1_000_000 if session.quick else 10_000_000
    label = f"{n // 1_000_000}M"
    ids = _user_ids(n, seed=5)
    absent = _user_ids(n // 2, seed=6)
    import pyarrow as pa

    queries = pa.chunked_array([ids.slice(0, n // 2), absent])
    id_list = ids.to_pylist()
    id_bytes = np.array([i.encode() for i in id_list], dtype="S13")
    query_bytes = np.concatenate([id_bytes[: n // 2],
                                  np.array(absent.to_pylist(), dtype="S13")])
    repeats = max(session.repeats, 5)

    def fresh() -> BloomFilter:
        return BloomFilter.for_capacity(n, FP_RATE, layout="split_block")

    case = session.case("bloom", f"split_block insert_many, {label}-id Arrow string column",
                        unit="key", repeats=repeats)
    case.add("buttress", lambda bf: bf.insert_many(ids), items=n, setup=fresh,
             note="pyarrow string array")
    case.add("buttress 'S' array", lambda bf: bf.insert_many(id_bytes), items=n, setup=fresh)
    case.add("buttress list of str", lambda bf: bf.insert_many(id_list), items=n, setup=fresh)
    case.target("buttress", "buttress 'S' array", max_ratio=1.0)
    if peers.missing(case, rbloom="rbloom update"):
        case.add("rbloom update", lambda b: b.update(id_list), items=n,
                 setup=lambda: peers.rbloom_filter(n), note="list of str")
        case.target("buttress", "rbloom update", min_speedup=10)

    ours = fresh()
    ours.insert_many(ids)
    case = session.case("bloom", f"split_block contains_many, {label}-id Arrow string column "
                        "(half absent)", unit="key", repeats=repeats)
    case.add("buttress", lambda: ours.contains_many(queries), items=n,
             note="pyarrow chunked array")
    case.add("buttress 'S' array", lambda: ours.contains_many(query_bytes), items=n)
    case.target("buttress", "buttress 'S' array", max_ratio=1.0)
    if peers.missing(case, rbloom="rbloom update"):
        query_list = queries.to_pylist()
        rb = peers.rbloom_filter(n)
        rb.update(id_list)
        case.add("rbloom update", lambda b: b.update(query_list), items=n,
                 setup=lambda: peers.rbloom_filter(n),
                 note="the issue's yardstick: rbloom's batch call on the same keys as a list")
        case.add("rbloom `in` loop", lambda: [k in rb for k in query_list], items=n,
                 note="rbloom has no batch lookup")
        case.target("buttress", "rbloom update", min_speedup=10)

    _memory_note(session, label, ours, ids, queries, id_bytes)
    _parquet_cases(session, ids, n, label)


def _memory_note(session: BenchSession, label: str, bf: BloomFilter, ids: Any, queries: Any,
                 id_bytes: np.ndarray) -> None:
    """Peak Python/numpy allocation during the columnar calls (tracemalloc)."""
    measured = []
    for name, call in (
        ("insert_many(Arrow)", lambda: bf.insert_many(ids)),
        ("contains_many(Arrow)", lambda: bf.contains_many(queries)),
        ("insert_many(Arrow, threads=0)", lambda: bf.insert_many(ids, threads=0)),
        ("insert_many('S')", lambda: bf.insert_many(id_bytes)),
    ):
        tracemalloc.start()
        call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        measured.append(f"{name} {peak / 2**20:.1f} MiB")
    session.notes.append(
        f"bloom {label} Arrow ids, peak extra memory during the call (tracemalloc: numpy and "
        f"Python allocations; the Arrow buffers are read in place): {'; '.join(measured)}; "
        f"the contains_many result is {len(queries) / 2**20:.1f} MiB, a threaded insert's "
        f"scratch is at most 8 MiB (1M hashes)")


_PARQUET_CHILD = textwrap.dedent("""
    import os, sys, time
    import pyarrow as pa
    import pyarrow.parquet as pq
    from buttress import BloomFilter

    def rss(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

    path, mode = sys.argv[1], sys.argv[2]
    rows = pq.ParquetFile(path).metadata.num_rows
    # Warm up both paths on a two-row file first: the first read pages in Arrow's
    # and Parquet's code, which counts in RSS but is not data.
    small = os.path.join(os.path.dirname(path), "warm-up.parquet")
    pq.write_table(pa.table({"id": ["user:00000001", "user:00000002"]}), small)
    BloomFilter.from_parquet(small, "id", fp_rate=0.01).insert_many(
        pq.read_table(small, columns=["id"]).column(0).to_pylist())
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss("VmRSS:")
    started = time.perf_counter()
    if mode == "from_parquet":
        bf = BloomFilter.from_parquet(path, "id", fp_rate=0.01, layout="split_block")
    elif mode == "from_parquet_threads0":
        bf = BloomFilter.from_parquet(path, "id", fp_rate=0.01, layout="split_block",
                                      threads=0)
    else:
        bf = BloomFilter.for_capacity(rows, 0.01, layout="split_block")
        bf.insert_many(pq.read_table(path, columns=["id"]).column(0).to_pylist())
    elapsed = time.perf_counter() - started
    print(elapsed, rss("VmHWM:") - base, bf.stats()["bytes"])
""")


def _parquet_cases(session: BenchSession, ids: Any, n: int, label: str) -> None:
    """The same ids end to end from a Parquet file: from_parquet against read + to_pylist."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tempfile.TemporaryDirectory(prefix="buttress-bench-parquet-")
    session.on_close(directory.cleanup)
    path = os.path.join(directory.name, "ids.parquet")
    row_group = n // 10
    pq.write_table(pa.table({"id": ids}), path, row_group_size=row_group)

    def build() -> None:
        BloomFilter.from_parquet(path, "id", fp_rate=FP_RATE, layout="split_block")

    def today() -> None:
        bf = BloomFilter.for_capacity(n, FP_RATE, layout="split_block")
        bf.insert_many(pq.read_table(path, columns=["id"]).column(0).to_pylist())

    case = session.case("bloom", f"split_block filter from a Parquet file of {label} ids",
                        unit="key", repeats=max(3, session.repeats))
    case.add("buttress", build, items=n, note="BloomFilter.from_parquet, 32k-row batches")
    case.add("buttress threads=0", lambda: BloomFilter.from_parquet(
        path, "id", fp_rate=FP_RATE, layout="split_block", threads=0), items=n,
        note="one reader per core, row groups shared out")
    case.add("read + to_pylist + insert_many", today, items=n, note="today's path")
    case.add("read only", lambda: pq.read_table(path, columns=["id"]), items=n,
             note="pq.read_table (all cores): decoding alone")
    case.target("buttress", "read + to_pylist + insert_many", min_speedup=5)
    case.target("buttress threads=0", "read + to_pylist + insert_many", min_speedup=5)

    # Peak memory in fresh processes: the growth of the peak RSS during the build
    # (Linux: /proc/self/clear_refs resets the peak first).
    group_bytes = pq.ParquetFile(path).read_row_group(0, columns=["id"]).nbytes
    figures = []
    if not os.path.exists("/proc/self/clear_refs"):
        session.notes.append("bloom Parquet peak memory: not measured (needs Linux /proc)")
        return
    peaks = {}
    for mode in ("from_parquet", "from_parquet_threads0", "to_pylist"):
        result = subprocess.run([sys.executable, "-c", _PARQUET_CHILD, path, mode],
                                capture_output=True, text=True, timeout=600, check=True)
        _, rss, filter_bytes = result.stdout.split()
        peaks[mode] = int(rss)
        figures.append(f"{mode} {int(rss) / 2**20:.1f} MiB")
    # The bound is for the default, one reader; threads=N is documented to
    # hold N readers' row groups at once, so it is held against N of them.
    readers = min(_usable_cores(), n // row_group)
    bound = int(filter_bytes) + group_bytes
    bound_threads = int(filter_bytes) + readers * group_bytes

    def verdict(peak: int, limit: int) -> str:
        return f"{'MET' if peak <= limit else 'MISSED'} (bound {limit / 2**20:.1f} MiB)"

    session.notes.append(
        f"bloom Parquet {label} ids ({n // row_group} row groups): peak RSS growth during the "
        f"build, in a fresh process after a warm-up read, Arrow pool retention included: "
        f"{', '.join(figures)}; bound = the filter {int(filter_bytes) / 2**20:.1f} MiB + one "
        f"row group's column {group_bytes / 2**20:.1f} MiB in Arrow memory per reader: "
        f"from_parquet {verdict(peaks['from_parquet'], bound)}, threads=0 ({readers} readers) "
        f"{verdict(peaks['from_parquet_threads0'], bound_threads)} "
        f"(file {os.path.getsize(path) / 2**20:.0f} MiB)")


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
