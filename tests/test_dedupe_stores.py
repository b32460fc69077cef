"""Store-specific behaviour: SQLite locking, expiry, sweeps; Redis scripts, keys, outages."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from buttress import DedupeStatus, Deduplicator, RedisStore, SQLiteStore
from buttress.dedupe import ClaimRecord, fingerprint
from buttress.dedupe.redis_store import NEVER_MS
from buttress.errors import StoreUnavailable
from buttress.testing import RedisServer
from conftest import wait_until

HOUR_MS = 3_600_000


def no_op(msg_id: str, payload: Any) -> str:
    return msg_id


# -- SQLite -------------------------------------------------------------------------------


def test_sqlite_uses_wal_and_an_indexed_expiry_column(tmp_path):
    store = SQLiteStore(tmp_path / "d.db")
    store.close()
    conn = sqlite3.connect(tmp_path / "d.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT msg_id FROM buttress_dedupe "
                        "WHERE expires_at <= 5 LIMIT 10").fetchall()
    assert "buttress_dedupe_expires_at" in str(plan)
    conn.close()


def test_a_locked_sqlite_file_is_retried_then_reported(tmp_path):
    path = tmp_path / "d.db"
    store = SQLiteStore(path, busy_timeout=0.05, lock_retries=2)
    calls: list[str] = []
    dedupe = Deduplicator(lambda i, p: calls.append(i), store)
    # Another process takes the write lock and holds it until told to stop.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
         "conn.execute('BEGIN IMMEDIATE')\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"
         "conn.execute('ROLLBACK')\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="stayed locked"):
            dedupe.process_message("m", {})
        assert time.monotonic() - started < 10  # bounded
        assert calls == []
        assert store.stats()["lock_retries"] == 2
    finally:
        holder.communicate(b"", timeout=10)
    assert dedupe.process_message("m", {})  # the lock is gone: works again
    assert calls == ["m"]


def test_an_unusable_sqlite_path_is_store_unavailable(tmp_path):
    with pytest.raises(StoreUnavailable, match="SQLite database"):
        SQLiteStore(tmp_path / "missing-dir" / "d.db")
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StoreUnavailable, match=r"junk\.db"):
        SQLiteStore(not_a_db)


def test_expired_rows_read_as_absent_before_the_sweep_removes_them(tmp_path):
    path = tmp_path / "d.db"
    store = SQLiteStore(path, sweep_every=None)
    assert store.claim(["old"], [7], token="a", lease_ms=1, ttl_ms=1) == [1]
    wait_until(lambda: store.lookup("old") is None, 10, message="the record to expire")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM buttress_dedupe").fetchone()[0] == 1
    # A new claim treats the expired row as absent: a fresh first attempt, new payload allowed.
    assert store.claim(["old"], [8], token="b", lease_ms=HOUR_MS, ttl_ms=HOUR_MS) == [1]
    record = store.lookup("old")
    assert record is not None and record.token == "b" and record.fingerprint == 8
    conn.close()


def test_sweep_deletes_expired_rows_in_bounded_batches(tmp_path):
    path = tmp_path / "d.db"
    store = SQLiteStore(path, sweep_every=None, sweep_batch=500)
    expired = [f"old-{i}" for i in range(2_000)]
    live = [f"live-{i}" for i in range(300)]
    store.claim(expired, list(range(len(expired))), token="a", lease_ms=1, ttl_ms=1)
    store.claim(live, list(range(len(live))), token="b", lease_ms=HOUR_MS, ttl_ms=HOUR_MS)
    wait_until(lambda: store.lookup(expired[-1]) is None, 10, message="rows to expire")
    # A budget too small for more than one batch deletes exactly one batch.
    assert store.sweep(budget=1e-9) == 500
    assert store.sweep(budget=5.0) == 1_500
    assert store.sweep(budget=5.0) == 0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM buttress_dedupe").fetchone()[0] == len(live)
    conn.close()
    assert store.stats()["swept"] == 2_000
    with pytest.raises(ValueError, match="budget"):
        store.sweep(budget=0)


def test_the_store_sweeps_by_itself_every_sweep_every_seconds(tmp_path):
    path = tmp_path / "d.db"
    store = SQLiteStore(path, sweep_every=0.05)
    store.claim([f"old-{i}" for i in range(100)], [1] * 100, token="a", lease_ms=1, ttl_ms=1)
    conn = sqlite3.connect(path)

    def rows() -> int:
        return int(conn.execute("SELECT count(*) FROM buttress_dedupe").fetchone()[0])

    counter = iter(range(10_000))

    def claim_and_check() -> bool:  # sweeps happen after claims
        store.claim([f"new-{next(counter)}"], [1], token="b", lease_ms=HOUR_MS, ttl_ms=HOUR_MS)
        return store.stats()["swept"] == 100

    wait_until(claim_and_check, 10, interval=0.02, message="an automatic sweep")
    assert rows() < 100
    conn.close()


@pytest.mark.slow
def test_only_the_elected_instance_sweeps(tmp_path, redis_client, unique_name):
    """The docs' pattern: stores without automatic sweeps, a sweeper gated by leadership."""
    from buttress import LeaderElection, LeaderElector

    path = tmp_path / "d.db"
    # Ten rows per sweep call, so two ungated sweepers would both delete some.
    stores = [SQLiteStore(path, sweep_every=None, sweep_batch=10) for _ in range(2)]
    stop = threading.Event()
    electors, threads, terms = [], [], []
    for n, store in enumerate(stores):
        leading = threading.Event()

        def sweeper(store: SQLiteStore = store, leading: threading.Event = leading) -> None:
            while not stop.is_set():
                if leading.wait(0.02):
                    store.sweep(budget=1e-9)  # one batch per call
                    stop.wait(0.01)

        threads.append(threading.Thread(target=sweeper, daemon=True))
        threads[-1].start()
        # A short ttl: a new election waits one ttl before anyone may win.
        election = LeaderElection(redis_client, unique_name, ttl_ms=1_000)
        electors.append(LeaderElector(election, f"pod-{n}",
                                      on_elected=lambda token, gate=leading: (
                                          terms.append(token), gate.set()),
                                      on_lost=lambda _token, gate=leading: gate.clear()))
        electors[-1].start()
    try:
        wait_until(lambda: terms, 30, message="an instance to be elected")
        stores[0].claim([f"old-{i}" for i in range(200)], [1] * 200, token="a", lease_ms=1,
                        ttl_ms=1)
        wait_until(lambda: sum(s.stats()["swept"] for s in stores) == 200, 30,
                   message="the leader to sweep the expired rows")
    finally:
        stop.set()
        for elector in electors:
            elector.stop()
        for thread in threads:
            thread.join(5)
    swept = sorted(s.stats()["swept"] for s in stores)
    if len(terms) == 1:  # one term (leadership may move on a badly loaded machine)
        assert swept == [0, 200]  # one instance swept it all


def _claim_in_child(store: SQLiteStore, queue: Any) -> None:
    queue.put(store.claim(["child"], [1], token="c", lease_ms=HOUR_MS, ttl_ms=HOUR_MS))


def test_a_forked_child_reopens_its_own_connection(tmp_path):
    store = SQLiteStore(tmp_path / "d.db")
    assert store.claim(["parent"], [1], token="p", lease_ms=HOUR_MS, ttl_ms=HOUR_MS) == [1]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_claim_in_child, args=(store, queue))
    child.start()
    assert queue.get(timeout=30) == [1]
    child.join(30)
    assert child.exitcode == 0
    record = store.lookup("child")  # the parent's connection still works and sees it
    assert record is not None and record.token == "c"


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"table": "x; DROP TABLE y"}, ValueError),
    ({"busy_timeout": -1}, ValueError),
    ({"lock_retries": -1}, ValueError),
    ({"lock_retries": 1.5}, TypeError),  # wrong type: TypeError (buttress._validate)
    ({"busy_timeout": "5"}, TypeError),
    ({"sweep_batch": True}, TypeError),
    ({"sweep_every": 0}, ValueError),
    ({"sweep_budget": 0}, ValueError),
    ({"sweep_batch": 0}, ValueError),
    ({"synchronous": "SOMETIMES"}, ValueError),
])
def test_bad_sqlite_settings_are_refused(tmp_path, kwargs, error):
    with pytest.raises(error):
        SQLiteStore(tmp_path / "d.db", **kwargs)
    with pytest.raises(TypeError, match="path"):
        SQLiteStore(42)  # type: ignore[arg-type]


def test_sqlite_paths_follow_the_one_path_rule(tmp_path):
    """require_path's rule: str or PathLike of str; bytes is a TypeError, "" a ValueError."""
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike path"):
        SQLiteStore(str(tmp_path / "b.db").encode())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path must not be empty"):
        SQLiteStore("")
    store = SQLiteStore(tmp_path / "p.db", sweep_every=None)  # a Path is kept as its str
    assert store.path == str(tmp_path / "p.db")
    store.close()
    memory = SQLiteStore(":memory:", sweep_every=None)  # one process's private store
    dedupe = Deduplicator(lambda msg_id, payload: msg_id, memory)
    assert dedupe.process_message("m", 1).status is DedupeStatus.PROCESSED
    assert dedupe.process_message("m", 1).status is DedupeStatus.DUPLICATE
    memory.close()


# -- Redis -------------------------------------------------------------------------------


def test_redis_keys_share_one_hash_tag_and_expire_natively(redis_client, unique_name):
    store = RedisStore(redis_client, namespace=unique_name)
    dedupe = Deduplicator(no_op, store, ttl=60, mode="effectively_once", lease=5)
    dedupe.process_batch([("a", 1), ("b", 2)])
    keys = sorted(redis_client.keys(f"{{{unique_name}}}:*"))
    assert keys == [f"{{{unique_name}}}:a".encode(), f"{{{unique_name}}}:b".encode()]
    # Done records live for the retention TTL, set by Redis itself.
    assert 55_000 < redis_client.pttl(keys[0]) <= 60_000
    # A claim that is never completed lives for the TTL too, not forever.
    store.claim(["c"], [1], token="t", lease_ms=5_000, ttl_ms=60_000)
    assert 55_000 < redis_client.pttl(f"{{{unique_name}}}:c") <= 60_000


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_single_at_most_once_claim_is_one_bare_set_nx(redis_client, unique_name, partitions):
    store = RedisStore(redis_client, namespace=unique_name, partitions=partitions)
    dedupe = Deduplicator(no_op, store, ttl=60)
    assert dedupe.process_message("a", {"n": 1})
    assert store.stats()["set_claims"] == 1 and store.stats()["script_calls"] == 0
    record = dedupe.lookup("a")
    assert record is not None and record.state == "claimed" and record.attempt == 1
    assert record.lease_until_ms == NEVER_MS  # outlives the record: no clock involved
    assert 55_000 < redis_client.pttl(store.key("a")) <= 60_000
    # The key exists: SET NX fails and the claim script reads the record.
    assert dedupe.process_message("a", {"n": 1}).status is DedupeStatus.DUPLICATE
    assert dedupe.process_message("a", {"n": 2}).status is DedupeStatus.CONFLICT
    assert store.stats()["set_claims"] == 3 and store.stats()["script_calls"] == 2
    # The batch script writes the same record, and the single path reads it.
    dedupe.process_batch([("b", 1), ("c", 2)])
    assert dedupe.lookup("b") == ClaimRecord("b", "claimed", 1, fingerprint(1),
                                             dedupe.lookup("c").token, NEVER_MS)
    assert dedupe.process_message("b", 1).status is DedupeStatus.DUPLICATE
    # An effectively_once consumer on the same records sees a lease that never lapses.
    leased = Deduplicator(no_op, store, ttl=60, mode="effectively_once", lease=1)
    assert leased.process_message("a", {"n": 1}).status is DedupeStatus.IN_PROGRESS


def test_redis_partitions_spread_keys_over_hash_tags(redis_client, unique_name):
    store = RedisStore(redis_client, namespace=unique_name, partitions=4)
    dedupe = Deduplicator(no_op, store, ttl=60, mode="effectively_once")
    ids = [f"m-{i}" for i in range(200)]
    results = dedupe.process_batch([(i, {}) for i in ids])
    assert all(results)
    tags = {key.decode().split("}")[0] for key in redis_client.keys(f"{{{unique_name}:*")}
    assert len(tags) == 4
    # One claim and one done call per partition touched.
    assert store.stats()["script_calls"] == 8
    again = dedupe.process_batch([(i, {}) for i in ids])
    assert {r.status for r in again} == {DedupeStatus.DUPLICATE}


def test_redis_scripts_are_reloaded_after_a_script_flush(redis_client, unique_name):
    dedupe = Deduplicator(no_op, RedisStore(redis_client, namespace=unique_name), ttl=60,
                          mode="effectively_once")
    assert dedupe.process_message("a", {})
    redis_client.script_flush()
    assert dedupe.process_message("b", {})  # EVALSHA -> NOSCRIPT -> load -> retry
    assert dedupe.process_message("a", {}).status is DedupeStatus.DUPLICATE


def test_redis_store_works_with_decoded_responses(redis_url, unique_name):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client, namespace=unique_name)
    dedupe = Deduplicator(no_op, store, ttl=60, mode="effectively_once")
    assert dedupe.process_batch([("a", 1), ("b", 1)])[1]
    assert dedupe.process_message("a", 2).status is DedupeStatus.CONFLICT
    record = dedupe.lookup("a")
    assert record is not None and record.state == "done"
    store.close()


@pytest.mark.slow
def test_a_redis_outage_is_store_unavailable_and_recovery_needs_nothing(unique_name):
    calls: list[str] = []
    with RedisServer() as server:
        store = RedisStore.from_url(server.url, namespace=unique_name)
        dedupe = Deduplicator(lambda i, p: calls.append(i), store, ttl=60,
                              mode="effectively_once")
        assert dedupe.process_message("before", {})
        server.stop()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            dedupe.process_message("during", {})
        with pytest.raises(StoreUnavailable):
            dedupe.process_batch([("during", {}), ("also", {})])
        server.start()  # no persistence: it comes back empty, without our scripts
        assert dedupe.process_message("after", {})
        store.close()
    assert calls == ["before", "after"]


@pytest.mark.slow
def test_claims_survive_a_redis_restart_with_aof_and_vanish_without(unique_name):
    """Durability is Redis's: with appendfsync always a SIGKILL loses nothing; without, all."""
    ids = [f"m-{i}" for i in range(50)]
    for config, survives in [({"appendonly": "yes", "appendfsync": "always"}, True), ({}, False)]:
        with RedisServer(persistence=bool(config), config=config) as server:
            store = RedisStore.from_url(server.url, namespace=unique_name)
            dedupe = Deduplicator(no_op, store, ttl=600, mode="effectively_once")
            assert all(dedupe.process_batch([(i, {}) for i in ids]))
            server.restart()  # SIGKILL and start again on the same port
            again = dedupe.process_batch([(i, {}) for i in ids])
            expected = DedupeStatus.DUPLICATE if survives else DedupeStatus.PROCESSED
            assert {r.status for r in again} == {expected}
            store.close()


@pytest.mark.slow
def test_redis_lost_between_handler_and_done_write_raises_after_the_handler(unique_name):
    """effectively_once: the handler ran but nothing recorded it; the caller must not ack."""
    with RedisServer() as server:
        calls: list[str] = []

        def handler_that_outlives_redis(msg_id: str, payload: Any) -> None:
            calls.append(msg_id)
            server.stop()

        store = RedisStore.from_url(server.url, namespace=unique_name)
        dedupe = Deduplicator(handler_that_outlives_redis, store, ttl=60,
                              mode="effectively_once")
        with pytest.raises(StoreUnavailable):
            dedupe.process_message("m", {})
        assert calls == ["m"]
        store.close()


@pytest.mark.parametrize(("namespace", "partitions", "error"), [
    ("", 1, ValueError), ("a{b}", 1, ValueError), ("ok", 0, ValueError),
    ("ok", True, TypeError), ("ok", "2", TypeError), (5, 1, TypeError),
])
def test_bad_redis_settings_are_refused(redis_client, namespace, partitions, error):
    with pytest.raises(error):
        RedisStore(redis_client, namespace=namespace, partitions=partitions)
    with pytest.raises(TypeError, match="client"):
        RedisStore(object())


def test_store_reprs_name_where_they_are(tmp_path, redis_client):
    assert "d.db" in repr(SQLiteStore(tmp_path / "d.db"))
    assert "partitions=1" in repr(RedisStore(redis_client))
    assert Path(SQLiteStore(tmp_path / "d.db").path).name == "d.db"


# -- resends: a second copy of a call, same owner token ---------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_second_copy_of_a_call_finds_its_own_token(tmp_path, redis_url, unique_name, kind):
    """What a resent command meets: the record its first copy wrote, under its own token."""
    store = SQLiteStore(tmp_path / "d.db") if kind == "sqlite" \
        else RedisStore.from_url(redis_url, namespace=unique_name)
    fps = [fingerprint("a"), fingerprint("b")]
    lease = {"lease_ms": 30_000, "ttl_ms": 60_000}
    assert store.claim(["a", "b"], fps, token="T1", **lease) == [1, 1]
    assert store.claim(["a", "b"], fps, token="T1", **lease) == [1, 1]  # ours, not in progress
    assert store.claim(["a", "b"], fps, token="T2", **lease) == [-1, -1]  # someone else's
    assert store.complete(["a"], [1], token="T1", ttl_ms=60_000) == [True]
    assert store.complete(["a"], [1], token="T1", ttl_ms=60_000) == [True]  # not fenced
    assert store.claim(["a"], fps[:1], token="T1", **lease) == [0]  # done is done
    assert store.release(["b"], [1], token="T1") == [True]
    assert store.release(["b"], [1], token="T1") == [True]
    assert store.claim(["b"], fps[1:], token="T3", **lease) == [2]  # released: taken over
    # A single at_most_once claim (SET NX PX on Redis), sent twice.
    forever = {"lease_ms": 120_000, "ttl_ms": 60_000}
    assert store.claim(["c"], [fingerprint("c")], token="T4", **forever) == [1]
    assert store.claim(["c"], [fingerprint("c")], token="T4", **forever) == [1]
    assert store.claim(["c"], [fingerprint("c")], token="T5", **forever) == [-1]
    store.close()
