"""FairQueue workers that must not charge twice: redelivery paired with the dedupe layer.

``buttress.distributed`` delivers at least once.  A worker killed after its handler
ran but before its acknowledgement reached Redis (one round trip: the ack goes out
with the worker's next Redis call) leaves a task whose lease expires; it is
delivered again, and so are the prefetched tasks the worker had not started.  A
producer that enqueues the same payment twice as two calls (not a resend of one
call, which the queue recognises) puts it in the queue under two task ids.  Either way
a bare handler would run the side effect again: here, appending a payment to a
ledger (a Redis list standing in for a payment gateway or a bank transfer).

The handler below goes through a :class:`buttress.Deduplicator` over a
:class:`buttress.RedisStore`, in ``effectively_once`` mode, keyed by the
*idempotency key in the payload* (``payment_id``) rather than the task id: a retried
enqueue gets a new task id but carries the same key, so one key covers both cases.

What this script does, against ``BUTTRESS_REDIS_URL`` or a redis-server it starts:

1. Enqueues ``--payments`` payments over three tenants, and every tenth one twice
   (a producer retry).
2. Starts ``--workers`` worker processes (this file, run with ``worker``), each
   with ``--prefetch`` tasks per lease.
3. As soon as the first worker starts a payment, kills it with SIGKILL: the task it
   was running (charged or not) and the prefetched ones it had not started are
   redelivered to the others after ``lease_ms``.
4. Waits until the queue is drained, stops the workers with SIGTERM (drain), and
   checks the ledger: every payment charged exactly once.

Run it::

    python examples/exactly_once_payments.py --payments 120
    python examples/exactly_once_payments.py --no-dedupe   # see the double charges

It prints a short summary and exits 0 if every payment is in the ledger exactly
once, 1 otherwise.

The one window dedupe cannot close: a worker that dies *after* the side effect but
before the dedupe "done" write (a few hundred microseconds here) charges again on
redelivery, because the record still says "claimed".  Closing it takes a side
effect that is idempotent itself, or committed in one transaction with its record.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any, cast

import redis

from buttress import DedupeStatus, Deduplicator, RedisStore
from buttress.distributed import FairQueue, Worker
from buttress.testing import redis_url

LEASE_MS = 2_000  # queue lease: a dead worker's tasks come back after this
DEDUPE_LEASE = 1.0  # dedupe claim lease (s): above a charge's latency, below LEASE_MS
TENANTS = ("acme", "globex", "initech")


class PaymentInProgress(Exception):
    """Another worker holds this payment's claim; fail the task so the queue retries it."""


def make_handlers(client: redis.Redis, queue_name: str, *, charge_ms: float,
                  dedupe: bool = True) -> dict[str, Any]:
    """The ``pay`` handler for a worker: one Deduplicator (and store) per process."""
    keys = Keys(queue_name)

    def charge(payment_id: str, payment: dict[str, Any]) -> None:
        """The side effect that must not repeat: a slow gateway call, then the ledger."""
        time.sleep(charge_ms / 1000)
        client.rpush(keys.ledger, json.dumps({"payment_id": payment_id, **payment}))

    if not dedupe:
        def pay_without_dedupe(payload: dict[str, Any]) -> None:
            client.rpush(keys.started, os.getpid())
            charge(payload["payment_id"], payload)
            client.hincrby(keys.outcomes, "charged", 1)
        return {"pay": pay_without_dedupe}

    deduplicator = Deduplicator(charge, RedisStore(client, namespace=keys.dedupe),
                                mode="effectively_once", lease=DEDUPE_LEASE, ttl=86_400)

    def pay(payload: dict[str, Any]) -> None:
        client.rpush(keys.started, os.getpid())  # only so the demo knows whom to kill, when
        result = deduplicator.process_message(payload["payment_id"], payload)
        client.hincrby(keys.outcomes, result.status.value, 1)
        if result.status in (DedupeStatus.PROCESSED, DedupeStatus.DUPLICATE):
            return  # charged, now or before: acknowledge the task
        if result.status is DedupeStatus.FAILED:
            raise result.error  # the charge raised: let the queue retry
        if result.status is DedupeStatus.IN_PROGRESS:
            raise PaymentInProgress(payload["payment_id"])  # retried after retry_delay_ms
        # CONFLICT: the same payment id with a different payload is a producer bug;
        # failing makes it visible (retries, then the dead-letter list with the reason).
        raise ValueError(f"payment {payload['payment_id']!r} seen with a different payload")

    return {"pay": pay}


class Keys:
    """The Redis keys of one demo run (a queue name is unique per run)."""

    def __init__(self, queue_name: str) -> None:
        self.ledger = f"example:{queue_name}:ledger"
        self.started = f"example:{queue_name}:started"
        self.outcomes = f"example:{queue_name}:outcomes"
        self.dedupe = f"example:{queue_name}:dedupe"

    def all(self) -> list[str]:
        return [self.ledger, self.started, self.outcomes]


def make_queue(client: redis.Redis, queue_name: str) -> FairQueue:
    return FairQueue(client, queue_name, lease_ms=LEASE_MS, max_attempts=10,
                     retry_delay_ms=100)


def run_worker(url: str, queue_name: str, *, charge_ms: float, prefetch: int,
               dedupe: bool) -> None:
    """One worker process: serve until SIGTERM (drain) or SIGKILL."""
    client = redis.Redis.from_url(url)
    handlers = make_handlers(client, queue_name, charge_ms=charge_ms, dedupe=dedupe)
    Worker(make_queue(client, queue_name), handlers, prefetch=prefetch, idle_wait=0.2).run()


def run_demo(url: str, *, payments: int, workers: int, prefetch: int, charge_ms: float,
             dedupe: bool, timeout: float) -> bool:
    """Enqueue, serve, kill a worker, drain, check the ledger.

    Return True if every payment is in the ledger exactly once.
    """
    client = redis.Redis.from_url(url)
    queue_name = f"payments-{os.urandom(4).hex()}"
    keys = Keys(queue_name)
    queue = make_queue(client, queue_name)

    expected: dict[str, dict[str, Any]] = {}
    enqueued = 0
    for n in range(payments):
        payment_id = f"pay-{n:05d}"  # the idempotency key, chosen by the producer
        payment = {"payment_id": payment_id, "amount_cents": 100 + n, "currency": "EUR"}
        expected[payment_id] = payment
        for _ in range(2 if n % 10 == 0 else 1):  # every tenth: the producer retried
            queue.enqueue("pay", payment, tenant=TENANTS[n % len(TENANTS)])
            enqueued += 1

    command = [sys.executable, os.path.abspath(__file__), "worker", "--redis", url,
               "--queue", queue_name, "--charge-ms", str(charge_ms),
               "--prefetch", str(prefetch)] + ([] if dedupe else ["--no-dedupe"])
    procs = [subprocess.Popen(command) for _ in range(workers)]
    deadline = time.monotonic() + timeout
    try:
        # Kill the first worker that starts its second payment: it holds a finished,
        # unacknowledged task and is in the middle of charging another.
        seen: Counter[int] = Counter()
        victim = None
        while victim is None:
            item = client.blpop([keys.started], timeout=max(0.1, deadline - time.monotonic()))
            if item is None:
                raise TimeoutError("no worker started a payment")
            pid = int(item[1])
            seen[pid] += 1
            if seen[pid] >= 2:
                victim = next(p for p in procs if p.pid == pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait()

        while True:
            stats = queue.stats()
            if stats["depth"] == 0 and stats["leased"] == 0 and stats["delayed_retries"] == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not drained in {timeout} s: {stats}")
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    ledger = cast("list[bytes]", client.lrange(keys.ledger, 0, -1))
    charges: Counter[str] = Counter(json.loads(entry)["payment_id"] for entry in ledger)
    outcomes_raw = cast("dict[bytes, bytes]", client.hgetall(keys.outcomes))
    outcomes = {key.decode(): int(value) for key, value in outcomes_raw.items()}
    twice = sorted(payment_id for payment_id, n in charges.items() if n > 1)
    missing = sorted(set(expected) - set(charges))
    print(f"enqueued {enqueued} tasks for {payments} payments "
          f"({enqueued - payments} duplicate enqueues); killed worker {victim.pid} with SIGKILL")
    print(f"queue: {stats['completed']} tasks acknowledged, {stats['redelivered']} redelivered "
          f"after the kill, {stats['retried']} retried, {stats['dead']} dead-lettered")
    print("handler outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"ledger: {sum(charges.values())} charges for {len(charges)} payments; "
          f"{len(twice)} charged more than once, {len(missing)} never charged")
    # The demo's keys are unique to this run: remove them (the queue's, dedupe's, ours).
    for pattern in (f"buttress:{{{queue_name}}}:*", f"{{{keys.dedupe}}}:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.delete(*keys.all())
    return not twice and not missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", nargs="?", choices=["demo", "worker"], default="demo")
    parser.add_argument("--payments", type=int, default=120)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--charge-ms", type=float, default=50.0,
                        help="latency of one charge (the simulated gateway call)")
    parser.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                        help="run the charge directly, to see what the pairing prevents")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--redis", help="worker role: the Redis URL")
    parser.add_argument("--queue", help="worker role: the queue name")
    args = parser.parse_args(argv)
    if not 0 < args.charge_ms <= DEDUPE_LEASE * 500:
        # The dedupe lease must outlast a charge, or a redelivery could take it over mid-way.
        parser.error(f"--charge-ms must be in (0, {DEDUPE_LEASE * 500:g}], got {args.charge_ms}")
    logging.basicConfig(level=logging.ERROR)  # the demo's handled failures are expected

    if args.role == "worker":
        run_worker(args.redis, args.queue, charge_ms=args.charge_ms, prefetch=args.prefetch,
                   dedupe=args.dedupe)
        return 0
    with redis_url() as url:
        ok = run_demo(url, payments=args.payments, workers=args.workers,
                      prefetch=args.prefetch, charge_ms=args.charge_ms, dedupe=args.dedupe,
                      timeout=args.timeout)
    print("OK: every payment charged exactly once" if ok else "FAILED: see the ledger above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
