"""examples/exactly_once_payments.py: FairQueue redelivery paired with the dedupe layer.

The example runs real worker processes against the test Redis, kills one with
SIGKILL while it holds leases (a finished but unacknowledged payment among them),
and checks its ledger.  The control run without the Deduplicator shows the same
scenario does charge twice, so the check can fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "exactly_once_payments.py"
PAYMENTS = 60
DUPLICATE_ENQUEUES = PAYMENTS // 10  # the example enqueues every tenth payment twice
# A charge takes 300 ms, so the SIGKILL, sent when the victim starts its second
# payment, lands during that charge's gateway call, not in the microseconds between
# the ledger write and the dedupe "done" write (the window dedupe cannot close).
ARGS = ["--payments", str(PAYMENTS), "--workers", "3", "--prefetch", "4", "--charge-ms", "300",
        "--timeout", "60"]


def run_example(redis_url: str, *extra: str) -> tuple[int, str]:
    env = {**os.environ, "BUTTRESS_REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, str(EXAMPLE), *ARGS, *extra], env=env,
                          capture_output=True, text=True, timeout=90)
    return done.returncode, done.stdout + done.stderr


def number(pattern: str, output: str) -> int:
    match = re.search(pattern, output)
    assert match, f"{pattern!r} not in the output:\n{output}"
    return int(match.group(1))


def test_each_payment_is_charged_once_despite_sigkill_and_duplicate_enqueues(redis_url):
    code, output = run_example(redis_url)
    assert code == 0, output
    assert "killed worker" in output
    # Every payment in the ledger exactly once; every task acknowledged.
    assert number(r"ledger: (\d+) charges", output) == PAYMENTS
    assert number(r"for (\d+) payments; ", output) == PAYMENTS
    assert "0 charged more than once, 0 never charged" in output
    assert number(r"queue: (\d+) tasks acknowledged", output) == PAYMENTS + DUPLICATE_ENQUEUES
    assert number(r"(\d+) dead-lettered", output) == 0
    # The kill did cause redeliveries (the victim held 4 leases), and the dedupe
    # layer answered at least every duplicate enqueue without charging.
    assert number(r"(\d+) redelivered", output) >= 2
    assert number(r"duplicate (\d+)", output) >= DUPLICATE_ENQUEUES
    assert number(r"processed (\d+)", output) == PAYMENTS


def test_without_dedupe_the_same_scenario_charges_twice(redis_url):
    code, output = run_example(redis_url, "--no-dedupe")
    assert code == 1, output
    charges = number(r"ledger: (\d+) charges", output)
    # Each duplicate enqueue charges again (and the payment the killed worker was
    # running charges again if the kill came between its charge and its ack).
    assert charges >= PAYMENTS + DUPLICATE_ENQUEUES, output
    assert "charged more than once, 0 never charged" in output
    assert ", 0 never charged" in output
