"""Command line of buttress.

Each subcommand's options and the function that runs it live in the module
it belongs to (``add_cli(commands)`` adds the parser and sets ``run``); this
file only lists the subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import signal
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
    _add_optional_cli(commands, "worker", "buttress.distributed.cli", extra="redis")
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
    """Run one command; return its exit code (usage errors raise SystemExit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # A subcommand's errors print its own usage line (set as command_parser).
    return int(args.run(getattr(args, "command_parser", parser), args))


def run() -> None:
    """The process entry point (``python -m buttress``, the ``buttress`` script)."""
    try:
        code = main()
    finally:
        # The command is over (a service has drained and run its cleanup): the process
        # is only exiting now, and a late SIGTERM (an orchestrator or harness sending
        # it again) would turn that outcome into death by signal (-15).  The commands
        # restore the handlers they found when they return, so ignore it from here on.
        # Not in main(): a program that calls main() keeps its own signal handling.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
