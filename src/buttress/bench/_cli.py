"""``python -m buttress bench``: its options and what runs them."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from buttress._validate import parse_int_setting, parse_number_setting

DESCRIPTION = """\
Time buttress against its pure-Python twin and the installed peers, side by
side in one run, and judge the targets: buttress's promised speedups.

By default each case prints one line as soon as it has run: the suite, the
case, buttress's median time per item with its spread (half the interquartile
range), and the case's worst target: MET, MISSED, inconclusive (the figure is
closer to the target than the noise of this run) or NOT EVALUATED (a peer is
not installed).

Suites: {suites}.

Compare two saved runs with:  python -m buttress bench compare A.json B.json
"""

COMPARE = """\
Compare two runs saved with --json: every case and implementation whose time
per item moved beyond the noise (the two runs' interquartile ranges do not
overlap), the targets whose verdict changed, and the cases found in only one
of the files.
"""


def add_cli(commands: Any) -> None:
    """Add ``bench`` (and ``bench compare``) to the subcommands of ``python -m buttress``."""
    from buttress.bench import suite_names

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suites and report each case as it finishes",
        description=DESCRIPTION.format(suites=", ".join(suite_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true",
                       help="smaller inputs and fewer rounds (a run of a few minutes)")
    bench.add_argument("--only", action="append", metavar="SUITE",
                       help="run only this suite; repeat the option for several "
                       "(default: all suites)")
    bench.add_argument("--repeats", metavar="N",
                       help="minimum rounds per case; short cases get more until the time "
                       "budget is spent (default: 3 with --quick, 5 without)")
    bench.add_argument("--time-budget", metavar="SECONDS",
                       help="seconds a case may spend on extra rounds beyond the minimum "
                       "(default: 0.5 with --quick, 2 without)")
    bench.add_argument("--json", metavar="PATH",
                       help="also save the results, with versions and commit, as JSON "
                       "(the path is checked before the run)")
    bench.add_argument("--from-json", metavar="PATH",
                       help="do not run anything: report the results saved in this file")
    bench.add_argument("--wide", action="store_true",
                       help="print the full table (every implementation and target) "
                       "at the end instead of one line per case")
    bench.add_argument("--markdown", action="store_true",
                       help="also print the Markdown table of the figures (the one in README.md)")
    bench.add_argument("--readme", metavar="PATH",
                       help="write that Markdown table into the marked block of this file, "
                       "e.g. README.md")
    bench.add_argument("--plot", metavar="PATH",
                       help="draw each target's figure against the target on a log scale "
                       "into this image file (needs matplotlib: pip install 'buttress[plot]')")
    bench.add_argument("--strict", action="store_true",
                       help="exit with status 1 when a target is missed or could not be "
                       "evaluated (a peer was skipped)")
    bench.add_argument("-v", "--verbose", action="store_true",
                       help="show the library's log messages and the progress of each suite")
    bench.set_defaults(run=run_cli, command_parser=bench)

    subcommands = bench.add_subparsers(dest="bench_command", metavar="{compare}")
    compare = subcommands.add_parser(
        "compare", help="compare two runs saved with --json", description=COMPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("before", metavar="A.json", help="the earlier run")
    compare.add_argument("after", metavar="B.json", help="the later run")
    compare.set_defaults(run=run_compare, command_parser=compare)


def run_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from buttress.bench import _report

    try:
        before, after = _report.read_json(args.before), _report.read_json(args.after)
    except ValueError as exc:
        parser.error(str(exc))
    _report.compare(before, after, (args.before, args.after), sys.stdout)
    return 0


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import buttress.bench as harness
    from buttress.bench import _report

    _configure_logging(args.verbose)
    try:
        repeats = None if args.repeats is None else parse_int_setting(
            "--repeats", args.repeats, minimum=1)
        budget = None if args.time_budget is None else parse_number_setting(
            "--time-budget", args.time_budget, minimum=0)
        for path in (args.json, args.plot):
            if path:
                harness.check_writable(path)
        if args.from_json:
            document = _report.read_json(args.from_json)
            if args.wide:
                _report.print_wide(document["cases"], sys.stdout)
            else:
                _report.print_header(sys.stdout)
                for case in document["cases"]:
                    _report.print_line(case, sys.stdout)
            _report.print_summary(document, sys.stdout)
        else:
            suites = harness.select_suites(args.only)
            with harness.BenchSession(quick=args.quick, repeats=repeats,
                                      time_budget=budget) as session:
                harness.run_session(session, suites, wide=args.wide, out=sys.stdout)
                document = harness.results_document(session, quick=args.quick)
            if args.json:
                _report.write_json(document, args.json)
        if args.markdown or args.readme:
            table = _report.markdown(document)
            if args.markdown:
                print("\n" + table)
            if args.readme:
                _report.update_readme(args.readme, table)
        if args.plot:
            _report.plot(document, args.plot)
    except ValueError as exc:
        parser.error(str(exc))
    tally = _report.counts(document["cases"])
    return 1 if args.strict and (tally["missed"] or tally["not evaluated"]) else 0


def _configure_logging(verbose: bool) -> None:
    """Without -v the library stays quiet: its state changes would break up the report."""
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(name)s: %(message)s")
    if not verbose:
        logging.getLogger("buttress").setLevel(logging.CRITICAL + 1)
