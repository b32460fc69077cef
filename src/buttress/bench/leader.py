"""Leader election suite: the cost of one term's round trips, next to redis-py's Lock.

All on the same Redis, one client each, interleaved repeats:

- acquire + release: ``acquire_leader`` + ``release_leader`` (two scripts, the
  acquire also INCRs the fencing counter) against redis-py's ``Lock``
  ``acquire(blocking=False)`` + ``release()`` and a bare ``SET NX PX`` + ``DEL``
  (the floor: two plain round trips);
- renew: ``renew_leader`` against ``Lock.reacquire()`` and a bare ``PEXPIRE``;
- a follower's acquire attempt on a held lease against a failing
  ``Lock.acquire(blocking=False)`` and a bare ``SET NX PX`` (one round trip);
- fenced write: ``FencedStore.write`` against a plain ``HSET``.

Every call is checked to have succeeded, so a failing call cannot pose as a
fast one.  The targets say what the extra safety (tokens, owner checks,
the local deadline) may cost per round trip.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from buttress.bench import BenchSession

if TYPE_CHECKING:  # imported in register(): discovery must not need redis
    from buttress.leader import LeaderElection

ORDER = 50

LOCK = "redis-py Lock"
TTL_MS = 600_000  # never expires during the run


def register(session: BenchSession) -> None:
    import redis

    from buttress.leader import FencedStore, LeaderElection

    # Any: redis-py's stubs differ between 5.x and 8.x (the compare extra pins 5.x).
    client: Any = redis.Redis.from_url(session.redis_url())
    run = uuid.uuid4().hex[:8]
    cycles = 300 if session.quick else 2000

    election = LeaderElection(client, f"bench-{run}", ttl_ms=TTL_MS)
    _past_quarantine(client, election.name)
    lock = client.lock(f"bench:lock:{run}", timeout=TTL_MS / 1e3)
    bare_key = f"bench:bare:{run}"

    def ours_cycle() -> None:
        for _ in range(cycles):
            _check(election.acquire_leader("bench") and election.release_leader("bench"))

    def lock_cycle() -> None:
        for _ in range(cycles):
            _check(lock.acquire(blocking=False))
            lock.release()

    def bare_cycle() -> None:
        for _ in range(cycles):
            _check(client.set(bare_key, b"bench", nx=True, px=TTL_MS))
            _check(client.delete(bare_key))

    case = session.case("leader", f"acquire + release, {cycles} terms", unit="term")
    case.add("buttress", ours_cycle, items=cycles)
    case.add(LOCK, lock_cycle, items=cycles, note="acquire(blocking=False) + release")
    case.add("bare SET NX PX + DEL", bare_cycle, items=cycles, note="no owner check")
    case.target("buttress", LOCK, max_ratio=1.3)

    def ours_renew(_: object) -> None:
        for _ in range(cycles):
            _check(election.renew_leader("bench"))

    def lock_renew(_: object) -> None:
        for _ in range(cycles):
            _check(lock.reacquire())

    def bare_renew(_: object) -> None:
        for _ in range(cycles):
            _check(client.pexpire(bare_key, TTL_MS))

    # Each renew timing gets its term (or lock, or key) from an untimed setup.
    case = session.case("leader", f"renew, {cycles} renewals", unit="renewal")
    case.add("buttress", ours_renew, items=cycles, setup=_holding(election))
    case.add(LOCK, lock_renew, items=cycles, setup=_holding_lock(lock), note="reacquire()")
    case.add("bare PEXPIRE", bare_renew, items=cycles,
             setup=lambda: client.set(bare_key, b"bench", px=TTL_MS), note="no owner check")
    case.target("buttress", LOCK, max_ratio=1.3)

    # What a follower pays per retry: one acquire attempt on a held lease.
    holder = LeaderElection(client, election.name, ttl_ms=TTL_MS)
    rival_lock = client.lock(lock.name, timeout=TTL_MS / 1e3)

    def ours_attempt(_: object) -> None:
        for _ in range(cycles):
            _check(not holder.acquire_leader("follower"))

    def lock_attempt(_: object) -> None:
        for _ in range(cycles):
            _check(not rival_lock.acquire(blocking=False))

    def bare_attempt(_: object) -> None:
        for _ in range(cycles):
            _check(client.set(bare_key, b"follower", nx=True, px=TTL_MS) is None)

    case = session.case("leader", f"acquire attempt on a held lease, {cycles} tries",
                        unit="try")
    case.add("buttress", ours_attempt, items=cycles, setup=_holding(election))
    case.add(LOCK, lock_attempt, items=cycles, setup=_holding_lock(lock),
             note="acquire(blocking=False)")
    case.add("bare SET NX PX", bare_attempt, items=cycles,
             setup=lambda: client.set(bare_key, b"bench", px=TTL_MS), note="one round trip")
    case.target("buttress", LOCK, max_ratio=1.3)

    store = FencedStore(client, f"bench-{run}")
    data_key = f"bench:hash:{run}"

    def fenced() -> None:
        for i in range(cycles):
            store.write(7, "field", i)  # raises FencingRejected if it did not apply

    def plain() -> None:
        for i in range(cycles):
            client.hset(data_key, "field", i)

    case = session.case("leader", f"fenced write, {cycles} writes", unit="write")
    case.add("buttress", fenced, items=cycles)
    case.add("plain HSET", plain, items=cycles, note="no fencing")
    case.target("buttress", "plain HSET", max_ratio=1.5)


def _past_quarantine(client: object, name: str) -> None:
    """The first acquire of a name blocks it for one ttl: spend that with a 20 ms ttl."""
    from buttress.leader import LeaderElection

    warmup = LeaderElection(client, name, ttl_ms=20)
    deadline = time.monotonic() + 10
    while not warmup.acquire_leader("warmup"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not open election {name!r} for the benchmark")
        time.sleep(0.005)
    warmup.release_leader("warmup")


def _holding(election: LeaderElection) -> Callable[[], None]:
    def setup() -> None:
        if not election.is_leader():
            _check(election.acquire_leader("bench"))
    return setup


def _holding_lock(lock: object) -> Callable[[], None]:
    def setup() -> None:
        if not lock.owned():  # type: ignore[attr-defined]
            _check(lock.acquire(blocking=False))  # type: ignore[attr-defined]
    return setup


def _check(ok: object) -> None:
    if not ok:
        raise RuntimeError("a benchmarked Redis call did not succeed; the figures would lie")
