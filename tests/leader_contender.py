"""A contender process for the leader-election tests (real processes, real signals).

Two modes:

``repl URL NAME TTL_MS`` reads one command per line on stdin and answers one
line on stdout, so a test can drive an election step by step from outside:

    acquire ID | renew ID | release ID   -> True / False (or "error <Type>")
    leader                               -> is_leader(): True / False
    token                                -> fencing_token
    check                                -> "leader <token>" or "follower"; remembers the
                                            token, as a leader does before acting on it
    write RESOURCE FIELD VALUE           -> writes with the remembered token to a
                                            FencedStore: "accepted" or "rejected <highest>"

``elect URL NAME INSTANCE TTL_MS RENEW_MS RETRY_MS OUTFILE SEED`` runs a
LeaderElector and samples ``is_leader()`` every 2 ms on the main thread.  Each
sample that says True is appended to OUTFILE as ``t0 t1 token``: the
``time.monotonic()`` just before and just after the call (CLOCK_MONOTONIC is
system-wide on Linux, so the test compares samples across processes).  The
term was certainly held from the first sample's t1 to the last sample's t0.
Each line is one unbuffered write, so a SIGKILL loses nothing already sampled.
SIGTERM stops the elector (on_lost, release) and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import redis

from buttress.errors import ButtressError
from buttress.leader import FencedStore, FencingRejected, LeaderElection, LeaderElector

SAMPLE_INTERVAL = 0.002


def repl(url: str, name: str, ttl_ms: int) -> None:
    client = redis.Redis.from_url(url)
    election = LeaderElection(client, name, ttl_ms=ttl_ms)
    remembered: int | None = None
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command in ("acquire", "renew", "release"):
                answer: object = getattr(election, f"{command}_leader")(args[0])
            elif command == "leader":
                answer = election.is_leader()
            elif command == "token":
                answer = election.fencing_token
            elif command == "check":
                leading = election.is_leader()
                remembered = election.fencing_token if leading else None
                answer = f"leader {remembered}" if leading else "follower"
            elif command == "write":
                resource, field, value = args
                assert remembered is not None, "write before a successful check"
                try:
                    FencedStore(client, resource).write(remembered, field, value)
                    answer = "accepted"
                except FencingRejected as exc:
                    answer = f"rejected {exc.highest_token}"
            else:
                answer = f"error unknown command {command!r}"
        except ButtressError as exc:
            answer = f"error {type(exc).__name__}: {exc}"
        print(answer, flush=True)


def elect(url: str, name: str, instance: str, ttl_ms: int, renew_ms: int, retry_ms: int,
          outfile: str, seed: int) -> None:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    client = redis.Redis.from_url(url, socket_timeout=ttl_ms / 1e3)
    election = LeaderElection(client, name, ttl_ms=ttl_ms)
    elector = LeaderElector(election, instance, renew_interval_ms=renew_ms,
                            retry_interval_ms=retry_ms, seed=seed)
    fd = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"# pid {os.getpid()} instance {instance}\n".encode())
    elector.start()
    try:
        while not stopping.is_set():
            t0 = time.monotonic()
            leading = elector.is_leader()
            token = elector.fencing_token
            t1 = time.monotonic()
            if leading:
                os.write(fd, f"{t0:.6f} {t1:.6f} {token}\n".encode())
            stopping.wait(SAMPLE_INTERVAL)
    finally:
        elector.stop()
        os.close(fd)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "repl":
        repl(rest[0], rest[1], int(rest[2]))
    elif mode == "elect":
        elect(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]), rest[6],
              int(rest[7]))
    else:
        sys.exit(f"unknown mode {mode!r}")
