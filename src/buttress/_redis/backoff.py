"""One jittered exponential backoff for every Redis retry loop in buttress."""

from __future__ import annotations

import math
import random

from buttress._validate import require_int, require_number

__all__ = ["Backoff"]


class Backoff:
    """Delays for retries: ``uniform(1 - jitter, 1) * min(cap, base * 2**n)`` seconds.

    ``n`` counts the calls to :meth:`next` since the last :meth:`reset`.  The
    jitter keeps clients that failed together from retrying in lockstep; the
    cap bounds the wait once the store has been gone a while.  ``base == cap``
    gives a constant jittered interval.  ``seed`` makes the sequence repeatable.

    Cheap to build (about 1 us for float settings): without a seed the jitter comes from the
    ``random`` module's shared generator (seeded once per process, re-seeded in
    a forked child), not from a new ``random.Random()``, whose seeding from
    ``os.urandom`` cost about 40 us per Backoff.
    """

    __slots__ = ("_uniform", "attempts", "base", "cap", "jitter")

    def __init__(self, base: float, cap: float, *, jitter: float = 0.5,
                 seed: int | None = None) -> None:
        if type(base) is float and type(cap) is float and type(jitter) is float \
                and 0.0 < base <= cap < math.inf and 0.0 <= jitter <= 1.0:
            # Plain floats in range (what buttress's own callers pass, one Backoff per
            # retried request): the same outcome as the checks below, without their ABC
            # isinstance calls, which cost several times the rest of the constructor.
            self.base, self.cap, self.jitter = base, cap, jitter
        else:
            self.base = require_number("base", base, above=0)
            self.cap = require_number("cap", cap, minimum=self.base)
            self.jitter = require_number("jitter", jitter, minimum=0, maximum=1)
        if seed is None:
            self._uniform = random.uniform
        else:
            self._uniform = random.Random(require_int("seed", seed)).uniform
        self.attempts = 0

    def next(self) -> float:
        """The next delay in seconds (grows until the cap)."""
        ceiling = self.cap if self.attempts >= 64 else min(self.cap, self.base * 2 ** self.attempts)
        self.attempts += 1
        return ceiling * self._uniform(1.0 - self.jitter, 1.0)

    def reset(self) -> None:
        """Back to the first delay (after a success)."""
        self.attempts = 0

    def __repr__(self) -> str:
        return f"Backoff(base={self.base}, cap={self.cap}, jitter={self.jitter})"
