"""Deduplicator semantics: one contract suite, run on both stores (real SQLite file, real Redis).

Store-specific behaviour (locking, sweeping, script reloads, restarts) is in
test_dedupe_stores.py; multi-process races and kill -9 in test_dedupe_processes.py.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buttress import DedupeResult, DedupeStatus, Deduplicator, RedisStore, SQLiteStore
from buttress.dedupe import ClaimRecord, DedupeStore, fingerprint
from buttress.dedupe.store import CLAIM_CONFLICT, CLAIM_DUPLICATE, CLAIM_IN_PROGRESS
from buttress.errors import StoreUnavailable
from buttress.testing import free_port
from conftest import wait_until

MODES = ["at_most_once", "effectively_once"]


class Recorder:
    """A handler that records every call and can be told to fail or to wait."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on: set[str] = set()
        self.block_on: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, msg_id: str, payload: Any) -> str:
        with self._lock:
            self.calls.append((msg_id, payload))
        if msg_id in self.block_on:
            self.entered.setdefault(msg_id, threading.Event()).set()
            assert self.block_on[msg_id].wait(20), "test never released the handler"
        if msg_id in self.fail_on:
            raise RuntimeError(f"handler failed on {msg_id}")
        return f"handled {msg_id}"

    def ids(self) -> list[str]:
        return [msg_id for msg_id, _ in self.calls]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Any, unique_name: str) -> Any:
    """A factory of store objects on one backing store: each is a separate consumer's view."""
    made: list[DedupeStore] = []
    if request.param == "sqlite":
        path = tmp_path / "dedupe.db"

        def make() -> DedupeStore:
            made.append(SQLiteStore(path))
            return made[-1]
    else:
        url = request.getfixturevalue("redis_url")

        def make() -> DedupeStore:
            made.append(RedisStore.from_url(url, namespace=unique_name))
            return made[-1]
    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: Any) -> DedupeStore:
    return make_store()


# -- the basic contract ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_first_delivery_runs_the_handler_and_later_ones_are_duplicates(store, mode):
    handler = Recorder()
    dedupe = Deduplicator(handler, store, mode=mode, ttl=60, lease=10)
    first = dedupe.process_message("order-1", {"amount": 12})
    assert first and first.status is DedupeStatus.PROCESSED and first.handler_ran
    assert first.value == "handled order-1" and first.attempt == 1 and first.error is None
    for _ in range(3):
        again = dedupe.process_message("order-1", {"amount": 12})
        assert not again and again.status is DedupeStatus.DUPLICATE and not again.handler_ran
        assert again.value is None and again.attempt == 0
    assert handler.ids() == ["order-1"]
    record = dedupe.lookup("order-1")
    assert isinstance(record, ClaimRecord)
    assert record.state == ("done" if mode == "effectively_once" else "claimed")
    assert record.attempt == 1 and record.fingerprint == fingerprint({"amount": 12})


@pytest.mark.parametrize("mode", MODES)
def test_same_id_with_another_payload_is_a_conflict_not_a_duplicate(store, mode):
    handler = Recorder()
    dedupe = Deduplicator(handler, store, mode=mode, ttl=60)
    assert dedupe.process_message("m", {"amount": 12, "currency": "EUR"})
    # The same payload in another key order is the same canonical JSON.
    assert dedupe.process_message("m", {"currency": "EUR", "amount": 12}).status \
        is DedupeStatus.DUPLICATE
    conflict = dedupe.process_message("m", {"amount": 13, "currency": "EUR"})
    assert conflict.status is DedupeStatus.CONFLICT and not conflict
    assert handler.ids() == ["m"]
    assert dedupe.stats()["conflict"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_batch_claims_in_one_store_call_and_keeps_input_order(store, mode):
    handler = Recorder()
    dedupe = Deduplicator(handler, store, mode=mode, ttl=60)
    assert dedupe.process_message("seen", 1)
    assert dedupe.process_message("other", 1)
    calls_before = dedupe.stats()["store_calls"]
    results = dedupe.process_batch([("a", {"n": 1}), ("seen", 1), ("b", {"n": 2}),
                                    ("c", [1, "x", None]), ("other", 2)])
    assert [(r.msg_id, r.status) for r in results] == [
        ("a", DedupeStatus.PROCESSED), ("seen", DedupeStatus.DUPLICATE),
        ("b", DedupeStatus.PROCESSED), ("c", DedupeStatus.PROCESSED),
        ("other", DedupeStatus.CONFLICT),
    ]
    assert [bool(r) for r in results] == [True, False, True, True, False]
    assert handler.ids() == ["seen", "other", "a", "b", "c"]
    # One claim call; effectively_once adds one done write for the whole batch.
    expected_calls = 1 if mode == "at_most_once" else 2
    assert dedupe.stats()["store_calls"] - calls_before == expected_calls
    assert dedupe.process_batch([]) == []


@pytest.mark.parametrize("mode", MODES)
def test_copies_within_a_batch_are_seen_as_redeliveries(store, mode):
    handler = Recorder()
    handler.fail_on.add("f")
    dedupe = Deduplicator(handler, store, mode=mode, ttl=60)
    results = dedupe.process_batch([("a", 1), ("b", 1), ("a", 1), ("b", 2), ("a", 2),
                                    ("f", 0), ("f", 0)])
    retried = DedupeStatus.FAILED if mode == "effectively_once" else DedupeStatus.DUPLICATE
    assert [r.status for r in results] == [
        DedupeStatus.PROCESSED, DedupeStatus.PROCESSED, DedupeStatus.DUPLICATE,
        DedupeStatus.CONFLICT, DedupeStatus.CONFLICT, DedupeStatus.FAILED, retried]
    assert handler.ids().count("a") == 1 and handler.ids().count("b") == 1


@pytest.mark.parametrize("mode", MODES)
def test_two_consumers_racing_on_the_same_ids_handle_each_once(make_store, mode):
    ids = [f"race-{i}" for i in range(600)]
    handler = Recorder()
    barrier = threading.Barrier(3)
    outcomes: list[list[DedupeResult]] = []

    def consumer(order: list[str], batch: int) -> None:
        dedupe = Deduplicator(handler, make_store(), mode=mode, ttl=60)
        barrier.wait()
        for start in range(0, len(order), batch):
            outcomes.append(dedupe.process_batch([(i, {"id": i}) for i in
                                                  order[start:start + batch]]))

    threads = [threading.Thread(target=consumer, args=(ids, 25)),
               threading.Thread(target=consumer, args=(ids[::-1], 40)),
               threading.Thread(target=consumer, args=(ids[::2] + ids[1::2], 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert Counter(handler.ids()) == Counter(ids)  # each exactly once
    statuses = Counter(r.status for batch in outcomes for r in batch)
    assert statuses[DedupeStatus.PROCESSED] == len(ids)
    assert sum(statuses.values()) == 3 * len(ids)
    assert statuses[DedupeStatus.CONFLICT] == statuses[DedupeStatus.FAILED] == 0


# -- failures, leases and the fence ---------------------------------------------------


def test_at_most_once_never_retries_a_failed_handler(store):
    handler = Recorder()
    handler.fail_on.add("m")
    dedupe = Deduplicator(handler, store, ttl=60)
    failed = dedupe.process_message("m", {})
    assert failed.status is DedupeStatus.FAILED and not failed and failed.handler_ran
    assert isinstance(failed.error, RuntimeError) and failed.attempt == 1
    handler.fail_on.clear()
    assert dedupe.process_message("m", {}).status is DedupeStatus.DUPLICATE
    assert handler.ids() == ["m"]
    assert dedupe.stats()["failed"] == 1


def test_effectively_once_releases_a_failed_message_for_retry(store):
    handler = Recorder()
    handler.fail_on.add("m")
    dedupe = Deduplicator(handler, store, ttl=60, mode="effectively_once", lease=30)
    assert dedupe.process_message("m", {}).status is DedupeStatus.FAILED
    handler.fail_on.clear()
    retried = dedupe.process_message("m", {})  # at once: the lease was released
    assert retried and retried.attempt == 2
    assert dedupe.process_message("m", {}).status is DedupeStatus.DUPLICATE
    assert handler.ids() == ["m", "m"]
    assert dedupe.stats()["takeovers"] == 1


def test_effectively_once_batch_marks_the_good_done_and_releases_the_failed(store):
    handler = Recorder()
    handler.fail_on.update({"b", "d"})
    dedupe = Deduplicator(handler, store, ttl=60, mode="effectively_once")
    first = dedupe.process_batch([(i, {}) for i in "abcde"])
    assert [r.status for r in first] == [DedupeStatus.PROCESSED, DedupeStatus.FAILED] * 2 + [
        DedupeStatus.PROCESSED]
    assert dedupe.stats()["store_calls"] == 3  # claim, done for a/c/e, release for b/d
    handler.fail_on.clear()
    second = dedupe.process_batch([(i, {}) for i in "abcde"])
    assert [(r.msg_id, r.attempt) for r in second if r] == [("b", 2), ("d", 2)]
    assert {r.status for r in second if not r} == {DedupeStatus.DUPLICATE}
    assert Counter(handler.ids()) == {"a": 1, "b": 2, "c": 1, "d": 2, "e": 1}


def test_effectively_once_without_release_retries_only_after_the_lease(store):
    handler = Recorder()
    handler.fail_on.add("m")
    dedupe = Deduplicator(handler, store, ttl=60, mode="effectively_once", lease=1.0,
                          release_on_failure=False)
    assert dedupe.process_message("m", {}).status is DedupeStatus.FAILED
    handler.fail_on.clear()
    assert dedupe.process_message("m", {}).status is DedupeStatus.IN_PROGRESS
    retried = wait_until(lambda: dedupe.process_message("m", {}) or None, timeout=10,
                         message="the failed claim's lease to lapse")
    assert retried.attempt == 2
    assert handler.ids() == ["m", "m"]


def start_stuck_in_handler(dedupe: Deduplicator, handler: Recorder, msg_id: str) \
        -> tuple[threading.Thread, list[DedupeResult], threading.Event]:
    """Process ``msg_id`` on a thread whose handler call waits; return it, its outcome, the gate."""
    gate = handler.block_on[msg_id] = threading.Event()
    outcome: list[DedupeResult] = []
    worker = threading.Thread(target=lambda: outcome.append(dedupe.process_message(msg_id, 1)))
    worker.start()
    assert handler.entered.setdefault(msg_id, threading.Event()).wait(10)
    return worker, outcome, gate


def test_a_live_lease_holds_other_consumers_off(make_store):
    handler = Recorder()
    first = Deduplicator(handler, make_store(), ttl=60, mode="effectively_once", lease=30)
    second = Deduplicator(handler, make_store(), ttl=60, mode="effectively_once", lease=30)
    worker, outcome, gate = start_stuck_in_handler(first, handler, "m")
    busy = second.process_message("m", 1)
    assert busy.status is DedupeStatus.IN_PROGRESS and not busy
    assert second.process_message("m", 2).status is DedupeStatus.CONFLICT
    gate.set()
    worker.join(10)
    assert outcome[0] and not outcome[0].fenced
    assert second.process_message("m", 1).status is DedupeStatus.DUPLICATE
    assert handler.ids() == ["m"]


def test_a_late_first_owner_is_fenced_by_the_attempt_counter(make_store):
    """A stalls past its lease, B takes over as attempt 2; A's done write must not land."""
    handler = Recorder()
    slow = Deduplicator(handler, make_store(), ttl=60, mode="effectively_once", lease=0.3)
    fast = Deduplicator(handler, make_store(), ttl=60, mode="effectively_once", lease=0.3)
    worker, outcome, release_slow = start_stuck_in_handler(slow, handler, "m")
    del handler.block_on["m"]  # B's call of the handler must not wait
    taken = wait_until(lambda: fast.process_message("m", 1) or None, timeout=10,
                       message="B to take the message over after A's lease")
    assert taken.attempt == 2 and not taken.fenced
    record = fast.lookup("m")
    assert record is not None and record.state == "done" and record.attempt == 2
    release_slow.set()
    worker.join(10)
    late = outcome[0]
    assert late.status is DedupeStatus.PROCESSED and late.fenced and late.attempt == 1
    assert late  # the handler did run in A's call
    assert slow.stats()["fenced"] == 1
    after = fast.lookup("m")
    assert after is not None and after.token == record.token and after.attempt == 2


def test_store_transitions_are_owner_checked(store):
    codes = store.claim(["x", "y"], [1, 2], token="owner-a", lease_ms=60_000, ttl_ms=60_000)
    assert codes == [1, 1]
    assert store.claim(["x", "y", "z"], [1, 9, 3], token="owner-b", lease_ms=60_000,
                       ttl_ms=60_000) == [CLAIM_IN_PROGRESS, CLAIM_CONFLICT, 1]
    assert store.complete(["x", "y"], [1, 1], token="owner-b", ttl_ms=60_000) == [False, False]
    assert store.complete(["x", "y"], [2, 1], token="owner-a", ttl_ms=60_000) == [False, True]
    assert store.release(["x"], [1], token="owner-b") == [False]
    assert store.release(["x", "y"], [1, 1], token="owner-a") == [True, False]  # y is done
    assert store.claim(["x", "y"], [1, 2], token="owner-c", lease_ms=60_000,
                       ttl_ms=60_000) == [2, CLAIM_DUPLICATE]
    record = store.lookup("x")
    assert record == ClaimRecord("x", "claimed", 2, 1, "owner-c", record.lease_until_ms)
    assert store.lookup("never") is None
    assert store.claim([], [], token="d", lease_ms=1, ttl_ms=1) == []
    assert store.complete([], [], token="d", ttl_ms=1) == []
    assert store.release([], [], token="d") == []


def test_fingerprints_beyond_int64_round_trip(store):
    top = (1 << 64) - 1
    assert store.claim(["big"], [top], token="t", lease_ms=60_000, ttl_ms=60_000) == [1]
    assert store.claim(["big"], [top], token="u", lease_ms=60_000,
                       ttl_ms=60_000) == [CLAIM_IN_PROGRESS]
    record = store.lookup("big")
    assert record is not None and record.fingerprint == top


@pytest.mark.parametrize("mode", MODES)
def test_an_id_gets_through_again_after_its_ttl(store, mode):
    handler = Recorder()
    dedupe = Deduplicator(handler, store, ttl=1.0, lease=1.0, mode=mode)
    assert dedupe.process_message("m", {})
    assert dedupe.process_message("m", {}).status is DedupeStatus.DUPLICATE
    again = wait_until(lambda: dedupe.process_message("m", {}) or None, timeout=10,
                       message="the record to expire")
    assert again.attempt == 1  # expired means forgotten: a fresh first claim
    assert handler.ids() == ["m", "m"]


def test_stats_count_every_outcome(store):
    handler = Recorder()
    handler.fail_on.add("bad")
    dedupe = Deduplicator(handler, store, ttl=60)
    dedupe.process_batch([("a", 1), ("b", 1), ("bad", 1), ("a", 1)])
    dedupe.process_message("b", 2)
    stats = dedupe.stats()
    assert stats["processed"] == 2 and stats["failed"] == 1
    assert stats["duplicate"] == 1 and stats["conflict"] == 1
    assert stats["mode"] == "at_most_once" and stats["ttl"] == 60
    assert stats["store"]["store"] in ("sqlite", "redis")


# -- bad input -----------------------------------------------------------------------


@pytest.fixture
def unreachable_store() -> RedisStore:
    """A store whose Redis is not there: anything that touches it fails."""
    return RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")


@pytest.mark.parametrize(("msg_id", "error"), [
    ("", ValueError),
    ("x" * 513, ValueError),
    ("é" * 257, ValueError),  # 514 bytes of UTF-8
    ("\ud800", ValueError),  # not encodable
    (17, TypeError),
    (b"bytes", TypeError),
    (None, TypeError),
])
def test_bad_msg_ids_are_refused_before_the_store(unreachable_store, msg_id, error):
    handler = Recorder()
    dedupe = Deduplicator(handler, unreachable_store)
    with pytest.raises(error, match="msg_id"):
        dedupe.process_message(msg_id, {})
    with pytest.raises(error, match="msg_id"):
        dedupe.process_batch([("fine", {}), (msg_id, {})])
    assert handler.calls == []


def test_the_longest_allowed_id_is_accepted(store):
    dedupe = Deduplicator(Recorder(), store)
    assert dedupe.process_message("x" * 512, {})
    assert dedupe.process_message("é" * 256, {})


@pytest.mark.parametrize("payload", [
    {"raw": b"bytes"}, {"when": object()}, {1, 2}, {"x": math.nan}, {"x": math.inf},
    {1: "a", "b": 2}, {"text": "\udc80"},
])
def test_unserialisable_payloads_raise_type_error_before_the_store(unreachable_store, payload):
    dedupe = Deduplicator(Recorder(), unreachable_store)
    with pytest.raises(TypeError, match="payload"):
        dedupe.process_message("m", payload)
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        dedupe.process_batch([("ok", {}), ("m", payload)])


def test_a_cyclic_payload_is_a_type_error():
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(TypeError, match="payload"):
        fingerprint(cyclic)


def test_fingerprint_is_xxh64_of_canonical_json():
    import xxhash

    payload = {"b": [1, 2.5, None, True], "a": {"é": "☃"}}
    canonical = '{"a":{"é":"☃"},"b":[1,2.5,null,true]}'
    assert fingerprint(payload) == xxhash.xxh64_intdigest(canonical.encode())
    assert fingerprint({"a": {"é": "☃"}, "b": [1, 2.5, None, True]}) == fingerprint(payload)


def test_the_portable_encoder_gives_the_same_json_as_the_fast_one(monkeypatch):
    """Without json's C encoder (other Pythons), fingerprints must not change."""
    from json import encoder as json_encoder

    from buttress.dedupe import core

    fast = core._make_canonical_encode()
    monkeypatch.setattr(json_encoder, "c_make_encoder", None)
    portable = core._make_canonical_encode()
    assert portable is not fast
    for payload in [{"b": [1, 2.5, None, True], "a": {"é": "☃"}}, "text", 7, [], {"k": -0.0},
                    {"nested": [{"z": 1, "y": [1e300, -1e-300]}]}]:
        assert "".join(portable(payload, 0)) == "".join(fast(payload, 0))


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=5), st.tuples(children, children),
                     st.dictionaries(st.text(max_size=8), children, max_size=5))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    json_containers, max_leaves=30)


@settings(max_examples=300)
@given(payload=json_values)
def test_the_native_fingerprint_agrees_with_json(payload):
    from buttress._canonical import canonical_xxh64
    from buttress.dedupe import core

    def unexpected(value: Any) -> int:
        raise AssertionError(f"a plain payload fell back to json: {value!r}")

    assert canonical_xxh64(payload, unexpected) == core._json_fingerprint(payload)


class Code(int):
    pass


def record_and_answer(seen: list[Any], answer: int, value: Any) -> int:
    seen.append(value)
    return answer


def test_the_native_fingerprint_leaves_anything_unusual_to_json():
    from buttress._canonical import canonical_xxh64
    from buttress.dedupe import core

    escapes = "".join(map(chr, range(0x20))) + '"\\\x7f é ☃ 𝄞'
    assert canonical_xxh64({"k": escapes, escapes: [escapes]}, None) == \
        core._json_fingerprint({"k": escapes, escapes: [escapes]})
    big = {"x": "y" * 5000, "n": list(range(300))}  # past the stack buffer
    assert canonical_xxh64(big, None) == core._json_fingerprint(big)
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    for unusual in [{1: "int key"}, {None: 1, "a": 2}, {"a": Code(3)}, [DedupeStatus.FAILED],
                    {"a": {"b": deep}}, {"s": type("S", (str,), {})("sub")}]:
        seen: list[Any] = []
        fell_back = canonical_xxh64(unusual, functools.partial(record_and_answer, seen, 7))
        assert fell_back == 7 and seen == [unusual]
    assert fingerprint({1: "int key"}) == core._json_fingerprint({1: "int key"})
    assert fingerprint({"a": {"b": deep}}) == core._json_fingerprint({"a": {"b": deep}})
    for bad in [{"x": float("nan")}, [float("inf")], "\ud800"]:
        with pytest.raises(TypeError, match="payload"):
            fingerprint(bad)


def _child_token(queue: Any) -> None:
    from buttress.dedupe import core

    queue.put(core._new_token())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_owner_tokens_are_unique_per_call_and_not_repeated_by_a_forked_child():
    import multiprocessing

    from buttress.dedupe import core

    tokens = {core._new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_token, args=(queue,))
    child.start()
    token = queue.get(timeout=30)
    child.join(30)
    assert token not in tokens and token[:16] != core._new_token()[:16]


def test_an_unreachable_store_raises_store_unavailable_and_runs_nothing(unreachable_store):
    handler = Recorder()
    for mode in MODES:
        dedupe = Deduplicator(handler, unreachable_store, mode=mode)
        with pytest.raises(StoreUnavailable, match=r"Redis at 127\.0\.0\.1"):
            dedupe.process_message("m", {})
        with pytest.raises(StoreUnavailable):
            dedupe.process_batch([("m", {}), ("n", {})])
    assert handler.calls == []


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"ttl": 0}, ValueError, "ttl"),
    ({"ttl": -1}, ValueError, "ttl"),
    ({"ttl": math.nan}, ValueError, "ttl"),
    ({"ttl": "60"}, TypeError, "ttl"),
    ({"ttl": True}, TypeError, "ttl"),
    ({"lease": 0, "mode": "effectively_once"}, ValueError, "lease"),
    ({"lease": 61, "ttl": 60, "mode": "effectively_once"}, ValueError, "lease"),
    ({"mode": "exactly_once"}, ValueError, "mode"),
    ({"release_on_failure": True}, ValueError, "at_most_once"),
    ({"release_on_failure": 1, "mode": "effectively_once"}, TypeError, "release_on_failure"),
])
def test_bad_settings_are_refused(unreachable_store, kwargs, error, match):
    with pytest.raises(error, match=match):
        Deduplicator(Recorder(), unreachable_store, **kwargs)


def test_bad_handler_store_and_batch_shape_are_refused(unreachable_store):
    with pytest.raises(TypeError, match="handler"):
        Deduplicator("not callable", unreachable_store)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="store"):
        Deduplicator(Recorder(), object())  # type: ignore[arg-type]
    dedupe = Deduplicator(Recorder(), unreachable_store)
    with pytest.raises(TypeError, match="pairs"):
        dedupe.process_batch([("a", {}, "extra")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pairs"):
        dedupe.process_batch(["abc"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pairs"):
        dedupe.process_batch([42])  # type: ignore[list-item]


def test_result_is_a_small_frozen_value():
    result = DedupeResult("m", DedupeStatus.PROCESSED, value=3, attempt=1)
    with pytest.raises(AttributeError):
        result.value = 4  # type: ignore[misc]
    assert result and result.handler_ran
    assert not DedupeResult("m", DedupeStatus.FAILED, error=RuntimeError())
    assert DedupeResult("m", DedupeStatus.FAILED).handler_ran
    for status in (DedupeStatus.DUPLICATE, DedupeStatus.IN_PROGRESS, DedupeStatus.CONFLICT):
        assert not DedupeResult("m", status) and not DedupeResult("m", status).handler_ran


# -- a property: any stream of deliveries, in any batching, against a plain dict model --------

deliveries = st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 2)), max_size=40)
batchings = st.lists(st.integers(1, 8), min_size=1, max_size=10)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=deliveries, sizes=batchings)
def test_any_delivery_stream_matches_the_first_seen_model(make_store, mode, stream, sizes):
    handler = Recorder()
    namespace = f"prop-{uuid.uuid4().hex}"  # a fresh id space per example on the same store
    dedupe = Deduplicator(handler, make_store(), ttl=60, mode=mode)
    messages = [(f"{namespace}:{key}", {"version": version}) for key, version in stream]
    results: list[DedupeResult] = []
    position, turn = 0, 0
    while position < len(messages):
        size = sizes[turn % len(sizes)]
        chunk = messages[position:position + size]
        results += (dedupe.process_batch(chunk) if size > 1
                    else [dedupe.process_message(*chunk[0])])
        position, turn = position + size, turn + 1

    first_payload: dict[str, Any] = {}
    expected = []
    for msg_id, payload in messages:
        if msg_id not in first_payload:
            first_payload[msg_id] = payload
            expected.append(DedupeStatus.PROCESSED)
        elif first_payload[msg_id] == payload:
            expected.append(DedupeStatus.DUPLICATE)
        else:
            expected.append(DedupeStatus.CONFLICT)
    assert [r.status for r in results] == expected
    assert handler.ids() == list(first_payload)
