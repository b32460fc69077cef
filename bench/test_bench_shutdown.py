"""Graceful shutdown: in-flight tracking against the bare app, under load from another process.

Mirrors suite ``shutdown`` of ``python -m buttress bench`` (which judges the <= 5%
target): for each flavor the bare app and the tracked app each run in a server process,
and a separate client process sends keep-alive requests to one or the other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from buttress.bench.shutdown import CONCURRENCY, WARM_UP, LoadClient, ServerProcess

REQUESTS = 1000


@pytest.fixture(scope="module")
def client() -> Iterator[LoadClient]:
    load = LoadClient()
    try:
        yield load
    finally:
        load.close()


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def servers(request: pytest.FixtureRequest, client: LoadClient) -> Iterator[dict[str, int]]:
    if request.param == "asgi":
        pytest.importorskip("uvicorn")
    started = {mode: ServerProcess(request.param, tracked=mode == "tracked")
               for mode in ("bare", "tracked")}
    try:
        for server in started.values():
            client.run(server.port, 200, CONCURRENCY)  # warm up
        yield {mode: server.port for mode, server in started.items()}
    finally:
        for server in started.values():
            server.close()


@pytest.mark.parametrize("mode", ["tracked", "bare"])
@pytest.mark.parametrize("connections", [CONCURRENCY, 1], ids=["throughput", "latency"])
def test_requests(benchmark, client, servers, mode, connections):
    benchmark.group = f"shutdown {connections} connection(s)"
    benchmark.extra_info["requests"] = REQUESTS
    port = servers[mode]

    def warm_up() -> tuple[tuple[int, int, int], dict[str, object]]:
        # Untimed, just before each round: the other mode's rounds left this server idle.
        client.run(port, WARM_UP * connections, connections)
        return (port, REQUESTS, connections), {}

    benchmark.pedantic(client.run, setup=warm_up, rounds=5)
