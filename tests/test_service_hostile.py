"""The gateway against hostile clients and edge settings: real processes, sockets and Redis.

Each test here failed before the fix it guards (see each docstring): a payload
the dedupe fingerprint cannot encode, a percent-encoded id decoded twice, a
control character the tenant check missed, a request body that never ends, a
405 without ``Allow``, and settings that started a gateway which then failed
every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from buttress.distributed import FairQueue
from buttress.service import Service, settings_from
from buttress.service.settings import MAX_DEDUPE_TTL
from buttress.service.worker import handlers
from buttress.testing import RedisServer
from conftest import PausedRedis, wait_until
from service_support import Gateway, service_env, task


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Any:
    queue = f"hostile-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    gw = Gateway(redis_url, queue, "--body-timeout", "0.5",
                 env={"BUTTRESS_GRACE_PERIOD": "6"}).wait_ready()
    gw.queue = queue
    yield gw
    gw.kill()


def enqueued(client: Any, queue: str) -> int:
    return int(FairQueue(client, queue).stats()["enqueued"])


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


# (what, the payload's JSON text, or raw bytes for the whole body)
NO_CANONICAL_JSON = [
    ("lone surrogate escape", '"\\ud800"'),
    ("lone surrogate as a key", '{"\\udc00": 1}'),
    ("float beyond a double", "[1e400]"),
    ("negative float beyond a double", '{"x": -1e999}'),
    ("CESU-8 surrogate bytes", b'"\xed\xa0\x80"'),
]


@pytest.mark.parametrize(("what", "payload"), NO_CANONICAL_JSON,
                         ids=[case[0] for case in NO_CANONICAL_JSON])
def test_a_payload_with_no_canonical_json_is_400_and_spares_its_batch(
        gateway: Gateway, redis_client: Any, what: str, payload: str | bytes) -> None:
    """Before: json.loads accepted these, the dedupe fingerprint of the batch raised
    TypeError, and the hostile request and every request batched with it got 500."""
    prefix = f"nc-{what.replace(' ', '-')}"
    text = payload if isinstance(payload, bytes) else payload.encode()
    hostile = (b'{"id":"%s-x","tenant":"t","task":"record","payload":%s}'
               % (prefix.encode(), text))
    before = enqueued(redis_client, gateway.queue)

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            good = [client.post("/v1/tasks", json=task(f"{prefix}-{i}")) for i in range(6)]
            bad = client.post("/v1/tasks", content=hostile,
                              headers={"content-type": "application/json"})
            return list(await asyncio.gather(bad, *good))

    answers = asyncio.run(send())
    assert answers[0].status_code == 400, answers[0].text
    assert answers[0].json()["field"] == "payload"
    assert "canonical JSON" in answers[0].json()["detail"]
    assert [a.status_code for a in answers[1:]] == [202] * 6, [a.text for a in answers[1:]]
    assert enqueued(redis_client, gateway.queue) == before + 6


def test_the_status_id_is_percent_decoded_once(gateway: Gateway) -> None:
    """Before: the gateway unquoted the already-decoded path again, so GET a%2541 (the id
    "a%41") answered with the task "aA", and a path that was not UTF-8 named a task with
    U+FFFD in its id."""
    for task_id in ("a%41", "aA", "x/y", "{tag}:*", "100%", "é ?#"):
        assert httpx.post(gateway.url + "/v1/tasks", json=task(task_id),
                          timeout=10).status_code == 202
        path = "/v1/tasks/" + urllib.parse.quote(task_id, safe="")
        answer = httpx.get(gateway.url + path, timeout=10)
        assert answer.status_code == 200, (task_id, answer.text)
        assert answer.json()["id"] == task_id
    not_utf8 = exchange(gateway.port, b"GET /v1/tasks/%ff%fe HTTP/1.1\r\nHost: x\r\n"
                                      b"Connection: close\r\n\r\n")
    assert not_utf8.startswith(b"HTTP/1.1 400"), not_utf8
    assert b'"field": "id"' in not_utf8


@pytest.mark.parametrize("tenant", ["a\x7fb", "a\x85b", "a\x9fb", "\x00"],
                         ids=["DEL", "NEL", "C1 APC", "NUL"])
def test_every_control_character_in_the_tenant_is_400(gateway: Gateway, redis_client: Any,
                                                       tenant: str) -> None:
    """Before: only C0 (< U+0020) was refused; DEL and the C1 controls made tenants."""
    before = enqueued(redis_client, gateway.queue)
    answer = httpx.post(gateway.url + "/v1/tasks", json=task(f"cc-{tenant!r}",
                                                             tenant=tenant), timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "tenant"
    assert enqueued(redis_client, gateway.queue) == before


def test_methods_405_with_allow_and_head_reads_a_status(gateway: Gateway) -> None:
    """Before: 405 without the Allow header RFC 9110 requires, and HEAD of a status 405."""
    options = httpx.request("OPTIONS", gateway.url + "/v1/tasks", timeout=10)
    assert options.status_code == 405 and options.headers["allow"] == "POST"
    delete = httpx.delete(gateway.url + "/v1/tasks/x", timeout=10)
    assert delete.status_code == 405 and delete.headers["allow"] == "GET, HEAD"
    assert httpx.post(gateway.url + "/v1/tasks", json=task("head-1"), timeout=10
                      ).status_code == 202
    head = httpx.head(gateway.url + "/v1/tasks/head-1", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert httpx.head(gateway.url + "/v1/tasks/never", timeout=10).status_code == 404
    lower = exchange(gateway.port, b"post /v1/tasks HTTP/1.1\r\nHost: x\r\n\r\n")
    assert lower.startswith(b"HTTP/1.1 400")  # llhttp refuses a method in odd case


def _stalled_request(port: int, sent: bytes = b'{"id":') -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + sent)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_body_shorter_than_its_length_or_trickled_is_408(gateway: Gateway) -> None:
    """Before: the gateway waited for the rest of the body forever."""
    with _stalled_request(gateway.port) as sock:
        answer = _read_all(sock)  # the server closes the connection after its 408
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in answer.lower() and b'"body_timeout"' in answer
    with _stalled_request(gateway.port, b"") as sock:
        # A client sending one byte every 50 ms (the whole body would take 5 s): answered
        # 408 and closed at the deadline, so its later bytes hit a closed connection.
        with pytest.raises(OSError):
            for byte in b'{"id":"slow","tenant":"t","task":"record","payload":1}' + b" " * 46:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)  # the attack itself, not a wait for a condition
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_stalled_body_does_not_hold_the_drain(redis_url: str, redis_client: Any) -> None:
    """Before: SIGTERM waited for the stalled request to the drain deadline, cut it, and
    exited 3 with the drain recorded as timed_out (ButtressDrainTimedOut)."""
    queue = f"stall-{os.getpid()}"
    gw = Gateway(redis_url, queue, "--body-timeout", "0.5",
                 env={"BUTTRESS_GRACE_PERIOD": "8"}).wait_ready()
    try:
        with _stalled_request(gw.port) as sock:
            assert gw.terminate(30) == 0
            assert _read_all(sock).startswith(b"HTTP/1.1 408")
    finally:
        gw.kill()
    assert redis_client.hgetall(f"buttress:svc:{queue}:drains") == {b"clean": b"1"}


@pytest.mark.parametrize(("given", "message"), [
    ({"dedupe_ttl": "1e17"}, "--dedupe-ttl must be in"),
    ({"dedupe_ttl": "1e306"}, "--dedupe-ttl must be in"),
    ({"dedupe_ttl": "nan"}, "--dedupe-ttl must be a finite number"),
    ({"dedupe_ttl": ""}, "--dedupe-ttl must be a number"),
    ({"leader_ttl_ms": "99999999999999999999"}, "--leader-ttl-ms must be in"),
    ({"body_timeout": "0"}, "--body-timeout must be in"),
    ({"body_timeout": "inf"}, "--body-timeout must be a finite number"),
])
def test_settings_past_what_redis_or_the_clock_takes_are_refused(given: dict,
                                                                 message: str) -> None:
    """Before: --dedupe-ttl 1e17 started a gateway whose every admission was a 500 (Redis
    refuses the expiry), 1e306 crashed the start with OverflowError, and a huge
    --leader-ttl-ms killed the election thread (OverflowError in its wait)."""
    with pytest.raises(ValueError, match=message):
        settings_from({"redis_url": "redis://x", **given}, {})


def test_the_longest_dedupe_ttl_admits(redis_url: str, redis_client: Any) -> None:
    settings = settings_from({"redis_url": redis_url, "queue": f"ttl-{os.getpid()}",
                              "dedupe_ttl": str(MAX_DEDUPE_TTL)}, {})
    service = Service(settings, registry=CollectorRegistry())

    async def admit() -> int:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await client.post("/v1/tasks", json=task("long"))
        await service.aclose()
        return answer.status_code

    try:
        assert asyncio.run(admit()) == 202
    finally:
        service.close()


@contextlib.contextmanager
def taken_port(host: str) -> Iterator[int]:
    """A port another socket listens on, for as long as the block runs."""
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        yield taken.getsockname()[1]


def refused_command(command: list[str], env: dict[str, str] | None = None) -> bytes:
    """Run ``python -m buttress <command>``; it must stop as for a bad setting: its stderr."""
    result = subprocess.run([sys.executable, "-m", "buttress", *command], env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert b"Traceback" not in result.stderr
    return result.stderr


def test_serve_on_a_taken_port_is_a_setting_error(redis_url: str) -> None:
    """Before: a traceback (exit 1) after the maintenance loop had started contending."""
    with taken_port("127.0.0.1") as port:
        stderr = refused_command(["serve", "--redis", redis_url, "--queue", "taken",
                                  "--host", "127.0.0.1", "--port", str(port)])
    assert b"error: serve: " in stderr
    assert f"cannot listen on 127.0.0.1:{port}".encode() in stderr


def test_worker_names_a_metrics_port_that_is_taken(redis_url: str) -> None:
    """Before: a traceback ending in "OSError: [Errno 98] Address already in use", exit 1,
    naming neither the setting nor the port; now the worker command's setting error."""
    with taken_port("0.0.0.0") as port:
        stderr = refused_command(
            ["worker", "--redis", redis_url, "--queue", "taken", "--handlers",
             "buttress.service.worker:handlers"],
            service_env(redis_url, "taken", BUTTRESS_WORKER_METRICS_PORT=str(port)))
    assert f"BUTTRESS_WORKER_METRICS_PORT: cannot serve metrics on port {port}".encode() \
        in stderr


def test_worker_refuses_a_dedupe_ttl_redis_would_refuse(redis_url: str) -> None:
    env = {"BUTTRESS_SERVICE_HANDLERS": "service_support:HANDLERS",
           "BUTTRESS_REDIS_URL": redis_url, "BUTTRESS_QUEUE": "q", "BUTTRESS_DEDUPE_TTL": "1e17"}
    with pytest.raises(ValueError, match="BUTTRESS_DEDUPE_TTL must be in"):
        handlers(env)


def with_reads_in_flight(reads: int, then: Callable[..., Awaitable[Any]],
                         *gateway_args: str) -> Any:
    """A gateway on a Redis of its own, paused, with ``reads`` status GETs in flight:
    ``await then(gw, server, client, gets)`` runs then; every GET must end in 503."""
    with RedisServer() as server:
        gw = Gateway(server.url, "reads", "--redis-timeout", "0.2", *gateway_args,
                     env={"BUTTRESS_GRACE_PERIOD": "4"}).wait_ready()

        async def run() -> Any:
            limits = httpx.Limits(max_connections=reads + 4)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
                gets = [asyncio.ensure_future(client.get(f"/v1/tasks/g-{i}"))
                        for i in range(reads)]
                deadline = time.monotonic() + 30
                while (await client.get("/drainz")).json()["in_flight"] < reads:
                    assert time.monotonic() < deadline, "the reads never reached the gateway"
                    await asyncio.sleep(0.01)
                result = await then(gw, server, client, gets)
                for get in await asyncio.gather(*gets):
                    assert get.status_code == 503
                return result

        try:
            paused = PausedRedis(server, 30)
            try:
                return asyncio.run(run())
            finally:
                paused.close()
        finally:
            gw.kill()


def test_status_reads_do_not_starve_admission_while_redis_is_slow() -> None:
    """Before: GET reads and admission batches shared one thread pool, so with Redis
    paused a POST waited behind every status read queued before it (each one a Redis
    timeout): 24 reads held a POST for 4 s, and more reads held it longer."""
    reads = 12

    async def post(gw: Gateway, server: RedisServer, client: httpx.AsyncClient,
                   gets: list[Any]) -> tuple[int, int]:
        answer = await client.post("/v1/tasks", json=task("starved"))
        return answer.status_code, sum(get.done() for get in gets)

    status, answered_before = with_reads_in_flight(reads, post)
    assert status == 503  # Redis timed out: the POST was tried, not queued behind the reads
    # Two read threads, 0.2 s per read: the POST's batch ran beside the first reads.
    assert answered_before <= reads // 2, answered_before


def test_status_reads_hold_a_bounded_number_of_redis_connections() -> None:
    """Before (async admission): every GET in flight while Redis was slow held a Redis
    connection of its own (300 GETs, 302 connections): HTTP clients could fill Redis's
    maxclients for everyone else on that Redis, the workers included."""
    import psutil

    async def count(gw: Gateway, server: RedisServer, client: httpx.AsyncClient,
                    gets: list[Any]) -> int:
        redis_port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        return sum(1 for c in psutil.Process(gw.process.pid).net_connections("tcp")
                   if c.raddr and c.raddr.port == redis_port)

    most = with_reads_in_flight(16, count, "--admission", "async")
    assert most <= 8, most  # two reads, the maintenance loop's and its election's clients


def test_a_tenant_named_like_the_overflow_series_is_not_exported_twice(
        redis_url: str) -> None:
    """Before: a client's tenant "__other__" among the deepest kept its own series and the
    tenants past the cap were summed under the same labels: one scrape held
    buttress_queue_tenant_depth{tenant="__other__"} twice (3 and 2), so Prometheus
    dropped one of them as a duplicate sample."""
    queue = f"other-{os.getpid()}"
    gw = Gateway(redis_url, queue, "--leader-ttl-ms", "1000", "--maintenance-interval", "0.2",
                 env={"BUTTRESS_GRACE_PERIOD": "4"})
    try:
        gw.wait_ready()
        bodies = [task(f"o-{i}", tenant="__other__") for i in range(3)]
        bodies += [task(f"t-{i}", tenant=f"t{i:02d}") for i in range(22)]  # 2 past the cap
        for body in bodies:
            assert httpx.post(gw.url + "/v1/tasks", json=body, timeout=10).status_code == 202

        def scraped() -> list[str] | None:
            text = httpx.get(gw.url + "/metrics", timeout=10).text
            lines = [line for line in text.splitlines()
                     if line.startswith(("buttress_queue_tenant_depth{",
                                         "buttress_queue_head_age_seconds{"))]
            return lines if len(lines) >= 42 else None  # both metrics, all 21 series each

        lines = wait_until(scraped, timeout=30, message="the leader's tenant series")
    finally:
        gw.kill()
    assert isinstance(lines, list)
    series = [line.rsplit(" ", 1)[0] for line in lines]
    assert len(series) == len(set(series)) == 42, series
    assert f'buttress_queue_tenant_depth{{queue="{queue}",tenant="__other__"}} 5.0' in lines
