"""Hashing suite: native XXH64 against its pure-Python twin and a loop over ``xxhash``."""

from __future__ import annotations

from typing import Any

import numpy as np

from buttress import _hash
from buttress.bench import BenchSession
from buttress.reference import hashing as reference

ORDER = 10

LOOP = "loop: xxhash.xxh64_intdigest"


def register(session: BenchSession) -> None:
    import xxhash

    rng = np.random.default_rng(0)
    n = 1_000_000  # the target is stated at 1M keys; quick mode keeps it, it is fast
    ints = rng.integers(0, 2**63, size=n, dtype=np.int64).view(np.uint64)
    encoded = [k.to_bytes(8, "little") for k in ints.tolist()]
    digest = xxhash.xxh64_intdigest
    # Each case takes well under a second, so more repeats cost little and keep
    # the median clear of one-off page faults and neighbours' bursts.
    repeats = max(session.repeats, 9)

    case = session.case("hash", f"xxh64_many, {n:,} uint64 keys", unit="key", repeats=repeats)
    case.add("buttress", lambda: _hash.xxh64_many(ints), items=n)
    # The loop gets pre-encoded bytes: the fairest (fastest) form for it.
    case.add(LOOP, lambda: [digest(k) for k in encoded], items=n, note="pre-encoded bytes")
    small = ints[: n // 10]
    case.add("reference", lambda: reference.xxh64_many(small), items=len(small))
    case.target("buttress", LOOP, min_speedup=20)

    words = [f"user:{i}:session" for i in range(n // 4)]
    case = session.case(
        "hash", f"xxh64_many, {len(words):,} str keys", unit="key", repeats=repeats
    )
    case.add("buttress", lambda: _hash.xxh64_many(words), items=len(words))
    case.add(LOOP, lambda: [digest(w.encode()) for w in words], items=len(words))
    case.add("reference", lambda: reference.xxh64_many(words), items=len(words))

    _arrow_case(session, repeats)

    blob = rng.bytes(1 << 20)
    case = session.case("hash", "xxh64 of one 1 MiB buffer", unit="MiB", repeats=repeats)
    case.add("buttress", lambda: _hash.xxh64(blob), items=1)
    case.add("xxhash (C library)", lambda: digest(blob), items=1)

    key: Any = "user:42:session"
    case = session.case("hash", "hash_key of one str key, in a loop", unit="call", repeats=repeats)
    calls = 200_000
    case.add("buttress", lambda: [_hash.hash_key(key) for _ in range(calls)], items=calls)
    case.add("reference", lambda: [reference.hash_key(key) for _ in range(calls)], items=calls)


def _arrow_case(session: BenchSession, repeats: int) -> None:
    """xxh64_many over an Arrow string column against the same ids as a list of str."""
    try:
        import pyarrow as pa
    except ImportError:
        session.notes.append("hashing: the Arrow case is skipped, pyarrow is not installed")
        return
    n = 1_000_000
    ids = [f"user:{i:08d}" for i in range(n)]
    column = pa.array(ids, type=pa.string())
    view = pa.array(ids, type=pa.string_view())
    case = session.case("hash", f"xxh64_many, {n:,} str ids as an Arrow column", unit="key",
                        repeats=repeats)
    case.add("buttress", lambda: _hash.xxh64_many(column), items=n, note="pyarrow string")
    case.add("buttress string_view", lambda: _hash.xxh64_many(view), items=n)
    case.add("buttress list of str", lambda: _hash.xxh64_many(ids), items=n)
    case.target("buttress", "buttress list of str", min_speedup=1.0)
