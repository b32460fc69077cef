"""Dedupe under Redis faults: a paused server, a read-only replica, a restart without data.

The rule: a command that timed out may still run, once or twice.  Each test
pauses a private redis-server (SIGSTOP) longer than the client's socket
timeout while a claim or a done write is in flight, with a client that
retries, so redis-py resends the command on new connections and the server
runs every copy when it resumes (SIGCONT).  The copies are counted from the
server's own command statistics, so a test that did not produce a resend
fails instead of passing for nothing.  No first delivery may come back
DUPLICATE or IN_PROGRESS, and no done write may come back fenced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from buttress import (
    AsyncDeduplicator,
    AsyncRedisStore,
    DedupeStatus,
    Deduplicator,
    RedisStore,
    StoreUnavailable,
)
from buttress.testing import RedisServer
from conftest import PausedRedis, commands_run

MODES = ["at_most_once", "effectively_once"]
SOCKET_TIMEOUT = 0.2
PAUSE = 0.9  # > SOCKET_TIMEOUT: the first send times out and is resent (several times)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as private:
        yield private


@pytest.fixture
def namespace(unique_name: str) -> str:
    return unique_name.replace("{", "").replace("}", "")


def sync_client(url: str) -> redis.Redis:
    """A client as docs/dedupe.md sets it up: short socket timeout, retries on.

    Connected before the pause: a connection opened during it would wait in its
    handshake and send the command only once, after the resume.  retry_on_timeout:
    redis-py 5 resends a timed-out command only when asked (8 does by default).
    """
    client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                  retry=Retry(NoBackoff(), 20), retry_on_timeout=True)
    client.ping()
    return client


def async_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                        retry=redis.asyncio.retry.Retry(NoBackoff(), 20),
                                        retry_on_timeout=True)


def pause_server(server: RedisServer, seconds: float = PAUSE) -> PausedRedis:
    return PausedRedis(server, seconds)


class Handler:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pause_on: tuple[str, RedisServer] | None = None
        self.pauses: list[PausedRedis] = []

    def __call__(self, msg_id: str, payload: Any) -> str:
        self.calls.append(msg_id)
        if self.pause_on is not None and msg_id == self.pause_on[0]:
            # The done write that follows this handler meets a paused server.
            self.pauses.append(pause_server(self.pause_on[1]))
        return msg_id


@pytest.fixture
def control(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def warm(store_client: Any) -> None:
    """Load the scripts first: the NOSCRIPT path is not what these tests are about."""
    from buttress.dedupe.redis_store import CLAIM, FINISH

    if isinstance(store_client, redis.Redis):
        store_client.script_load(CLAIM.source)
        store_client.script_load(FINISH.source)


def deliver(dedupe: Deduplicator, ids: list[str]) -> list[Any]:
    """One message through process_message, several through process_batch."""
    if len(ids) == 1:
        return [dedupe.process_message(ids[0], {"n": ids[0]})]
    return dedupe.process_batch([(i, {"n": i}) for i in ids])


async def deliver_async(dedupe: AsyncDeduplicator, ids: list[str]) -> list[Any]:
    if len(ids) == 1:
        return [await dedupe.process_message(ids[0], {"n": ids[0]})]
    return await dedupe.process_batch([(i, {"n": i}) for i in ids])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 50])
def test_a_resent_claim_is_the_callers_own_sync(server, control, namespace, mode, size):
    client = sync_client(server.url)
    warm(control)
    handler = Handler()
    dedupe = Deduplicator(handler, RedisStore(client, namespace=namespace), ttl=60, mode=mode,
                          lease=30)
    ids = [f"m-{i}" for i in range(size)]
    control.config_resetstat()
    pause = pause_server(server)
    try:
        results = deliver(dedupe, ids)
    finally:
        pause.close()
    assert commands_run(control, "set", "evalsha") >= 2, "no resend happened: not a test"
    assert [r.status for r in results] == [DedupeStatus.PROCESSED] * size
    assert not any(r.fenced for r in results)
    assert handler.calls == ids
    again = dedupe.process_batch([(i, {"n": i}) for i in ids])  # a real redelivery
    assert {r.status for r in again} == {DedupeStatus.DUPLICATE}
    client.close()


@pytest.mark.parametrize("size", [1, 50])
def test_a_resent_done_write_is_not_fenced_sync(server, control, namespace, size):
    client = sync_client(server.url)
    warm(control)
    handler = Handler()
    handler.pause_on = (f"m-{size - 1}", server)  # the last handler pauses Redis
    dedupe = Deduplicator(handler, RedisStore(client, namespace=namespace), ttl=60,
                          mode="effectively_once", lease=30)
    ids = [f"m-{i}" for i in range(size)]
    control.config_resetstat()
    try:
        results = deliver(dedupe, ids)
    finally:
        for pause in handler.pauses:
            pause.close()
    assert commands_run(control, "evalsha") >= 3, "no resend of the done write: not a test"
    assert [(r.status, r.fenced) for r in results] == [(DedupeStatus.PROCESSED, False)] * size
    assert all(dedupe.lookup(i).state == "done" for i in ids)  # type: ignore[union-attr]
    assert dedupe.stats()["fenced"] == 0
    client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 50])
def test_a_resent_claim_is_the_callers_own_async(server, control, namespace, mode, size):
    warm(control)
    handler = Handler()
    ids = [f"m-{i}" for i in range(size)]

    async def scenario() -> list[Any]:
        client = async_client(server.url)
        await client.ping()
        dedupe = AsyncDeduplicator(handler, AsyncRedisStore(client, namespace=namespace),
                                   ttl=60, mode=mode, lease=30)
        control.config_resetstat()
        pause = pause_server(server)
        try:
            results = await deliver_async(dedupe, ids)
        finally:
            pause.close()
        again = await dedupe.process_batch([(i, {"n": i}) for i in ids])
        await client.aclose()
        return [results, again]

    results, again = asyncio.run(scenario())
    assert commands_run(control, "set", "evalsha") >= 2, "no resend happened: not a test"
    assert [r.status for r in results] == [DedupeStatus.PROCESSED] * size
    assert not any(r.fenced for r in results)
    assert handler.calls == ids
    assert {r.status for r in again} == {DedupeStatus.DUPLICATE}


@pytest.mark.parametrize("size", [1, 50])
def test_a_resent_done_write_is_not_fenced_async(server, control, namespace, size):
    warm(control)
    handler = Handler()
    handler.pause_on = (f"m-{size - 1}", server)
    ids = [f"m-{i}" for i in range(size)]

    async def scenario() -> tuple[list[Any], list[Any], int]:
        client = async_client(server.url)
        await client.ping()
        dedupe = AsyncDeduplicator(handler, AsyncRedisStore(client, namespace=namespace),
                                   ttl=60, mode="effectively_once", lease=30)
        control.config_resetstat()
        try:
            results = await deliver_async(dedupe, ids)
        finally:
            for pause in handler.pauses:
                pause.close()
        records = [await dedupe.lookup(i) for i in ids]
        await client.aclose()
        return results, records, dedupe.stats()["fenced"]

    results, records, fenced = asyncio.run(scenario())
    assert commands_run(control, "evalsha") >= 3, "no resend of the done write: not a test"
    assert [(r.status, r.fenced) for r in results] == [(DedupeStatus.PROCESSED, False)] * size
    assert all(r is not None and r.state == "done" for r in records) and fenced == 0


def test_a_claim_whose_every_send_timed_out_is_found_on_redelivery(server, control,
                                                                   namespace):
    """No retries left: StoreUnavailable; the claim ran later; the redelivery still runs."""
    client = redis.Redis.from_url(server.url, socket_timeout=SOCKET_TIMEOUT, retry=None)
    warm(control)
    client.ping()
    for mode in MODES:
        handler = Handler()
        dedupe = Deduplicator(handler, RedisStore(client, namespace=f"{namespace}:{mode}"),
                              ttl=60, mode=mode)
        control.config_resetstat()
        pause = pause_server(server, 0.5)
        try:
            with pytest.raises(StoreUnavailable, match="Timeout"):
                dedupe.process_batch([("a", 1), ("b", 2)])
        finally:
            pause.wait()
            pause.close()
        assert commands_run(control, "evalsha") == 1  # it ran, after the client gave up
        assert dedupe.stats()["unanswered_claims"] == 2
        # The queue redelivers: the claim that ran is found as this consumer's own.
        assert dedupe.process_message("a", 1).status is DedupeStatus.PROCESSED
        assert [r.status for r in dedupe.process_batch([("b", 2), ("c", 3)])] == \
            [DedupeStatus.PROCESSED, DedupeStatus.PROCESSED]
        assert handler.calls == ["a", "b", "c"]
    client.close()


def test_a_read_only_replica_is_store_unavailable_sync_and_async(server, namespace):
    with RedisServer() as replica:
        control = redis.Redis.from_url(replica.url)
        control.replicaof("127.0.0.1", server.port)
        handler = Handler()
        for mode in MODES:
            dedupe = Deduplicator(handler, RedisStore(control, namespace=namespace), mode=mode)
            with pytest.raises(StoreUnavailable, match=r"READONLY|ReadOnly") as single:
                dedupe.process_message("m", 1)
            assert "unavailable for dedupe records" in str(single.value)
            assert isinstance(single.value.__cause__, redis.exceptions.RedisError)
            with pytest.raises(StoreUnavailable, match=r"READONLY|ReadOnly"):
                dedupe.process_batch([("a", 1), ("b", 2)])

        async def scenario() -> None:
            client = redis.asyncio.Redis.from_url(replica.url)
            for mode in MODES:
                dedupe = AsyncDeduplicator(handler, AsyncRedisStore(client, namespace=namespace),
                                           mode=mode)
                with pytest.raises(StoreUnavailable, match=r"READONLY|ReadOnly"):
                    await dedupe.process_message("m", 1)
                with pytest.raises(StoreUnavailable, match=r"READONLY|ReadOnly"):
                    await dedupe.process_batch([("a", 1), ("b", 2)])
            await client.aclose()

        asyncio.run(scenario())
        assert handler.calls == []
        control.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_restart_without_persistence_mid_run_loses_no_message(namespace, flavour):
    """A consumer keeps going while Redis restarts empty: every id runs, none is refused.

    A batch that fails with StoreUnavailable is redelivered, as a queue would;
    the claim may have run before the restart (then its record is gone) or
    not at all.  Records made before the restart are lost with the data,
    which is the documented cost of a Redis without persistence.
    """
    ids = [f"m-{i}" for i in range(400)]
    batches = [ids[i:i + 20] for i in range(0, len(ids), 20)]
    handler = Handler()
    refused: list[Any] = []
    failures = 0
    with RedisServer() as private:
        restarted = threading.Event()

        def restart_mid_run() -> None:
            while len(handler.calls) < 100:
                restarted.wait(0.005)
            private.restart()
            restarted.set()

        restarter = threading.Thread(target=restart_mid_run)
        restarter.start()

        def keep(results: list[Any]) -> None:
            refused.extend(r for r in results if r.status is not DedupeStatus.PROCESSED)

        if flavour == "sync":
            client = redis.Redis.from_url(private.url, socket_timeout=1.0,
                                          retry=Retry(NoBackoff(), 3), retry_on_timeout=True)
            dedupe = Deduplicator(handler, RedisStore(client, namespace=namespace), ttl=60,
                                  mode="effectively_once")
            for batch in batches:
                while True:
                    try:
                        keep(dedupe.process_batch([(i, {"i": i}) for i in batch]))
                        break
                    except StoreUnavailable:
                        failures += 1
                        restarted.wait(5)
            client.close()
        else:
            async def run() -> int:
                failed = 0
                client = redis.asyncio.Redis.from_url(
                    private.url, socket_timeout=1.0,
                    retry=redis.asyncio.retry.Retry(NoBackoff(), 3), retry_on_timeout=True)
                dedupe = AsyncDeduplicator(handler, AsyncRedisStore(client, namespace=namespace),
                                           ttl=60, mode="effectively_once")
                for batch in batches:
                    while True:
                        try:
                            keep(await dedupe.process_batch([(i, {"i": i}) for i in batch]))
                            break
                        except StoreUnavailable:
                            failed += 1
                            await asyncio.to_thread(restarted.wait, 5)
                await client.aclose()
                return failed

            failures = asyncio.run(run())
        restarter.join(10)
        assert restarted.is_set()
    assert refused == []
    assert sorted(set(handler.calls)) == sorted(ids)
    # A batch handled just before the restart may lose its done write with the data and
    # run again on redelivery (effectively_once allows a repeat after a failure); no id
    # runs more than twice, and only ids of a failed batch repeat.
    repeated = {i for i in handler.calls if handler.calls.count(i) > 1}
    assert len(repeated) <= 20 * failures
