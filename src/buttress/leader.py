"""Redis leader election with fencing tokens.

One instance at a time holds the *lease* of an election; each term it wins
gets a *fencing token* that is higher than every earlier term's.  Leadership
is judged locally by a deadline, so a paused or partitioned leader learns it
has lost before anyone else can win, and resources it writes can reject a
stale leader by its token (:class:`FencedStore`).

>>> election = LeaderElection(redis.Redis(), "billing-cron", ttl_ms=10_000)  # doctest: +SKIP
>>> elector = LeaderElector(election, "pod-7", on_elected=start, on_lost=stop)  # doctest: +SKIP
>>> elector.start()                                                          # doctest: +SKIP

How the pieces fit:

- :class:`LeaderElection` is the protocol: ``acquire_leader``,
  ``renew_leader`` and ``release_leader``, one Lua script (one round trip)
  each.  ``is_leader()`` is true only until the monotonic time the acquire
  or the last successful renew was *sent*, plus the TTL, minus a drift
  margin.  The server's lease started no earlier than that send, so it
  expires no earlier than the local deadline as long as the two clocks run
  at rates within the drift margin of each other.
- :class:`LeaderElector` runs an election on a thread: it renews at a
  fraction of the TTL and steps down (``on_lost``) at the local deadline if
  no renewal has succeeded, even while a Redis call is still hanging.
- :class:`FencedStore` is a Redis hash that accepts a write only if its
  token is at least the highest token it has accepted, so a leader that
  lost its term while paused cannot overwrite its successor's work.

The keys of one election share a hash tag (``{name}``), so the scripts run on
Redis Cluster.  docs/leader.md explains the failure modes this handles and
the ones it does not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from buttress._redis import (
    Backoff,
    Keys,
    Script,
    StoreErrors,
    check_tag,
    is_unavailable,
    load_script,
    require_async_client,
    require_sync_client,
)
from buttress._validate import require_callable, require_int, require_number, require_str
from buttress.errors import FencingRejected, StoreUnavailable

__all__ = [
    "FencedStore",
    "FencingRejected",
    "LeaderElection",
    "LeaderElector",
    "Term",
]

logger = logging.getLogger("buttress.leader")

DEFAULT_PREFIX = "buttress:leader"
# The longest lease (ms): ten years.  Redis refuses an expiry past 2**63 ms and the
# renewal thread's waits overflow long before that (a ttl_ms of 1e20 killed the thread).
MAX_TTL_MS = 315_360_000_000
FENCED_PREFIX = "buttress:fenced"

# Lua turns integer replies into doubles: tokens stay exact below 2**53.
MAX_TOKEN = 2**53 - 1


@dataclass(frozen=True)
class Term:
    """One won term, as this process sees it.

    ``sent_at`` is the ``time.monotonic()`` at which the acquire or the last
    successful renew was sent; ``deadline`` is ``sent_at + ttl - drift``, the
    moment local leadership ends unless a renewal sent before it succeeds.
    """

    instance_id: str
    fencing_token: int
    sent_at: float
    deadline: float

    @property
    def lease_value(self) -> str:
        """What the lease key holds during this term: ``"<token>:<instance_id>"``."""
        return f"{self.fencing_token}:{self.instance_id}"


# --------------------------------------------------------------------------
# The election protocol: scripts and local state, shared by the sync class
# below and the asyncio twin in buttress.leader_async.  Subclasses only run
# the scripts; every decision lives here.
# --------------------------------------------------------------------------


class ElectionProtocol:
    """Validation, keys, scripts and the local view of one election.

    Subclasses only run the scripts, blocking or with ``await``.
    """

    # The scripts (KEYS/ARGV contract in each file's header): buttress/_redis/leader_*.lua.
    ACQUIRE = load_script("leader_acquire.lua")
    RENEW = load_script("leader_renew.lua")
    RELEASE = load_script("leader_release.lua")

    _ASYNC = False  # which redis-py client the class runs its scripts on

    def __init__(
        self,
        redis_client: Any,
        name: str,
        *,
        ttl_ms: int,
        drift_ms: int | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        # The name is the hash tag that keeps the election's keys in one cluster slot.
        check_tag("name", name)
        ttl_ms = require_int("ttl_ms", ttl_ms, minimum=1, maximum=MAX_TTL_MS)
        if drift_ms is None:
            # 1% covers clock rate differences (NTP slews at most 0.05%) and
            # 2 ms covers the server's expiry granularity.
            drift_ms = min(ttl_ms // 100 + 2, ttl_ms // 2)
        drift_ms = require_int("drift_ms", drift_ms, minimum=0)
        if drift_ms >= ttl_ms:
            raise ValueError(
                f"drift_ms must be smaller than ttl_ms, got drift_ms={drift_ms} ttl_ms={ttl_ms}"
            )
        require_str("prefix", prefix)
        self.redis = _check_client(redis_client, self._ASYNC, type(self).__name__)
        self.name = name
        self.ttl_ms = ttl_ms
        self.drift_ms = drift_ms
        keys = Keys(name, prefix)
        self.lease_key = keys.key("lease")
        self.fence_key = keys.key("fence")
        # The nonce of the acquire call that set the lease: a resent acquire finds its own.
        self.acquire_key = keys.key("acquire")
        self._errors = StoreErrors(f"election {name!r}", redis_client)
        # (instance_id, nonce) of an acquire whose reply was lost: the next acquire of that
        # instance resends the same nonce, so a copy that ran after all is found as its own.
        self._unanswered_acquire: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._term: Term | None = None
        self._last_token: int | None = None
        self._counts = dict.fromkeys(
            ("acquire_attempts", "terms_won", "renewals", "renewals_failed", "releases",
             "store_errors", "quarantines"), 0)

    # -- the local view ---------------------------------------------------

    def is_leader(self) -> bool:
        """True while this object's current term is within its local deadline."""
        term = self._term
        return term is not None and time.monotonic() < term.deadline

    @property
    def fencing_token(self) -> int | None:
        """The token of the current term, or of the last one (None before any).

        It stays readable after the term ends, so a write prepared during the
        term carries the term's token and a fenced resource can reject it.
        """
        return self._last_token

    @property
    def term(self) -> Term | None:
        """The current term (possibly past its deadline), or None."""
        return self._term

    def stats(self) -> dict[str, Any]:
        term = self._term
        return {
            "name": self.name,
            "ttl_ms": self.ttl_ms,
            "drift_ms": self.drift_ms,
            "is_leader": self.is_leader(),
            "instance_id": term.instance_id if term else None,
            "fencing_token": self._last_token,
            **self._counts,
        }

    # -- requests and replies (the decisions, shared with the async twin) --

    def _acquire_request(self, instance_id: str) -> tuple[list[str], list[object]]:
        """The acquire script's keys and args, with a nonce drawn before the first send.

        A resend of the same call (redis-py's retry, or the next acquire of the
        same instance after this one's reply was lost) carries the same nonce.
        """
        _check_instance_id(instance_id)
        self._counts["acquire_attempts"] += 1
        pending = self._unanswered_acquire
        nonce = pending[1] if pending is not None and pending[0] == instance_id \
            else os.urandom(12).hex()
        self._unanswered_acquire = (instance_id, nonce)  # until a reply arrives
        return ([self.lease_key, self.fence_key, self.acquire_key],
                [instance_id, self.ttl_ms, nonce])

    def _acquire_reply(self, instance_id: str, sent_at: float, reply: object) -> bool:
        self._unanswered_acquire = None
        token = int(reply)  # type: ignore[call-overload]
        if token == -1:
            self._counts["quarantines"] += 1
            logger.warning(
                "election %r: fencing counter was missing (first use, or Redis lost its "
                "data); nobody can win for %d ms", self.name, self.ttl_ms)
            return False
        if token == 0:
            return False
        term = Term(instance_id, token, sent_at, sent_at + (self.ttl_ms - self.drift_ms) / 1e3)
        with self._lock:
            self._term = term
            self._last_token = token
        self._counts["terms_won"] += 1
        if time.monotonic() >= term.deadline:
            # Won on the server, but the reply came too late to use the term.
            logger.warning("election %r: term %d won by %r after its local deadline",
                           self.name, token, instance_id)
            return False
        logger.info("election %r: %r won term %d", self.name, instance_id, token)
        return True

    def _renew_request(self, instance_id: str) -> tuple[Term | None, list[str], list[object]]:
        """The term to renew and the script's keys/args; term None: nothing to renew."""
        _check_instance_id(instance_id)
        term = self._term
        if term is None or term.instance_id != instance_id:
            return None, [], []
        if time.monotonic() >= term.deadline:
            self._end_term(term, "its local deadline passed before the renewal")
            return None, [], []
        return term, [self.lease_key], [term.lease_value, self.ttl_ms]

    def _renew_reply(self, term: Term, sent_at: float, reply: object) -> bool:
        now = time.monotonic()
        if int(reply) != 1:  # type: ignore[call-overload]
            self._end_term(term, "the lease was no longer this term's")
            return False
        if now >= term.deadline:
            # The lease lives on until its ttl, but local leadership already
            # ended at the deadline: a term is never revived.
            self._end_term(term, "the renewal was answered after the local deadline")
            return False
        with self._lock:
            if self._term is not term:
                return False
            self._term = Term(term.instance_id, term.fencing_token, sent_at,
                              sent_at + (self.ttl_ms - self.drift_ms) / 1e3)
        self._counts["renewals"] += 1
        return True

    def _release_request(self, instance_id: str) -> tuple[Term | None, list[str], list[object]]:
        _check_instance_id(instance_id)
        term = self._term
        if term is None or term.instance_id != instance_id:
            return None, [], []
        # Local leadership ends as the release is sent, whatever the reply.
        self._end_term(term, None)
        return term, [self.lease_key], [term.lease_value]

    def _release_reply(self, reply: object) -> bool:
        released = int(reply) == 1  # type: ignore[call-overload]
        self._counts["releases"] += released
        return released

    def _store_error(self, operation: str, exc: BaseException) -> StoreUnavailable:
        """The StoreUnavailable for an unavailable Redis during ``operation`` (counted)."""
        self._counts["store_errors"] += 1
        return StoreUnavailable(f"election {self.name!r}: {operation} failed: "
                                f"{self._errors.error(exc)}")

    def _end_term(self, term: Term, reason: str | None) -> None:
        with self._lock:
            if self._term is not term:
                return
            self._term = None
        if reason is not None:
            self._counts["renewals_failed"] += 1
            logger.warning("election %r: term %d of %r ended: %s",
                           self.name, term.fencing_token, term.instance_id, reason)


def _check_instance_id(instance_id: object) -> None:
    require_str("instance_id", instance_id)


def _check_client(client: Any, is_async: bool, owner: str) -> Any:
    """The sync or ``redis.asyncio`` client ``owner`` needs; TypeError naming both otherwise."""
    if is_async:
        return require_async_client(client, owner=owner, twin=owner.removeprefix("Async"),
                                    argument="redis_client")
    return require_sync_client(client, owner=owner, twin=f"Async{owner}",
                               argument="redis_client")


class LeaderElection(ElectionProtocol):
    """Leader election on one Redis key, with fencing tokens (redis-py client).

    ``ttl_ms`` is the lease length; ``drift_ms`` (default 1% + 2 ms) is
    subtracted from it locally to absorb clock rate differences between this
    host and Redis.  Every contender of a name must use the same ``ttl_ms``.

    The race the deadline defends against, step by step: A sends a renewal at
    t0 and Redis extends the lease to (its now) + ttl, which is after t0 + ttl.
    A then freezes (GC, VM pause) past t0 + ttl.  Redis expires the lease, B
    acquires it.  When A wakes, ``is_leader()`` compares the clock with
    t0 + ttl - drift and says False, whatever the renewal reply said; A's
    next ``renew_leader`` returns False without reviving the term; and if A
    had already decided to write before freezing, the write carries A's
    older token, which a :class:`FencedStore` rejects once B has written.

    Redis errors surface as :class:`~buttress.errors.StoreUnavailable`; the
    local deadline still runs, so an unreachable Redis ends leadership on time.

    One object tracks one term at a time: give each contender its own.
    """

    def acquire_leader(self, instance_id: str) -> bool:
        """Start a new term for ``instance_id`` if no lease is held; True if won.

        Returns False while any lease exists, this instance's own included:
        keep a term with :meth:`renew_leader`.
        """
        keys, args = self._acquire_request(instance_id)
        sent_at = time.monotonic()
        reply = self._call("acquire", self.ACQUIRE, keys, args)
        return self._acquire_reply(instance_id, sent_at, reply)

    def renew_leader(self, instance_id: str) -> bool:
        """Extend this instance's current term by ``ttl_ms``; False if it has ended.

        False (and the term is over) when this object holds no term for
        ``instance_id``, when the local deadline has passed, or when the lease
        expired or belongs to another term, even if the key is free now.
        """
        term, keys, args = self._renew_request(instance_id)
        if term is None:
            return False
        sent_at = time.monotonic()
        reply = self._call("renew", self.RENEW, keys, args)
        return self._renew_reply(term, sent_at, reply)

    def release_leader(self, instance_id: str) -> bool:
        """End this instance's term and delete its lease; True if it was deleted.

        Never deletes another term's lease (compare-and-delete).
        """
        term, keys, args = self._release_request(instance_id)
        if term is None:
            return False
        reply = self._call("release", self.RELEASE, keys, args)
        return self._release_reply(reply)

    def _call(self, operation: str, script: Script, keys: list[str], args: list[object]) -> object:
        with _mapped(self, operation):
            return script.run(self.redis, keys, args)


# --------------------------------------------------------------------------
# The background elector
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sleep:
    """Elector step: wait until monotonic time ``until`` (or until stopped)."""

    until: float


@dataclass(frozen=True)
class _Call:
    """Elector step: run ``operation`` ("acquire" or "renew"), waiting at most until ``until``.

    The driver sends back the finished future/task, or None if ``until``
    came first; a call left behind keeps running and is never revived.
    """

    operation: str
    until: float


class ElectorCore:
    """What an elector does and when, as a generator of steps (no I/O, no threads).

    Shared by :class:`LeaderElector` (a thread) and the asyncio elector: each
    only drives :meth:`_steps`, running its sleeps and calls.
    ``renew_interval_ms`` (default ttl/3) is how long after a renewal was
    sent the next one goes out; ``retry_interval_ms`` (default ttl/4) is the
    longest wait between acquisition attempts, each wait drawn uniformly from
    its upper half so contenders do not retry in lockstep.
    """

    def __init__(
        self,
        election: Any,
        instance_id: str,
        *,
        on_elected: Callable[[int], object] | None = None,
        on_lost: Callable[[int], object] | None = None,
        renew_interval_ms: int | None = None,
        retry_interval_ms: int | None = None,
        seed: int | None = None,
    ) -> None:
        _check_instance_id(instance_id)
        if not isinstance(election, ElectionProtocol):
            raise TypeError(f"election must be a LeaderElection, got {type(election).__name__}")
        usable_ms = election.ttl_ms - election.drift_ms
        if renew_interval_ms is None:
            renew_interval_ms = max(1, election.ttl_ms // 3)
        if retry_interval_ms is None:
            retry_interval_ms = max(1, election.ttl_ms // 4)
        renew_interval_ms = require_int("renew_interval_ms", renew_interval_ms, minimum=1)
        retry_interval_ms = require_int("retry_interval_ms", retry_interval_ms, minimum=1)
        if renew_interval_ms >= usable_ms:
            raise ValueError(
                f"renew_interval_ms must be below ttl_ms - drift_ms = {usable_ms} so a "
                f"renewal goes out before the deadline, got {renew_interval_ms}")
        require_callable("on_elected", on_elected, allow_none=True)
        require_callable("on_lost", on_lost, allow_none=True)
        self.instance_id = instance_id
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.renew_interval = renew_interval_ms / 1e3
        self.retry_interval = retry_interval_ms / 1e3
        self.election = election
        self._protocol: ElectionProtocol = election
        # Jittered so contenders do not retry in lockstep; constant: a contender retries
        # at the same pace however long the lease has been held.
        self._backoff = Backoff(self.retry_interval, self.retry_interval, seed=seed)
        self._token: int | None = None  # the term this elector leads, if any
        self._counts = dict.fromkeys(
            ("terms_won", "terms_lost", "renew_errors", "acquire_errors", "callback_errors"), 0)
        self._stop_timeout = 5.0
        self._init_driver()

    def _init_driver(self) -> None:
        """Set up the driver's own state (a thread, or a task)."""

    def is_leader(self) -> bool:
        """True while the elector leads and the term is within its local deadline."""
        return self._token is not None and self._protocol.is_leader()

    @property
    def fencing_token(self) -> int | None:
        """The token of the term being led, or of the last one (None before any)."""
        return self._protocol.fencing_token

    def stats(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "is_leader": self.is_leader(),
            "fencing_token": self.fencing_token,
            **self._counts,
            "election": self._protocol.stats(),
        }

    def _steps(self) -> Generator[_Sleep | _Call, Any, None]:
        """The elector's life: contend, lead, step down, contend again."""
        while True:
            if self._token is None:
                outcome = yield _Call("acquire", until=math.inf)
                won = self._result(outcome, "acquire_errors")
                if won and self._protocol.is_leader():
                    self._elected()
                else:
                    yield _Sleep(time.monotonic() + self._retry_delay())
                continue
            term = self._protocol.term
            deadline = term.deadline if term is not None else -math.inf
            renew_at = term.sent_at + self.renew_interval if term is not None else -math.inf
            yield _Sleep(min(renew_at, deadline))
            if time.monotonic() >= deadline:
                self._lost("no renewal succeeded before the local deadline")
                continue
            outcome = yield _Call("renew", until=deadline)
            if outcome is None:
                self._lost("the renewal did not answer before the local deadline")
                continue
            renewed = self._result(outcome, "renew_errors")
            if renewed is None:  # a Redis error: retry soon, never past the deadline
                yield _Sleep(min(time.monotonic() + self._retry_delay(), deadline))
            elif not renewed:
                self._lost("the lease was lost")

    def _stepping_down(self) -> None:
        """Called by the driver when it stops: end the term before releasing."""
        self._lost("the elector is stopping")

    def _result(self, outcome: Any, error_count: str) -> bool | None:
        """The bool a finished call returned, or None after a Redis error."""
        try:
            return bool(outcome.result())
        except (StoreUnavailable, RedisError) as exc:
            # Unavailable, or another Redis error (a clobbered key): a failed attempt,
            # counted and logged; the deadline still ends the term on time.
            self._counts[error_count] += 1
            logger.warning("elector %r: %s", self.instance_id, exc)
            return None

    def _retry_delay(self) -> float:
        return self._backoff.next()

    def _elected(self) -> None:
        token = self._protocol.fencing_token
        assert token is not None
        self._token = token
        self._counts["terms_won"] += 1
        self._callback(self.on_elected, token)

    def _lost(self, reason: str) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        self._counts["terms_lost"] += 1
        logger.info("elector %r: stepped down from term %d: %s", self.instance_id, token, reason)
        self._callback(self.on_lost, token)

    def _callback(self, callback: Callable[[int], object] | None, token: int) -> None:
        if callback is None:
            return
        try:
            callback(token)
        except Exception:
            self._counts["callback_errors"] += 1
            logger.exception("elector %r: callback %r raised", self.instance_id, callback)


class LeaderElector(ElectorCore):
    """Keeps contending for an election on a background thread.

    While following, it tries :meth:`LeaderElection.acquire_leader` every
    ``retry_interval_ms`` (jittered); when it wins it calls
    ``on_elected(token)``.  While leading it renews every
    ``renew_interval_ms``; if no renewal succeeds by the term's local deadline
    it calls ``on_lost(token)`` *at* that deadline, which comes before the
    server can expire the lease, so before anyone else can win.  Redis calls
    run on a helper thread, so a call that hangs (a partition, a paused
    Redis) cannot delay the step-down; Redis errors count as failed renewals.

    Callbacks run on the elector thread: keep them short (hand work to other
    threads).  Their exceptions are logged and counted, never fatal.
    :meth:`stop` calls ``on_lost`` and then releases the lease.
    """

    election: LeaderElection

    def _init_driver(self) -> None:
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: _CallThread | None = None

    def start(self) -> LeaderElector:
        """Start contending (idempotent while running)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        if self._stopping.is_set():
            raise RuntimeError("a stopped LeaderElector cannot be restarted; create a new one")
        self._worker = _CallThread(f"buttress-leader-io-{self.instance_id}")
        self._thread = threading.Thread(
            target=self._run, name=f"buttress-leader-{self.instance_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Step down (``on_lost``), release the lease and stop the thread.

        Waits up to ``timeout`` seconds in all; the lease expires by itself
        if Redis does not answer in time.
        """
        self._stop_timeout = require_number("timeout", timeout, above=0)
        self._stopping.set()
        self._wake.set()
        if self._thread is threading.current_thread():
            return  # called from a callback: the thread stops after it returns
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("elector %r: thread did not stop within %.3gs",
                               self.instance_id, timeout)

    def __enter__(self) -> LeaderElector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread: drive the steps --------------------------------------

    def _run(self) -> None:
        steps = self._steps()
        outcome: Future[bool] | None = None
        try:
            while not self._stopping.is_set():
                step = steps.send(outcome)
                if isinstance(step, _Sleep):
                    outcome = None
                    self._stopping.wait(max(0.0, step.until - time.monotonic()))
                else:
                    outcome = self._call(step.operation, until=step.until)
        except Exception:  # a bug, not a Redis error: stop leading, loudly
            logger.exception("elector %r: thread failed", self.instance_id)
        finally:
            self._shutdown()

    def _call(self, operation: str, *, until: float) -> Future[bool] | None:
        """Run the operation on the I/O thread; None at ``until`` or when stopping."""
        assert self._worker is not None
        function = (self.election.acquire_leader if operation == "acquire"
                    else self.election.renew_leader)
        outcome = self._worker.submit(function, self.instance_id)
        outcome.add_done_callback(lambda _: self._wake.set())
        while not outcome.done():
            remaining = until - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return None
            self._wake.wait(min(remaining, 3600.0))
            self._wake.clear()
        return outcome

    def _shutdown(self) -> None:
        self._stepping_down()
        worker, self._worker = self._worker, None
        if worker is None:
            return
        # Queued behind any call in flight, so an acquire that wins late is released too.
        release = worker.submit(self.election.release_leader, self.instance_id)
        try:
            release.result(timeout=self._stop_timeout)
        except Exception as exc:  # the lease expires by itself
            logger.warning("elector %r: release failed: %r", self.instance_id, exc)
        worker.close()


class _CallThread:
    """One daemon thread that runs submitted calls in order.

    A daemon, unlike a ThreadPoolExecutor's workers, so a Redis call hanging
    on a dead connection cannot hold up interpreter exit.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                       | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, function, args))
        return future

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, function, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as exc:
                future.set_exception(exc)


# --------------------------------------------------------------------------
# Fencing: a resource that rejects writes from stale terms
# --------------------------------------------------------------------------


class FencedResource:
    """Validation, keys and the script of a fenced resource; subclasses run it."""

    # KEYS/ARGV contract in the file's header: buttress/_redis/fenced_write.lua.
    WRITE = load_script("fenced_write.lua")
    _ASYNC = False

    def __init__(self, redis_client: Any, resource: str, *, prefix: str = FENCED_PREFIX) -> None:
        check_tag("resource", resource)
        require_str("prefix", prefix)
        self.redis = _check_client(redis_client, self._ASYNC, type(self).__name__)
        self.resource = resource
        keys = Keys(resource, prefix)
        self.token_key = keys.key("token")
        self.data_key = keys.key("data")
        self._counts = {"writes": 0, "rejected": 0}
        self._errors = StoreErrors(f"fenced resource {resource!r}", redis_client)

    def stats(self) -> dict[str, Any]:
        return {"resource": self.resource, **self._counts}

    def _write_request(
        self, fencing_token: int, field: str | bytes, value: str | bytes | int | float,
    ) -> tuple[list[str], list[object]]:
        require_int("fencing_token", fencing_token, minimum=1, maximum=MAX_TOKEN)
        if not isinstance(field, (str, bytes)):
            raise TypeError(f"field must be str or bytes, got {type(field).__name__}")
        if not isinstance(value, (str, bytes, int, float)) or isinstance(value, bool):
            raise TypeError(f"value must be str, bytes, int or float, got {type(value).__name__}")
        return [self.token_key, self.data_key], [fencing_token, field, value]

    def _write_reply(self, fencing_token: int, reply: Any) -> None:
        accepted, highest = int(reply[0]), int(reply[1])
        if not accepted:
            self._counts["rejected"] += 1
            raise FencingRejected(self.resource, fencing_token, highest)
        self._counts["writes"] += 1

    def _store_error(self, operation: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"fenced resource {self.resource!r}: {operation} failed: "
                                f"{self._errors.error(exc)}")


class FencedStore(FencedResource):
    """A Redis hash that only accepts writes carrying a current fencing token.

    ``write(token, field, value)`` applies (HSET) only if ``token`` is at
    least the highest token the resource has accepted, and records it; an
    older token raises :class:`FencingRejected`.  Check and write are one
    script, so a newer leader's write cannot slip between them.  A resource
    outside Redis (a database row, an object store) follows the same pattern:
    store the highest token with the data and compare in the same transaction.
    """

    def write(
        self, fencing_token: int, field: str | bytes, value: str | bytes | int | float,
    ) -> None:
        """Set ``field`` to ``value`` if ``fencing_token`` is current; else FencingRejected."""
        keys, args = self._write_request(fencing_token, field, value)
        with _mapped(self, "write"):
            reply = self.WRITE.run(self.redis, keys, args)
        self._write_reply(fencing_token, reply)

    def read(self, field: str | bytes) -> Any:
        """The value of ``field`` (as the client returns it), or None."""
        with _mapped(self, "read"):
            return self.redis.hget(self.data_key, field)

    def highest_token(self) -> int | None:
        """The highest token accepted so far, or None before the first write."""
        with _mapped(self, "read"):
            value = self.redis.get(self.token_key)
        return None if value is None else int(value)


@contextlib.contextmanager
def _mapped(owner: ElectionProtocol | FencedResource, operation: str) -> Iterator[None]:
    """The core's error mapping, with the operation named (sync and async shells alike)."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            raise owner._store_error(operation, exc) from exc
        raise
