"""``python -m buttress drain --port P``: the preStop hook that drains a service and waits.

Kubernetes runs the preStop hook, waits for it, then sends SIGTERM.  A fixed
``sleep`` there guesses how long the endpoint removal takes and knows nothing
about the requests in flight.  This command asks the service itself, from
inside the pod: ``POST /drainz`` on loopback starts the drain (readiness turns
false at once, requests are still served for ``drain_delay`` while endpoints
propagate, then the listener closes) and is answered when the in-flight
requests are done or were cut at ``drain_timeout``.  By the time SIGTERM
arrives the service has drained; it runs its cleanup hooks and exits.  Under
gunicorn the worker that gets the request asks the master for a graceful stop,
so every worker drains.

Exit status: 0 drained, 3 requests were cut, 1 the service could not be
asked (not listening, refused, or no answer within ``--timeout``).  A preStop
hook's status does not stop the pod's termination; it shows in the events.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any

from buttress._validate import parse_int_setting, parse_number_setting

__all__ = ["add_cli", "drain", "run_cli"]


def drain(port: int, *, host: str = "127.0.0.1", path: str = "/drainz",
          timeout: float = 60.0) -> dict[str, Any]:
    """Start the drain of the service on ``host:port`` and wait for it; its report as a dict.

    The report is ``/drainz``'s JSON plus ``drained`` (False when requests were cut).
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, headers={"Content-Length": "0"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise ConnectionError(f"POST {path} on {host}:{port} answered {response.status}: "
                              f"{body[:200]!r}")
    report: dict[str, Any] = json.loads(body)
    return report


def add_cli(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "drain",
        help="preStop hook: drain the local service and wait until its requests are done",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    command.add_argument("--port", required=True, metavar="P", help="the service's port")
    command.add_argument("--host", default="127.0.0.1",
                         help="loopback address of the service (default 127.0.0.1)")
    command.add_argument("--path", default="/drainz", help="the drain path (default /drainz)")
    command.add_argument("--timeout", default="120", metavar="S",
                         help="give up after S seconds (default 120; the pod's grace period "
                         "bounds the hook anyway)")
    command.set_defaults(run=lambda _parser, args: run_cli(args), command_parser=command)


def run_cli(args: argparse.Namespace) -> int:
    try:
        port = parse_int_setting("--port", args.port, minimum=1, maximum=65535)
        timeout = parse_number_setting("--timeout", args.timeout, above=0)
    except ValueError as exc:
        print(f"buttress drain: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = drain(port, host=args.host, path=args.path, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(f"buttress drain: could not drain {args.host}:{port}: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0 if report.get("drained") is not False else 3
