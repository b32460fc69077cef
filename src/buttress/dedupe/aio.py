"""AsyncDeduplicator: :class:`~buttress.Deduplicator` for services on an event loop.

Same modes, codes, scripts and records as the sync class: every decision is
:class:`~buttress.dedupe.core.DedupeCore`'s, and this shell only awaits the
store and the handler.  A sync consumer and an async consumer of one store
interoperate (tests/test_dedupe_async.py runs them side by side).

>>> store = AsyncRedisStore(redis.asyncio.Redis())                   # doctest: +SKIP
>>> dedupe = AsyncDeduplicator(handle, store, mode="effectively_once")  # doctest: +SKIP
>>> result = await dedupe.process_message("order-17", {"amount": 12})   # doctest: +SKIP

The handler may be a coroutine function (awaited) or a plain function.
Stores: :class:`~buttress.AsyncRedisStore` (``redis.asyncio``) and
:class:`~buttress.AsyncSQLiteStore` (the sync SQLite store on one dedicated
thread; docs/dedupe.md says why).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

from buttress.dedupe.core import (
    DedupeCore,
    DedupeResult,
    DedupeStatus,
    _check_id,
    _rounds,
    fingerprint,
)
from buttress.dedupe.store import AsyncDedupeStore, ClaimRecord
from buttress.errors import StoreUnavailable

__all__ = ["AsyncDeduplicator"]

# Handler return values that are never awaitable (no isawaitable check for them).
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple})

logger = logging.getLogger("buttress.dedupe")


class AsyncDeduplicator(DedupeCore):
    """Run ``await handler(msg_id, payload)`` once per message id, on an event loop.

    Arguments as :class:`~buttress.Deduplicator`; ``store`` is an asyncio store
    (:class:`~buttress.AsyncRedisStore`, :class:`~buttress.AsyncSQLiteStore`;
    a sync store is a TypeError).  Handlers of one call run one after another,
    in input order, as in the sync class.  Many tasks may share one
    AsyncDeduplicator.
    """

    _STORE_INTERFACE = AsyncDedupeStore
    _ASYNC = True

    async def process_message(self, msg_id: str, payload: Any) -> DedupeResult:
        """Claim ``msg_id`` and run the handler if the claim is ours; say what happened."""
        _check_id(msg_id)
        fingerprints = [fingerprint(payload)]
        token = self._token_for(msg_id)
        try:
            code = (await self.store.claim([msg_id], fingerprints, token=token,
                                           lease_ms=self._lease_ms, ttl_ms=self._ttl_ms))[0]
        except StoreUnavailable:
            self._unanswered_claim([msg_id], token)
            raise
        results, _ = await self._run_handlers([msg_id], [payload], [code])
        store_calls = 1 + (await self._finish(results, token) if self._effectively_once else 0)
        result = results[0]
        self._count_one(result, code, store_calls)
        return result

    async def process_batch(self, messages: Iterable[tuple[str, Any]]) -> list[DedupeResult]:
        """Claim many ``(msg_id, payload)`` messages in one store call, then run the handler.

        As :meth:`buttress.Deduplicator.process_batch`: results in input order,
        repeated ids in rounds, one done write for the batch (effectively_once).
        """
        ids, payloads, fingerprints = self._batch_request(messages)
        if not ids:
            return []
        rounds = _rounds(ids)
        if rounds is None:
            return await self._process_tokens(ids, payloads, fingerprints)
        results: list[Any] = [None] * len(ids)
        for positions in rounds:
            done = await self._process_tokens([ids[i] for i in positions],
                                              [payloads[i] for i in positions],
                                              [fingerprints[i] for i in positions])
            for position, result in zip(positions, done, strict=True):
                results[position] = result
        return results

    async def lookup(self, msg_id: str) -> ClaimRecord | None:
        """The store's live record for ``msg_id`` (None if unknown or expired)."""
        _check_id(msg_id)
        return await self.store.lookup(msg_id)

    # -- the work -----------------------------------------------------------------------

    async def _process_tokens(self, ids: list[str], payloads: list[Any],
                              fingerprints: list[int]) -> list[DedupeResult]:
        groups = self._token_groups(ids)
        if len(groups) == 1 and groups[0][1] is None:
            return await self._process(ids, payloads, fingerprints, groups[0][0])
        results: list[Any] = [None] * len(ids)
        for token, positions in groups:
            assert positions is not None
            done = await self._process([ids[i] for i in positions],
                                       [payloads[i] for i in positions],
                                       [fingerprints[i] for i in positions], token)
            for position, result in zip(positions, done, strict=True):
                results[position] = result
        return results

    async def _process(self, ids: list[str], payloads: list[Any], fingerprints: list[int],
                       token: str) -> list[DedupeResult]:
        try:
            codes = await self.store.claim(ids, fingerprints, token=token,
                                           lease_ms=self._lease_ms, ttl_ms=self._ttl_ms)
        except StoreUnavailable:
            self._unanswered_claim(ids, token)
            raise
        results, failed = await self._run_handlers(ids, payloads, codes)
        store_calls = 1
        if self._effectively_once:
            store_calls += await self._finish(results, token)
        self._count_batch(codes, failed, store_calls)
        return results

    async def _run_handlers(self, ids: list[str], payloads: list[Any],
                            codes: list[int]) -> tuple[list[DedupeResult], int]:
        """Call (and await) the handler on each message claimed here, as the sync class."""
        handler, processed, not_run = self.handler, DedupeStatus.PROCESSED, self._not_run
        new, result, isawaitable = tuple.__new__, DedupeResult, inspect.isawaitable
        results: list[DedupeResult] = []
        failed = 0
        for msg_id, payload, attempt in zip(ids, payloads, codes, strict=True):
            if attempt <= 0:
                results.append(not_run(msg_id, attempt))
                continue
            try:
                value = handler(msg_id, payload)
                # inspect.isawaitable's ABC check costs about 0.5 us, more than the rest
                # of this loop: values of the plain built-in types skip it.
                if type(value) not in _PLAIN and isawaitable(value):
                    value = await value
                results.append(new(result, (msg_id, processed, value, None, attempt, False)))
            except Exception as exc:
                results.append(self._failed(msg_id, attempt, exc))
                failed += 1
        return results, failed

    async def _finish(self, results: list[DedupeResult], token: str) -> int:
        """Mark handled messages done and release failed ones; return the store calls made."""
        processed, failed = self._finish_plan(results)
        calls = 0
        if processed:
            calls += 1
            marked = await self.store.complete([results[i].msg_id for i in processed],
                                               [results[i].attempt for i in processed],
                                               token=token, ttl_ms=self._ttl_ms)
            self._marked(results, processed, marked)
        if failed:
            calls += 1
            await self.store.release([r.msg_id for r in failed], [r.attempt for r in failed],
                                     token=token)
        return calls
