"""The ingest gateway and its workers: real processes, a real Redis, real HTTP.

Request handling (each status code), bad input (nothing enqueued), Redis
unavailable (503 + Retry-After, then recovery), shedding (429 + Retry-After),
effectively-once workers, the leader-run maintenance, settings validation.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from buttress.distributed import FairQueue
from buttress.service import BadRequest, ServiceHandlers, parse_task, settings_from
from buttress.service.admission import enqueue_request_id
from buttress.service.maintenance import Maintenance, head_ages
from buttress.testing import RedisServer, free_port
from conftest import wait_until
from service_support import Gateway, Worker, kill_mid_task_then_redeliver, task


@pytest.fixture(scope="module")
def module_redis(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Any:
    queue = f"svc-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    gw = Gateway(redis_url, queue, "--max-body-bytes", "4096", "--high-water", "40",
                 "--leader-ttl-ms", "1000", "--maintenance-interval", "0.2",
                 env={"BUTTRESS_GRACE_PERIOD": "6"}).wait_ready()
    gw.queue = queue
    yield gw
    gw.kill()


def post(gw: Gateway, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/tasks", json=body, timeout=10, **kwargs)


def test_accept_duplicate_conflict_and_status(gateway: Gateway, module_redis: Any) -> None:
    first = post(gateway, task("a-1"))
    assert first.status_code == 202, first.text
    assert first.json()["id"] == "a-1" and first.json()["state"] == "queued"
    again = post(gateway, task("a-1"))
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["state"] in ("queued", "running", "done")  # the first outcome
    conflict = post(gateway, task("a-1", n=99))
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "conflict"
    status = httpx.get(gateway.url + "/v1/tasks/a-1", timeout=10)
    assert status.status_code == 200 and status.json()["state"] in ("queued", "running", "done")
    missing = httpx.get(gateway.url + "/v1/tasks/never-sent", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert FairQueue(module_redis, gateway.queue).stats()["enqueued"] == 1


def test_a_retry_after_an_enqueue_that_ran_unseen_makes_no_second_task(
        gateway: Gateway, module_redis: Any) -> None:
    # The gateway's first try of r-1 ran in Redis, but its reply was lost (the client got
    # 503, the claim was released): that enqueue, sent as the gateway sends it, is in the
    # queue already.  The client's retry is claimed and enqueued again: one task, not two.
    queue = FairQueue(module_redis, gateway.queue, high_water=40)
    before = queue.stats()["enqueued"]
    queue.enqueue("record", {"id": "r-1", "payload": {"n": "r-1", "tenant": "acme"}},
                  tenant="acme", request_id=enqueue_request_id("r-1"))
    retry = post(gateway, task("r-1"))
    assert retry.status_code == 202, retry.text
    assert queue.stats()["enqueued"] == before + 1
    other = post(gateway, task("r-2"))  # another id is another request: a task of its own
    assert other.status_code == 202, other.text
    assert queue.stats()["enqueued"] == before + 2
    for leased in queue.lease(10):  # leave the shared queue as empty as it was (no workers)
        queue.ack(leased)


def test_enqueue_request_ids_fit_the_queue_and_differ_per_id() -> None:
    longest = enqueue_request_id("é" * 256)  # 512 bytes, the longest id the gateway takes
    assert len(longest.encode()) <= 200  # what FairQueue.enqueue accepts
    assert enqueue_request_id("a") == enqueue_request_id("a") != enqueue_request_id("b")


BAD = [
    # (what, request kwargs, status, error, field)
    ("malformed JSON", {"content": b'{"id": "x",', "headers": {"content-type":
                                                                "application/json"}},
     400, "malformed_json", None),
    ("NaN", {"content": b'{"id":"x","tenant":"t","task":"record","payload":NaN}',
             "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
    ("not an object", {"json": [1, 2]}, 400, "invalid_field", None),
    ("missing id", {"json": {"tenant": "t", "task": "record", "payload": 1}}, 400,
     "missing_field", "id"),
    ("missing payload", {"json": {"id": "x", "tenant": "t", "task": "record"}}, 400,
     "missing_field", "payload"),
    ("id not a string", {"json": {**task("x"), "id": 7}}, 400, "invalid_field", "id"),
    ("empty id", {"json": task("")}, 400, "invalid_field", "id"),
    ("id over 512 bytes", {"json": task("é" * 257)}, 400, "too_long", "id"),
    ("tenant too long", {"json": task("x", tenant="t" * 129)}, 400, "too_long", "tenant"),
    ("tenant control char", {"json": task("x", tenant="a\nb")}, 400, "invalid_field",
     "tenant"),
    ("priority a string", {"json": task("x", priority="high")}, 400, "invalid_field",
     "priority"),
    ("priority a bool", {"json": task("x", priority=True)}, 400, "invalid_field", "priority"),
    ("priority a float", {"json": task("x", priority=1.5)}, 400, "invalid_field", "priority"),
    ("priority too large", {"json": task("x", priority=2**60)}, 400, "invalid_field",
     "priority"),
    ("unknown task", {"json": task("x", task="launch")}, 400, "unknown_task", "task"),
    ("unknown field", {"json": task("x", colour="red")}, 400, "unknown_field", "colour"),
    ("body over the limit", {"json": task("x", payload={"blob": "z" * 5000})}, 413,
     "body_too_large", None),
    ("not JSON content", {"content": b"id=x", "headers": {"content-type":
                                                            "application/x-www-form-urlencoded"}},
     415, "unsupported_media_type", None),
]


@pytest.mark.parametrize(("what", "kwargs", "status", "error", "field"), BAD,
                         ids=[case[0] for case in BAD])
def test_bad_input_is_refused_and_nothing_enqueued(gateway: Gateway, module_redis: Any,
                                                   what: str, kwargs: dict, status: int,
                                                   error: str, field: str | None) -> None:
    before = FairQueue(module_redis, gateway.queue).stats()["enqueued"]
    response = httpx.post(gateway.url + "/v1/tasks", timeout=10, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body.get("field") == field
    assert body["detail"]
    assert FairQueue(module_redis, gateway.queue).stats()["enqueued"] == before


def test_chunked_body_over_the_limit_is_413(gateway: Gateway) -> None:
    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    response = httpx.post(gateway.url + "/v1/tasks", content=chunks(), timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_routes_and_methods(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/v1/tasks", timeout=10).status_code == 405
    assert httpx.delete(gateway.url + "/v1/tasks/x", timeout=10).status_code == 405
    assert httpx.get(gateway.url + "/nope", timeout=10).status_code == 404
    assert httpx.get(gateway.url + "/livez", timeout=10).status_code == 200
    assert httpx.get(gateway.url + "/drainz", timeout=10).json()["state"] == "ready"
    metrics = httpx.get(gateway.url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "buttress_gateway_requests_total" in metrics.text


def test_shedding_is_429_with_retry_after(gateway: Gateway, module_redis: Any) -> None:
    # No workers on this queue: it fills to high_water (40) and then refuses.
    answers = [post(gateway, task(f"shed-{i}", tenant="flood")) for i in range(60)]
    codes = [a.status_code for a in answers]
    assert codes.count(202) >= 39 and 429 in codes
    refused = answers[codes.index(429)]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "shedding"
    # A refused id was released: once there is room it is accepted, not a duplicate.
    module_redis.delete(*[k for k in module_redis.scan_iter(f"buttress:{{{gateway.queue}}}:*")])
    again = post(gateway, task(refused.json()["id"], tenant="flood"))
    assert again.status_code == 202, again.text


def test_leader_maintenance_exports_queue_metrics(gateway: Gateway) -> None:
    def leader_metrics() -> str | None:
        text = httpx.get(gateway.url + "/metrics", timeout=10).text
        return text if f'buttress_queue_depth{{queue="{gateway.queue}"}}' in text else None

    text = wait_until(leader_metrics, timeout=20, message="maintenance leader snapshot")
    assert f'buttress_maintenance_is_leader{{queue="{gateway.queue}"}} 1.0' in str(text)
    assert f'buttress_queue_oldest_head_age_seconds{{queue="{gateway.queue}"}}' in str(text)
    assert f'buttress_gateway_requests_total{{code="202",gateway="{gateway.queue}",' \
           'outcome="accepted"}' in str(text)


@pytest.mark.parametrize("admission", ["async", "threads"])
def test_redis_unavailable_is_503_then_recovers(admission: str) -> None:
    with RedisServer() as server:
        gw = Gateway(server.url, "outage", "--redis-timeout", "0.3", "--retry-after", "2",
                     "--admission", admission, env={"BUTTRESS_GRACE_PERIOD": "4"}).wait_ready()
        try:
            assert post(gw, task("o-1")).status_code == 202
            server.stop()
            down = post(gw, task("o-2"))
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "2"
            assert down.json()["error"] == "unavailable"
            assert httpx.get(gw.url + "/v1/tasks/o-1", timeout=10).status_code == 503
            server.start()
            wait_until(lambda: post(gw, task("o-2")).status_code == 202, timeout=20,
                       message="accepted again after Redis returned")
        finally:
            gw.kill()


def test_sigterm_drains_and_records_the_drain(redis_url: str, module_redis: Any) -> None:
    queue = f"drain-{os.getpid()}"
    # Grace 8 s: the cleanup hook (step down, close pools) gets 0.8 s on a loaded machine.
    gw = Gateway(redis_url, queue, env={"BUTTRESS_GRACE_PERIOD": "8"}).wait_ready()
    assert post(gw, task("d-1")).status_code == 202
    assert gw.terminate() == 0
    assert module_redis.hget(f"buttress:svc:{queue}:drains", "clean") == b"1"


def test_worker_handler_failure_is_retried_not_swallowed(module_redis: Any) -> None:
    calls: list[Any] = []

    def flaky(payload: Any) -> str:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return "ok"

    name = f"flaky-{os.getpid()}"
    service = ServiceHandlers({"flaky": flaky}, module_redis, name)
    envelope = {"id": "f-1", "payload": 1}
    with pytest.raises(RuntimeError, match="first try"):
        service.wrapped["flaky"](envelope)
    assert service.wrapped["flaky"](envelope) == "ok"
    assert service.wrapped["flaky"](envelope) is None  # done: a duplicate, not run again
    assert len(calls) == 2
    with pytest.raises(ValueError, match="gateway envelope"):
        service.wrapped["flaky"]({"payload": 1})


def test_head_ages_read_the_queue_layout(module_redis: Any) -> None:
    queue = FairQueue(module_redis, f"ages-{os.getpid()}")
    queue.enqueue("x", {}, tenant="a")
    queue.enqueue("x", {}, tenant="b")
    time.sleep(0.05)  # an age to measure, not a synchronisation
    ages = head_ages(module_redis, queue, ["a", "b", "nobody"])
    assert set(ages) == {"a", "b"}
    assert all(0.04 <= age < 30 for age in ages.values())


def test_one_maintenance_leader_and_non_overlapping_terms(module_redis: Any) -> None:
    queue = FairQueue(module_redis, f"lead-{os.getpid()}")
    module_redis.set(f"buttress:leader:{{{queue.name}-maintenance}}:fence", 0)
    members = [Maintenance(module_redis, queue, instance_id=f"m{i}", ttl_ms=600,
                           interval=0.05) for i in range(3)]
    for member in members:
        member.start()
    try:
        wait_until(lambda: sum(m.stats()["runs"] > 0 for m in members) >= 1, timeout=20)
        leader = next(m for m in members if m.elector.is_leader())
        leader.stop()  # steps down and releases: another takes over
        wait_until(lambda: any(m.elector.is_leader() for m in members if m is not leader),
                   timeout=20, message="a new leader")
        wait_until(lambda: sum(m.stats()["runs"] > 0 for m in members) >= 2, timeout=20)

        def one_leader_with_a_snapshot() -> bool:
            # Read each member once: under load a term may lapse between two reads.
            views = [m.stats() for m in members]
            leading = [v for v in views if v["is_leader"]]
            return (len(leading) == 1 and leading[0]["snapshot"] is not None
                    and all(v["snapshot"] is None for v in views if not v["is_leader"]))

        wait_until(one_leader_with_a_snapshot, timeout=20)
    finally:
        for member in members:
            member.stop()
    runs = [json.loads(r) for r in module_redis.lrange(
        f"buttress:svc:{queue.name}:maintenance:runs", 0, -1)]
    assert_terms_do_not_overlap(runs)


def assert_terms_do_not_overlap(runs: list[dict]) -> None:
    """Runs of an older term all end before the first run of any newer term starts."""
    by_token: dict[int, list[dict]] = {}
    for run in runs:
        by_token.setdefault(run["token"], []).append(run)
    tokens = sorted(by_token)
    assert len(tokens) >= 2, f"expected a handover, got terms {tokens}"
    for older, newer in itertools.pairwise(tokens):
        assert len({r["instance"] for r in by_token[older]}) == 1
        assert max(r["finished"] for r in by_token[older]) <= \
            min(r["started"] for r in by_token[newer]), (older, newer)


def test_parse_task_unit() -> None:
    parsed = parse_task(b'{"id":"x","tenant":"t","task":"a","payload":null}',
                        max_tenant_bytes=8, tasks=None)
    assert parsed.priority == 0 and parsed.payload is None
    with pytest.raises(BadRequest) as info:
        parse_task(b'{"id":"x","tenant":"t","task":"a","payload":1}', max_tenant_bytes=8,
                   tasks=frozenset({"b"}))
    assert info.value.status == 400 and info.value.body["field"] == "task"
    with pytest.raises(BadRequest, match="valid JSON"):
        parse_task(b"\xff\xfe", max_tenant_bytes=8)


@pytest.mark.parametrize(("given", "env", "message"), [
    ({}, {}, "BUTTRESS_REDIS_URL"),
    ({"redis_url": "http://x"}, {}, "--redis must be a redis://"),
    ({"redis_url": "redis://x", "port": "eighty"}, {}, "--port must be an int"),
    ({"redis_url": "redis://x"}, {"BUTTRESS_PORT": "70000"}, "BUTTRESS_PORT must be in"),
    ({"redis_url": "redis://x"}, {"BUTTRESS_REDIS_TIMEOUT": "soon"},
     "BUTTRESS_REDIS_TIMEOUT must be a number"),
    ({"redis_url": "redis://x", "high_water": "10", "low_water": "10"}, {}, "--low-water"),
    ({"redis_url": "redis://x", "queue": "a{b}"}, {}, "--queue must not contain"),
    ({"redis_url": "redis://x"}, {"BUTTRESS_ADMISSION": "fast"},
     "BUTTRESS_ADMISSION must be one of 'threads', 'async'"),
])
def test_settings_errors_name_the_setting(given: dict, env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{")):
        settings_from(given, env)


def test_settings_flag_beats_env_beats_default() -> None:
    settings = settings_from({"redis_url": "redis://x", "port": "9000"},
                             {"BUTTRESS_PORT": "9100", "BUTTRESS_MAX_PENDING": "7",
                              "BUTTRESS_TASKS": "b, a,a"})
    assert (settings.port, settings.max_pending, settings.tasks) == (9000, 7, ("a", "b"))
    assert settings.max_body_bytes == 1_048_576


def test_serve_cli_refuses_bad_settings_before_listening() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "buttress", "serve", "--redis", "redis://x",
                             "--max-body-bytes", "-1"], capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"--max-body-bytes must be in" in result.stderr


def test_gateway_registers_with_metrics_kinds(module_redis: Any, redis_url: str) -> None:
    from buttress.service import Service

    settings = settings_from({"redis_url": redis_url, "queue": f"reg-{os.getpid()}"}, {})
    service = Service(settings, registry=CollectorRegistry())
    try:
        body, content_type = service.render_metrics()
        assert b"buttress_gateway_pending_admissions" in body
        assert content_type.startswith("text/plain")
    finally:
        service.close()


@pytest.mark.parametrize(("dedupe_ttl", "window_ms"), [(86_400.0, 600_000), (30.0, 30_000)])
def test_the_gateway_recognises_an_enqueue_retry_only_while_dedupe_remembers_the_id(
        redis_url: str, dedupe_ttl: float, window_ms: int) -> None:
    from buttress.service import Service

    settings = settings_from({"redis_url": redis_url, "queue": f"win-{os.getpid()}",
                              "dedupe_ttl": dedupe_ttl}, {})
    service = Service(settings, registry=CollectorRegistry())
    try:
        assert service.queue.resend_window_ms == window_ms
    finally:
        service.close()


def test_sigkill_of_a_worker_mid_task_is_redelivered_once(redis_url: str,
                                                          module_redis: Any) -> None:
    queue_name = f"kill-{os.getpid()}"
    kill_mid_task_then_redeliver(module_redis, redis_url, queue_name, lease_ms=1500, seconds=5,
                                 env={"BUTTRESS_WORKER_DEDUPE_LEASE": "1.5"})
    assert module_redis.hget(f"{queue_name}:runs", "k-1") == b"1"


def test_worker_serves_its_metrics_on_a_port_of_its_own(redis_url: str,
                                                       module_redis: Any) -> None:
    queue_name = f"wm-{os.getpid()}"
    queue = FairQueue(module_redis, queue_name)
    for i in range(3):
        queue.enqueue("record", {"id": f"m-{i}", "payload": {"n": f"m-{i}", "tenant": "t"}},
                      tenant="t")
    port = free_port()
    worker = Worker(redis_url, queue_name, env={"BUTTRESS_WORKER_METRICS_PORT": str(port)})
    try:
        wait_until(lambda: queue.stats()["completed"] == 3, timeout=60)

        def scraped() -> str | None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return None
            return text if "buttress_worker_tasks_total" in text else None

        text = str(wait_until(scraped, timeout=30, message="the worker's /metrics"))
        assert (f'buttress_worker_tasks_total{{outcome="completed",queue="{queue_name}"}} 3.0'
                in text)
        assert 'buttress_dedupe_messages_total{deduplicator="worker",outcome="processed"} 3.0' \
            in text
    finally:
        assert worker.terminate() == 0


def test_maintenance_sweeps_a_sqlite_dedupe_store(tmp_path: Any, module_redis: Any) -> None:
    from buttress import Deduplicator, SQLiteStore

    store = SQLiteStore(tmp_path / "claims.db", sweep_every=None)
    dedupe = Deduplicator(lambda msg_id, payload: None, store, ttl=0.05)
    for i in range(5):
        dedupe.process_message(f"s-{i}", i)
    queue = FairQueue(module_redis, f"sweep-{os.getpid()}")
    module_redis.set(f"buttress:leader:{{{queue.name}-maintenance}}:fence", 0)
    maintenance = Maintenance(module_redis, queue, instance_id="only", ttl_ms=1000,
                              interval=0.05, dedupe_store=store)
    maintenance.start()
    try:
        wait_until(lambda: maintenance.stats()["swept"] == 5, timeout=20,
                   message="the leader swept the expired claims")
    finally:
        maintenance.stop()
        store.close()


@pytest.mark.parametrize("admission", ["threads", "async"])
def test_sqlite_dedupe_store_in_process(tmp_path: Any, redis_url: str, module_redis: Any,
                                        admission: str) -> None:
    """--dedupe-sqlite: claims in SQLite, the queue in Redis; the app called in process."""
    import asyncio

    from buttress.service import Service

    settings = settings_from({"redis_url": redis_url, "queue": f"sq-{admission}-{os.getpid()}",
                              "dedupe_sqlite": str(tmp_path / "claims.db"),
                              "admission": admission}, {})
    service = Service(settings, registry=CollectorRegistry())

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=service.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answers = await asyncio.gather(*(client.post("/v1/tasks", json=task(f"s-{i % 5}"))
                                             for i in range(20)))
        await service.aclose()  # what the lifespan shutdown does under a server
        return sorted(a.status_code for a in answers)

    try:
        codes = asyncio.run(run())
    finally:
        service.close()
    # 5 ids, each sent 4 times at once: one 202 each; the copies are 200 or, while the first
    # copy's admission is in flight in another batch, 503 in_progress.
    assert codes.count(202) == 5
    assert set(codes) <= {200, 202, 503}
    assert FairQueue(module_redis, settings.queue).stats()["enqueued"] == 5
