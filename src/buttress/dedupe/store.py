"""The store interface behind :class:`~buttress.dedupe.Deduplicator`.

A store keeps one *claim record* per message id and does only I/O; the
Deduplicator holds the semantics.  Every method takes whole sequences and is
one round trip (Redis: one script call) or one transaction (SQLite), so a batch
costs the same number of trips as a single message.

A record moves through two states::

    (absent) --claim--> claimed --complete--> done
                          |  ^
                  release |  | claim after the lease lapsed (attempt + 1)
                          v  |
                       claimed, lease lapsed

and disappears when its TTL runs out (Redis: native expiry; SQLite: the
``expires_at`` column, read as absent once passed and deleted by a sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "CLAIM_CONFLICT",
    "CLAIM_DUPLICATE",
    "CLAIM_IN_PROGRESS",
    "AsyncDedupeStore",
    "ClaimRecord",
    "DedupeStore",
]

# What ``DedupeStore.claim`` answers per message.  A positive number means "claimed
# by this call" and is the attempt number (1 for a first claim, n + 1 for a
# takeover after attempt n's lease lapsed); the rest are:
CLAIM_DUPLICATE = 0  # a done record with this fingerprint
CLAIM_IN_PROGRESS = -1  # claimed by another owner whose lease is still live
CLAIM_CONFLICT = -2  # a live record for this id holds a different payload fingerprint


@dataclass(frozen=True)
class ClaimRecord:
    """One message id's stored record, as :meth:`DedupeStore.lookup` reads it."""

    msg_id: str
    state: str  # "claimed" or "done"
    attempt: int
    fingerprint: int  # XXH64 of the payload's canonical JSON (uint64)
    token: str  # owner token of the claim call that wrote it
    lease_until_ms: int  # epoch ms when a claim may be taken over (0 once released or done)


@runtime_checkable
class DedupeStore(Protocol):
    """What a Deduplicator needs from a store: claims, owner-checked transitions, lookup.

    Times are integers in milliseconds.  ``token`` identifies one claim call (one
    owner); ``attempt`` is the fence: a transition is applied only when the
    record is still claimed by ``token`` at ``attempt``, so an owner whose lease
    lapsed and was taken over cannot touch the new owner's record.
    """

    def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
              lease_ms: int, ttl_ms: int) -> list[int]:
        """Claim each id unless a live record exists; one code per id (see ``CLAIM_*``).

        A new claim holds its lease for ``lease_ms`` and its record lives for
        ``ttl_ms``.  ``msg_ids`` holds no duplicates.
        """
        ...

    def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                 ttl_ms: int) -> list[bool]:
        """Mark each record done (kept ``ttl_ms``) if still ours; False where fenced."""
        ...

    def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                token: str) -> list[bool]:
        """End each of our leases now so the next delivery may claim it; False where fenced."""
        ...

    def lookup(self, msg_id: str) -> ClaimRecord | None:
        """The live record of ``msg_id``, or None."""
        ...

    def sweep(self, *, budget: float = 0.05) -> int:
        """Delete expired records for at most ``budget`` seconds; return how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring, as a plain dict."""
        ...

    def close(self) -> None:
        """Release the store's connections."""
        ...


@runtime_checkable
class AsyncDedupeStore(Protocol):
    """:class:`DedupeStore` for an :class:`~buttress.AsyncDeduplicator`: coroutine methods.

    The same calls, codes and records (``stats`` stays a plain method), so a
    sync and an async consumer of one store interoperate.
    """

    async def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
                    lease_ms: int, ttl_ms: int) -> list[int]: ...

    async def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                       ttl_ms: int) -> list[bool]: ...

    async def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                      token: str) -> list[bool]: ...

    async def lookup(self, msg_id: str) -> ClaimRecord | None: ...

    async def sweep(self, *, budget: float = 0.05) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
