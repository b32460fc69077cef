"""A Deduplicator in a child process, driven over a pipe: the dedupe suite's A/B helper.

The idempotence-cost case of :mod:`buttress.bench.dedupe` times this very
driver twice over: once with ``PYTHONPATH`` naming this tree's ``src`` and once
naming the ``src`` of an older checkout (``BUTTRESS_BENCH_OLD_SRC``), so both
sides run the same loop, in the same kind of process, against the same Redis,
and differ only in the buttress they import.  Run by path::

    python _dedupe_runner.py REDIS_URL NAMESPACE MODE

It answers ``hello <buttress package dir>``, then serves one line at a time:

``prepare KIND COUNT``
    build COUNT never-seen messages (untimed by the parent); answers ``ready``.
    KIND is ``message`` (``process_message`` one by one) or ``batch``
    (``process_batch`` in batches of 1,000).
``run``
    process the prepared messages; answers ``done CPU``, CPU being the
    seconds of CPU this process spent on them (for A/Bs by CPU time, which
    other jobs on a shared machine disturb less than the wall clock).

The parent's clock covers ``run`` and its answer: one pipe round trip per
repeat, the same on both sides.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Run by path, this file's directory heads sys.path: its suite modules must not
    # shadow anything, and the buttress imported must be the one PYTHONPATH names.
    del sys.path[0]

BATCH = 1_000


def _no_op(msg_id: str, payload: object) -> None:
    return None


def main(argv: list[str]) -> None:
    import itertools
    import os
    import time

    import redis

    import buttress
    from buttress.dedupe import Deduplicator, RedisStore

    url, namespace, mode = argv
    store = RedisStore(redis.Redis.from_url(url), namespace=namespace)
    dedupe = Deduplicator(_no_op, store, ttl=300.0, mode=mode, lease=30.0)
    print("hello", os.path.dirname(os.path.abspath(buttress.__file__)), flush=True)
    fresh = itertools.count()
    kind, messages = "message", []
    for line in sys.stdin:
        words = line.split()
        if words[0] == "prepare":
            kind, count, base = words[1], int(words[2]), next(fresh)
            messages = [(f"ab-{base}-{i}", {"order": i, "amount": 12.5, "currency": "EUR"})
                        for i in range(count)]
            print("ready", flush=True)
        elif words[0] == "run":
            started = time.process_time()
            if kind == "message":
                process = dedupe.process_message
                for msg_id, payload in messages:
                    process(msg_id, payload)
            else:
                for start in range(0, len(messages), BATCH):
                    dedupe.process_batch(messages[start:start + BATCH])
            print("done", f"{time.process_time() - started:.6f}", flush=True)
        else:
            print("error unknown command", words[0], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
