"""A Redis Streams consumer group with buttress dedupe: redelivered messages are suppressed.

Streams deliver at least once.  An entry read with XREADGROUP stays pending until
it is XACKed; if its consumer crashes first, another consumer takes it over with
XAUTOCLAIM and it is delivered again.  A producer that retries a publish adds the
same order twice under two stream entry ids.  Either way the handler would run
twice; with a Deduplicator keyed on the *order id* it runs once.

What this script does, against ``BUTTRESS_REDIS_URL`` or a redis-server it starts:

1. A producer adds ``--orders`` orders to the stream, and re-publishes every tenth
   one (a producer retry).
2. Consumer ``crashy`` reads a batch, handles it and "crashes" before XACK, so its
   entries stay pending.
3. Consumer ``steady`` first XAUTOCLAIMs entries idle for over ``--claim-idle-ms``
   (the crashed consumer's), then reads new ones with XREADGROUP, until the stream
   is drained.  Every batch goes through ``Deduplicator.process_batch`` (one
   Redis script call for the claims) and is acknowledged with one XACK.

Run it::

    python examples/streams_consumer.py --orders 500 --mode effectively_once

It prints how many deliveries there were and how many the handler saw, and exits
non-zero if any order was charged twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from typing import Any

import redis

from buttress import DedupeStatus, Deduplicator, RedisStore, StoreUnavailable
from buttress.testing import redis_url

STREAM = "examples:orders"
GROUP = "billing"

# Outcomes after which an entry may be acknowledged: the message is finished here or
# elsewhere.  IN_PROGRESS (another consumer holds it) and FAILED (effectively_once
# released it for a retry) stay pending, so XAUTOCLAIM redelivers them later.
ACKABLE = {DedupeStatus.PROCESSED, DedupeStatus.DUPLICATE, DedupeStatus.CONFLICT}


class Billing:
    """The handler: charges an order.  Counts charges so the demo can check them."""

    def __init__(self) -> None:
        self.charged: Counter[str] = Counter()

    def __call__(self, order_id: str, order: dict[str, Any]) -> str:
        self.charged[order_id] += 1
        return f"charged {order['amount']} {order['currency']}"


def produce(client: redis.Redis, orders: int) -> int:
    """Add the orders, re-publishing every tenth one as a retrying producer would."""
    published = 0
    for n in range(orders):
        order = {"order_id": f"order-{n}", "amount": 10 + n % 90, "currency": "EUR"}
        copies = 2 if n % 10 == 0 else 1
        for _ in range(copies):
            client.xadd(STREAM, {"order": json.dumps(order)})
            published += 1
    return published


def handle_entries(dedupe: Deduplicator, client: redis.Redis,
                   entries: list[tuple[bytes, dict[bytes, bytes]]], *, ack: bool = True) \
        -> Counter[str]:
    """Dedupe and handle one batch of stream entries; XACK the finished ones."""
    messages = []
    for _entry_id, fields in entries:
        order = json.loads(fields[b"order"])
        messages.append((order["order_id"], order))
    results = dedupe.process_batch(messages)
    finished = [entry_id for (entry_id, _), result in zip(entries, results, strict=True)
                if result.status in ACKABLE]
    if ack and finished:
        client.xack(STREAM, GROUP, *finished)
    return Counter(result.status.value for result in results)


def consume(dedupe: Deduplicator, client: redis.Redis, consumer: str, *, batch: int,
            claim_idle_ms: int, deadline: float) -> Counter[str]:
    """Take over stale entries first, then read new ones, until nothing is left."""
    outcomes: Counter[str] = Counter()
    cursor = "0-0"
    while time.monotonic() < deadline:
        # Entries another consumer read but never acknowledged (it crashed, or stalled).
        cursor, claimed, *_ = client.xautoclaim(STREAM, GROUP, consumer, claim_idle_ms,
                                                start_id=cursor, count=batch)
        entries = claimed or (client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch,
                                                block=100) or [[None, []]])[0][1]
        if entries:
            try:
                outcomes.update(handle_entries(dedupe, client, entries))
            except StoreUnavailable as exc:
                # Nothing was acknowledged: the entries stay pending and come back later.
                logging.getLogger("examples.streams").warning("dedupe store down: %s", exc)
                time.sleep(1.0)
            continue
        if client.xpending(STREAM, GROUP)["pending"] == 0:
            break  # drained: nothing new and nothing pending
        cursor = "0-0"
        time.sleep(claim_idle_ms / 1000 / 4)  # pending entries are not idle long enough yet
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--mode", choices=["at_most_once", "effectively_once"],
                        default="effectively_once")
    parser.add_argument("--claim-idle-ms", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    with redis_url() as url:
        client = redis.Redis.from_url(url)
        client.delete(STREAM)
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        published = produce(client, args.orders)

        billing = Billing()
        store = RedisStore(client, namespace=f"examples:dedupe:{time.time_ns()}")
        dedupe = Deduplicator(billing, store, ttl=3600, mode=args.mode, lease=5)

        # Consumer "crashy" handles one batch and dies before acknowledging it.
        entries = client.xreadgroup(GROUP, "crashy", {STREAM: ">"}, count=args.batch)[0][1]
        crashed = handle_entries(dedupe, client, entries, ack=False)
        print(f"crashy: handled {crashed['processed']} orders, then crashed before XACK; "
              f"{len(entries)} entries left pending")

        outcomes = consume(dedupe, client, "steady", batch=args.batch,
                           claim_idle_ms=args.claim_idle_ms, deadline=time.monotonic() + 60)
        print(f"steady: {sum(outcomes.values())} deliveries: " + ", ".join(
            f"{count} {status}" for status, count in sorted(outcomes.items())))

        twice = sorted(order for order, n in billing.charged.items() if n > 1)
        print(f"published {published} entries for {args.orders} orders; the handler charged "
              f"{len(billing.charged)} orders, {len(twice)} of them more than once")
        pending = client.xpending(STREAM, GROUP)["pending"]
        client.delete(STREAM)
        client.close()
    return 0 if not twice and len(billing.charged) == args.orders and pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
