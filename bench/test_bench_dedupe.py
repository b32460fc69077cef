"""Dedupe: the Deduplicator against the bare store operations it replaces (pytest-benchmark).

Mirrors ``python -m buttress bench --only dedupe`` (which prints the ratios and
judges the targets): Redis ``process_batch`` vs a redis-py pipeline of SET NX PX,
one ``process_message`` vs one SET NX PX, SQLite ``process_batch`` vs a raw
``executemany`` of INSERT OR IGNORE in one transaction.  Fresh ids every round.
"""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from buttress import Deduplicator, RedisStore, SQLiteStore
from buttress.bench.dedupe import insert_or_ignore
from buttress.testing import redis_url

BATCH = 1_000
TTL = 300.0
_fresh = itertools.count()


def messages(count: int) -> list[tuple[str, dict[str, Any]]]:
    base = next(_fresh)
    return [(f"order-{base}-{i}", {"order": i, "amount": 12.5, "currency": "EUR"})
            for i in range(count)]


def no_op(msg_id: str, payload: Any) -> None:
    return None


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    redis = pytest.importorskip("redis")
    with redis_url() as url:
        connection = redis.Redis.from_url(url)
        yield connection
        connection.close()


@pytest.fixture(scope="module")
def namespace() -> str:
    return f"bench:dedupe:{uuid.uuid4().hex[:8]}"


@pytest.mark.benchmark(group="dedupe redis batch 5k")
def test_redis_process_batch(benchmark, client, namespace):
    dedupe = Deduplicator(no_op, RedisStore(client, namespace=namespace), ttl=TTL)
    benchmark.pedantic(dedupe.process_batch, setup=lambda: ((messages(BATCH),), {}), rounds=5)


@pytest.mark.benchmark(group="dedupe redis batch 5k")
def test_redis_pipeline_set_nx_px(benchmark, client, namespace):
    def pipeline(msgs: list[tuple[str, Any]]) -> None:
        pipe = client.pipeline(transaction=False)
        for msg_id, _ in msgs:
            pipe.set(f"{namespace}:pipe:{msg_id}", "1", nx=True, px=int(TTL * 1000))
        pipe.execute()

    benchmark.pedantic(pipeline, setup=lambda: ((messages(BATCH),), {}), rounds=5)


@pytest.mark.benchmark(group="dedupe redis one message")
def test_redis_process_message(benchmark, client, namespace):
    dedupe = Deduplicator(no_op, RedisStore(client, namespace=namespace), ttl=TTL)
    ids = (f"single-{i}" for i in itertools.count())
    payload = {"order": 1, "amount": 12.5, "currency": "EUR"}
    benchmark(lambda: dedupe.process_message(next(ids), payload))


@pytest.mark.benchmark(group="dedupe redis one message")
def test_redis_bare_set_nx_px(benchmark, client, namespace):
    ids = (f"{namespace}:bare:{i}" for i in itertools.count())
    benchmark(lambda: client.set(next(ids), "1", nx=True, px=int(TTL * 1000)))


@pytest.mark.benchmark(group="dedupe sqlite batch 5k")
def test_sqlite_process_batch(benchmark, tmp_path):
    files = itertools.count()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        store = SQLiteStore(tmp_path / f"{next(files)}.db", sweep_every=None)
        return (Deduplicator(no_op, store, ttl=TTL), messages(BATCH)), {}

    benchmark.pedantic(lambda dedupe, msgs: dedupe.process_batch(msgs), setup=setup, rounds=5)


@pytest.mark.benchmark(group="dedupe sqlite batch 5k")
def test_sqlite_raw_executemany_insert_or_ignore(benchmark, tmp_path):
    files = itertools.count()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        path = tmp_path / f"{next(files)}.db"
        SQLiteStore(path, sweep_every=None).close()  # the same table and index
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return (conn, messages(BATCH)), {}

    benchmark.pedantic(insert_or_ignore, setup=setup, rounds=5)
