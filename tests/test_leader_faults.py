"""Leader election under a paused Redis: every operation is correct when a command is resent.

A private redis-server is paused (SIGSTOP) longer than the client's socket
timeout while an acquire, renew or release is in flight; the client resends
it and the server runs every copy when it resumes.  The copies are counted
from the server's command statistics, so a test without a resend fails.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from buttress import AsyncLeaderElection, LeaderElection, StoreUnavailable
from buttress.testing import RedisServer
from conftest import PausedRedis, commands_run

pytestmark = pytest.mark.redis

SOCKET_TIMEOUT = 0.2
PAUSE = 0.9


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as private:
        yield private


@pytest.fixture
def control(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture
def name(unique_name: str, control: redis.Redis) -> str:
    """An election past its first-use quarantine, with every script loaded."""
    plain = unique_name.replace("{", "").replace("}", "")
    control.set(LeaderElection(control, plain, ttl_ms=1000).fence_key, 100)
    for script in (LeaderElection.ACQUIRE, LeaderElection.RENEW, LeaderElection.RELEASE):
        control.script_load(script.source)
    return plain


def retrying(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                  retry=Retry(NoBackoff(), 20), retry_on_timeout=True)
    client.ping()  # connected before the pause (see test_dedupe_faults.sync_client)
    return client


def test_a_resent_acquire_wins_the_term_it_took_and_renew_and_release_hold(
        server, control, name):
    client = retrying(server.url)
    election = LeaderElection(client, name, ttl_ms=5000)
    control.config_resetstat()
    pause = PausedRedis(server, PAUSE)
    try:
        won = election.acquire_leader("a")
    finally:
        pause.close()
    assert commands_run(control, "evalsha") >= 2, "no resend happened: not a test"
    # Without the nonce the second copy found a lease and answered 0: the caller lost,
    # while holding a lease nobody knew about, for a whole ttl.
    assert won and election.is_leader()
    token = election.fencing_token
    assert control.get(election.lease_key) == f"{token}:a".encode()
    assert not LeaderElection(control, name, ttl_ms=5000).acquire_leader("b")

    control.config_resetstat()
    pause = PausedRedis(server, PAUSE)
    try:
        assert election.renew_leader("a")  # the renewal is idempotent
    finally:
        pause.close()
    assert commands_run(control, "evalsha") >= 2
    assert control.pttl(election.lease_key) > 3000

    control.config_resetstat()
    pause = PausedRedis(server, PAUSE)
    try:
        election.release_leader("a")  # True or False (an earlier copy deleted it): gone
    finally:
        pause.close()
    assert commands_run(control, "evalsha") >= 2
    assert control.exists(election.lease_key) == 0 and not election.is_leader()
    other = LeaderElection(control, name, ttl_ms=5000)
    assert other.acquire_leader("b") and other.fencing_token == token + 1  # type: ignore[operator]
    client.close()


def test_an_acquire_whose_reply_was_lost_is_found_by_the_next_one(server, control, name):
    """No retries: the acquire raises, runs later, and the caller's next acquire finds it."""
    client = redis.Redis.from_url(server.url, socket_timeout=SOCKET_TIMEOUT, retry=None)
    client.ping()
    election = LeaderElection(client, name, ttl_ms=5000)
    control.config_resetstat()
    pause = PausedRedis(server, 0.5)
    try:
        with pytest.raises(StoreUnavailable, match="acquire"):
            election.acquire_leader("a")
    finally:
        pause.wait()
        pause.close()
    assert commands_run(control, "evalsha") == 1  # it ran after the client gave up
    held = control.get(election.lease_key)
    assert held is not None and held.endswith(b":a")
    assert not election.is_leader()
    assert election.acquire_leader("a")  # the same nonce: the lease is this caller's
    assert f"{election.fencing_token}:a".encode() == held
    assert election.stats()["store_errors"] == 1
    # Another instance of the same name on another object does not inherit it.
    assert not LeaderElection(control, name, ttl_ms=5000).acquire_leader("a")
    client.close()


def test_a_resent_async_acquire_wins_the_term_it_took(server, control, name):
    async def scenario() -> tuple[bool, int | None]:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=SOCKET_TIMEOUT,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 20), retry_on_timeout=True)
        await client.ping()
        election = AsyncLeaderElection(client, name, ttl_ms=5000)
        control.config_resetstat()
        pause = PausedRedis(server, PAUSE)
        try:
            won = await election.acquire_leader("a")
        finally:
            pause.close()
        won = won and election.is_leader()
        await client.aclose()
        return won, election.fencing_token

    won, token = asyncio.run(scenario())
    assert commands_run(control, "evalsha") >= 2, "no resend happened: not a test"
    assert won
    assert control.get(f"buttress:leader:{{{name}}}:lease") == f"{token}:a".encode()


def test_the_wrong_client_kind_is_a_type_error_naming_both(redis_url):
    sync_client = redis.Redis.from_url(redis_url)
    async_client = redis.asyncio.Redis.from_url(redis_url)
    with pytest.raises(TypeError, match=r"LeaderElection needs a sync .*AsyncLeaderElection"):
        LeaderElection(async_client, "x", ttl_ms=100)
    with pytest.raises(TypeError, match=r"AsyncLeaderElection needs a redis\.asyncio"):
        AsyncLeaderElection(sync_client, "x", ttl_ms=100)
    sync_client.close()


def test_an_elector_whose_acquire_was_resent_leads_at_once_after_the_pause(server, control,
                                                                          name):
    """Resend safety end to end: no ttl spent locked out by the elector's own lease."""
    from buttress import LeaderElector

    client = retrying(server.url)
    election = LeaderElection(client, name, ttl_ms=10_000)
    elected = threading.Event()
    elector = LeaderElector(election, "a", on_elected=lambda token: elected.set(),
                            retry_interval_ms=200, seed=3)
    control.config_resetstat()
    pause = PausedRedis(server, PAUSE)
    try:
        elector.start()  # its first acquire meets the paused server and is resent
        pause.wait()
        # Without the nonce: the resent copy answers "held" and the elector waits out the
        # 10 s lease it holds itself.  With it: elected as soon as the server answers.
        assert elected.wait(5), "the elector did not recognise its own lease"
        assert commands_run(control, "evalsha") >= 2, "no resend happened: not a test"
        assert elector.is_leader() and election.stats()["terms_won"] == 1
    finally:
        pause.close()
        elector.stop()
        client.close()
