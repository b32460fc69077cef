"""Leader election with fencing: the protocol, its edge cases, the elector, the async twin.

Real Redis (the session fixture, or a private RedisServer where the test
restarts or freezes it), real processes (tests/leader_contender.py) and real
signals.  Every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from buttress import (
    AsyncFencedStore,
    AsyncLeaderElection,
    AsyncLeaderElector,
    FencedStore,
    FencingRejected,
    LeaderElection,
    LeaderElector,
    StoreUnavailable,
)
from buttress.testing import RedisServer
from conftest import wait_until

pytestmark = pytest.mark.redis

CONTENDER = os.path.join(os.path.dirname(__file__), "leader_contender.py")


def opened(client: redis.Redis, name: str, ttl_ms: int = 50) -> None:
    """Get an election past its first-use quarantine (one short ttl), leaving no lease."""
    election = LeaderElection(client, name, ttl_ms=ttl_ms)
    wait_until(lambda: election.acquire_leader("opener"), timeout=10, message="first term")
    assert election.release_leader("opener")


def won(election: LeaderElection, instance_id: str, timeout: float = 10.0) -> int:
    wait_until(lambda: election.acquire_leader(instance_id), timeout=timeout,
               message=f"{instance_id} to win {election.name}")
    token = election.fencing_token
    assert token is not None
    return token


class Repl:
    """A tests/leader_contender.py process in repl mode, driven line by line."""

    def __init__(self, url: str, name: str, ttl_ms: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, CONTENDER, "repl", url, name, str(ttl_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.read() == "ready"

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self, timeout: float = 20.0) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"contender {self.process.pid} did not answer within {timeout}s"
        line = self.process.stdout.readline().strip()
        assert line, f"contender {self.process.pid} exited ({self.process.poll()})"
        return line

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def repls() -> Iterator[list[Repl]]:
    started: list[Repl] = []
    yield started
    for repl in started:
        repl.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, to restart or freeze."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        server.close()


# -- arguments ---------------------------------------------------------------


# Wrong type -> TypeError, right type wrong value -> ValueError (buttress._validate).
@pytest.mark.parametrize(("ttl_ms", "error"), [
    (0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
    (None, TypeError), ("100", TypeError), ("5", TypeError)])
def test_ttl_must_be_a_positive_int(redis_client, ttl_ms, error):
    with pytest.raises(error, match="ttl_ms"):
        LeaderElection(redis_client, "x", ttl_ms=ttl_ms)


@pytest.mark.parametrize(("name", "error"), [
    ("", ValueError), ("a{b", ValueError), ("b}", ValueError), (None, TypeError), (7, TypeError)])
def test_name_must_be_a_plain_non_empty_str(redis_client, name, error):
    with pytest.raises(error, match="name"):
        LeaderElection(redis_client, name, ttl_ms=100)


@pytest.mark.parametrize(("drift_ms", "error"), [
    (-1, ValueError), (100, ValueError), (250, ValueError), (1.0, TypeError)])
def test_drift_margin_must_fit_inside_the_ttl(redis_client, drift_ms, error):
    with pytest.raises(error, match="drift_ms"):
        LeaderElection(redis_client, "x", ttl_ms=100, drift_ms=drift_ms)


@pytest.mark.parametrize(("instance_id", "error"), [
    ("", ValueError), (None, TypeError), (b"a", TypeError), (3, TypeError)])
def test_instance_id_must_be_a_non_empty_str(redis_client, unique_name, instance_id, error):
    election = LeaderElection(redis_client, unique_name, ttl_ms=100)
    for method in (election.acquire_leader, election.renew_leader, election.release_leader):
        with pytest.raises(error, match="instance_id"):
            method(instance_id)
    with pytest.raises(error, match="instance_id"):
        LeaderElector(election, instance_id)


def test_elector_arguments_are_checked(redis_client, unique_name):
    election = LeaderElection(redis_client, unique_name, ttl_ms=300)
    with pytest.raises(ValueError, match="renew_interval_ms"):
        LeaderElector(election, "a", renew_interval_ms=300)
    with pytest.raises(ValueError, match="retry_interval_ms"):
        LeaderElector(election, "a", retry_interval_ms=0)
    with pytest.raises(TypeError, match="on_lost"):
        LeaderElector(election, "a", on_lost="stop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="election"):
        LeaderElector(redis_client, "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        LeaderElector(election, "a").stop(timeout=0)


@pytest.mark.parametrize(("token", "error"), [
    (0, ValueError), (-3, ValueError), (2**53, ValueError), (True, TypeError), ("5", TypeError),
    (1.0, TypeError)])
def test_fenced_write_needs_a_valid_token(redis_client, unique_name, token, error):
    store = FencedStore(redis_client, unique_name)
    with pytest.raises(error, match="fencing_token"):
        store.write(token, "f", "v")
    with pytest.raises(TypeError, match="value"):
        store.write(1, "f", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resource"):
        FencedStore(redis_client, "")


# -- the protocol ----------------------------------------------------------------


def test_first_use_quarantines_the_election_for_one_ttl(redis_client, unique_name):
    election = LeaderElection(redis_client, unique_name, ttl_ms=400)
    started = time.monotonic()
    assert election.acquire_leader("a") is False  # creates the counter, blocks one ttl
    assert election.acquire_leader("a") is False
    assert election.stats()["quarantines"] == 1
    won(election, "a")
    assert time.monotonic() - started >= 0.4 - 0.01  # 10 ms: the server's expiry granularity
    assert election.is_leader()


def test_acquire_renew_release(redis_client, unique_name):
    opened(redis_client, unique_name)
    a = LeaderElection(redis_client, unique_name, ttl_ms=5000)
    b = LeaderElection(redis_client, unique_name, ttl_ms=5000)
    assert a.acquire_leader("a")
    token = a.fencing_token
    assert a.is_leader() and a.term is not None and a.term.instance_id == "a"
    assert redis_client.get(a.lease_key) == f"{token}:a".encode()
    assert b.acquire_leader("b") is False  # held
    assert a.acquire_leader("a") is False  # held, by a itself: keep a term with renew
    assert b.renew_leader("b") is False and b.release_leader("b") is False
    redis_client.pexpire(a.lease_key, 1000)
    assert a.renew_leader("a")
    assert redis_client.pttl(a.lease_key) > 4000
    assert a.release_leader("a")
    assert not a.is_leader() and redis_client.exists(a.lease_key) == 0
    assert a.fencing_token == token  # kept after the term, for fenced writes
    assert a.renew_leader("a") is False
    assert b.acquire_leader("b") and b.fencing_token == token + 1
    assert a.release_leader("a") is False  # never deletes another term's lease
    assert redis_client.exists(b.lease_key) == 1
    stats = a.stats()
    assert stats["terms_won"] == 1 and stats["renewals"] == 1 and stats["releases"] == 1


def test_each_call_is_one_evalsha_and_scripts_reload_after_noscript(private_redis):
    client = redis.Redis.from_url(private_redis.url)
    opened(client, "one-trip")
    election = LeaderElection(client, "one-trip", ttl_ms=5000)

    def script_commands() -> dict[str, int]:
        stats = client.info("commandstats")  # (commands run inside scripts count too)
        return {name: stats.get(f"cmdstat_{name}", {"calls": 0})["calls"]
                for name in ("evalsha", "eval", "script")}

    assert election.acquire_leader("a") and election.renew_leader("a")  # scripts loaded
    assert election.release_leader("a")
    client.config_resetstat()
    assert election.acquire_leader("a") and election.renew_leader("a")
    assert election.release_leader("a")
    assert script_commands() == {"evalsha": 3, "eval": 0, "script": 0}
    client.script_flush()
    client.config_resetstat()
    assert election.acquire_leader("a")  # NOSCRIPT, then SCRIPT LOAD and EVALSHA again
    assert script_commands() == {"evalsha": 2, "eval": 0, "script": 1}
    assert election.is_leader()
    client.close()


def test_an_expired_ttl_ends_the_term_even_if_the_key_is_free(redis_client, unique_name):
    opened(redis_client, unique_name)
    a = LeaderElection(redis_client, unique_name, ttl_ms=200)
    b = LeaderElection(redis_client, unique_name, ttl_ms=200)
    token = won(a, "a")
    deadline = a.term.deadline  # type: ignore[union-attr]
    # Whenever the server has expired the lease, the local view already says so.
    wait_until(lambda: redis_client.exists(a.lease_key) == 0, timeout=5, interval=0.001,
               message="the server to expire the lease")
    assert not a.is_leader()
    assert time.monotonic() >= deadline
    assert a.renew_leader("a") is False  # the key is free, and still: lost
    assert a.term is None and a.renew_leader("a") is False
    assert b.acquire_leader("b") and b.fencing_token == token + 1


def test_a_renewal_racing_a_new_acquirer_never_gives_two_leaders(redis_client, unique_name):
    """Renew and acquire fired together around the server's expiry, many times.

    To reach the server-side race, the lease is shortened behind the leader's
    back (as a server clock running fast would): the leader still believes
    in its term and sends its renewal while another instance can acquire.
    """
    opened(redis_client, unique_name)
    a = LeaderElection(redis_client, unique_name, ttl_ms=2000)
    b = LeaderElection(redis_client, unique_name, ttl_ms=2000)
    outcomes = set()

    def race(gate: threading.Barrier, delay: float, results: dict[str, bool], name: str,
             call) -> None:
        gate.wait()
        time.sleep(delay)
        results[name] = call()

    for trial in range(30):
        won(a, "a")
        redis_client.pexpire(a.lease_key, 20)
        gate = threading.Barrier(2)
        results: dict[str, bool] = {}
        delay = 0.015 + (trial % 10) * 0.001  # around the 20 ms expiry
        threads = [
            threading.Thread(target=race, args=(gate, delay, results, "renew",
                                                lambda: a.renew_leader("a"))),
            threading.Thread(target=race, args=(gate, delay, results, "acquire",
                                                lambda: b.acquire_leader("b"))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not (results["renew"] and results["acquire"]), f"two leaders in trial {trial}"
        assert a.is_leader() == results["renew"] and b.is_leader() == results["acquire"]
        holder = redis_client.get(a.lease_key)
        if results["acquire"]:
            assert holder == f"{b.fencing_token}:b".encode()
            assert b.release_leader("b")
        elif results["renew"]:
            assert holder == f"{a.fencing_token}:a".encode()
        outcomes.add((results["renew"], results["acquire"]))
        a.release_leader("a")
    assert (False, True) in outcomes  # the acquirer won some races (renew answered False)


def test_a_crashed_leader_is_replaced_after_its_ttl(redis_client, redis_url, unique_name, repls):
    opened(redis_client, unique_name)
    ttl = 600
    crashed = Repl(redis_url, unique_name, ttl)
    repls.append(crashed)
    sent = time.monotonic()
    assert crashed.ask("acquire pod-a") == "True"
    old_token = int(crashed.ask("token"))
    crashed.signal(signal.SIGKILL)
    killed = time.monotonic()
    successor = LeaderElection(redis_client, unique_name, ttl_ms=ttl)
    token = won(successor, "pod-b", timeout=ttl / 1e3 + 5)
    taken_over = time.monotonic()
    # Not before the crashed leader's lease could expire (Redis truncates its
    # clock to milliseconds: 2 ms of grace), and soon after it did.
    assert taken_over >= sent + ttl / 1e3 - 0.002
    assert taken_over - killed < ttl / 1e3 + 1.0
    assert token == old_token + 1


def test_a_redis_restart_without_persistence_never_overlaps_terms(private_redis, redis_client,
                                                                  unique_name):
    client = redis.Redis.from_url(private_redis.url)
    ttl = 500
    opened(client, "restart")
    old = LeaderElection(client, "restart", ttl_ms=ttl)
    new = LeaderElection(client, "restart", ttl_ms=ttl)
    old_token = won(old, "old")
    fenced = FencedStore(redis_client, unique_name)  # a resource that survives the restart
    fenced.write(old_token, "owner", "old")
    old_deadline = old.term.deadline  # type: ignore[union-attr]

    private_redis.restart()  # no persistence: lease and counter are gone

    def renewed() -> bool | None:
        try:
            return old.renew_leader("old")
        except StoreUnavailable:
            return None  # the reconnect failed this time; try again

    assert wait_until(lambda: renewed() is False, message="old leader to learn it lost") is True
    assert not old.is_leader()
    # The first acquire finds no counter and quarantines the name for one ttl:
    # the old leader's local deadline passes before anybody can win.
    assert new.acquire_leader("new") is False
    new_token = won(new, "new")
    assert new.term.sent_at >= old_deadline  # type: ignore[union-attr]
    assert new_token > old_token  # the counter restarts at the server clock (microseconds)
    fenced.write(new_token, "owner", "new")
    with pytest.raises(FencingRejected):
        fenced.write(old_token, "owner", "old, late")
    assert fenced.read("owner") == b"new"
    client.close()


def test_an_instance_id_reused_by_two_processes_cannot_take_the_other_term(
        redis_client, redis_url, unique_name, repls):
    opened(redis_client, unique_name)
    first, second = Repl(redis_url, unique_name, 30_000), Repl(redis_url, unique_name, 30_000)
    repls += [first, second]
    assert first.ask("acquire worker-1") == "True"
    assert second.ask("acquire worker-1") == "False"
    assert second.ask("renew worker-1") == "False"
    assert second.ask("release worker-1") == "False"
    assert first.ask("renew worker-1") == "True"
    # The lease vanishes under the first process (a failover that lost the write
    # would do this); the second, with the same id, wins a new term.
    lease_key = LeaderElection(redis_client, unique_name, ttl_ms=30_000).lease_key
    redis_client.delete(lease_key)
    assert second.ask("acquire worker-1") == "True"
    assert first.ask("leader") == "True"  # its local deadline has not passed...
    assert first.ask("renew worker-1") == "False"  # ...but the token does not match
    assert first.ask("leader") == "False"
    assert first.ask("release worker-1") == "False"
    assert second.ask("renew worker-1") == "True"
    assert redis_client.get(lease_key) == f"{second.ask('token')}:worker-1".encode()


def test_a_leader_paused_past_its_ttl_has_its_late_write_rejected(
        redis_client, redis_url, unique_name, repls):
    """check -> SIGSTOP -> successor wins and writes -> SIGCONT -> the late write is rejected."""
    opened(redis_client, unique_name)
    ttl = 500
    paused = Repl(redis_url, unique_name, ttl)
    repls.append(paused)
    resource = f"{unique_name}:resource"
    assert paused.ask("acquire pod-a") == "True"
    old_token = int(paused.ask("check").split()[1])  # decided to write, as leader
    assert paused.ask(f"write {resource} config v1") == "accepted"
    paused.signal(signal.SIGSTOP)  # a GC or VM pause between decision and write
    successor = LeaderElection(redis_client, unique_name, ttl_ms=ttl)
    token = won(successor, "pod-b", timeout=ttl / 1e3 + 5)
    store = FencedStore(redis_client, resource)
    store.write(token, "config", "v2")
    paused.signal(signal.SIGCONT)
    assert paused.ask(f"write {resource} config stale") == f"rejected {token}"
    assert paused.ask("leader") == "False"
    assert paused.ask("renew pod-a") == "False"
    assert store.read("config") == b"v2" and store.highest_token() == token > old_token


def test_fenced_store_accepts_equal_and_newer_tokens(redis_client, unique_name):
    store = FencedStore(redis_client, unique_name)
    assert store.highest_token() is None and store.read("f") is None
    store.write(10, "f", "a")
    store.write(10, "f", "b")  # many writes in one term
    store.write(11, "g", 1)
    with pytest.raises(FencingRejected) as rejected:
        store.write(10, "f", "late")
    assert rejected.value.token == 10 and rejected.value.highest_token == 11
    assert store.read("f") == b"b" and store.highest_token() == 11
    assert store.stats() == {"resource": unique_name, "writes": 3, "rejected": 1}


def test_unreachable_redis_raises_store_unavailable(unique_name):
    client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=None)
    election = LeaderElection(client, unique_name, ttl_ms=100)
    with pytest.raises(StoreUnavailable, match="acquire"):
        election.acquire_leader("a")
    assert election.renew_leader("a") is False  # no term: nothing to renew
    with pytest.raises(StoreUnavailable, match="write"):
        FencedStore(client, unique_name).write(1, "f", "v")
    assert election.stats()["store_errors"] == 1


def test_renewing_against_a_dead_redis_raises_and_the_deadline_still_ends_the_term(
        private_redis):
    client = redis.Redis.from_url(private_redis.url, socket_timeout=0.2, retry=None)
    opened(client, "dead")
    election = LeaderElection(client, "dead", ttl_ms=400)
    won(election, "a")
    private_redis.stop()
    with pytest.raises(StoreUnavailable, match="renew"):
        election.renew_leader("a")
    wait_until(lambda: not election.is_leader(), timeout=2, message="the local deadline")
    assert election.renew_leader("a") is False  # the term is over: no round trip, no error
    client.close()


# -- the elector -------------------------------------------------------------


class Events:
    """Callback recorder: (kind, token, monotonic time, is_leader at the call)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, float]] = []
        self.elector: LeaderElector | None = None

    def elected(self, token: int) -> None:
        self.log.append(("elected", token, time.monotonic()))

    def lost(self, token: int) -> None:
        self.log.append(("lost", token, time.monotonic()))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.log]


def test_elector_leads_renews_and_releases_on_stop(redis_client, unique_name):
    opened(redis_client, unique_name)
    events = Events()
    election = LeaderElection(redis_client, unique_name, ttl_ms=300)
    elector = LeaderElector(election, "a", on_elected=events.elected, on_lost=events.lost, seed=1)
    with elector:
        wait_until(elector.is_leader, message="election")
        token = elector.fencing_token
        wait_until(lambda: election.stats()["renewals"] >= 6, message="renewals over 2 ttls")
        assert elector.is_leader() and elector.fencing_token == token
    assert events.kinds() == ["elected", "lost"] and events.log[1][1] == token
    assert not elector.is_leader() and redis_client.exists(election.lease_key) == 0
    stats = elector.stats()
    assert stats["terms_won"] == 1 and stats["terms_lost"] == 1
    with pytest.raises(RuntimeError, match="restarted"):
        elector.start()


def test_electors_hand_over_with_higher_tokens(redis_client, unique_name):
    opened(redis_client, unique_name)
    events = {name: Events() for name in "ab"}
    electors = {
        name: LeaderElector(LeaderElection(redis_client, unique_name, ttl_ms=300), name,
                            on_elected=events[name].elected, on_lost=events[name].lost, seed=i)
        for i, name in enumerate("ab")}
    for elector in electors.values():
        elector.start()
    try:
        leader = wait_until(lambda: next((n for n, e in electors.items() if e.is_leader()), None),
                            message="a leader")
        first_token = electors[leader].fencing_token
        follower = "b" if leader == "a" else "a"
        assert not electors[follower].is_leader()
        electors[leader].stop()
        wait_until(electors[follower].is_leader, message="hand-over")
        assert electors[follower].fencing_token > first_token  # type: ignore[operator]
        lost_at = events[leader].log[-1][2]
        elected_at = events[follower].log[0][2]
        assert elected_at > lost_at
    finally:
        for elector in electors.values():
            elector.stop()


def test_elector_survives_callbacks_that_raise(redis_client, unique_name, caplog):
    opened(redis_client, unique_name)

    def explode(token: int) -> None:
        raise RuntimeError(f"callback bug in term {token}")

    election = LeaderElection(redis_client, unique_name, ttl_ms=300)
    elector = LeaderElector(election, "a", on_elected=explode, on_lost=explode)
    with caplog.at_level(logging.ERROR, logger="buttress.leader"), elector:
        wait_until(elector.is_leader, message="election")
        renewals = election.stats()["renewals"]
        wait_until(lambda: election.stats()["renewals"] >= renewals + 3, message="renewals")
    assert elector.stats()["callback_errors"] == 2
    assert "callback bug" in caplog.text


def test_elector_steps_down_on_time_while_redis_hangs_then_recovers(private_redis):
    """A frozen Redis (SIGSTOP): the renewal hangs, on_lost still comes at the local deadline."""
    client = redis.Redis.from_url(private_redis.url)  # no socket timeout: calls hang
    opened(client, "hang")
    events = Events()
    election = LeaderElection(client, "hang", ttl_ms=600)
    elector = LeaderElector(election, "a", on_elected=events.elected, on_lost=events.lost)
    elector.start()
    try:
        wait_until(elector.is_leader, message="election")
        assert private_redis.pid is not None
        os.kill(private_redis.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_until(lambda: "lost" in events.kinds(), timeout=5, message="on_lost")
        lost_at = events.log[-1][2]
        # The last renewal sent before the freeze set the deadline.
        assert lost_at <= frozen + 0.6 + 0.5, f"on_lost {lost_at - frozen:.3f}s after the freeze"
        assert not elector.is_leader()
        os.kill(private_redis.pid, signal.SIGCONT)
        wait_until(elector.is_leader, timeout=10, message="re-election after Redis thawed")
        assert events.kinds()[-1] == "elected"
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)  # type: ignore[arg-type]
        elector.stop()
        client.close()


def test_elector_steps_down_when_redis_dies_and_comes_back_empty(private_redis):
    client = redis.Redis.from_url(private_redis.url, socket_timeout=0.2)
    opened(client, "dies")
    events = Events()
    election = LeaderElection(client, "dies", ttl_ms=500)
    elector = LeaderElector(election, "a", on_elected=events.elected, on_lost=events.lost)
    elector.start()
    try:
        wait_until(elector.is_leader, message="election")
        old_token = elector.fencing_token
        deadline = election.term.deadline  # type: ignore[union-attr]
        private_redis.stop()
        wait_until(lambda: "lost" in events.kinds(), timeout=5, message="on_lost")
        assert events.log[-1][2] <= deadline + 0.5 + 0.5
        private_redis.start()  # empty: quarantine for one ttl, then a new, higher term
        wait_until(elector.is_leader, timeout=15, message="re-election")
        assert elector.fencing_token > old_token  # type: ignore[operator]
    finally:
        elector.stop()
        client.close()


# -- the asyncio twin --------------------------------------------------------


async def async_wait_until(condition, timeout: float = 10.0, message: str = "condition") -> None:
    """wait_until for a coroutine: poll without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


def test_async_election_interoperates_with_the_sync_one(redis_client, redis_url, unique_name):
    opened(redis_client, unique_name)
    sync = LeaderElection(redis_client, unique_name, ttl_ms=5000)

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        election = AsyncLeaderElection(client, unique_name, ttl_ms=5000)
        assert election.lease_key == sync.lease_key
        assert await election.acquire_leader("async")
        token = election.fencing_token
        assert election.is_leader() and not sync.acquire_leader("sync")
        assert await election.renew_leader("async")
        with pytest.raises(ValueError, match="instance_id"):
            await election.renew_leader("")
        store = AsyncFencedStore(client, unique_name)
        await store.write(token, "f", "v")  # type: ignore[arg-type]
        with pytest.raises(FencingRejected):
            await store.write(token - 1, "f", "old")  # type: ignore[operator]
        assert await store.read("f") == b"v" and await store.highest_token() == token
        assert await election.release_leader("async")
        assert sync.acquire_leader("sync") and sync.fencing_token == token + 1  # type: ignore[operator]
        await client.aclose()

    asyncio.run(scenario())


def test_async_elector_leads_and_hands_over(redis_client, redis_url, unique_name):
    opened(redis_client, unique_name)

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        events = {name: Events() for name in "ab"}
        electors = {
            name: AsyncLeaderElector(AsyncLeaderElection(client, unique_name, ttl_ms=600), name,
                                     on_elected=events[name].elected,
                                     on_lost=events[name].lost, seed=i)
            for i, name in enumerate("ab")}
        for elector in electors.values():
            elector.start()
        await async_wait_until(lambda: any(e.is_leader() for e in electors.values()),
                               message="an async leader")
        leader = next(n for n, e in electors.items() if e.is_leader())
        follower = "b" if leader == "a" else "a"
        token = electors[leader].fencing_token
        await async_wait_until(lambda: electors[leader].stats()["election"]["renewals"] >= 3,
                               message="three renewals")
        assert electors[leader].is_leader() and electors[leader].fencing_token == token
        await electors[leader].stop()
        assert events[leader].kinds() == ["elected", "lost"]
        await async_wait_until(electors[follower].is_leader, message="hand-over")
        assert electors[follower].fencing_token > token  # type: ignore[operator]
        await electors[follower].stop()
        assert await client.exists(electors[follower].election.lease_key) == 0
        await client.aclose()

    asyncio.run(scenario())


def test_async_elector_steps_down_on_time_while_redis_hangs(private_redis):
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(private_redis.url)  # no timeout: calls hang
        with redis.Redis.from_url(private_redis.url) as sync_client:
            opened(sync_client, "async-hang")
        events = Events()
        election = AsyncLeaderElection(client, "async-hang", ttl_ms=600)
        elector = AsyncLeaderElector(election, "a", on_elected=events.elected,
                                     on_lost=events.lost).start()
        await async_wait_until(elector.is_leader, message="election")
        os.kill(private_redis.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        frozen = time.monotonic()
        await async_wait_until(lambda: "lost" in events.kinds(), timeout=5,
                               message="on_lost while Redis hangs")
        assert events.log[-1][2] <= frozen + 0.6 + 0.5
        assert not elector.is_leader()
        os.kill(private_redis.pid, signal.SIGCONT)  # type: ignore[arg-type]
        await elector.stop()
        await client.aclose()

    asyncio.run(scenario())


def test_elector_can_be_stopped_from_its_own_callback(redis_client, unique_name):
    opened(redis_client, unique_name)
    election = LeaderElection(redis_client, unique_name, ttl_ms=300)
    lost = threading.Event()
    elector = LeaderElector(election, "a", on_elected=lambda _: elector.stop(),
                            on_lost=lambda _: lost.set())
    elector.start()
    wait_until(lost.is_set, message="on_lost after stop() from on_elected")
    wait_until(lambda: redis_client.exists(election.lease_key) == 0, message="release")
    assert elector.stats()["callback_errors"] == 0


# -- a model of the protocol -------------------------------------------------


def test_protocol_matches_a_model_under_random_operations(redis_client, unique_name):
    """Stateful: three contenders (two share the instance id "a") and a lease that can vanish.

    Losing the lease (DEL) stands in for an expiry or a failover seen by the
    server before the holder.  The model says who holds the lease, which
    token comes next, and what each call must answer.
    """
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    opened(redis_client, unique_name)
    ids = ["a", "b", "a"]
    contender = st.integers(0, len(ids) - 1)

    class Protocol(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.elections = [LeaderElection(redis_client, unique_name, ttl_ms=60_000)
                              for _ in ids]
            self.lease_key = self.elections[0].lease_key
            redis_client.delete(self.lease_key)
            self.next_token = int(redis_client.get(self.elections[0].fence_key)) + 1
            self.holder: int | None = None  # whose term the server's lease is
            self.live = [False] * len(ids)  # whose local term has not ended

        @rule(i=contender)
        def acquire(self, i: int) -> None:
            won_term = self.elections[i].acquire_leader(ids[i])
            assert won_term == (self.holder is None)
            if won_term:
                assert self.elections[i].fencing_token == self.next_token
                self.next_token += 1
                self.holder = i
                self.live[i] = True

        @rule(i=contender)
        def renew(self, i: int) -> None:
            assert self.elections[i].renew_leader(ids[i]) == (self.holder == i and self.live[i])
            self.live[i] = self.holder == i and self.live[i]

        @rule(i=contender)
        def release(self, i: int) -> None:
            assert self.elections[i].release_leader(ids[i]) == (self.holder == i and self.live[i])
            if self.holder == i:
                self.holder = None
            self.live[i] = False

        @rule()
        def lose_lease(self) -> None:
            redis_client.delete(self.lease_key)
            self.holder = None

        @invariant()
        def server_and_local_views_agree_with_the_model(self) -> None:
            value = redis_client.get(self.lease_key)
            if self.holder is None:
                assert value is None
            else:
                election = self.elections[self.holder]
                assert value == f"{election.fencing_token}:{ids[self.holder]}".encode()
            assert [e.is_leader() for e in self.elections] == self.live

    Protocol.TestCase.settings = settings(max_examples=200, stateful_step_count=20,
                                          deadline=None, derandomize=True)
    Protocol.TestCase().runTest()


def test_the_cron_example_runs_the_job_on_one_process(redis_client, redis_url, unique_name):
    opened(redis_client, unique_name)
    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples",
                           "leader_cron.py")
    env = {**os.environ, "BUTTRESS_REDIS_URL": redis_url}
    processes = [
        subprocess.Popen([sys.executable, example, "--instance", name, "--name", unique_name,
                          "--ttl-ms", "600", "--every", "0.1", "--duration", "1.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        for name in ("x", "y")]
    outputs = [process.communicate(timeout=30)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    runs = [line for output in outputs for line in output.splitlines() if "ran the job" in line]
    holders: dict[str, set[str]] = {}
    for line in runs:  # "x: ran the job in term 1795...": one instance per term
        holders.setdefault(line.rsplit(" ", 1)[1], set()).add(line.split(":")[0])
    assert runs and all(len(instances) == 1 for instances in holders.values()), holders
    assert "rejected" not in "".join(outputs)
