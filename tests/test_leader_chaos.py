"""Chaos: five contender processes, SIGKILL / SIGSTOP / SIGCONT from a seeded loop.

Each contender (tests/leader_contender.py, ``elect`` mode) runs a
LeaderElector and appends every ``is_leader()`` sample that says True to its
own file, stamped with CLOCK_MONOTONIC (system-wide on Linux) just before and
just after the call.  A term was certainly held from its first sample's
"after" to its last sample's "before"; those spans, compared across all
processes, must never overlap, and tokens must increase with each new term.

Timing, chosen for a loaded 2-core machine: ttl 1000 ms, renew every 250 ms,
retry every 75-150 ms.  After a SIGKILL of the leader the lease expires at
most ttl after the kill; a contender retries within the retry interval; so a
new term must start within ttl + retry + 200 ms of the kill, measured from the
moment the signal was sent to the new leader's first True sample.  Every 2 s the loop
forces an action on the leader, alternately a measured SIGKILL and a SIGSTOP
for twice the ttl; before it, stopped contenders are resumed until a leader
and at least two other running contenders are seen, and after a measured kill
nothing else happens until the takeover window has passed, so the figure is
the election's and not the chaos loop's.
"""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import redis

from buttress import LeaderElection
from conftest import wait_until
from test_leader import CONTENDER, opened

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SEED = 20261128
CONTENDERS = 5
DURATION = 21.0
TTL_MS, RENEW_MS, RETRY_MS = 1000, 250, 150
TAKEOVER_BOUND = (TTL_MS + RETRY_MS + 200) / 1e3
FORCED_EVERY = 2.0  # alternately: kill the leader (measured), pause the leader past its ttl


@dataclass
class Contender:
    slot: int
    generation: int
    path: str
    process: subprocess.Popen[bytes]
    stopped_until: float | None = None

    @property
    def instance(self) -> str:
        return f"c{self.slot}"

    def ready(self) -> bool:
        return os.path.exists(self.path) and os.path.getsize(self.path) > 0

    def running(self) -> bool:
        return self.process.poll() is None and self.stopped_until is None and self.ready()

    def last_sample(self) -> tuple[float, float, int] | None:
        with open(self.path, "rb") as fh:
            lines = fh.read().splitlines()
        for line in reversed(lines):
            if not line.startswith(b"#"):
                t0, t1, token = line.split()
                return float(t0), float(t1), int(token)
        return None


@dataclass
class Chaos:
    url: str
    name: str
    directory: str
    rng: random.Random
    contenders: dict[int, Contender] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)  # (instance, path)
    kills: list[tuple[float, int]] = field(default_factory=list)  # measured: (sent at, token)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("sigkill", "sigstop", "leader_paused_past_ttl", "restarts"), 0))

    def spawn(self, slot: int) -> None:
        previous = self.contenders.get(slot)
        generation = previous.generation + 1 if previous else 0
        path = os.path.join(self.directory, f"c{slot}.{generation}.samples")
        with open(path + ".err", "wb") as errors:
            process = subprocess.Popen(
                [sys.executable, CONTENDER, "elect", self.url, self.name, f"c{slot}",
                 str(TTL_MS), str(RENEW_MS), str(RETRY_MS), path, str(self.rng.randrange(2**32))],
                stdout=subprocess.DEVNULL, stderr=errors)
        self.contenders[slot] = Contender(slot, generation, path, process)
        self.files.append((f"c{slot}", path))
        self.counts["restarts"] += previous is not None

    def resume_due(self, now: float) -> None:
        for contender in self.contenders.values():
            if contender.stopped_until is not None and now >= contender.stopped_until:
                contender.process.send_signal(signal.SIGCONT)
                contender.stopped_until = None

    def active_leader(self, client: redis.Redis, lease_key: str) -> Contender | None:
        """The running contender whose term holds the lease and who is sampling it now."""
        value = client.get(lease_key)
        if not value or value.startswith(b"0:"):
            return None
        token, instance = value.decode().split(":", 1)
        contender = self.contenders[int(instance[1:])]
        if not contender.running():
            return None
        last = contender.last_sample()
        if last is None or last[2] != int(token) or time.monotonic() - last[0] > 0.2:
            return None
        return contender

    def kill(self, contender: Contender) -> None:
        contender.process.send_signal(signal.SIGKILL)
        contender.process.wait(10)
        self.counts["sigkill"] += 1
        self.spawn(contender.slot)

    def stop(self, contender: Contender, seconds: float) -> None:
        contender.process.send_signal(signal.SIGSTOP)
        contender.stopped_until = time.monotonic() + seconds
        self.counts["sigstop"] += 1

    def shutdown(self) -> list[int | None]:
        for contender in self.contenders.values():
            if contender.process.poll() is None:
                contender.process.send_signal(signal.SIGCONT)
                contender.process.send_signal(signal.SIGTERM)
        codes = []
        for contender in self.contenders.values():
            try:
                codes.append(contender.process.wait(15))
            except subprocess.TimeoutExpired:
                contender.process.kill()
                codes.append(None)
        return codes


def read_terms(files: list[tuple[str, str]]) -> dict[int, tuple[str, str, float, float]]:
    """token -> (instance, file, first sample's t1, last sample's t0)."""
    terms: dict[int, tuple[str, str, float, float]] = {}
    for instance, path in files:
        with open(path, "rb") as fh:
            lines = [line for line in fh.read().splitlines() if not line.startswith(b"#")]
        for line in lines:
            t0, t1, token_text = line.split()
            token = int(token_text)
            if token in terms:
                owner, owner_path, start, end = terms[token]
                assert owner_path == path, f"token {token} held by {owner_path} and {path}"
                terms[token] = (owner, path, min(start, float(t1)), max(end, float(t0)))
            else:
                terms[token] = (instance, path, float(t1), float(t0))
    return terms


def pace(seconds: float) -> None:
    """The chaos loop's own rhythm (a schedule, not a wait for a condition)."""
    time.sleep(seconds)


def test_five_contenders_under_signal_chaos(redis_url, redis_client, unique_name, tmp_path):
    opened(redis_client, unique_name)
    lease_key = LeaderElection(redis_client, unique_name, ttl_ms=TTL_MS).lease_key
    chaos = Chaos(redis_url, unique_name, str(tmp_path), random.Random(SEED))
    for slot in range(CONTENDERS):
        chaos.spawn(slot)
    try:
        wait_until(lambda: all(c.ready() for c in chaos.contenders.values()), timeout=30,
                   message="contenders to start")
        wait_until(lambda: chaos.active_leader(redis_client, lease_key), timeout=10,
                   message="a first leader")
        started = time.monotonic()
        next_forced, forced_kill = started + FORCED_EVERY, True
        while (now := time.monotonic()) < started + DURATION:
            chaos.resume_due(now)
            leader = chaos.active_leader(redis_client, lease_key)
            others = [c for c in chaos.contenders.values() if c is not leader and c.running()]
            if now >= next_forced:
                if leader is None or len(others) < 2:
                    chaos.resume_due(math.inf)  # clear the field for the forced action
                    pace(0.02)
                    continue
                if forced_kill:  # measured: nothing else happens during the window
                    token = leader.last_sample()[2]  # type: ignore[index]
                    killed_at = time.monotonic()
                    chaos.kill(leader)
                    chaos.kills.append((killed_at, token))
                    window_end = killed_at + TAKEOVER_BOUND + 0.3
                    while (now := time.monotonic()) < window_end:
                        chaos.resume_due(now)
                        pace(0.02)
                else:
                    chaos.stop(leader, 2 * TTL_MS / 1e3)
                    chaos.counts["leader_paused_past_ttl"] += 1
                next_forced, forced_kill = time.monotonic() + FORCED_EVERY, not forced_kill
            else:
                action = chaos.rng.choice(["stop", "stop", "kill", "idle"])
                candidates = [c for c in chaos.contenders.values() if c.process.poll() is None
                              and c.ready()]
                if action != "idle" and candidates:
                    target = chaos.rng.choice(candidates)
                    if action == "kill":
                        chaos.kill(target)
                    elif target.stopped_until is None:
                        chaos.stop(target, chaos.rng.uniform(0.05, 2.0))
            pace(chaos.rng.uniform(0.1, 0.5))
        elapsed = time.monotonic() - started
    finally:
        exit_codes = chaos.shutdown()

    terms = read_terms(chaos.files)
    ordered = sorted(terms.items(), key=lambda item: item[1][2])
    # Tokens increase strictly with each new term.
    tokens = [token for token, _ in ordered]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens
    # No two terms' certain spans overlap, across all processes and restarts.
    latest_end, latest_token = -1.0, None
    for token, (instance, _, start, end) in ordered:
        assert start >= latest_end, (
            f"term {token} ({instance}) started at {start:.6f}, before term {latest_token} "
            f"ended at {latest_end:.6f}")
        if end > latest_end:
            latest_end, latest_token = end, token
    # After each measured SIGKILL of the leader, a new term within the bound.
    takeovers = []
    for killed_at, killed_token in chaos.kills:
        successor = min((start for token, (_, _, start, _) in terms.items()
                         if token > killed_token), default=None)
        assert successor is not None, f"no leader after killing term {killed_token}"
        takeovers.append(successor - killed_at)
    print(f"\nchaos: {elapsed:.1f}s, {len(terms)} terms, counts {chaos.counts}, "
          f"takeovers after SIGKILL (s): {[round(t, 3) for t in takeovers]}, "
          f"median {statistics.median(takeovers):.3f}, bound {TAKEOVER_BOUND:.3f}")
    assert elapsed >= 20.0
    assert len(chaos.kills) >= 3 and chaos.counts["leader_paused_past_ttl"] >= 2
    assert all(0 < t <= TAKEOVER_BOUND for t in takeovers), takeovers
    assert all(code == 0 for code in exit_codes), exit_codes  # clean stop: on_lost, release
