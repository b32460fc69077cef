"""Dedupe suite: the Deduplicator against the bare store operations it is built on.

Side by side on the same Redis and the same disk, never-seen ids every repeat,
in batches of 1,000 (a typical consumer read, e.g. XREADGROUP COUNT 1000):

- Redis ``process_batch`` against a plain redis-py pipeline of ``SET NX PX`` for
  the same ids (the usual hand-rolled dedupe); target: at least 2x throughput.
- one ``process_message`` against one bare ``SET NX PX`` round trip; target:
  at most 1.3x the time (at_most_once claims a new id with that same command,
  its record as the value; effectively_once is two script calls, claim and
  done, and is shown for comparison).
- SQLite ``process_batch`` against a raw ``executemany`` of ``INSERT OR IGNORE``
  in one transaction per batch, into the same table with the same PRAGMAs;
  target: within 1.5x.
- ``AsyncDeduplicator.process_batch`` on ``AsyncRedisStore`` against a
  ``redis.asyncio`` pipeline of ``SET NX PX`` for the same ids; target: at
  least 2x throughput.  Both run on one event loop kept for the session.

- the cost of idempotence under resends (issue 11: at most 10%): the same
  ``process_message`` and ``process_batch`` work run by this tree and by a
  checkout from before it (``BUTTRESS_BENCH_OLD_SRC`` names that checkout's
  ``src``, its extensions built), each in a child process driven by the same
  loop (:mod:`buttress.bench._dedupe_runner`) against the same Redis, in
  paired rounds; a second child of this tree is the noise floor.  Target: at
  most 1.10x the old time.  Without the variable the old side is skipped and
  the target is not evaluated.

The Deduplicator's figures include everything it does per message: id
checks, the payload fingerprint (canonical JSON + XXH64), the claim, a no-op
handler call and the result objects.  A "store.claim alone" row shows the
store's share: the same claim calls with ids and fingerprints precomputed.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from buttress.bench import BenchSession
from buttress.bench._child import OLD_SRC_ENV, child_env, close_child, expect, source_root
from buttress.dedupe import (
    AsyncDeduplicator,
    AsyncRedisStore,
    DedupeStore,
    Deduplicator,
    RedisStore,
    SQLiteStore,
    fingerprint,
)

ORDER = 40

PIPELINE = "redis-py pipeline SET NX PX"
ASYNC_PIPELINE = "redis.asyncio pipeline SET NX PX"
BARE_SET = "one SET NX PX round trip"
RAW_INSERT = "executemany INSERT OR IGNORE, 1 txn"
EFFECTIVELY_ONCE = "buttress effectively_once"
CLAIM_ALONE = "store.claim alone"
OLD = "before idempotence (BUTTRESS_BENCH_OLD_SRC)"
AGAIN = "buttress, a second process"
NEW_RUNNER = "buttress"
BATCH = 1_000
TTL = 300.0  # seconds: every key the suite writes expires by itself

Message = tuple[str, Any]


def insert_or_ignore(conn: sqlite3.Connection, msgs: list[Message]) -> None:
    """The SQLite baseline: the ids into the store's table, one executemany, one transaction."""
    expires_at = int((time.time() + TTL) * 1000)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT OR IGNORE INTO buttress_dedupe (msg_id, state, fingerprint, token, attempt, "
        "lease_until, expires_at) VALUES (?, 0, 0, '', 1, ?, ?)",
        [(msg_id, expires_at, expires_at) for msg_id, _ in msgs])
    conn.execute("COMMIT")


def register(session: BenchSession) -> None:
    total = 5_000 if session.quick else 20_000
    singles = 1_000 if session.quick else 3_000
    fresh = itertools.count()

    def messages(count: int) -> list[Message]:
        """``count`` never-seen ids with small order-like payloads (untimed setup)."""
        base = next(fresh)
        return [(f"order-{base}-{i}", {"order": i, "amount": 12.5, "currency": "EUR"})
                for i in range(count)]

    def batches() -> list[list[Message]]:
        msgs = messages(total)
        return [msgs[start:start + BATCH] for start in range(0, total, BATCH)]

    redis = session.peer("redis")
    url, reason = None, "redis-py is not installed (the redis extra)"
    if redis is not None:
        try:
            url = session.redis_url()
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            reason = f"no Redis to run against: {exc}"
    if redis is None or url is None:
        for name in ("Redis process_batch", "Redis process_message"):
            session.case("dedupe", name, unit="msg").skip("buttress", reason)
    else:
        client = redis.Redis.from_url(url)
        _redis_batch_case(session, client, total, batches)
        _redis_single_case(session, client, singles, messages)
        _redis_async_batch_case(session, url, total, batches)
        _idempotence_cost_cases(session, url, total, singles)
    _sqlite_case(session, total, batches)


def _no_op(msg_id: str, payload: Any) -> None:
    return None


def _each_batch(process: Callable[[list[Message]], Any]) -> Callable[[list[list[Message]]], None]:
    def work(batches: list[list[Message]]) -> None:
        for batch in batches:
            process(batch)
    return work


def _claim(store: DedupeStore) -> Callable[[list[Message]], Any]:
    """The store's share of process_batch: ids and fingerprints are ready before the clock."""
    def claim(prepared: Any) -> Any:
        ids, fingerprints = prepared
        return store.claim(ids, fingerprints, token=uuid.uuid4().hex[:16],
                           lease_ms=int(TTL * 2000), ttl_ms=int(TTL * 1000))
    return claim


def _claim_inputs(batches: list[list[Message]]) -> list[Any]:
    return [([msg_id for msg_id, _ in batch], [fingerprint(payload) for _, payload in batch])
            for batch in batches]


def _redis_batch_case(session: BenchSession, client: Any, total: int,
                      batches: Callable[[], list[list[Message]]]) -> None:
    run = uuid.uuid4().hex[:8]
    store = RedisStore(client, namespace=f"bench:dedupe:{run}")
    at_most_once = Deduplicator(_no_op, store, ttl=TTL)
    effectively_once = Deduplicator(_no_op, store, ttl=TTL, mode="effectively_once", lease=30)
    ttl_ms = int(TTL * 1000)

    def pipeline(batch: list[Message]) -> None:
        pipe = client.pipeline(transaction=False)
        for msg_id, _ in batch:
            pipe.set(f"bench:pipe:{run}:{msg_id}", "1", nx=True, px=ttl_ms)
        pipe.execute()

    # A repeat takes well under a second; more of them keep the median clear of the
    # bursts from other processes that a 5-sample median on a shared machine is not.
    case = session.case("dedupe", f"Redis process_batch, {total:,} new ids in {BATCH:,}s",
                        unit="msg", repeats=max(session.repeats, 9))
    case.add("buttress", _each_batch(at_most_once.process_batch), items=total, setup=batches,
             note="at_most_once")
    case.add(EFFECTIVELY_ONCE, _each_batch(effectively_once.process_batch), items=total,
             setup=batches, note="claim + done: 2 script calls")
    case.add(PIPELINE, _each_batch(pipeline), items=total, setup=batches)
    case.add(CLAIM_ALONE, _each_batch(_claim(store)), items=total,
             setup=lambda: _claim_inputs(batches()), note="ids, fingerprints precomputed")
    case.target("buttress", PIPELINE, min_speedup=2.0)
    case.target(EFFECTIVELY_ONCE, PIPELINE, min_speedup=2.0)


def _redis_single_case(session: BenchSession, client: Any, singles: int,
                       messages: Callable[[int], list[Message]]) -> None:
    run = uuid.uuid4().hex[:8]
    store = RedisStore(client, namespace=f"bench:dedupe:{run}")
    ttl_ms = int(TTL * 1000)

    def one_by_one(dedupe: Deduplicator) -> Callable[[list[Message]], None]:
        def work(msgs: list[Message]) -> None:
            process = dedupe.process_message
            for msg_id, payload in msgs:
                process(msg_id, payload)
        return work

    def bare_sets(msgs: list[Message]) -> None:
        set_ = client.set
        for msg_id, _ in msgs:
            set_(f"bench:bare:{run}:{msg_id}", "1", nx=True, px=ttl_ms)

    case = session.case("dedupe", "Redis process_message, one message", unit="msg")
    case.add("buttress", one_by_one(Deduplicator(_no_op, store, ttl=TTL)), items=singles,
             setup=lambda: messages(singles), note="at_most_once")
    case.add(EFFECTIVELY_ONCE,
             one_by_one(Deduplicator(_no_op, store, ttl=TTL, mode="effectively_once")),
             items=singles, setup=lambda: messages(singles), note="2 round trips")
    case.add(BARE_SET, bare_sets, items=singles, setup=lambda: messages(singles))
    case.target("buttress", BARE_SET, max_ratio=1.3)


def _redis_async_batch_case(session: BenchSession, url: str, total: int,
                            batches: Callable[[], list[list[Message]]]) -> None:
    import redis.asyncio

    loop = asyncio.new_event_loop()
    client = redis.asyncio.Redis.from_url(url)

    def close() -> None:
        loop.run_until_complete(client.aclose())
        loop.close()

    session.on_close(close)
    run = uuid.uuid4().hex[:8]
    store = AsyncRedisStore(client, namespace=f"bench:dedupe:async:{run}")
    at_most_once = AsyncDeduplicator(_no_op, store, ttl=TTL)
    effectively_once = AsyncDeduplicator(_no_op, store, ttl=TTL, mode="effectively_once",
                                         lease=30)
    ttl_ms = int(TTL * 1000)

    async def pipeline(batch: list[Message]) -> None:
        pipe = client.pipeline(transaction=False)
        for msg_id, _ in batch:
            pipe.set(f"bench:apipe:{run}:{msg_id}", "1", nx=True, px=ttl_ms)
        await pipe.execute()

    def on_loop(process: Callable[[list[Message]], Any]) -> Callable[[list[list[Message]]], None]:
        async def all_batches(prepared: list[list[Message]]) -> None:
            for batch in prepared:
                await process(batch)
        return lambda prepared: loop.run_until_complete(all_batches(prepared))

    loop.run_until_complete(client.ping())  # connect outside the clock
    case = session.case("dedupe", f"Redis async process_batch, {total:,} new ids in "
                        f"{BATCH:,}s", unit="msg", repeats=max(session.repeats, 9))
    case.add("buttress", on_loop(at_most_once.process_batch), items=total, setup=batches,
             note="AsyncDeduplicator, at_most_once")
    case.add(EFFECTIVELY_ONCE, on_loop(effectively_once.process_batch), items=total,
             setup=batches, note="claim + done: 2 script calls")
    case.add(ASYNC_PIPELINE, on_loop(pipeline), items=total, setup=batches)
    case.target("buttress", ASYNC_PIPELINE, min_speedup=2.0)


def _sqlite_case(session: BenchSession, total: int,
                 batches: Callable[[], list[list[Message]]]) -> None:
    directory = tempfile.mkdtemp(prefix="buttress-bench-dedupe-")
    session.on_close(shutil.rmtree, directory, True)
    files = itertools.count()

    def new_store() -> SQLiteStore:
        return SQLiteStore(os.path.join(directory, f"{next(files)}.db"), sweep_every=None)

    def with_fresh_file(make: Callable[[SQLiteStore], Any], inputs: Callable[[], Any]) \
            -> tuple[Callable[[], Any], Callable[[Any], None]]:
        """Setup and work over a new database file per repeat.

        Files are closed when the session ends, not in the timed work: closing
        the last connection checkpoints the WAL, which no row should pay for.
        """
        def setup() -> tuple[Any, Any]:
            store = new_store()
            session.on_close(store.close)
            return make(store), inputs()

        def work(prepared: tuple[Any, Any]) -> None:
            process, prepared_batches = prepared
            for batch in prepared_batches:
                process(batch)
        return setup, work

    def dedupe(mode: str) -> Callable[[SQLiteStore], Any]:
        return lambda store: Deduplicator(_no_op, store, ttl=TTL, mode=mode).process_batch

    def raw(store: SQLiteStore) -> Callable[[list[Message]], None]:
        # The store made the table and index; the baseline gets its own plain connection.
        conn = sqlite3.connect(store.path, isolation_level=None)
        session.on_close(conn.close)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return lambda batch: insert_or_ignore(conn, batch)

    case = session.case("dedupe", f"SQLite process_batch, {total:,} new ids in {BATCH:,}s",
                        unit="msg", repeats=max(session.repeats, 9))
    for name, make, inputs, note in [
        ("buttress", dedupe("at_most_once"), batches, "at_most_once"),
        (EFFECTIVELY_ONCE, dedupe("effectively_once"), batches,
         "claim + done: 2 transactions"),
        (RAW_INSERT, raw, batches, ""),
        (CLAIM_ALONE, _claim, lambda: _claim_inputs(batches()),
         "ids, fingerprints precomputed"),
    ]:
        setup, work = with_fresh_file(make, inputs)
        case.add(name, work, items=total, setup=setup, note=note)
    case.target("buttress", RAW_INSERT, max_ratio=1.5)


class _Runner:
    """A child process running :mod:`buttress.bench._dedupe_runner` on the buttress in ``src``."""

    def __init__(self, src: str, url: str, mode: str) -> None:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dedupe_runner.py")
        self.process = subprocess.Popen(
            [sys.executable, script, url, f"bench:dedupe:ab:{uuid.uuid4().hex[:8]}", mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=child_env(src))
        loaded = expect(self.process, "hello")
        if os.path.realpath(loaded) != os.path.realpath(os.path.join(src, "buttress")):
            self.close()
            raise RuntimeError(f"the runner for {src} imported buttress from {loaded}")

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")

    def prepare(self, kind: str, count: int) -> _Runner:
        self._send(f"prepare {kind} {count}")
        expect(self.process, "ready")
        return self

    def run(self, _prepared: Any = None) -> float:
        """Process the prepared messages; the child's CPU seconds for them."""
        self._send("run")
        return float(expect(self.process, "done"))

    def close(self) -> None:
        close_child(self.process)


def _idempotence_cost_cases(session: BenchSession, url: str, total: int, singles: int) -> None:
    """This tree against the tree before resend-safe claims: same driver, same Redis."""
    old_src = os.environ.get(OLD_SRC_ENV)
    new_src = source_root()
    runners: dict[str, _Runner] = {}
    reason = (f"set {OLD_SRC_ENV} to the src/ of a checkout before issue 11's resend "
              "safety (commit 4ea162d), extensions built")
    # Without the old tree there is nothing to compare: no child processes, no rounds.
    for name, src in ((OLD, old_src), (NEW_RUNNER, new_src), (AGAIN, new_src)):
        if src is None:
            break
        try:
            runners[name] = _Runner(src, url, "at_most_once")
        except (OSError, RuntimeError) as exc:
            reason = f"{src}: {exc}"
            break
        session.on_close(runners[name].close)
    # A 10% question on a shared machine: more work per sample and more paired rounds
    # than the other cases, even in a quick run (about 10 s in all).
    batched = max(total, 20_000)
    for kind, count, title in (("message", max(singles, 2_000), "one message at a time"),
                               ("batch", batched, f"{batched:,} ids in {BATCH:,}s")):
        case = session.case("dedupe", f"idempotence cost: Redis process_{kind}, {title}",
                            unit="msg", repeats=max(session.repeats, 15))
        for name, note in ((NEW_RUNNER, "this tree, in a child process"),
                           (AGAIN, "this tree again: the noise floor"),
                           (OLD, "the tree before, in a child process")):
            runner = runners.get(name)
            if runner is None or OLD not in runners:
                case.skip(name, reason)
                continue
            case.add(name, runner.run, items=count,
                     setup=functools.partial(runner.prepare, kind, count), note=note)
        case.noise_floor(NEW_RUNNER, AGAIN)
        case.target(NEW_RUNNER, OLD, max_ratio=1.10)
