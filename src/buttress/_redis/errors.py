"""One mapping from redis-py and socket errors to :class:`buttress.errors.StoreUnavailable`.

"Unavailable" means the server could not take the command now and a later
try may succeed: the connection failed or timed out, the server is loading
its data (LOADING), is a read-only replica (READONLY: what a client sees after
a failover until it reaches the new primary), lost its primary (MASTERDOWN),
or the cluster is down or resharding (CLUSTERDOWN, TRYAGAIN, a slot not
covered).  Anything else (a script bug, WRONGTYPE, OOM) is a different kind
of failure and passes through as redis-py raised it.

A timed-out command may still have run: StoreUnavailable says "unknown",
never "not done".  Callers that retry resend with the same call identity.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from redis import exceptions as rx

from buttress._redis.clients import describe
from buttress.errors import StoreUnavailable

__all__ = ["UNAVAILABLE_CODES", "StoreErrors", "is_unavailable"]

UNAVAILABLE_CODES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")

# Always unavailable, whatever the message.  ConnectionError covers BusyLoadingError
# (LOADING); ClusterError covers ClusterDownError and MasterDownError; OSError covers
# socket errors redis-py did not wrap, and the builtin TimeoutError of asyncio.
_ALWAYS = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.ClusterError,
           rx.TryAgainError, rx.SlotNotCoveredError, OSError)
# Carrying a code in their text: a plain ResponseError from a non-cluster client
# (MASTERDOWN, CLUSTERDOWN) or a script whose redis.call failed (READONLY inside EVALSHA).
_MAYBE = (rx.ResponseError,)


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` means the server cannot serve now (see the module docstring)."""
    if isinstance(exc, _ALWAYS):
        return True
    if isinstance(exc, _MAYBE):
        code = getattr(exc, "status_code", None)
        if code in UNAVAILABLE_CODES:
            return True
        text = str(exc)
        return any(text.startswith(c) or f" {c} " in text or f"-{c} " in text
                   for c in UNAVAILABLE_CODES)
    return False


class StoreErrors:
    """A reusable guard: ``with guard:`` turns unavailable errors into StoreUnavailable.

    ``what`` names the data in the message (``"dedupe records"``); ``client``
    supplies the server address.  Stateless once built, so one guard serves
    every thread and task; it works around ``await`` as well.
    """

    __slots__ = ("_where", "what")

    def __init__(self, what: str, client: Any = None) -> None:
        self.what = what
        self._where = describe(client) if client is not None else "?"

    def error(self, exc: BaseException) -> StoreUnavailable:
        """The StoreUnavailable that stands for ``exc`` (chain it: ``raise ... from exc``)."""
        return StoreUnavailable(f"Redis at {self._where} is unavailable for {self.what} "
                                f"({type(exc).__name__}: {exc})")

    def __enter__(self) -> StoreErrors:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and is_unavailable(exc):
            raise self.error(exc) from exc
