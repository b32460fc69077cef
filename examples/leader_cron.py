"""Run a periodic job on exactly one of many processes, with fenced writes.

Start several copies against one Redis; one leads and runs the job, the others
wait.  Kill the leader (Ctrl-C, ``kill -9``, ``kill -STOP``) and another takes
over within about ttl + retry interval.  A leader frozen mid-job (``kill
-STOP``) that resumes after losing its term has its late write rejected.

    BUTTRESS_REDIS_URL=redis://localhost:6379/0 python examples/leader_cron.py --instance a
    BUTTRESS_REDIS_URL=redis://localhost:6379/0 python examples/leader_cron.py --instance b
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import redis

from buttress import FencedStore, FencingRejected, LeaderElection, LeaderElector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default=f"pid-{os.getpid()}")
    parser.add_argument("--name", default="example-cron", help="election name")
    parser.add_argument("--ttl-ms", type=int, default=3000)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between job runs")
    parser.add_argument("--duration", type=float, default=None, help="exit after this long")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    url = os.environ.get("BUTTRESS_REDIS_URL", "redis://localhost:6379/0")
    # A socket timeout below the renew interval lets a hung call fail and retry in time.
    client = redis.Redis.from_url(url, socket_timeout=args.ttl_ms / 3000)
    election = LeaderElection(client, args.name, ttl_ms=args.ttl_ms)
    store = FencedStore(client, f"{args.name}-state")
    elector = LeaderElector(
        election, args.instance,
        on_elected=lambda token: print(f"{args.instance}: elected, term {token}", flush=True),
        on_lost=lambda token: print(f"{args.instance}: lost term {token}", flush=True),
    )

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    started = time.monotonic()
    with elector:
        while not stopping.wait(args.every):
            if args.duration is not None and time.monotonic() - started > args.duration:
                break
            if not elector.is_leader():
                continue
            token = elector.fencing_token
            assert token is not None
            try:  # the job: its result goes to a resource that checks the token
                store.write(token, "last_run", f"{args.instance} at {time.time():.3f}")
                print(f"{args.instance}: ran the job in term {token}", flush=True)
            except FencingRejected as exc:
                print(f"{args.instance}: late write rejected: {exc}", flush=True)


if __name__ == "__main__":
    main()
