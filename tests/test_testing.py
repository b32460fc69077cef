"""The Redis launcher the tests, benchmarks and examples stand on."""

from __future__ import annotations

import pytest
import redis

from buttress.testing import RedisServer, find_redis_server, free_port


def test_session_server_is_real_redis(redis_client):
    assert redis_client.ping()
    info = redis_client.info("server")
    assert info["redis_version"]
    assert redis_client.config_get("save")["save"] == ""  # no persistence unless asked


def test_restart_without_persistence_loses_data_and_keeps_the_port():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        port, pid = server.port, server.pid
        server.restart()
        assert server.port == port and server.pid != pid
        assert client.get("k") is None  # reconnects to the fresh, empty server
        client.close()
    assert server.pid is None


def test_a_bad_config_fails_with_the_servers_own_message():
    with pytest.raises(RuntimeError, match=r"(?s)exited with code.*Bad directive"):
        RedisServer(config={"no-such-directive": "1"}).start()


def test_a_taken_port_fails_even_though_another_server_answers_there():
    """The other server answers PING on the port; ours must not pass for it."""
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        try:
            with pytest.raises(RuntimeError, match=r"(?s)exited with code.*Address already in use"):
                second.start()
        finally:
            second.close()


def test_binary_and_port_helpers():
    assert find_redis_server().endswith("redis-server")
    assert 0 < free_port() < 65536
    with pytest.raises(ValueError, match="startup_timeout"):
        RedisServer(startup_timeout=0)
