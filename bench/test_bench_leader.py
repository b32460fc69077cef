"""Leader election round trips: buttress against redis-py's Lock and bare commands.

Mirrors the ``leader`` suite of ``python -m buttress bench`` (which prints the
ratios and judges the targets) on one Redis started for this module.
"""

from __future__ import annotations

import uuid

import pytest

redis = pytest.importorskip("redis")

from buttress.bench.leader import TTL_MS, _past_quarantine  # noqa: E402
from buttress.leader import FencedStore, LeaderElection  # noqa: E402
from buttress.testing import redis_url  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with redis_url() as url:
        connection = redis.Redis.from_url(url)
        yield connection
        connection.close()


@pytest.fixture
def election(client):
    name = f"bench-{uuid.uuid4().hex[:8]}"
    _past_quarantine(client, name)
    return LeaderElection(client, name, ttl_ms=TTL_MS)


@pytest.mark.benchmark(group="leader: acquire + release")
def test_buttress_acquire_release(benchmark, election):
    def term():
        assert election.acquire_leader("bench") and election.release_leader("bench")
    benchmark(term)


@pytest.mark.benchmark(group="leader: acquire + release")
def test_redis_py_lock_acquire_release(benchmark, client):
    lock = client.lock(f"bench:lock:{uuid.uuid4().hex[:8]}", timeout=TTL_MS / 1e3)

    def term():
        assert lock.acquire(blocking=False)
        lock.release()
    benchmark(term)


@pytest.mark.benchmark(group="leader: acquire + release")
def test_bare_set_nx_px_delete(benchmark, client):
    key = f"bench:bare:{uuid.uuid4().hex[:8]}"

    def term():
        assert client.set(key, b"bench", nx=True, px=TTL_MS)
        client.delete(key)
    benchmark(term)


@pytest.mark.benchmark(group="leader: renew")
def test_buttress_renew(benchmark, election):
    assert election.acquire_leader("bench")
    benchmark(lambda: election.renew_leader("bench") or pytest.fail("renew failed"))


@pytest.mark.benchmark(group="leader: renew")
def test_redis_py_lock_reacquire(benchmark, client):
    lock = client.lock(f"bench:lock:{uuid.uuid4().hex[:8]}", timeout=TTL_MS / 1e3)
    assert lock.acquire(blocking=False)
    benchmark(lock.reacquire)
    lock.release()


@pytest.mark.benchmark(group="leader: fenced write")
def test_buttress_fenced_write(benchmark, client):
    store = FencedStore(client, f"bench-{uuid.uuid4().hex[:8]}")
    benchmark(store.write, 7, "field", "value")


@pytest.mark.benchmark(group="leader: fenced write")
def test_plain_hset(benchmark, client):
    benchmark(client.hset, f"bench:hash:{uuid.uuid4().hex[:8]}", "field", "value")


@pytest.mark.benchmark(group="leader: acquire attempt on a held lease")
def test_buttress_acquire_attempt_on_held_lease(benchmark, client, election):
    assert election.acquire_leader("holder")
    follower = LeaderElection(client, election.name, ttl_ms=TTL_MS)
    benchmark(lambda: not follower.acquire_leader("follower") or pytest.fail("won a held lease"))


@pytest.mark.benchmark(group="leader: acquire attempt on a held lease")
def test_bare_set_nx_px_on_held_key(benchmark, client):
    key = f"bench:bare:{uuid.uuid4().hex[:8]}"
    client.set(key, b"holder", px=TTL_MS)
    benchmark(lambda: client.set(key, b"follower", nx=True, px=TTL_MS) is None
              or pytest.fail("SET NX succeeded on a held key"))
