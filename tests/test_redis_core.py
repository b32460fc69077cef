"""The one Redis core (buttress._redis): clients, keys, scripts, errors, backoff; real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from importlib import resources

import pytest
import redis
import redis.asyncio

from buttress._redis import (
    Backoff,
    Keys,
    StoreErrors,
    check_tag,
    is_async_client,
    is_unavailable,
    load_script,
    require_async_client,
    require_sync_client,
)
from buttress.errors import StoreUnavailable
from buttress.testing import RedisServer

LUA_FILES = sorted(p.name for p in resources.files("buttress._redis").iterdir()
                   if p.name.endswith(".lua"))


def test_every_script_states_its_contract_and_loads_once():
    assert LUA_FILES, "no .lua files shipped in buttress._redis"
    for name in LUA_FILES:
        script = load_script(name)
        assert script is load_script(name)  # read once per process
        assert script.source.startswith(f"-- {name}:")
        header = script.source.split("\n\n")[0] + script.source.split("\n--\n")[0]
        assert "KEYS[" in header and "ARGV[" in header, name


def test_scripts_are_package_data():
    # The tests run against the installed package (CI installs the wheel), so this
    # fails if a script was left out of the wheel.
    installed = {entry.name for entry in resources.files("buttress._redis").iterdir()}
    for name in ("dedupe_claim.lua", "dedupe_finish.lua", "leader_acquire.lua",
                 "leader_renew.lua", "leader_release.lua", "fenced_write.lua"):
        assert name in installed
        assert load_script(name).sha


def test_noscript_reloads_sync_and_async(redis_client, redis_url, unique_name):
    script = load_script("leader_renew.lua")
    redis_client.set(unique_name, "v")
    redis_client.script_flush()
    assert script.run(redis_client, [unique_name], ["v", 5000]) == 1
    redis_client.script_flush()

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await script.run_async(client, [unique_name], ["v", 5000])
        finally:
            await client.aclose()

    assert asyncio.run(main()) == 1


def test_client_kinds_are_checked_both_ways(redis_client, redis_url):
    async_client = redis.asyncio.Redis.from_url(redis_url)
    assert is_async_client(async_client) and not is_async_client(redis_client)
    assert require_sync_client(redis_client, owner="X") is redis_client
    assert require_async_client(async_client, owner="X") is async_client
    with pytest.raises(TypeError, match=r"RedisStore needs a sync .*redis\.asyncio\.client\."
                                        r"Redis.*AsyncRedisStore"):
        require_sync_client(async_client, owner="RedisStore", twin="AsyncRedisStore")
    with pytest.raises(TypeError, match=r"AsyncRedisStore needs a redis\.asyncio .*redis\."
                                        r"client\.Redis.*RedisStore"):
        require_async_client(redis_client, owner="AsyncRedisStore", twin="RedisStore")
    with pytest.raises(TypeError, match=r"got builtins\.str"):
        require_sync_client("redis://x", owner="RedisStore")


def test_keys_share_one_hash_tag():
    keys = Keys("orders", prefix="buttress:leader")
    assert keys.key("lease") == "buttress:leader:{orders}:lease"
    assert Keys("ns").key("m-1") == "{ns}:m-1"
    assert Keys("ns").base_bytes == b"{ns}:"
    assert check_tag("name", "ok") == "ok"
    with pytest.raises(ValueError, match="name must not contain"):
        check_tag("name", "a{b")
    with pytest.raises(TypeError, match="name must be a str"):
        check_tag("name", 5)


def test_backoff_is_jittered_capped_and_seeded():
    a, b = Backoff(0.1, 1.0, seed=3), Backoff(0.1, 1.0, seed=3)
    delays = [a.next() for _ in range(10)]
    assert delays == [b.next() for _ in range(10)]
    for n, delay in enumerate(delays):
        ceiling = min(1.0, 0.1 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    a.reset()
    assert a.next() <= 0.1
    with pytest.raises(TypeError):
        Backoff("1", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Backoff(2, 1)
    with pytest.raises(TypeError):
        Backoff(1, 2, seed=1.5)  # type: ignore[arg-type]


def test_an_unseeded_backoff_is_cheap_to_build_and_still_jittered():
    """No per-object generator seeded from os.urandom: the shared one jitters."""
    backoffs = [Backoff(0.1, 0.1) for _ in range(50)]
    delays = {backoff.next() for backoff in backoffs}
    assert len(delays) > 1
    assert all(0.05 <= delay <= 0.1 for delay in delays)
    assert not hasattr(backoffs[0], "__dict__")  # slots: nothing per object but the settings


def test_error_mapping_keeps_other_errors():
    guard = StoreErrors("things")
    for text in ("LOADING Redis is loading", "MASTERDOWN Link with MASTER is down",
                 "CLUSTERDOWN The cluster is down", "TRYAGAIN Multiple keys",
                 "Error running script: @user_script:3: -READONLY You can't write"):
        assert is_unavailable(redis.exceptions.ResponseError(text)), text
    assert is_unavailable(ConnectionResetError())
    assert not is_unavailable(redis.exceptions.ResponseError("WRONGTYPE Operation"))
    with pytest.raises(redis.exceptions.ResponseError), guard:
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key")
    with pytest.raises(StoreUnavailable, match="unavailable for things") as caught, guard:
        raise redis.exceptions.TimeoutError("Timeout reading from socket")
    assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)


def test_read_only_replica_and_paused_server_are_unavailable():
    with RedisServer() as primary, RedisServer() as replica:
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", primary.port)
        guard = StoreErrors("test records", client)
        with pytest.raises(StoreUnavailable, match="ReadOnlyError"), guard:
            client.set("k", "v")
        with pytest.raises(StoreUnavailable, match="READONLY"), guard:
            load_script("leader_acquire.lua").run(client, ["{t}:a", "{t}:b", "{t}:c"],
                                                  ["i", 1000, "n"])
        client.close()
        paused = redis.Redis.from_url(primary.url, socket_timeout=0.2)
        os.kill(primary.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="Timeout") as caught, \
                    StoreErrors("test records", paused):
                paused.get("k")
            assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
        finally:
            os.kill(primary.pid, signal.SIGCONT)
            paused.close()
