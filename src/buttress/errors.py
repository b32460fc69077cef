"""The one exception hierarchy of buttress (re-exported at the top level).

Bad arguments raise plain ``ValueError`` / ``TypeError`` naming the argument
and the value (the rule lives in ``buttress._validate``); everything below
describes an outcome the caller must handle.  Every exception buttress raises
on purpose derives from :class:`ButtressError`; a few keep a standard base as
well, so existing ``except OSError`` code still catches them.
"""

from __future__ import annotations

__all__ = [
    "ButtressError",
    "CorruptFilterError",
    "Expired",
    "FencingRejected",
    "PortInUseError",
    "Rejected",
    "ServerConfigError",
    "Shed",
    "StoreUnavailable",
    "WorkerCrashed",
]


class ButtressError(Exception):
    """Base class of every buttress outcome exception."""


class Rejected(ButtressError):
    """Work was refused at admission (backpressure or shutdown).

    ``state`` is the admission state when it was refused (for example
    ``"shedding"`` or ``"shutting_down"``), ``reason`` a short human reason and
    ``retry_after`` a hint in seconds (``None`` when retrying will not help,
    such as after shutdown).
    """

    def __init__(self, reason: str, *, state: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.state = state
        self.retry_after = retry_after

    def __str__(self) -> str:
        hint = "" if self.retry_after is None else f"; retry after {self.retry_after:.3g}s"
        return f"{self.reason} (state={self.state}{hint})"


class Shed(ButtressError):
    """Accepted work was evicted from the queue to make room for more important work."""


class Expired(ButtressError):
    """Work reached its deadline before it could start, so it was not run."""


class StoreUnavailable(ButtressError):
    """A backing store (Redis, SQLite) could not be reached or used; nothing was done."""


class FencingRejected(ButtressError):
    """A fenced write carried a token older than one the resource already accepted.

    The writer's term is over: a newer leader has written since.  ``token`` is
    the rejected token, ``highest_token`` the one the resource holds.
    """

    def __init__(self, resource: str, token: int, highest_token: int) -> None:
        super().__init__(
            f"fenced write to {resource!r} rejected: token {token} is older than "
            f"the highest accepted token {highest_token}"
        )
        self.resource = resource
        self.token = token
        self.highest_token = highest_token


class PortInUseError(ButtressError, OSError):
    """The port a server was asked to listen on is taken by another socket.

    Also an ``OSError`` (with the ``errno`` of the failed bind), as before.
    """


class ServerConfigError(ButtressError, RuntimeError):
    """A server setting does not fit the shutdown budget or cannot work (names the setting).

    Raised before anything is served, for example by the gunicorn
    integration (``buttress.shutdown.gunicorn``) when ``graceful_timeout``
    is shorter than the drain needs.  Also a ``RuntimeError``: gunicorn prints
    those as a one-line ``Error:`` and exits 1.
    """


class WorkerCrashed(ButtressError):
    """A queue worker stopped because one of its threads or coroutines died unexpectedly.

    Handler exceptions and Redis errors never do this (they fail the task or are
    retried); the cause is chained as ``__cause__``.
    """


class CorruptFilterError(ButtressError, ValueError):
    """Bytes or a file given as a saved Bloom filter are not one, or are damaged.

    Raised by ``BloomFilter.from_bytes`` and ``BloomFilter.open``; the message
    says which check failed (the length, the magic, the version, a header
    field or the checksum) and, for a file, names it.  Also a ``ValueError``,
    as before.
    """
