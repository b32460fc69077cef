"""The Redis Streams example runs end to end and suppresses every redelivery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "streams_consumer.py"


@pytest.mark.parametrize("mode", ["at_most_once", "effectively_once"])
def test_streams_consumer_example_charges_each_order_once(redis_url, mode):
    env = {**os.environ, "BUTTRESS_REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--orders", "300", "--mode", mode],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the handler charged 300 orders, 0 of them more than once" in done.stdout
    assert "entries left pending" in done.stdout
