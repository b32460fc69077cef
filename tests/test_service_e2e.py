"""End to end: 2 gateways, 3 workers, one Redis, a load generator, and faults during the run.

Real processes on loopback.  The load generator sends ``E2E_TASKS`` tasks
(20,000 in the issue; 8,000 by default here, see TASKS) from three tenants at
10:1:1, 10% of ids a second time to the other gateway, honouring Retry-After on
429/503.  During the run: a rolling
restart of both gateways (a replacement is started, the old one gets SIGTERM
and keeps serving through its drain delay while the client moves over), kill -9
of one worker, and a 2 s Redis pause (SIGSTOP/SIGCONT).  Then:

* every unique id was handled exactly once (the one exception the docs state:
  a task whose worker was killed after its side effect and before its "done"
  write runs again; such ids are counted and must have run in the killed pid);
* no request failed: every answer was 200/202, or a 429/503 the client retried;
* over the window where all three tenants had ready work, completions were fair
  (Jain's index >= 0.9);
* the maintenance runs of different leader terms never overlapped in time;
* the gateways' metrics counters (sum over all four gateway processes) equal
  the client's counts per status code.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from buttress.distributed import FairQueue
from buttress.testing import RedisServer
from conftest import wait_until
from service_support import Gateway, Worker
from test_service import assert_terms_do_not_overlap

# The figure is 20,000 tasks; that passes (E2E_TASKS=20000) but takes about 4 minutes on
# the shared 2-core machine, so the suite runs 8,000, which keeps every property observable.
TASKS = int(os.environ.get("E2E_TASKS", "8000"))
TENANTS = {"big": 10, "small-1": 1, "small-2": 1}
QUEUE = "e2e"
# Deadline for each step of the fault schedule (progress waits), generous on a loaded machine.
STEP_TIMEOUT = 600
HIGH_WATER = 1000  # reached before the workers start: the shedding path (429) is exercised
CONCURRENCY = 2  # worker threads per process


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 1.0


class Load:
    """The load generator: asyncio + keep-alive httpx clients, honouring Retry-After."""

    def __init__(self, slots: list[str], seed: int = 7) -> None:
        rng = random.Random(seed)
        weights = list(TENANTS.values())
        tenants = rng.choices(list(TENANTS), weights=weights, k=TASKS)
        self.sends: list[tuple[dict[str, Any], int]] = []
        for i, tenant in enumerate(tenants):
            body = {"id": f"e2e-{i}", "tenant": tenant, "task": "record", "priority": 0,
                    "payload": {"n": f"e2e-{i}", "tenant": tenant}}
            self.sends.append((body, i % 2))
        for i in rng.sample(range(TASKS), TASKS // 10):  # the same id again, other gateway
            body, slot = self.sends[i]
            self.sends.insert(min(len(self.sends), i + rng.randint(1, 200)), (body, 1 - slot))
        self.slots = slots  # the current gateway URL of each slot (swapped on restarts)
        self.answers: Counter[tuple[int, str]] = Counter()
        self.transport_errors = 0
        self.failures: list[str] = []
        self.first_success: dict[str, int] = {}  # id -> code of its first 2xx
        self.history: dict[str, list[tuple[float, str, int, str]]] = {}
        self.done = 0

    async def run(self, concurrency: int = 24) -> None:
        iterator = iter(self.sends)
        limits = httpx.Limits(max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def sender() -> None:
                for body, slot in iterator:
                    await self.send(client, body, slot)
                    self.done += 1
            await asyncio.gather(*(sender() for _ in range(concurrency)))

    async def send(self, client: httpx.AsyncClient, body: dict[str, Any], slot: int) -> None:
        while True:
            url = self.slots[slot]
            try:
                response = await client.post(url + "/v1/tasks", json=body)
            except httpx.TransportError:
                self.transport_errors += 1  # never reached the app: refused or reset
                await asyncio.sleep(0.05)
                continue
            code = response.status_code
            is_json = response.headers.get("content-type", "").startswith("application/json")
            outcome = response.json().get("error", "ok") if is_json else "cut"
            self.answers[code, outcome] += 1
            self.history.setdefault(body["id"], []).append(
                (time.monotonic(), url, code, outcome))
            if code in (429, 503) and "retry-after" in response.headers:
                await asyncio.sleep(float(response.headers["retry-after"]))
                continue
            if code in (200, 202):
                self.first_success.setdefault(body["id"], code)
                return
            self.failures.append(f"{body['id']}: {code} {response.text[:200]}")
            return


def final_gateway_stats(log: Path) -> Counter[tuple[int, str]]:
    """The answers a stopped gateway counted, from its last log line (the same stats())."""
    match = re.search(r"gateway stopped: (\{.*\})", log.read_text())
    assert match, f"no final stats in {log}: {log.read_text()[-2000:]}"
    stats = json.loads(match.group(1))
    return Counter({(int(k.split()[0]), k.split()[1]): v for k, v in stats["answers"].items()})


def scraped_answers(url: str) -> Counter[tuple[int, str]]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found: Counter[tuple[int, str]] = Counter()
    for code, outcome, value in re.findall(
            r'^buttress_gateway_requests_total\{code="(\d+)",gateway="[^"]*",'
            r'outcome="([^"]+)"\} (\S+)$', text, re.M):
        found[int(code), outcome] += int(float(value))
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_end_to_end_with_rolling_restart_kill_and_redis_pause(tmp_path: Path) -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set(f"buttress:leader:{{{QUEUE}-maintenance}}:fence", 0)  # no first-use wait
        gateway_args = ("--high-water", str(HIGH_WATER), "--leader-ttl-ms", "1000",
                        "--maintenance-interval", "0.1", "--redis-timeout", "0.5",
                        "-v")
        env = {"BUTTRESS_GRACE_PERIOD": "8"}  # cleanup (step down, close) gets 0.8 s
        logs: list[Path] = []

        def start_gateway() -> Gateway:
            log = tmp_path / f"gateway-{len(logs)}.log"
            logs.append(log)
            return Gateway(server.url, QUEUE, *gateway_args, env=env,
                           log=log.open("w")).wait_ready()

        def start_worker(number: int) -> Worker:
            return Worker(server.url, QUEUE, "--concurrency", str(CONCURRENCY), "--lease-ms",
                          "3000", "--retry-delay-ms", "100", "--max-attempts", "20",
                          env={"BUTTRESS_WORKER_DEDUPE_LEASE": "3"},
                          log=(tmp_path / f"worker-{number}.log").open("w"))

        gateways = [start_gateway(), start_gateway()]
        stopped: list[Gateway] = []
        workers: list[Worker] = []
        load = Load([gateways[0].url, gateways[1].url])
        queue = FairQueue(client, QUEUE)
        samples: list[tuple[float, dict[str, int], int]] = []
        events: list[str] = []
        killed_pid = 0
        stop_sampling = threading.Event()

        def sample() -> None:
            sampler = redis.Redis.from_url(server.url, socket_timeout=5)
            while not stop_sampling.wait(0.05):
                try:
                    depth = queue.stats()["depth_by_tenant"]
                    completed = sampler.llen(f"{QUEUE}:order")
                except Exception:
                    continue  # Redis paused: no sample
                samples.append((time.monotonic(), depth, completed))

        def restart(slot: int) -> None:
            replacement = start_gateway()
            old = gateways[slot]
            old.process.send_signal(signal.SIGTERM)  # readiness flips; serves drain_delay
            time.sleep(0.3)  # the load balancer notices (a propagation delay, not a wait)
            load.slots[slot] = replacement.url
            gateways[slot] = replacement
            assert old.process.wait(30) == 0, f"gateway drain exit code {old.process.returncode}"
            stopped.append(old)
            events.append(f"gateway slot {slot} restarted at {load.done}")

        def chaos() -> None:
            nonlocal killed_pid
            total = len(load.sends)
            # Workers start once the queue sheds: every tenant has a backlog by then.
            wait_until(lambda: load.answers[429, "shedding"] > 0 or load.done >= total // 4,
                       timeout=STEP_TIMEOUT)
            workers.extend(start_worker(n) for n in range(3))
            events.append(f"workers started at {load.done}")
            wait_until(lambda: load.done >= total * 0.3, timeout=STEP_TIMEOUT)
            restart(0)
            wait_until(lambda: load.done >= total * 0.45, timeout=STEP_TIMEOUT)
            restart(1)
            wait_until(lambda: load.done >= total * 0.55, timeout=STEP_TIMEOUT)
            killed_pid = workers[0].process.pid
            workers[0].process.send_signal(signal.SIGKILL)
            workers[0].process.wait(10)
            events.append(f"worker {killed_pid} killed at {load.done}")
            wait_until(lambda: load.done >= total * 0.7, timeout=STEP_TIMEOUT)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            time.sleep(2.0)  # the fault itself: Redis paused for 2 s
            os.kill(server.pid, signal.SIGCONT)
            events.append(f"redis paused 2 s at {load.done}")

        chaos_errors: list[BaseException] = []

        def run_chaos() -> None:
            try:
                chaos()
            except BaseException as exc:
                chaos_errors.append(exc)

        threads = [threading.Thread(target=run_chaos), threading.Thread(target=sample)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        try:
            asyncio.run(load.run())
            sent_in = time.monotonic() - started
            threads[0].join(STEP_TIMEOUT)
            assert not chaos_errors, chaos_errors
            unique = {body["id"] for body, _ in load.sends}

            def all_handled() -> bool:
                return client.hlen(f"{QUEUE}:runs") >= len(unique)

            wait_until(all_handled, timeout=STEP_TIMEOUT, interval=0.2, message="every id handled")
            wait_until(lambda: queue.stats()["leased"] == 0 and queue.stats()["depth"] == 0,
                       timeout=60)
            finished_in = time.monotonic() - started
            stop_sampling.set()
            threads[1].join(10)

            # 1. Exactly once (but for the stated window of the killed worker).
            runs = {k.decode(): int(v) for k, v in client.hgetall(f"{QUEUE}:runs").items()}
            assert set(runs) == unique
            repeated = {task_id for task_id, n in runs.items() if n > 1}
            killed_ran = {k.decode() for k in client.hkeys(f"{QUEUE}:runs_by:{killed_pid}")}
            assert all(runs[task_id] == 2 for task_id in repeated), repeated
            assert repeated <= killed_ran, repeated - killed_ran
            assert len(repeated) <= CONCURRENCY, repeated

            # 2. No request failed; every id got its one success.
            assert not load.failures, load.failures[:10]
            assert load.answers[503, "cut"] == 0
            assert set(load.first_success) == unique
            # An id may see a 200 before its 202: the admission that wrote the task record had
            # its "done" write cut by the Redis pause (503), a duplicate meanwhile read the
            # record (200), and the retry took the claim over after its lease (202).  The
            # worker-side claim runs such an id once all the same (checked above).
            retried_admissions = sum(
                1 for history in load.history.values()
                if next(code for _, _, code, _ in history if code in (200, 202)) == 200
                and any(code == 202 for _, _, code, _ in history))
            # 3. Fairness over the window where every tenant had ready work.
            backlogged = [i for i, (_, depth, _) in enumerate(samples)
                          if all(depth.get(t, 0) > 0 for t in TENANTS)]
            assert backlogged, "no moment with all tenants backlogged"
            first, last = backlogged[0], backlogged[0]
            for i in backlogged[1:]:  # the first contiguous run of backlogged samples
                if i != last + 1:
                    break
                last = i
            order = [t.decode() for t in client.lrange(f"{QUEUE}:order", samples[first][2],
                                                       samples[last][2] - 1)]
            window = Counter(order)
            fairness = jain([window[t] for t in TENANTS])
            assert len(order) >= 100, f"window too short: {window}"
            assert fairness >= 0.9, (fairness, window)

            # 4. One maintenance leader at any moment.
            runs_log = [json.loads(r) for r in client.lrange(
                f"buttress:svc:{QUEUE}:maintenance:runs", 0, -1)]
            assert_terms_do_not_overlap(runs_log)

            # 5. Metrics equal the client's counts.
            counted: Counter[tuple[int, str]] = Counter()
            for gateway in gateways:
                counted += scraped_answers(gateway.url)
            for gateway in gateways:
                assert gateway.terminate() == 0
            for log in logs[:len(stopped)]:
                counted += final_gateway_stats(log)
            client_counts = Counter({key: n for key, n in load.answers.items()})
            by_code_client = Counter()
            for (code, _), n in client_counts.items():
                by_code_client[code] += n
            by_code_metrics = Counter()
            for (code, _), n in counted.items():
                by_code_metrics[code] += n
            assert by_code_metrics == by_code_client, (counted, load.answers)
            assert load.answers[429, "shedding"] > 0  # backpressure was exercised
            assert counted[202, "accepted"] == load.answers[202, "ok"]
            assert counted[200, "duplicate"] == load.answers[200, "ok"]
            stats = queue.stats()
            assert stats["completed"] >= len(unique)
            print(f"\nE2E {TASKS} tasks ({len(load.sends)} sends) in {sent_in:.1f}s, all handled "
                  f"in {finished_in:.1f}s; answers {dict(load.answers)}; transport errors "
                  f"{load.transport_errors}; admissions retried after a 200 {retried_admissions}; "
                  f"repeated after kill {len(repeated)}; fairness "
                  f"{fairness:.3f} over {dict(window)}; maintenance terms "
                  f"{len({r['token'] for r in runs_log})}; queue enqueued {stats['enqueued']} "
                  f"for {len(unique)} ids; events {events}")
        finally:
            stop_sampling.set()
            for gateway in gateways + stopped:
                gateway.kill()
            for worker in workers:
                worker.kill()
            client.close()
