"""Command line: ``python -m buttress bench`` runs the benchmark suites (the main job).

``python -m buttress worker`` runs a distributed worker (see ``buttress.distributed``).
"""

from __future__ import annotations

import argparse
import logging
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

    from buttress.distributed import cli as worker_cli

    worker = worker_cli.add_cli(commands)

    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_cli.run_cli(worker, args)
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


if __name__ == "__main__":
    sys.exit(main())
