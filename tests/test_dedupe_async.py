"""AsyncDeduplicator: the same answers as Deduplicator, on the same records, on an event loop.

Real Redis (redis.asyncio) and real SQLite files.  A sync and an async
consumer share one store in every interop test; the process-level races with
async consumers are in test_dedupe_processes.py, the fault tests in
test_dedupe_faults.py.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
import redis
import redis.asyncio

from buttress import (
    AsyncDeduplicator,
    AsyncRedisStore,
    AsyncSQLiteStore,
    DedupeStatus,
    Deduplicator,
    RedisStore,
    SQLiteStore,
)

MODES = ["at_most_once", "effectively_once"]


class Stores:
    """A sync and an async store on the same backing data (one namespace or one file)."""

    def __init__(self, kind: str, where: str, redis_url: str) -> None:
        self.kind, self.where, self.redis_url = kind, where, redis_url

    def sync(self) -> Any:
        if self.kind == "sqlite":
            return SQLiteStore(self.where)
        return RedisStore.from_url(self.redis_url, namespace=self.where)

    def async_(self) -> Any:
        if self.kind == "sqlite":
            return AsyncSQLiteStore(self.where)
        return AsyncRedisStore.from_url(self.redis_url, namespace=self.where)


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Any, unique_name: str,
           redis_url: str) -> Stores:
    where = str(tmp_path / "d.db") if request.param == "sqlite" else unique_name
    return Stores(request.param, where, redis_url)


def statuses(results: list[Any]) -> list[str]:
    return [r.status.value for r in results]


@pytest.mark.parametrize("mode", MODES)
def test_a_sync_and_an_async_consumer_share_one_store(stores, mode):
    calls: list[tuple[str, str]] = []

    def sync_handler(msg_id: str, payload: Any) -> str:
        calls.append(("sync", msg_id))
        return msg_id

    async def async_handler(msg_id: str, payload: Any) -> str:
        await asyncio.sleep(0)
        calls.append(("async", msg_id))
        return msg_id

    sync_store = stores.sync()
    sync = Deduplicator(sync_handler, sync_store, mode=mode, ttl=60)

    async def scenario() -> None:
        store = stores.async_()
        dedupe = AsyncDeduplicator(async_handler, store, mode=mode, ttl=60)
        first = await dedupe.process_batch([(f"a{i}", i) for i in range(10)])
        assert statuses(first) == ["processed"] * 10 and first[0].value == "a0"
        assert statuses(sync.process_batch([(f"a{i}", i) for i in range(10)])) == \
            ["duplicate"] * 10
        assert statuses(sync.process_batch([(f"s{i}", i) for i in range(5)])) == \
            ["processed"] * 5
        again = await dedupe.process_batch([(f"s{i}", i) for i in range(5)] + [("n", 0)])
        assert statuses(again) == ["duplicate"] * 5 + ["processed"]
        assert (await dedupe.process_message("s0", 99)).status is DedupeStatus.CONFLICT
        record = await dedupe.lookup("a3")
        assert record == sync.lookup("a3")  # one record format
        assert record is not None and record.state == ("done" if mode == "effectively_once"
                                                       else "claimed")
        await store.close()

    asyncio.run(scenario())
    sync_store.close()
    assert sorted(calls) == sorted([("async", f"a{i}") for i in range(10)] + [("async", "n")]
                                   + [("sync", f"s{i}") for i in range(5)])


def test_a_live_async_lease_holds_a_sync_consumer_off_and_the_reverse(stores):
    sync_store = stores.sync()
    sync = Deduplicator(lambda m, p: m, sync_store, mode="effectively_once", ttl=60, lease=30)

    async def scenario() -> None:
        store = stores.async_()
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(msg_id: str, payload: Any) -> str:
            entered.set()
            await release.wait()
            return msg_id

        dedupe = AsyncDeduplicator(slow, store, mode="effectively_once", ttl=60, lease=30)
        task = asyncio.create_task(dedupe.process_message("m", 1))
        await entered.wait()
        # The sync consumer meets the async one's live lease (SQLite on a thread: fine).
        seen = await asyncio.to_thread(sync.process_message, "m", 1)
        assert seen.status is DedupeStatus.IN_PROGRESS
        release.set()
        assert (await task).status is DedupeStatus.PROCESSED
        assert (await asyncio.to_thread(sync.process_message, "m", 1)).status is \
            DedupeStatus.DUPLICATE
        await store.close()

    asyncio.run(scenario())
    sync_store.close()


@pytest.mark.parametrize("mode", MODES)
def test_any_delivery_stream_gets_the_same_answers_as_the_sync_class(tmp_path, redis_url,
                                                                      unique_name, mode):
    """One seeded stream of deliveries (repeats, conflicts, failures) through both classes."""
    rng = random.Random(7)
    stream = [[(f"m{rng.randrange(30)}", rng.randrange(2)) for _ in range(rng.randrange(1, 8))]
              for _ in range(40)]
    failing = {"m3", "m11"}

    def handler(msg_id: str, payload: Any) -> str:
        if msg_id in failing:
            raise RuntimeError(msg_id)
        return msg_id

    for kind in ("sqlite", "redis"):
        sync_stores = Stores(kind, str(tmp_path / f"s-{mode}.db") if kind == "sqlite"
                             else f"{unique_name}:s", redis_url)
        async_stores = Stores(kind, str(tmp_path / f"a-{mode}.db") if kind == "sqlite"
                              else f"{unique_name}:a", redis_url)
        sync_store = sync_stores.sync()
        sync = Deduplicator(handler, sync_store, mode=mode, ttl=60)
        expected = [statuses(sync.process_batch(batch)) if len(batch) > 1
                    else [sync.process_message(*batch[0]).status.value] for batch in stream]
        sync_store.close()

        async def run(async_stores: Stores = async_stores,
                      sync: Deduplicator = sync) -> list[list[str]]:
            store = async_stores.async_()
            dedupe = AsyncDeduplicator(handler, store, mode=mode, ttl=60)
            out = [statuses(await dedupe.process_batch(batch)) if len(batch) > 1
                   else [(await dedupe.process_message(*batch[0])).status.value]
                   for batch in stream]
            counts = dedupe.stats()
            await store.close()
            assert {k: v for k, v in counts.items() if k != "store"} == \
                {k: v for k, v in sync.stats().items() if k != "store"}
            return out

        assert asyncio.run(run()) == expected, kind


def test_a_failed_async_handler_is_released_and_a_late_owner_is_fenced(redis_url,
                                                                       unique_name):
    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, namespace=unique_name)
        failures = {"f"}

        async def handler(msg_id: str, payload: Any) -> str:
            if msg_id in failures:
                failures.discard(msg_id)
                raise RuntimeError("boom")
            return msg_id

        dedupe = AsyncDeduplicator(handler, store, mode="effectively_once", ttl=60, lease=0.05)
        first = await dedupe.process_message("f", 1)
        assert first.status is DedupeStatus.FAILED and isinstance(first.error, RuntimeError)
        retried = await dedupe.process_message("f", 1)
        assert retried.status is DedupeStatus.PROCESSED and retried.attempt == 2

        other = AsyncDeduplicator(handler, AsyncRedisStore.from_url(
            redis_url, namespace=unique_name), mode="effectively_once", ttl=60, lease=0.05)

        async def slow(msg_id: str, payload: Any) -> str:
            await asyncio.sleep(0.3)  # outlives its 50 ms lease
            return msg_id

        late = AsyncDeduplicator(slow, store, mode="effectively_once", ttl=60, lease=0.05)
        task = asyncio.create_task(late.process_message("x", 1))
        await asyncio.sleep(0.15)
        assert (await other.process_message("x", 1)).attempt == 2  # took over
        result = await task
        assert result.status is DedupeStatus.PROCESSED and result.fenced
        assert late.stats()["fenced"] == 1
        await other.store.close()
        await store.close()

    asyncio.run(scenario())


def test_async_sqlite_store_runs_on_its_own_thread_and_wraps_a_sync_store(tmp_path):
    sync_store = SQLiteStore(tmp_path / "d.db")

    async def scenario() -> None:
        store = AsyncSQLiteStore(store=sync_store)
        dedupe = AsyncDeduplicator(lambda m, p: m, store, ttl=60)
        assert (await dedupe.process_message("m", 1)).status is DedupeStatus.PROCESSED
        assert await store.sweep(budget=0.01) == 0
        assert store.stats()["store"] == "sqlite" and "d.db" in repr(store)
        await store.close()

    asyncio.run(scenario())
    with pytest.raises(TypeError, match="path or store"):
        AsyncSQLiteStore()
    with pytest.raises(TypeError, match="SQLiteStore"):
        AsyncSQLiteStore(store=object())  # type: ignore[arg-type]


# -- bad input: one validation for both classes ---------------------------------------


BAD_SETTINGS = [
    ({"ttl": 0}, ValueError, "ttl"),
    ({"ttl": math.nan}, ValueError, "ttl"),
    ({"ttl": "60"}, TypeError, "ttl"),
    ({"ttl": "5"}, TypeError, "ttl"),
    ({"ttl": True}, TypeError, "ttl"),
    ({"lease": 0, "mode": "effectively_once"}, ValueError, "lease"),
    ({"lease": "1", "mode": "effectively_once"}, TypeError, "lease"),
    ({"lease": 61, "ttl": 60, "mode": "effectively_once"}, ValueError, "lease"),
    ({"mode": "exactly_once"}, ValueError, "mode"),
    ({"release_on_failure": True}, ValueError, "at_most_once"),
    ({"release_on_failure": 1, "mode": "effectively_once"}, TypeError, "release_on_failure"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_SETTINGS)
def test_bad_settings_are_refused_alike(tmp_path, redis_url, kwargs, error, match):
    sync_store = SQLiteStore(tmp_path / "d.db")
    async_store = AsyncSQLiteStore(store=sync_store)
    with pytest.raises(error, match=match) as sync_error:
        Deduplicator(lambda m, p: None, sync_store, **kwargs)
    with pytest.raises(error, match=match) as async_error:
        AsyncDeduplicator(lambda m, p: None, async_store, **kwargs)
    assert str(sync_error.value) == str(async_error.value)


@pytest.mark.parametrize("msg_id", ["", "x" * 513, 17, None, b"b"])
def test_bad_ids_and_payloads_are_refused_alike(tmp_path, msg_id):
    sync = Deduplicator(lambda m, p: None, SQLiteStore(tmp_path / "d.db"))

    async def scenario() -> tuple[BaseException, BaseException]:
        dedupe = AsyncDeduplicator(lambda m, p: None, AsyncSQLiteStore(tmp_path / "d.db"))
        with pytest.raises((TypeError, ValueError)) as single:
            await dedupe.process_message(msg_id, 1)
        with pytest.raises(TypeError, match="payload"):
            await dedupe.process_message("ok", {"x": object()})
        with pytest.raises(TypeError, match="pairs"):
            await dedupe.process_batch([1, 2])  # type: ignore[list-item]
        await dedupe.store.close()
        return single.value, single.value

    async_error, _ = asyncio.run(scenario())
    with pytest.raises(type(async_error)) as sync_error:
        sync.process_message(msg_id, 1)
    assert str(sync_error.value) == str(async_error)


def test_the_wrong_kind_of_store_or_client_is_a_type_error_naming_both(redis_url, tmp_path):
    sync_client = redis.Redis.from_url(redis_url)
    async_client = redis.asyncio.Redis.from_url(redis_url)
    with pytest.raises(TypeError, match=r"RedisStore needs a sync .*AsyncRedisStore"):
        RedisStore(async_client)
    with pytest.raises(TypeError, match=r"AsyncRedisStore needs a redis\.asyncio .*RedisStore"):
        AsyncRedisStore(sync_client)
    with pytest.raises(TypeError, match=r"Deduplicator needs .*AsyncRedisStore.*"
                                        r"use AsyncDeduplicator"):
        Deduplicator(lambda m, p: None, AsyncRedisStore(async_client))
    with pytest.raises(TypeError, match=r"AsyncDeduplicator needs .*RedisStore.*use Deduplicator"):
        AsyncDeduplicator(lambda m, p: None, RedisStore(sync_client))
    with pytest.raises(TypeError, match="handler"):
        AsyncDeduplicator("nope", AsyncSQLiteStore(tmp_path / "d.db"))  # type: ignore[arg-type]
    sync_client.close()


