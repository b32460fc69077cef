"""The gateway's admission on the event loop, and the workers' coroutine handlers.

Real gateway and worker processes, a real Redis, real sockets: the group commit
under concurrent requests, a redelivered task not run twice (sync and async
worker), kill -9 of an async worker mid-task.  In process: the group commit's
own backpressure (429 overloaded) and failure path, the lifespan helper, and
AsyncServiceHandlers against the real Redis.

``ASYNC_HANDLERS`` below are the coroutine handlers the ``--async`` worker
processes run (BUTTRESS_SERVICE_HANDLERS=test_service_async:ASYNC_HANDLERS):
the same side effect as service_support's, awaited.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest
import redis

_async_clients: dict[str, Any] = {}


def _async_client() -> Any:
    import redis.asyncio

    url = os.environ["BUTTRESS_REDIS_URL"]
    if url not in _async_clients:
        _async_clients[url] = redis.asyncio.Redis.from_url(url, socket_timeout=10)
    return _async_clients[url]


async def record_async(payload: Any) -> None:
    """The side effect under test: count runs per id (as service_support.record)."""
    queue = os.environ["BUTTRESS_QUEUE"]
    pipe = _async_client().pipeline(transaction=True)
    pipe.hincrby(f"{queue}:runs", payload["n"], 1)
    pipe.rpush(f"{queue}:order", payload["tenant"])
    await pipe.execute()


async def slow_async(payload: Any) -> None:
    await asyncio.sleep(float(payload.get("seconds", 0.5)))
    await record_async(payload)


ASYNC_HANDLERS = {"record": record_async, "slow": slow_async}

# Imported after the handlers: a worker process importing this module for them needs
# only the lines above (pytest and the fixtures come with the rest, harmlessly).
from buttress.distributed import FairQueue  # noqa: E402
from buttress.service import AdmissionCore, GroupCommit, Outcome, TaskRequest  # noqa: E402
from buttress.shutdown import lifespan  # noqa: E402
from conftest import wait_until  # noqa: E402
from service_support import Gateway, Worker, kill_mid_task_then_redeliver  # noqa: E402

ASYNC_WORKER = ("--async", "--handlers", "buttress.service.worker:async_handlers")
ASYNC_ENV = {"BUTTRESS_SERVICE_HANDLERS": "test_service_async:ASYNC_HANDLERS"}


def task(task_id: str, n: Any = None, tenant: str = "acme") -> dict[str, Any]:
    return {"id": task_id, "tenant": tenant, "task": "record", "priority": 0,
            "payload": {"n": task_id if n is None else n, "tenant": tenant}}


@pytest.fixture(scope="module")
def client(redis_url: str) -> Any:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.mark.parametrize("admission", ["async", "threads"])
def test_concurrent_requests_are_group_committed_once_each(redis_url: str, client: Any,
                                                            admission: str) -> None:
    """40 ids each sent 3 times at once over 12 connections: one 202 per id, batches."""
    queue = f"gc-{admission}-{os.getpid()}"
    gw = Gateway(redis_url, queue, "--admission", admission,
                 env={"BUTTRESS_GRACE_PERIOD": "6"}).wait_ready()

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=12, max_keepalive_connections=12)
        async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=30) as http:
            bodies = [task(f"g-{i % 40}") for i in range(120)]
            return await asyncio.gather(*(http.post("/v1/tasks", json=b) for b in bodies))

    try:
        answers = asyncio.run(send_all())
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
        assert gw.terminate() == 0  # the lifespan shutdown closed the loop's client cleanly
    finally:
        gw.kill()
    accepted = sorted(a.json()["id"] for a in answers if a.status_code == 202)
    assert accepted == sorted(f"g-{i}" for i in range(40))  # each id admitted exactly once
    others = {a.status_code for a in answers if a.status_code != 202}
    assert others <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 202)]
    assert FairQueue(client, queue).stats()["enqueued"] == 40
    batches = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("buttress_gateway_admission_batches_total"))
    assert 1 <= batches < 120  # requests that arrived during a batch went together


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_redelivered_task_runs_its_side_effect_once(redis_url: str, client: Any,
                                                       flavour: str) -> None:
    """Two queue deliveries of each id (a redelivery, a double admission): one run each."""
    queue_name = f"redeliver-{flavour}-{os.getpid()}"
    queue = FairQueue(client, queue_name)
    extra = ASYNC_WORKER if flavour == "async" else ()
    worker = Worker(redis_url, queue_name, "--concurrency", "3", *extra,
                    env=ASYNC_ENV if flavour == "async" else None)
    try:
        for _copy in range(2):
            for i in range(15):
                queue.enqueue("record", {"id": f"r-{i}", "payload": {"n": f"r-{i}",
                                                                       "tenant": "t"}},
                              tenant="t")
        wait_until(lambda: queue.stats()["completed"] == 30, timeout=60,
                   message="both copies of every task acknowledged")
    finally:
        code = worker.terminate()
    assert code == 0
    runs = {k.decode(): int(v) for k, v in client.hgetall(f"{queue_name}:runs").items()}
    assert runs == {f"r-{i}": 1 for i in range(15)}
    record = client.hgetall(f"buttress:svc:{queue_name}:task:{{r-3}}")
    assert record[b"state"] == b"done" and record[b"attempts"] == b"1"


def test_kill_of_an_async_worker_mid_task_is_redelivered_once(redis_url: str,
                                                              client: Any) -> None:
    queue_name = f"akill-{os.getpid()}"
    env = {**ASYNC_ENV, "BUTTRESS_WORKER_DEDUPE_LEASE": "1"}
    assert kill_mid_task_then_redeliver(client, redis_url, queue_name, lease_ms=1000,
                                        seconds=4, worker_args=ASYNC_WORKER, env=env) == 0
    assert client.hget(f"{queue_name}:runs", "k-1") == b"1"
    assert client.hget(f"buttress:svc:{queue_name}:task:{{k-1}}", "attempts") == b"2"


def test_async_service_handlers_retry_a_failure_and_skip_a_done_id(redis_url: str) -> None:
    import redis.asyncio

    from buttress.service import AsyncServiceHandlers

    calls: list[Any] = []

    async def flaky(payload: Any) -> str:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return "ok"

    async def run() -> None:
        connection = redis.asyncio.Redis.from_url(redis_url)
        try:
            service = AsyncServiceHandlers({"flaky": flaky}, connection, f"aflaky-{os.getpid()}")
            handle = service.wrapped["flaky"]
            assert asyncio.iscoroutinefunction(handle)
            envelope = {"id": "f-1", "payload": 1}
            with pytest.raises(RuntimeError, match="first try"):
                await handle(envelope)
            assert await handle(envelope) == "ok"
            assert await handle(envelope) is None  # done: a duplicate, not run again
            with pytest.raises(ValueError, match="another payload"):
                await handle({"id": "f-1", "payload": 2})
            with pytest.raises(ValueError, match="gateway envelope"):
                await handle({"payload": 1})
            record = await service.records.read("f-1")
            assert record is not None and record["state"] == "done"
            assert record["attempts"] == 2
        finally:
            await connection.aclose()

    asyncio.run(run())
    assert len(calls) == 2


def test_group_commit_sheds_when_full_and_fails_a_batch_whole() -> None:
    core = AdmissionCore(retry_after=3)
    release = asyncio.Event()
    committed: list[list[str]] = []

    async def commit(requests: list[TaskRequest]) -> list[Outcome]:
        committed.append([r.id for r in requests])
        await release.wait()
        if any(r.id == "boom" for r in requests):
            raise RuntimeError("a bug in admission")
        return [Outcome(202, {"id": r.id}, "accepted") for r in requests]

    def request(task_id: str) -> TaskRequest:
        return TaskRequest(task_id, "t", "record", 0, None)

    async def run() -> None:
        group = GroupCommit(core, commit, committers=1, max_pending=4, max_batch=2)
        first = asyncio.ensure_future(group.admit(request("a")))
        await asyncio.sleep(0)  # "a" is committing alone; the next ones wait
        waiting = [asyncio.ensure_future(group.admit(request(i))) for i in ("b", "boom", "c")]
        await asyncio.sleep(0)
        refused = await group.admit(request("d"))  # 4 pending: the gateway's own 429
        assert (refused.status, refused.outcome, refused.retry_after) == (429, "overloaded", 3)
        waiting[0].cancel()  # a request cut at the drain deadline: its batch still runs
        release.set()
        assert (await first).status == 202
        results = await asyncio.gather(*waiting[1:], return_exceptions=True)
        assert isinstance(results[0], RuntimeError)  # "boom" and "b" failed together (500)
        assert results[1].status == 202  # the next batch is unaffected
        await group.wait_idle()
        assert group.pending() == 0 and group.stats()["batches"] == 3

    asyncio.run(run())
    assert committed == [["a"], ["b", "boom"], ["c"]]


@pytest.mark.parametrize("fail", [None, "startup", "shutdown"])
def test_lifespan_runs_its_hooks_and_reports_a_failure(fail: str | None) -> None:
    async def run() -> list[str]:
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[str] = []
        ran: list[str] = []

        def hook(phase: str) -> Any:
            async def call() -> None:
                ran.append(phase)
                if phase == fail:
                    raise RuntimeError(f"{phase} broke")
            return call

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        for phase in ("startup", "shutdown"):
            incoming.put_nowait({"type": f"lifespan.{phase}"})
        await asyncio.wait_for(lifespan(incoming.get, send, startup=hook("startup"),
                                        shutdown=hook("shutdown")), 5)
        return sent + ran

    result = asyncio.run(run())
    expected = {None: ["lifespan.startup.complete", "lifespan.shutdown.complete",
                       "startup", "shutdown"],
                "startup": ["lifespan.startup.failed", "startup"],
                "shutdown": ["lifespan.startup.complete", "lifespan.shutdown.failed",
                             "startup", "shutdown"]}[fail]
    assert result == expected
