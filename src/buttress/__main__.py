"""Command line of buttress.

Each subcommand's options and the function that runs it live in the module
it belongs to (``add_cli(commands)`` adds the parser and sets ``run``); this
file only lists the subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from buttress._version import __version__
from buttress.bench import _cli as bench_cli

DESCRIPTION = """\
buttress: building blocks for resilient Python services.

  python -m buttress bench            run the benchmark suites (the main job)
  python -m buttress bench compare    compare two saved benchmark runs
  python -m buttress worker           run workers of a distributed FairQueue
  python -m buttress serve            run the ingest gateway (HTTP -> dedupe -> fair queue)
  python -m buttress drain            preStop hook: drain a local service and wait

Run a command with --help for its options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m buttress", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"buttress {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.add_cli(commands)
    _add_worker_cli(commands)
    _add_optional_cli(commands, "drain", "buttress.shutdown.drain", extra="http")
    _add_optional_cli(commands, "serve", "buttress.service.app", extra="redis,http,metrics")
    return parser


def _add_optional_cli(
    commands: argparse._SubParsersAction, name: str, module: str, *, extra: str
) -> None:
    """Add the subcommand ``name`` from ``module``, whose imports need an optional extra.

    Without the extra the subcommand still shows in --help and says what to install,
    so ``python -m buttress --version`` and the other commands work on a bare install.
    """
    try:
        add_cli = importlib.import_module(module).add_cli
    except ImportError as exc:
        reason = str(exc)
        missing = commands.add_parser(name, help=f"(needs: pip install 'buttress[{extra}]')")

        def explain(parser: argparse.ArgumentParser, _args: argparse.Namespace) -> int:
            parser.error(f"{name} needs the {extra!r} extra: pip install 'buttress[{extra}]' "
                         f"({reason})")
            return 2

        missing.set_defaults(run=explain, command_parser=missing)
        return
    add_cli(commands)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A subcommand's errors print its own usage line (set as command_parser).
    return int(args.run(getattr(args, "command_parser", parser), args))


def _add_worker_cli(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a distributed worker on a buttress.distributed FairQueue",
        description="Lease tasks from a FairQueue in Redis and run them with the given "
        "handlers until SIGTERM or SIGINT (the first one drains: leased tasks finish; a "
        "second one stops at once).",
    )
    worker.add_argument("--redis", required=True, metavar="URL",
                        help="the Redis server, as redis://host:port/db")
    worker.add_argument("--queue", required=True, metavar="NAME", help="the FairQueue name")
    worker.add_argument("--handlers", required=True, metavar="MODULE:OBJECT",
                        help="a mapping of task name to callable(payload), e.g. "
                        "app.tasks:HANDLERS")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="handler threads (default: 1)")
    worker.add_argument("--prefetch", type=int, default=1, metavar="K",
                        help="tasks leased per round trip and thread (default: 1)")
    worker.add_argument("--lease-ms", type=int, default=30_000, metavar="MS",
                        help="lease length before redelivery, in milliseconds (default: 30000)")
    worker.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="deliveries before a failing task is dead-lettered (default: 3)")
    worker.add_argument("--retry-delay-ms", type=int, default=1_000, metavar="MS",
                        help="delay before retrying a failed task, doubled per attempt, in "
                        "milliseconds (default: 1000)")
    worker.add_argument("--completion-log", type=int, default=0, metavar="N",
                        help="keep the last N acknowledged tasks in Redis (default: 0, off)")
    worker.add_argument("-v", "--verbose", action="store_true", help="log progress")
    worker.set_defaults(run=_run_worker, command_parser=worker)


def _run_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
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
