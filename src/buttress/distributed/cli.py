"""``python -m buttress worker``: the worker subcommand (parser and run function).

``__main__`` calls :func:`add_cli` with its subparsers and :func:`run_cli` with
the parsed arguments; everything the subcommand does lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from buttress._validate import parse_int_setting

__all__ = ["add_cli", "run_cli"]

logger = logging.getLogger("buttress.distributed")

HANDLERS_HELP = (
    "where the handlers are, as MODULE:OBJECT. OBJECT is either a mapping of task name "
    "to handler (a callable taking the payload; with --async, an async def), or a "
    "zero-argument function decorated with @buttress.distributed.handler_factory that "
    "returns such a mapping. Example: app.tasks:HANDLERS")


def _setting(flag: str, minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            return parse_int_setting(flag, text, minimum=minimum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``worker`` subcommand to ``subparsers``; return its parser."""
    worker = subparsers.add_parser(
        "worker",
        help="run a worker on a buttress.distributed FairQueue",
        description="Lease tasks from a FairQueue in Redis and run them with the given "
        "handlers until SIGTERM or SIGINT (the first drains: running and prefetched tasks "
        "finish and are acknowledged; a second stops at once). Exits with status 1 if a "
        "worker thread or coroutine dies of an unexpected error.",
    )
    worker.add_argument("--redis", required=True, metavar="URL",
                        help="the Redis to use, e.g. redis://host:6379/0")
    worker.add_argument("--queue", required=True, metavar="NAME", help="the FairQueue name")
    worker.add_argument("--handlers", required=True, metavar="MODULE:OBJECT",
                        help=HANDLERS_HELP)
    worker.add_argument("--async", dest="use_async", action="store_true",
                        help="run an AsyncWorker on asyncio: coroutine handlers, "
                        "--concurrency coroutines instead of threads")
    worker.add_argument("--concurrency", type=_setting("--concurrency", 1), default=1,
                        metavar="N", help="handler threads, or coroutines with --async "
                        "(default 1)")
    worker.add_argument("--prefetch", type=_setting("--prefetch", 1), default=1, metavar="K",
                        help="tasks leased per round trip by each thread or coroutine "
                        "(default 1)")
    worker.add_argument("--lease-ms", type=_setting("--lease-ms", 1), default=30_000,
                        metavar="MS", help="lease length before redelivery (default 30000)")
    worker.add_argument("--max-attempts", type=_setting("--max-attempts", 1), default=3,
                        metavar="N",
                        help="deliveries before a failing task is dead-lettered (default 3)")
    worker.add_argument("--retry-delay-ms", type=_setting("--retry-delay-ms", 0),
                        default=1_000, metavar="MS",
                        help="delay before retrying a failed task, doubled per attempt "
                        "(default 1000)")
    worker.add_argument("--completion-log", type=_setting("--completion-log", 0), default=0,
                        metavar="N",
                        help="keep the last N acknowledged tasks in Redis (default 0: off)")
    worker.add_argument("-v", "--verbose", action="store_true", help="log progress")
    worker.set_defaults(run=run_cli, command_parser=worker)
    return worker


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the worker the arguments describe; the process's exit status."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    import redis
    import redis.asyncio

    from buttress.distributed import (
        AsyncFairQueue,
        AsyncWorker,
        FairQueue,
        Worker,
        load_handlers,
    )
    from buttress.errors import WorkerCrashed

    settings = {"lease_ms": args.lease_ms, "max_attempts": args.max_attempts,
                "retry_delay_ms": args.retry_delay_ms, "completion_log": args.completion_log}
    options = {"concurrency": args.concurrency, "prefetch": args.prefetch}
    # Named connections: CLIENT LIST shows which workers serve which queue.
    client_name = "buttress-worker:" + "_".join(f"{args.queue}:{os.getpid()}".split())
    try:
        handlers = load_handlers(args.handlers)
        if args.use_async:
            async_client = redis.asyncio.Redis.from_url(args.redis, client_name=client_name)
            async_worker = AsyncWorker(AsyncFairQueue(async_client, args.queue, **settings),
                                       handlers, **options)
        else:
            client = redis.Redis.from_url(args.redis, client_name=client_name)
            worker = Worker(FairQueue(client, args.queue, **settings), handlers, **options)
        # The ingest service's handlers may serve metrics on a port of their own
        # (BUTTRESS_WORKER_METRICS_PORT); the worker's counters join them there.
        from buttress.service.worker import export_worker

        export_worker(async_worker if args.use_async else worker)
    except (TypeError, ValueError) as exc:
        parser.error(f"worker: {exc}")
    try:
        if args.use_async:
            asyncio.run(async_worker.run())
        else:
            worker.run()
    except WorkerCrashed as exc:
        logger.error("%s", exc)
        return 1
    return 0
