"""Real consumer processes racing on one store, and consumers killed with SIGKILL mid-batch.

Every test runs with sync consumers (Deduplicator) and with asyncio ones
(AsyncDeduplicator with AsyncRedisStore / AsyncSQLiteStore); the race of eight
consumers also runs "mixed", four of each on one store, which is how sync and
async consumers are shown to interoperate (same scripts, same records).

Each consumer is this file run as a script (see ``consume`` at the bottom): it
reads its ids, waits for a start signal so all consumers race, and logs every
handler call (``ran <id>``) and every done write that landed (``done <id>``),
line-buffered, to its own file, so a SIGKILLed consumer leaves what it did.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until

HERE = Path(__file__).resolve()
MODES = ["at_most_once", "effectively_once"]


# -- harness ---------------------------------------------------------------------------


def start_consumer(workdir: Path, name: str, store: str, ids: list[str], **options: Any) \
        -> tuple[subprocess.Popen[bytes], Path]:
    """Start one consumer process; return it and the path of its log."""
    ids_file = workdir / f"{name}.ids"
    ids_file.write_text("\n".join(ids))
    log = workdir / f"{name}.log"
    config = {"store": store, "ids": str(ids_file), "log": str(log),
              "ready": str(workdir / f"{name}.ready"), "go": str(workdir / "go"), **options}
    process = subprocess.Popen([sys.executable, str(HERE), json.dumps(config)],
                               stderr=subprocess.PIPE)
    return process, log


def read_log(log: Path) -> tuple[list[str], list[str]]:
    """The ids a consumer's handler ran, and the ids whose done write it landed."""
    ran, done = [], []
    if log.exists():
        for line in log.read_text().splitlines():
            kind, _, msg_id = line.partition(" ")
            (ran if kind == "ran" else done).append(msg_id)
    return ran, done


def finish(process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path, unique_name: str) -> str:
    """How a consumer process reaches the shared store: ``sqlite:<path>`` or ``redis:<url>``."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'dedupe.db'}"
    url = request.getfixturevalue("redis_url")
    return f"redis:{url}#{unique_name}"


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Consumers as Deduplicator ("sync") or AsyncDeduplicator ("async")."""
    return str(request.param)


def open_store(spec: str, flavour: str = "sync") -> Any:
    from buttress import AsyncRedisStore, AsyncSQLiteStore, RedisStore, SQLiteStore

    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        if flavour == "async":
            return AsyncSQLiteStore(where, busy_timeout=10.0, lock_retries=10)
        return SQLiteStore(where, busy_timeout=10.0, lock_retries=10)
    url, _, namespace = where.partition("#")
    if flavour == "async":
        return AsyncRedisStore.from_url(url, namespace=namespace)
    return RedisStore.from_url(url, namespace=namespace)


# -- tests -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("mix", "count"), [("sync", 20_000), ("mixed", 5_000)])
def test_eight_consumers_racing_on_the_same_20k_ids_handle_each_exactly_once(
        tmp_path, store_spec, mode, mix, count):
    # "mixed": consumers 1, 3, 5, 7 are AsyncDeduplicators on the same store (fewer ids:
    # the property shows at 5k and the suite stays fast).
    ids = [f"order-{i}" for i in range(count)]
    consumers = []
    for n in range(8):
        order = ids[:]
        random.Random(n).shuffle(order)  # each gets every id, in its own order
        consumers.append(start_consumer(tmp_path, f"c{n}", store_spec, order, mode=mode,
                                        batch=500, lease=60,
                                        flavour="async" if mix == "mixed" and n % 2 else "sync"))
    wait_until(lambda: all((tmp_path / f"c{n}.ready").exists() for n in range(8)), 60,
               message="8 consumers to be ready")
    (tmp_path / "go").touch()  # all start together, so they race on every id
    for process, _ in consumers:
        finish(process)
    ran = Counter(i for _, log in consumers for i in read_log(log)[0])
    assert set(ran) == set(ids)
    assert [i for i, n in ran.items() if n != 1] == []
    if mode == "effectively_once":
        done = Counter(i for _, log in consumers for i in read_log(log)[1])
        assert done == Counter(ids)
    busy = [len(read_log(log)[0]) for _, log in consumers]
    assert sum(1 for n in busy if n > 0) >= 2, f"no race happened: {busy}"


@pytest.mark.slow
def test_kill_9_mid_batch_at_most_once_never_runs_an_id_twice(tmp_path, store_spec, flavour):
    ids = [f"m-{i}" for i in range(300)]
    victim, victim_log = start_consumer(tmp_path, "victim", store_spec, ids,
                                        mode="at_most_once", batch=300, stick_after=40,
                                        flavour=flavour)
    (tmp_path / "go").touch()
    wait_until(lambda: len(read_log(victim_log)[0]) > 40, 60,
               message="the victim to be stuck mid-batch")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    ran_by_victim = read_log(victim_log)[0]

    survivor, survivor_log = start_consumer(tmp_path, "survivor", store_spec, ids,
                                            mode="at_most_once", batch=50, flavour=flavour)
    finish(survivor)
    ran_after = read_log(survivor_log)[0]
    # The victim claimed the whole batch before running it: every id is taken, none
    # runs again, and the ids it never reached are lost (at_most_once, documented).
    assert ran_after == []
    assert len(ran_by_victim) == len(set(ran_by_victim)) == 41


@pytest.mark.slow
def test_kill_9_mid_batch_effectively_once_others_complete_it_after_the_lease(
        tmp_path, store_spec, flavour):
    ids = [f"m-{i}" for i in range(300)]
    lease = 1.5
    victim, victim_log = start_consumer(tmp_path, "victim", store_spec, ids,
                                        mode="effectively_once", batch=300, lease=lease,
                                        stick_after=40, flavour=flavour)
    (tmp_path / "go").touch()
    wait_until(lambda: len(read_log(victim_log)[0]) > 40, 60,
               message="the victim to be stuck mid-batch")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)

    # Two consumers keep redelivering the same ids until each is finished.
    takers = [start_consumer(tmp_path, f"taker{n}", store_spec, ids[::1 - 2 * n],
                             mode="effectively_once", batch=60, lease=lease, until_done=True,
                             flavour=flavour if n else "sync")
              for n in range(2)]
    for process, _ in takers:
        finish(process)

    ran_by_victim, done_by_victim = read_log(victim_log)
    assert done_by_victim == []  # killed before its done write
    done = Counter(i for _, log in takers for i in read_log(log)[1])
    assert done == Counter(ids)  # every id marked done exactly once, by a taker
    ran_by_takers = Counter(i for _, log in takers for i in read_log(log)[0])
    assert ran_by_takers == Counter(ids)  # the lease kept the takers from running any twice
    assert set(ran_by_victim) <= set(ids)

    store = open_store(store_spec)
    try:
        records = [store.lookup(i) for i in ids]
    finally:
        store.close()
    assert all(r is not None and r.state == "done" and r.attempt == 2 for r in records)


@pytest.mark.slow
def test_sqlite_claims_survive_a_process_restart(tmp_path):
    spec = f"sqlite:{tmp_path / 'dedupe.db'}"
    ids = [f"m-{i}" for i in range(500)]
    for mode in MODES:
        first, first_log = start_consumer(tmp_path, f"first-{mode}", spec,
                                          [f"{mode}:{i}" for i in ids], mode=mode, batch=100)
        (tmp_path / "go").touch()
        finish(first)
        assert len(read_log(first_log)[0]) == len(ids)
        second, second_log = start_consumer(tmp_path, f"second-{mode}", spec,
                                            [f"{mode}:{i}" for i in ids], mode=mode, batch=100)
        finish(second)
        assert read_log(second_log)[0] == []  # the new process sees every claim


# -- the consumer process -----------------------------------------------------------------


async def consume(config: dict[str, Any]) -> None:
    """One consumer: Deduplicator (``flavour`` "sync") or AsyncDeduplicator ("async").

    The loop is a coroutine for both; the sync consumer's calls simply block it.
    """
    from buttress import AsyncDeduplicator, DedupeStatus, Deduplicator

    is_async = config.get("flavour") == "async"
    ids = Path(config["ids"]).read_text().split("\n")
    log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - line-buffered for SIGKILL
    stick_after = config.get("stick_after")
    ran = 0

    def handler(msg_id: str, payload: Any) -> None:
        nonlocal ran
        log.write(f"ran {msg_id}\n")
        ran += 1
        if stick_after is not None and ran > stick_after:
            while True:  # stuck mid-batch until the test kills this process
                time.sleep(1)

    async def async_handler(msg_id: str, payload: Any) -> None:
        await asyncio.sleep(0)
        handler(msg_id, payload)

    store = open_store(config["store"], "async" if is_async else "sync")
    dedupe: Any = (AsyncDeduplicator(async_handler, store, mode=config["mode"], ttl=600,
                                     lease=config.get("lease", 30)) if is_async
                   else Deduplicator(handler, store, mode=config["mode"], ttl=600,
                                     lease=config.get("lease", 30)))

    async def process_batch(messages: list[tuple[str, Any]]) -> Any:
        results = dedupe.process_batch(messages)
        return await results if is_async else results

    Path(config["ready"]).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(config["go"]):
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        await asyncio.sleep(0.005)

    batch = config["batch"]
    pending = ids
    while pending:
        unfinished = []
        for start in range(0, len(pending), batch):
            chunk = pending[start:start + batch]
            for result in await process_batch([(i, {"id": i}) for i in chunk]):
                if result.status is DedupeStatus.PROCESSED and not result.fenced \
                        and dedupe.mode == "effectively_once":
                    log.write(f"done {result.msg_id}\n")
                elif result.status in (DedupeStatus.IN_PROGRESS, DedupeStatus.FAILED):
                    unfinished.append(result.msg_id)
        if not config.get("until_done") or time.monotonic() > deadline:
            break
        pending = unfinished
        if pending:
            await asyncio.sleep(0.05)  # a redelivery delay, as a queue would have
    closed = store.close()
    if is_async:
        await closed
    log.close()


if __name__ == "__main__":
    asyncio.run(consume(json.loads(sys.argv[1])))
