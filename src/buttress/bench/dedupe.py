"""Dedupe suite: the Deduplicator against the bare store operations it is built on.

Side by side on the same Redis and the same disk, fresh ids every repeat:

- Redis ``process_batch`` against a plain redis-py pipeline of ``SET NX PX`` for
  the same ids (the usual hand-rolled dedupe); target: at least 2x throughput.
- one ``process_message`` against one bare ``SET NX PX`` round trip; target:
  at most 1.3x the time (at_most_once is one round trip; effectively_once is
  two, claim and done, and is shown for comparison).
- SQLite ``process_batch`` against a raw ``executemany`` of ``INSERT OR IGNORE``
  in one transaction, into the same table shape with the same PRAGMAs; target:
  within 1.5x.

The Deduplicator's figures include everything it does per message: id
checks, the payload fingerprint (canonical JSON + XXH64), the claim, a no-op
handler call and the result objects.  A "store.claim alone" row shows the
store's share: the same claim call with ids and fingerprints precomputed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from typing import Any

from buttress.bench import BenchSession
from buttress.dedupe import DedupeStore, Deduplicator, RedisStore, SQLiteStore, fingerprint

ORDER = 40

PIPELINE = "redis-py pipeline SET NX PX"
BARE_SET = "one SET NX PX round trip"
RAW_INSERT = "executemany INSERT OR IGNORE, 1 txn"
EFFECTIVELY_ONCE = "buttress effectively_once"
CLAIM_ALONE = "store.claim alone"
TTL = 300.0  # seconds: every key the suite writes expires by itself


def _no_op(msg_id: str, payload: Any) -> None:
    return None


def insert_or_ignore(conn: sqlite3.Connection, msgs: list[tuple[str, Any]]) -> None:
    """The baseline: the ids into the store's table, one executemany, one transaction."""
    expires_at = int((time.time() + TTL) * 1000)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT OR IGNORE INTO buttress_dedupe (msg_id, state, fingerprint, token, attempt, "
        "lease_until, expires_at) VALUES (?, 0, 0, '', 1, ?, ?)",
        [(msg_id, expires_at, expires_at) for msg_id, _ in msgs])
    conn.execute("COMMIT")


def _claim_inputs(messages: Any, count: int) -> Any:
    """Setup for a bare ``store.claim``: fresh ids and their fingerprints (untimed)."""
    def setup() -> tuple[list[str], list[int]]:
        msgs = messages(count)
        return [msg_id for msg_id, _ in msgs], [fingerprint(payload) for _, payload in msgs]
    return setup


def _claim_alone(store: DedupeStore) -> Any:
    """The store's share of process_batch: one claim call, no fingerprints, no handler."""
    def work(prepared: tuple[list[str], list[int]]) -> None:
        ids, fingerprints = prepared
        store.claim(ids, fingerprints, token=uuid.uuid4().hex[:16], lease_ms=int(TTL * 2000),
                    ttl_ms=int(TTL * 1000))
    return work


def register(session: BenchSession) -> None:
    batch = 5_000 if session.quick else 20_000
    singles = 1_000 if session.quick else 3_000
    run = uuid.uuid4().hex[:8]
    fresh = itertools.count()

    def messages(count: int) -> list[tuple[str, dict[str, Any]]]:
        """``count`` never-seen ids with small order-like payloads (untimed setup)."""
        base = next(fresh)
        return [(f"order-{base}-{i}", {"order": i, "amount": 12.5, "currency": "EUR"})
                for i in range(count)]

    redis = session.peer("redis")
    url, reason = None, "redis-py is not installed (the redis extra)"
    if redis is not None:
        try:
            url = session.redis_url()
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            reason = f"no Redis to run against: {exc}"
    if redis is None or url is None:
        for name in ("Redis process_batch", "Redis process_message"):
            session.case("dedupe", name, unit="msg").skip("buttress", reason)
    else:
        _redis_cases(session, redis.Redis.from_url(url), run, batch, singles, messages)
    _sqlite_case(session, batch, messages)


def _redis_cases(session: BenchSession, client: Any, run: str, batch: int, singles: int,
                 messages: Any) -> None:
    store = RedisStore(client, namespace=f"bench:dedupe:{run}")
    at_most_once = Deduplicator(_no_op, store, ttl=TTL)
    effectively_once = Deduplicator(_no_op, store, ttl=TTL, mode="effectively_once", lease=30)
    ttl_ms = int(TTL * 1000)

    def pipeline(msgs: list[tuple[str, Any]]) -> None:
        pipe = client.pipeline(transaction=False)
        for msg_id, _ in msgs:
            pipe.set(f"bench:pipe:{run}:{msg_id}", "1", nx=True, px=ttl_ms)
        pipe.execute()

    case = session.case("dedupe", f"Redis process_batch, {batch:,} new ids", unit="msg")
    case.add("buttress", at_most_once.process_batch, items=batch,
             setup=lambda: messages(batch), note="at_most_once")
    case.add(EFFECTIVELY_ONCE, effectively_once.process_batch, items=batch,
             setup=lambda: messages(batch), note="claim + done: 2 script calls")
    case.add(PIPELINE, pipeline, items=batch, setup=lambda: messages(batch))
    case.add(CLAIM_ALONE, _claim_alone(store), items=batch,
             setup=_claim_inputs(messages, batch), note="ids, fingerprints precomputed")
    case.target("buttress", PIPELINE, min_speedup=2.0)
    case.target(EFFECTIVELY_ONCE, PIPELINE, min_speedup=2.0)

    def one_by_one(dedupe: Deduplicator) -> Any:
        def work(msgs: list[tuple[str, Any]]) -> None:
            process = dedupe.process_message
            for msg_id, payload in msgs:
                process(msg_id, payload)
        return work

    def bare_sets(msgs: list[tuple[str, Any]]) -> None:
        set_ = client.set
        for msg_id, _ in msgs:
            set_(f"bench:bare:{run}:{msg_id}", "1", nx=True, px=ttl_ms)

    case = session.case("dedupe", "Redis process_message, one message", unit="msg")
    case.add("buttress", one_by_one(at_most_once), items=singles,
             setup=lambda: messages(singles), note="at_most_once")
    case.add(EFFECTIVELY_ONCE, one_by_one(effectively_once), items=singles,
             setup=lambda: messages(singles), note="2 round trips")
    case.add(BARE_SET, bare_sets, items=singles, setup=lambda: messages(singles))
    case.target("buttress", BARE_SET, max_ratio=1.3)


def _sqlite_case(session: BenchSession, batch: int, messages: Any) -> None:
    directory = tempfile.mkdtemp(prefix="buttress-bench-dedupe-")
    session._stack.callback(shutil.rmtree, directory, True)
    files = itertools.count()

    def new_path() -> str:
        return os.path.join(directory, f"{next(files)}.db")

    def dedupe_setup(mode: str) -> Any:
        def setup() -> tuple[Deduplicator, list[tuple[str, Any]]]:
            store = SQLiteStore(new_path(), sweep_every=None)
            return Deduplicator(_no_op, store, ttl=TTL, mode=mode), messages(batch)
        return setup

    def process(prepared: tuple[Deduplicator, list[tuple[str, Any]]]) -> None:
        dedupe, msgs = prepared
        dedupe.process_batch(msgs)
        dedupe.store.close()

    def raw_setup() -> tuple[sqlite3.Connection, list[tuple[str, Any]]]:
        # The same table, index and PRAGMAs the store uses; only the ids go in.
        store = SQLiteStore(new_path(), sweep_every=None)
        store.close()
        conn = sqlite3.connect(store.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn, messages(batch)

    def raw_insert(prepared: tuple[sqlite3.Connection, list[tuple[str, Any]]]) -> None:
        conn, msgs = prepared
        insert_or_ignore(conn, msgs)
        conn.close()

    case = session.case("dedupe", f"SQLite process_batch, {batch:,} new ids", unit="msg")
    case.add("buttress", process, items=batch, setup=dedupe_setup("at_most_once"),
             note="at_most_once")
    case.add(EFFECTIVELY_ONCE, process, items=batch, setup=dedupe_setup("effectively_once"),
             note="claim + done: 2 transactions")
    case.add(RAW_INSERT, raw_insert, items=batch, setup=raw_setup)

    def claim_setup() -> tuple[SQLiteStore, list[str], list[int]]:
        return (SQLiteStore(new_path(), sweep_every=None), *_claim_inputs(messages, batch)())

    def claim_alone(prepared: tuple[SQLiteStore, list[str], list[int]]) -> None:
        store, ids, fingerprints = prepared
        _claim_alone(store)((ids, fingerprints))
        store.close()

    case.add(CLAIM_ALONE, claim_alone, items=batch, setup=claim_setup,
             note="ids, fingerprints precomputed")
    case.target("buttress", RAW_INSERT, max_ratio=1.5)
