"""RedisStore on a real three-node Redis Cluster: hash tags keep every script in one slot."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from buttress import DedupeStatus, Deduplicator, RedisStore
from buttress.testing import RedisServer
from conftest import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 40000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three masters sharing the 16384 slots; a redis-py RedisCluster client on them."""
    from redis.cluster import RedisCluster

    from buttress.testing import find_redis_server

    find_redis_server()  # no binary is a failure here, not a skip: CI always has one

    servers = []
    try:
        for _ in range(3):
            port = cluster_port()
            servers.append(RedisServer(port=port, config={
                "cluster-enabled": "yes", "cluster-config-file": f"nodes-{port}.conf",
            }).start())
        nodes = [redis.Redis(port=server.port) for server in servers]
        for node in nodes[1:]:
            node.execute_command("CLUSTER", "MEET", "127.0.0.1", servers[0].port)
        share = SLOTS // len(nodes)
        for index, node in enumerate(nodes):
            last = SLOTS - 1 if index == len(nodes) - 1 else (index + 1) * share - 1
            node.execute_command("CLUSTER", "ADDSLOTS", *range(index * share, last + 1))
        wait_until(lambda: all(node.cluster("info")["cluster_state"] == "ok" for node in nodes),
                   timeout=30, interval=0.05, message="the test cluster to reach cluster_state:ok")
        client = RedisCluster(host="127.0.0.1", port=servers[0].port)
        yield client
        client.close()
        for node in nodes:
            node.close()
    finally:
        for server in servers:
            server.close()


def test_the_cluster_refuses_cross_slot_scripts(cluster):
    """Without hash tags a multi-key script fails here: the tests below can fail."""
    script = cluster.register_script("return #KEYS")
    with pytest.raises(Exception, match=r"(?i)slot"):
        script(keys=["plain:a", "plain:b", "plain:c"])


@pytest.mark.parametrize("mode", ["at_most_once", "effectively_once"])
def test_partitioned_store_spreads_over_shards_and_dedupes(cluster, mode):
    namespace = f"cluster-{mode}-{time.time_ns()}"
    store = RedisStore(cluster, namespace=namespace, partitions=8)
    calls: list[str] = []
    dedupe = Deduplicator(lambda msg_id, payload: calls.append(msg_id), store, ttl=60,
                          mode=mode)
    ids = [f"m-{i}" for i in range(300)]
    assert all(dedupe.process_batch([(i, {"n": i}) for i in ids]))
    again = dedupe.process_batch([(i, {"n": i}) for i in ids])
    assert {r.status for r in again} == {DedupeStatus.DUPLICATE}
    assert dedupe.process_message("m-1", {"n": "other"}).status is DedupeStatus.CONFLICT
    assert sorted(calls) == sorted(ids)
    shards = {cluster.get_node_from_key(store.key(i)).port for i in ids}
    assert len(shards) >= 2  # 8 hash tags landed on more than one master


def test_one_partition_runs_too_in_one_slot(cluster):
    store = RedisStore(cluster, namespace=f"single-{time.time_ns()}")
    dedupe = Deduplicator(lambda msg_id, payload: None, store, ttl=60, mode="effectively_once")
    assert all(dedupe.process_batch([(f"m-{i}", {}) for i in range(100)]))
    record = dedupe.lookup("m-7")
    assert record is not None and record.state == "done"
