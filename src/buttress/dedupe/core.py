"""Deduplicator: run a message handler once per message id, across racing consumers.

Queues redeliver: after a consumer crash, a visibility timeout, a rebalance.
A :class:`Deduplicator` sits between the queue and the handler and lets each
message id through once.  Before the handler runs, it *claims* the id in a
shared store; the store decides every race atomically, so of several consumers
holding the same message, one runs the handler and the others are told why not.

Two modes, chosen per Deduplicator:

``at_most_once``
    The claim (owner token, payload fingerprint, expiry ``ttl``) is written
    before the handler runs and is the only write.  A later delivery of the
    same id within ``ttl`` is a duplicate.  If the handler raises, or the
    process dies after the claim, the message is **not** retried: it may be
    lost, never run twice.  One store round trip per message (or per batch);
    on Redis a single message already seen costs a second one (see step 3).

``effectively_once``
    The claim is a short *lease* (``lease`` seconds).  The handler runs, then
    an owner-checked "done" write keeps the record for ``ttl``.  If the
    consumer dies mid-message, its lease lapses and the next delivery takes the
    message over as attempt n + 1; the attempt number is the fence, so the late
    first owner can no longer mark it done.  A handler failure releases the
    claim so the next delivery retries at once (``release_on_failure=False``
    leaves it until the lease lapses).  A handler that outlives its lease may
    run twice, so it should be idempotent or transactional: "effectively" once.
    Two round trips per message (or per batch).

The race between two consumers A and B on the same id, step by step:

1. A and B each receive message ``m`` (a redelivery, or two consumer groups).
2. Both validate ``m`` and fingerprint its payload locally; nothing is shared yet.
3. Both send a claim.  The store serialises them (Redis runs commands and
   scripts one at a time; SQLite's ``BEGIN IMMEDIATE`` takes the single write
   lock).  Say A's lands first: ``SET NX`` (or ``INSERT OR IGNORE``) creates A's
   record with A's token and attempt 1.  (A single at_most_once message on
   Redis is claimed by a bare ``SET NX PX``; B's, failing, is followed by the
   claim script, which reads A's record for step 4.)
4. B's claim finds A's record.  Same fingerprint: B gets ``duplicate`` (done,
   or any claim in at_most_once) or ``in_progress`` (A's lease is live);
   another fingerprint: ``conflict``.  B does not run the handler; it may ack
   a duplicate, but leaves an in-progress message to be redelivered (A may die).
5. A runs the handler.  In at_most_once that is all.  In effectively_once A
   then marks ``m`` done, but only if the record still carries A's token at
   attempt 1.
6. If A died or stalled past its lease, a later delivery to B finds the lease
   lapsed, takes over as attempt 2 with B's token and runs the handler; if A
   wakes and tries to mark done, the check in step 5 fails and A's result says
   ``fenced``: only B's done write lands.

A command that timed out may still run, once or twice (docs/redis.md): each
claim call's owner token is drawn before its first send, and a copy of the
call that finds its own token takes the claim as its own (step 3 never turns
against the caller).  :class:`DedupeCore` holds every decision above, shared
by :class:`Deduplicator` and the asyncio twin
:class:`~buttress.AsyncDeduplicator`, which only do the I/O.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from buttress._canonical import canonical_xxh64
from buttress._hash import xxh64
from buttress._validate import (
    require_bool,
    require_callable,
    require_choice,
    require_number,
    require_str,
)
from buttress.dedupe.store import (
    CLAIM_CONFLICT,
    CLAIM_DUPLICATE,
    CLAIM_IN_PROGRESS,
    ClaimRecord,
    DedupeStore,
)
from buttress.errors import StoreUnavailable

__all__ = ["MAX_ID_BYTES", "DedupeCore", "DedupeResult", "DedupeStatus", "Deduplicator",
           "fingerprint"]

logger = logging.getLogger("buttress.dedupe")

MAX_ID_BYTES = 512  # longer ids are refused: they bloat every key and index entry
# The longest ttl (seconds): ten years, far past any redelivery and far below what Redis
# refuses (an expiry only if now + ttl stays below 2**63 ms, about 9.2e15 s: a larger ttl
# made every claim fail on the server; one past 1.8e305 s overflowed converting to ms).
MAX_TTL = 315_360_000.0
MODES = ("at_most_once", "effectively_once")
_SHORT_ID = MAX_ID_BYTES // 4  # a str this short is within MAX_ID_BYTES in any encoding

class DedupeStatus(enum.Enum):
    """What happened to one message."""

    PROCESSED = "processed"  # claimed here, handler ran and returned
    DUPLICATE = "duplicate"  # already done (at_most_once: already claimed); handler not run
    IN_PROGRESS = "in_progress"  # another consumer holds a live lease; handler not run
    FAILED = "failed"  # claimed here, handler raised (the exception is in ``error``)
    CONFLICT = "conflict"  # the id is known with a different payload; handler not run


class DedupeResult(NamedTuple):
    """The outcome for one message, a frozen value.

    Truthy exactly when the handler ran and returned in this call (status
    ``PROCESSED``); ``handler_ran`` also counts a handler that raised.
    ``value`` is the handler's return value, ``error`` its exception,
    ``attempt`` the claim's attempt number (0 when not claimed here).
    ``fenced`` (effectively_once): the handler ran, but its lease had lapsed
    and another consumer took the message over, so this call could not mark
    it done; expect the new owner to run it as well.

    A NamedTuple rather than a frozen dataclass: one is built per message, and a
    tuple is built in C, about 6x cheaper (0.07 against 0.45 µs).
    """

    msg_id: str
    status: DedupeStatus
    value: Any = None
    error: BaseException | None = None
    attempt: int = 0
    fenced: bool = False

    def __bool__(self) -> bool:
        return self.status is DedupeStatus.PROCESSED

    @property
    def handler_ran(self) -> bool:
        return self.status is DedupeStatus.PROCESSED or self.status is DedupeStatus.FAILED


def fingerprint(payload: Any) -> int:
    """XXH64 (uint64) of ``payload``'s canonical JSON; TypeError if it has none.

    Canonical JSON is ``json.dumps(payload, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False, allow_nan=False)``, hashed as UTF-8.  Plain payloads (dicts
    with str keys, lists, tuples, str, int, float, bool, None) are hashed by
    ``buttress._canonical`` without building the JSON text; anything else goes
    through ``json`` itself (:func:`_json_fingerprint`, the twin).
    """
    try:
        return canonical_xxh64(payload, _json_fingerprint)
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, cycles, lone surrogates
        raise TypeError(f"payload cannot be serialised to canonical JSON for its "
                        f"fingerprint: {exc}") from exc


def _json_fingerprint(payload: Any) -> int:
    """``fingerprint`` through ``json``: any payload json can encode, at about twice the cost."""
    return xxh64("".join(_canonical_chunks(payload, 0)))


def _fingerprints(payloads: list[Any]) -> list[int]:
    """``fingerprint`` of each payload (one try for the whole list: this is the hot path)."""
    try:
        fast, slow = canonical_xxh64, _json_fingerprint
        return [fast(payload, slow) for payload in payloads]
    except (TypeError, ValueError, RecursionError):
        for position, payload in enumerate(payloads):
            try:
                fingerprint(payload)
            except TypeError as exc:
                raise TypeError(f"messages[{position}]: {exc}") from exc
        raise


class DedupeCore:
    """Everything a Deduplicator decides, with no I/O: shared by the sync and async shells.

    Validation, fingerprints, owner tokens, what each claim code means, which
    messages to mark done or release, what a fenced completion looks like, and
    the accounting.  :class:`Deduplicator` and
    :class:`~buttress.AsyncDeduplicator` only call the store and the handler,
    blocking or with ``await``.

    Owner tokens and resends: every claim call draws its token before the first
    send, so a copy of the call that Redis runs twice (a resend after a client
    timeout) finds its own token and is answered as the same claim.  If the
    claim still fails (StoreUnavailable: the reply was lost, the command may have
    run), the token is remembered per message id, and the next claim of that id
    in this process (the queue's redelivery, the caller's retry) is sent with
    it, so it too finds its own claim instead of a stranger's.
    """

    _STORE_INTERFACE: Any = DedupeStore
    _ASYNC = False  # the store's methods are coroutines
    UNANSWERED_LIMIT = 65_536  # remembered tokens of claims that got no reply (oldest dropped)

    def __init__(
        self,
        handler: Callable[[str, Any], Any],
        store: Any,
        *,
        ttl: float = 86_400.0,
        mode: str = "at_most_once",
        lease: float = 30.0,
        release_on_failure: bool | None = None,
    ) -> None:
        require_callable("handler", handler)
        self._check_store(store)
        mode = require_choice("mode", mode, MODES)
        self.ttl = require_number("ttl", ttl, above=0, maximum=MAX_TTL)
        self.lease = require_number("lease", lease, above=0)
        if mode == "effectively_once" and self.lease > self.ttl:
            raise ValueError(f"lease must be <= ttl, got lease={lease!r} > ttl={ttl!r}")
        if release_on_failure is None:
            release_on_failure = mode == "effectively_once"
        elif require_bool("release_on_failure", release_on_failure) and mode == "at_most_once":
            raise ValueError("release_on_failure=True contradicts mode='at_most_once', which "
                             "never runs a message twice; use mode='effectively_once'")
        self.handler = handler
        self.store = store
        self.mode = mode
        self.release_on_failure = release_on_failure
        self._effectively_once = mode == "effectively_once"
        self._ttl_ms = max(1, round(self.ttl * 1000))
        # at_most_once: a claim is final and is never taken over; only its expiry frees the
        # id.  A lease that outlives the record (2 x TTL) says so in the store's own terms.
        self._lease_ms = max(1, round(self.lease * 1000)) if self._effectively_once \
            else 2 * self._ttl_ms
        self._counts_lock = threading.Lock()
        self._counts = {status.value: 0 for status in DedupeStatus}
        self._counts.update(fenced=0, takeovers=0, store_calls=0, unanswered_claims=0)
        # msg_id -> owner token of a claim that raised StoreUnavailable (it may have run).
        self._unanswered: dict[str, str] = {}

    def _check_store(self, store: Any) -> None:
        """TypeError unless ``store`` is a store of this class's kind (sync or asyncio)."""
        is_async = inspect.iscoroutinefunction(getattr(store, "claim", None))
        if isinstance(store, self._STORE_INTERFACE) and is_async == self._ASYNC:
            return
        hint = ""
        if isinstance(store, DedupeStore):  # the right methods, the wrong kind
            hint = (" (an asyncio store: use AsyncDeduplicator)" if is_async
                    else " (a sync store: use Deduplicator)")
        raise TypeError(f"{type(self).__name__} needs a store implementing the "
                        f"{self._STORE_INTERFACE.__name__} interface (claim, complete, release, "
                        f"lookup, sweep, stats, close), got {type(store).__name__}{hint}")

    def stats(self) -> dict[str, Any]:
        """Counts per status, fenced completions, takeovers and store calls; the store's stats."""
        with self._counts_lock:
            counts: dict[str, Any] = dict(self._counts)
        counts.update(mode=self.mode, ttl=self.ttl, store=self.store.stats())
        if self._effectively_once:
            counts["lease"] = self.lease
        return counts

    # -- decisions ----------------------------------------------------------------------

    def _batch_request(self, messages: Iterable[tuple[str, Any]]
                       ) -> tuple[list[str], list[Any], list[int]]:
        """Validate a batch: its ids, payloads and fingerprints (in input order)."""
        try:
            pairs = messages if isinstance(messages, list) else list(messages)
            ids: list[str] = [msg_id for msg_id, _ in pairs]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"messages must be an iterable of (msg_id, payload) pairs: {exc}") \
                from exc
        payloads = [payload for _, payload in pairs]
        _check_ids(ids)
        return ids, payloads, _fingerprints(payloads)

    def _token_for(self, msg_id: str) -> str:
        """The owner token of a single claim: remembered if its last claim went unanswered."""
        if self._unanswered:
            with self._counts_lock:
                token = self._unanswered.pop(msg_id, None)
            if token is not None:
                return token
        return _new_token()

    def _token_groups(self, ids: list[str]) -> list[tuple[str, list[int] | None]]:
        """The owner token of each claim call for ``ids``: one new token, positions None.

        Ids whose last claim got no reply go with their remembered token (one
        group per token), so a claim that ran after all is found as their own.
        """
        unanswered = self._unanswered
        if not unanswered or not any(msg_id in unanswered for msg_id in ids):
            return [(_new_token(), None)]
        groups: dict[str, list[int]] = {}
        fresh = _new_token()
        with self._counts_lock:
            for position, msg_id in enumerate(ids):
                groups.setdefault(unanswered.pop(msg_id, fresh), []).append(position)
        return list(groups.items())

    def _unanswered_claim(self, ids: list[str], token: str) -> None:
        """Remember ``token`` for ``ids``: their claim raised, so it may have run."""
        with self._counts_lock:
            self._counts["unanswered_claims"] += len(ids)
            unanswered = self._unanswered
            for msg_id in ids:
                unanswered[msg_id] = token
            while len(unanswered) > self.UNANSWERED_LIMIT:
                del unanswered[next(iter(unanswered))]

    def _not_run(self, msg_id: str, code: int) -> DedupeResult:
        """The result for a message this call did not claim, from the store's claim code."""
        if code == CLAIM_CONFLICT:
            logger.warning("message %r seen again with a different payload", msg_id)
            return DedupeResult(msg_id, DedupeStatus.CONFLICT)
        if code == CLAIM_IN_PROGRESS and self._effectively_once:
            return DedupeResult(msg_id, DedupeStatus.IN_PROGRESS)
        # Done; or, in at_most_once, any live claim: there a claim is final.
        return DedupeResult(msg_id, DedupeStatus.DUPLICATE)

    @staticmethod
    def _failed(msg_id: str, attempt: int, exc: Exception) -> DedupeResult:
        logger.warning("handler failed on message %r (attempt %d): %r", msg_id, attempt, exc)
        return DedupeResult(msg_id, DedupeStatus.FAILED, None, exc, attempt)

    def _finish_plan(self, results: list[DedupeResult]) -> tuple[list[int], list[DedupeResult]]:
        """Positions of the results to mark done, and the failed results to release."""
        processed = [i for i, r in enumerate(results) if r.status is DedupeStatus.PROCESSED]
        failed = [r for r in results if r.status is DedupeStatus.FAILED] \
            if self.release_on_failure else []
        return processed, failed

    def _marked(self, results: list[DedupeResult], processed: list[int],
                marked: list[bool]) -> None:
        """Turn the results whose done write was fenced into ``fenced`` results, in place."""
        fenced = [i for i, ok in zip(processed, marked, strict=True) if not ok]
        for i in fenced:
            result = results[i]
            logger.warning("message %r: lease lapsed and attempt %d was taken over; not "
                           "marked done here", result.msg_id, result.attempt)
            results[i] = DedupeResult(result.msg_id, result.status, result.value,
                                      attempt=result.attempt, fenced=True)
        if fenced:
            with self._counts_lock:
                self._counts["fenced"] += len(fenced)

    def _count_one(self, result: DedupeResult, code: int, store_calls: int) -> None:
        with self._counts_lock:
            self._counts[result.status.value] += 1
            self._counts["store_calls"] += store_calls
            if code > 1:
                self._counts["takeovers"] += 1

    def _count_batch(self, codes: list[int], failed: int, store_calls: int) -> None:
        tally = Counter({1: len(codes)}) if codes.count(1) == len(codes) else Counter(codes)
        claimed = sum(n for code, n in tally.items() if code > 0)
        in_progress = tally[CLAIM_IN_PROGRESS]
        self._bump(processed=claimed - failed, failed=failed,
                   duplicate=tally[CLAIM_DUPLICATE] + (0 if self._effectively_once
                                                       else in_progress),
                   in_progress=in_progress if self._effectively_once else 0,
                   conflict=tally[CLAIM_CONFLICT], takeovers=claimed - tally[1],
                   store_calls=store_calls)

    def _bump(self, **increments: int) -> None:
        with self._counts_lock:
            for name, increment in increments.items():
                self._counts[name] += increment

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, ttl={self.ttl}, store={self.store!r})"


class Deduplicator(DedupeCore):
    """Run ``handler(msg_id, payload)`` once per message id, whoever else sees the id.

    ``store`` is a :class:`~buttress.SQLiteStore` (one machine) or a
    :class:`~buttress.RedisStore` (many machines).  ``ttl`` (seconds) is how
    long an id is remembered (at most ten years); ``mode`` is ``"at_most_once"`` or
    ``"effectively_once"`` (see the module docstring); ``lease`` (seconds,
    effectively_once only, at most ``ttl``) bounds how long a dead consumer
    holds a message; ``release_on_failure`` (effectively_once only, default
    True) makes a failed message retryable at once.

    One Deduplicator may be shared by threads; processes each make their own
    (with their own store object).  The store being unreachable raises
    :class:`~buttress.StoreUnavailable` before any handler runs.  If it becomes
    unreachable between the handler and the done write (effectively_once),
    StoreUnavailable is raised too: do not acknowledge the message; its lease
    will lapse and it will be retried.  A claim that raised StoreUnavailable
    may have run on the server: its token is remembered, so this
    Deduplicator's next claim of the id finds it as its own (docs/redis.md).
    :class:`~buttress.AsyncDeduplicator` is the asyncio twin.
    """

    # -- public API -------------------------------------------------------------------

    def process_message(self, msg_id: str, payload: Any) -> DedupeResult:
        """Claim ``msg_id`` and run the handler if the claim is ours; say what happened."""
        # The batch path's steps for one message, without its per-batch bookkeeping: this
        # call's cost is held against one bare SET NX PX round trip.
        _check_id(msg_id)
        fingerprints = [fingerprint(payload)]
        # One owner per claim call, drawn before the first send; takeovers replace it.
        token = self._token_for(msg_id)
        try:
            code = self.store.claim([msg_id], fingerprints, token=token,
                                    lease_ms=self._lease_ms, ttl_ms=self._ttl_ms)[0]
        except StoreUnavailable:
            self._unanswered_claim([msg_id], token)
            raise
        results, _ = self._run_handlers([msg_id], [payload], [code])
        store_calls = 1 + (self._finish(results, token) if self._effectively_once else 0)
        result = results[0]
        self._count_one(result, code, store_calls)
        return result

    def process_batch(self, messages: Iterable[tuple[str, Any]]) -> list[DedupeResult]:
        """Claim many ``(msg_id, payload)`` messages in one store call, then run the handler.

        Results come back in input order.  An id repeated within the batch is
        treated as redelivered after its first copy: a later copy is a duplicate
        (a conflict if its payload differs), at the cost of one more claim call
        per extra copy.  In effectively_once, the done writes for the
        whole batch are one more store call after the handlers, so a crash
        mid-batch leaves the batch's handled messages to be retried after the lease.
        """
        ids, payloads, fingerprints = self._batch_request(messages)
        if not ids:
            return []
        rounds = _rounds(ids)
        if rounds is None:
            return self._process_tokens(ids, payloads, fingerprints)
        results: list[DedupeResult | None] = [None] * len(ids)
        for positions in rounds:
            done = self._process_tokens([ids[i] for i in positions],
                                        [payloads[i] for i in positions],
                                        [fingerprints[i] for i in positions])
            for position, result in zip(positions, done, strict=True):
                results[position] = result
        return results  # type: ignore[return-value]  # every position is filled

    def lookup(self, msg_id: str) -> ClaimRecord | None:
        """The store's live record for ``msg_id`` (None if unknown or expired)."""
        _check_id(msg_id)
        return self.store.lookup(msg_id)

    # -- the work -----------------------------------------------------------------------

    def _process_tokens(self, ids: list[str], payloads: list[Any],
                        fingerprints: list[int]) -> list[DedupeResult]:
        """One claim call per owner token (one, unless a claim of some id went unanswered)."""
        groups = self._token_groups(ids)
        if len(groups) == 1 and groups[0][1] is None:
            return self._process(ids, payloads, fingerprints, groups[0][0])
        results: list[Any] = [None] * len(ids)
        for token, positions in groups:
            assert positions is not None
            done = self._process([ids[i] for i in positions], [payloads[i] for i in positions],
                                 [fingerprints[i] for i in positions], token)
            for position, result in zip(positions, done, strict=True):
                results[position] = result
        return results

    def _process(self, ids: list[str], payloads: list[Any], fingerprints: list[int],
                 token: str) -> list[DedupeResult]:
        try:
            codes = self.store.claim(ids, fingerprints, token=token, lease_ms=self._lease_ms,
                                     ttl_ms=self._ttl_ms)
        except StoreUnavailable:
            self._unanswered_claim(ids, token)
            raise
        results, failed = self._run_handlers(ids, payloads, codes)
        store_calls = 1
        if self._effectively_once:
            store_calls += self._finish(results, token)
        self._count_batch(codes, failed, store_calls)
        return results

    def _run_handlers(self, ids: list[str], payloads: list[Any],
                      codes: list[int]) -> tuple[list[DedupeResult], int]:
        """Call the handler on each message claimed here (code > 0, its attempt).

        A message not claimed gets its result from the code; a handler
        exception becomes a FAILED result.  Returns the results and how many failed.
        """
        handler, processed, not_run = self.handler, DedupeStatus.PROCESSED, self._not_run
        # tuple.__new__ straight: the NamedTuple's own __new__ is a Python function.
        new, result = tuple.__new__, DedupeResult
        results: list[DedupeResult] = []
        failed = 0
        append = results.append
        for msg_id, payload, attempt in zip(ids, payloads, codes, strict=True):
            if attempt <= 0:
                append(not_run(msg_id, attempt))
                continue
            try:
                append(new(result, (msg_id, processed, handler(msg_id, payload), None, attempt,
                                    False)))
            except Exception as exc:
                append(self._failed(msg_id, attempt, exc))
                failed += 1
        return results, failed

    def _finish(self, results: list[DedupeResult], token: str) -> int:
        """Mark handled messages done and release failed ones; return the store calls made."""
        processed, failed = self._finish_plan(results)
        calls = 0
        if processed:
            calls += 1
            marked = self.store.complete([results[i].msg_id for i in processed],
                                         [results[i].attempt for i in processed],
                                         token=token, ttl_ms=self._ttl_ms)
            self._marked(results, processed, marked)
        if failed:
            calls += 1
            self.store.release([r.msg_id for r in failed], [r.attempt for r in failed],
                               token=token)
        return calls


def _rounds(ids: list[str]) -> list[list[int]] | None:
    """Positions per claim round when an id repeats within a batch; None if none repeats.

    Copies go in rounds, one claim call each, so every copy meets the store as
    a later redelivery would (done, released, conflict).
    """
    if len(set(ids)) == len(ids):
        return None
    rounds: list[list[int]] = []
    copies: Counter[str] = Counter()
    for position, msg_id in enumerate(ids):
        if copies[msg_id] == len(rounds):
            rounds.append([])
        rounds[copies[msg_id]].append(position)
        copies[msg_id] += 1
    return rounds


class _TokenSource:
    """Owner tokens, unique per claim call: a random per-process prefix and a counter.

    A token is a fence, not a secret: it must differ between any two claim
    calls anywhere, and it need not be unguessable.  One ``os.urandom`` per
    process (re-drawn in a forked child, which would otherwise repeat its
    parent's tokens) instead of one per call: a system call per message costs
    more than the rest of the Python work of a single ``process_message``.
    """

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_new_token = _TokenSource()
if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork to guard against
    os.register_at_fork(after_in_child=_new_token.renew)


def _check_ids(ids: list[str]) -> None:
    """``_check_id`` on each id; the common case (short ASCII strs) is checked in bulk."""
    try:
        if not ids or ("".join(ids).isascii() and min(map(len, ids)) > 0
                       and max(map(len, ids)) <= _SHORT_ID):
            return
    except TypeError:
        pass  # a non-str id: the loop below says which
    for msg_id in ids:
        _check_id(msg_id)


def _check_id(msg_id: object) -> None:
    # A str of n characters is at most 4n bytes of UTF-8: skip the encode for short ids.
    if type(msg_id) is not str or not msg_id or len(msg_id) > _SHORT_ID \
            or not msg_id.isascii():
        require_str("msg_id", msg_id, max_bytes=MAX_ID_BYTES)


# Canonical JSON: sorted keys, no whitespace, UTF-8 text as is, no NaN/Infinity.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


def _make_canonical_encode() -> Callable[[Any, int], list[str]]:
    """The fastest correct canonical encoder this Python offers: ``encode(payload, 0)``.

    ``JSONEncoder.encode`` builds a C encoder per call; building it once halves
    the cost, which matters at one fingerprint per message.  The C encoder is an
    implementation detail of ``json``, so it is used only if present and if it
    agrees with ``JSONEncoder`` on a probe.  Without circular-reference markers
    a cyclic payload ends in RecursionError, which ``fingerprint`` reports.
    The second argument (the C encoder's indent level, always 0) is passed
    positionally: a keyword or a wrapper would cost a fifth of the encoding.
    """
    from json import encoder as json_encoder

    make = getattr(json_encoder, "c_make_encoder", None)
    quote = getattr(json_encoder, "c_encode_basestring", None)

    def portable(payload: Any, _level: int) -> list[str]:
        return [_CANONICAL.encode(payload)]

    if make is None or quote is None:
        return portable
    try:
        iterencode = make(None, _CANONICAL.default, quote, None, ":", ",", True, False, False)
        probe = {"b": [1, 2.5, None, True], "a": {"é": "x"}, "c": "\u2603"}
        if "".join(iterencode(probe, 0)) != _CANONICAL.encode(probe):
            return portable
    except (TypeError, ValueError):
        return portable
    return iterencode


_canonical_chunks = _make_canonical_encode()
