"""Command line: ``python -m buttress bench`` runs the benchmark suites (the main job).

``python -m buttress worker`` runs a distributed worker (see ``buttress.distributed``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buttress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suites and print one comparison table",
        description="Time buttress against its pure-Python twin and installed peers, "
        "side by side in one run, and report ratios and targets.",
    )
    bench.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    bench.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    bench.add_argument("--only", action="append", metavar="SUITE",
                       help="run only this suite (repeatable), e.g. --only hashing")
    bench.add_argument("--repeats", type=int, help="repeats per implementation (median taken)")
    bench.add_argument("--strict", action="store_true",
                       help="exit with status 1 when a target is missed")
    bench.add_argument("-v", "--verbose", action="store_true", help="log progress")

    worker = commands.add_parser(
        "worker",
        help="run a distributed worker on a buttress.distributed FairQueue",
        description="Lease tasks from a FairQueue in Redis and run them with the given "
        "handlers until SIGTERM/SIGINT (the first drains, a second stops at once).",
    )
    worker.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    worker.add_argument("--queue", required=True, metavar="NAME", help="the FairQueue name")
    worker.add_argument("--handlers", required=True, metavar="MODULE:OBJECT",
                        help="a mapping of task name -> callable(payload), e.g. app.tasks:HANDLERS")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="handler threads (default 1)")
    worker.add_argument("--prefetch", type=int, default=1, metavar="K",
                        help="tasks leased per round trip and thread (default 1)")
    worker.add_argument("--lease-ms", type=int, default=30_000, metavar="MS",
                        help="lease length before redelivery (default 30000)")
    worker.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="deliveries before a failing task is dead-lettered (default 3)")
    worker.add_argument("--retry-delay-ms", type=int, default=1_000, metavar="MS",
                        help="delay before retrying a failed task, doubled per attempt "
                        "(default 1000)")
    worker.add_argument("--completion-log", type=int, default=0, metavar="N",
                        help="keep the last N acknowledged tasks in Redis (default 0: off)")
    worker.add_argument("-v", "--verbose", action="store_true", help="log progress")

    from buttress.service.app import add_cli, run_cli  # `serve`: the ingest gateway

    add_cli(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_cli(parser, args)
    if args.command == "worker":
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        return _run_worker(parser, args)
    if args.command == "bench":
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s")
        from buttress import bench as harness

        try:
            cases = harness.run(quick=args.quick, only=args.only, repeats=args.repeats,
                                json_path=args.json)
        except ValueError as exc:
            parser.error(str(exc))
        missed = any(t.met is False for c in cases for t in c.targets)
        return 1 if (args.strict and missed) else 0
    parser.error(f"unknown command {args.command!r}")
    return 2


def _run_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import redis

    from buttress.distributed import FairQueue, Worker, load_handlers

    try:
        handlers = load_handlers(args.handlers)
        # Named connections: CLIENT LIST shows which workers serve which queue.
        client_name = "buttress-worker:" + "_".join(f"{args.queue}:{os.getpid()}".split())
        client = redis.Redis.from_url(args.redis, client_name=client_name)
        queue = FairQueue(client, args.queue, lease_ms=args.lease_ms,
                          max_attempts=args.max_attempts, retry_delay_ms=args.retry_delay_ms,
                          completion_log=args.completion_log)
        worker = Worker(queue, handlers, concurrency=args.concurrency, prefetch=args.prefetch)
        from buttress.service.worker import export_worker  # on BUTTRESS_WORKER_METRICS_PORT

        export_worker(worker)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        parser.error(f"worker: {exc}")
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
