"""buttress._canonical against json: the crash audit's regression (a freed temporary read)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import json, xxhash
from buttress._canonical import canonical_xxh64

def canonical(payload):
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)

payloads = [[10**k for k in range(0, 300, 7)], 12345678901234567890, 3.141592653589793,
            {"a": 123456789012345678901234567890, "b": [1.5, -2.25e300, 7]}]
for payload in payloads:
    assert canonical_xxh64(payload, None) == xxhash.xxh64_intdigest(
        canonical(payload).encode()), payload
print("ok")
"""


def test_numbers_are_hashed_from_text_that_is_still_alive():
    """The digits of an int or float used to be read after their str was freed.

    Python's debug allocator fills freed memory, so the read shows as a wrong hash.
    """
    env = {**os.environ, "PYTHONMALLOC": "debug"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
