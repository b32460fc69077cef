"""BloomFilter under hostile and careless use: races with files and writers,
odd files at the path, unusual numpy and Arrow inputs, arguments at their edges.

Each test pins a defect found by a hostile review, against the native filter
and its pure-Python twin (the ``impl`` fixture), which must agree on results
and on errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import buttress
import buttress.bloom
import buttress.reference
from bloom_support import NATIVE, TWIN
from buttress import _hash
from buttress.reference import hashing as reference_hashing

# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _repeated_on_a_thread(action: Callable[[int], object]) -> Iterator[list[int]]:
    """Run ``action(0)``, ``action(1)``, ... on a thread until the block ends.

    Yields a one-item list holding how many calls have finished so far.
    """
    stop = threading.Event()
    done = [0]

    def loop() -> None:
        while not stop.is_set():
            action(done[0])
            done[0] += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join()


def _outcome_unless_it_blocks(fifo: Any, call: Callable[[], object]) -> object:
    """``call()``'s result or exception; fails the test if it blocks on ``fifo``."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # it waits for a writer: let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("blocked on a FIFO")
    return outcome[0]


# ---------------------------------------------------------------------- files and writers


def test_save_and_to_bytes_racing_inserts_write_a_consistent_snapshot(impl, tmp_path):
    # A snapshot taken while another thread inserts: the checksum and the bits
    # must come from the same moment, or the file fails its own checksum.
    bf = impl.for_capacity(2_000_000, 0.01, layout="split_block")
    batch = 20_000 if impl is NATIVE else 2_000
    rng = np.random.default_rng(0)
    with _repeated_on_a_thread(lambda _: bf.insert_many(rng.integers(0, 2**62, batch))):
        for round_ in range(8):
            path = tmp_path / f"snap{round_}.bloom"
            bf.save(path)
            impl.open(path).close()  # verifies the checksum
            impl.from_bytes(bf.to_bytes())


def test_open_racing_a_save_over_the_path_reads_one_whole_file(impl, tmp_path):
    # The rebuild-and-swap recipe: save() replaces the file while services
    # open it.  Every open must see one file (header, length and bits), never
    # the old header with the new bits.
    path = tmp_path / "swap.bloom"
    old = impl.for_capacity(100_000, 0.01, layout="split_block")
    old.insert_many(np.arange(1000))
    new = impl.for_capacity(100_000, 0.01, layout="split_block")
    new.insert_many(np.arange(1000, 2000))
    old.save(path)
    opens = 0
    deadline = time.monotonic() + 30
    with _repeated_on_a_thread(lambda i: (new if i % 2 else old).save(path)) as swaps:
        # until the file was swapped under the opens many times (the race was on)
        while (opens < 300 or swaps[0] < 30) and time.monotonic() < deadline:
            with impl.open(path) as bf:
                assert bf in (old, new)
            opens += 1
    assert swaps[0] >= 30


def test_close_racing_inserts_leaves_a_file_that_verifies(impl, tmp_path):
    # close() flushes, then drops the bits: an insert from another thread in
    # between changed the mapped bits after their checksum was written.
    path = tmp_path / "live.bloom"
    impl.for_capacity(50_000, 0.01, layout="split_block").save(path)
    for trial in range(30):
        bf = impl.open(path, "r+")
        inserted = threading.Event()
        errors: list[BaseException] = []

        def inserter(bf=bf, inserted=inserted, errors=errors, trial=trial) -> None:
            rng = np.random.default_rng(trial)
            try:
                while True:
                    bf.insert_many(rng.integers(0, 2**62, 100))
                    inserted.set()
            except ValueError as exc:  # the filter was closed under it
                errors.append(exc)

        thread = threading.Thread(target=inserter)
        thread.start()
        assert inserted.wait(timeout=30)
        bf.close()
        thread.join(timeout=30)
        assert "closed" in str(errors[0])
        impl.open(path).close()  # verifies the checksum


def test_open_refuses_a_fifo_without_blocking(impl, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome = _outcome_unless_it_blocks(fifo, lambda: impl.open(fifo))
    assert isinstance(outcome, ValueError)
    assert "not a regular file" in str(outcome)
    with pytest.raises(IsADirectoryError):
        impl.open(tmp_path)


def test_open_names_the_file_in_every_format_error(impl, tmp_path):
    path = tmp_path / "junk.bloom"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"junk\.bloom: not a buttress Bloom filter"):
        impl.open(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"junk\.bloom: truncated"):
        impl.open(path)


# ---------------------------------------------------------------------- numpy inputs


WORDS = ["user:1", "", "\u0100", "\u0100\u0101", "héllo", "日本語", "emoji 🙂", "a\x00b"]


@pytest.mark.parametrize("order", [">", "<"])
def test_unicode_arrays_of_either_byte_order_are_the_same_keys(impl, layout, order):
    # '\u0100' byte-swapped reads as U+10000, a valid character: without care
    # a big-endian array inserts other keys and the filter gives false negatives.
    keys = np.array(WORDS, dtype=f"{order}U12")
    bf = impl.for_capacity(100, 0.01, layout=layout)
    bf.insert_many(keys)
    expected = impl.for_capacity(100, 0.01, layout=layout)
    expected.insert_many(WORDS)
    assert bf == expected
    assert bf.contains_many(keys).all()
    assert not bf.contains_many(np.array(["\U00010000"], dtype=f"{order}U1")).any()


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_reads_byte_swapped_unicode_arrays(hasher):
    swapped = np.array(WORDS, dtype=">U12")
    assert hasher.xxh64_many(swapped).tolist() == hasher.xxh64_many(WORDS).tolist()


def test_open_verify_must_be_a_bool(impl, tmp_path):
    path = tmp_path / "f.bloom"
    impl(1024, 3).save(path)
    with pytest.raises(TypeError, match="verify"):
        impl.open(path, verify="no")


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_unicode_arrays_holding_no_code_point_raise_value_error(hasher):
    # numpy itself raises SystemError turning such an element into str
    raw = np.array([0x41, 0x42, 0x43, 0x110000], dtype=np.uint32).view("U2")
    with pytest.raises(ValueError, match="element 1 holds 0x110000"):
        hasher.xxh64_many(raw)


def test_unicode_arrays_holding_no_code_point_are_refused_by_both_filters(impl):
    raw = np.array([0x41, 0xFFFFFFFF], dtype=np.uint32).view("U1")
    bf = impl(1024, 3)
    for method in (bf.insert_many, bf.contains_many):
        with pytest.raises(ValueError, match="not a Unicode code point"):
            method(raw)


# ---------------------------------------------------------------------- Python keys


@pytest.mark.parametrize("keys", [[None, "a"], ("a", None)])
def test_none_in_a_list_of_keys_is_a_type_error_in_both_filters(impl, keys):
    # None is a null only inside a column; among Python keys it has no type
    # the key rule accepts, as for insert(None).  The twin used to skip it.
    bf = impl(1024, 3)
    for batch in (keys, (key for key in keys)):
        with pytest.raises(TypeError, match="NoneType"):
            bf.insert_many(batch)
    for batch in (keys, (key for key in keys)):
        with pytest.raises(TypeError, match="NoneType"):
            bf.contains_many(batch)
    assert not any(bf.bitset())


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_refuses_none_among_python_keys_as_a_type_error(hasher):
    with pytest.raises(TypeError, match="NoneType"):
        hasher.xxh64_many(["a", None])


# ---------------------------------------------------------------------- arguments


def test_threads_beyond_the_maximum_is_a_value_error_in_both_filters(impl):
    bf = impl(1024, 3)
    bf.insert_many([1, 2], threads=1024)
    for method in (bf.insert_many, bf.contains_many):
        with pytest.raises(ValueError, match="threads"):
            method([1, 2], threads=2**40)  # native: was an OverflowError from C
        with pytest.raises(TypeError, match="threads"):
            method([1, 2], threads=np.float64(2))


@pytest.mark.parametrize("num_hashes", [8.0, True, "8", None])
def test_split_block_num_hashes_of_the_wrong_type_is_a_type_error(impl, num_hashes):
    with pytest.raises(TypeError, match="num_hashes"):
        impl(1024, num_hashes, layout="split_block")
    if num_hashes is not None:  # from_bitset: None means the layout's default
        with pytest.raises(TypeError, match="num_hashes"):
            impl.from_bitset(b"\0" * 32, num_hashes=num_hashes)
    assert impl(1024, np.int64(8), layout="split_block").num_hashes == 8


def test_layout_that_is_not_a_str_is_refused_with_the_choices(impl):
    with pytest.raises(ValueError, match="layout must be one of"):
        impl(1024, 3, layout=np.array(["classic"]))  # was a KeyError
    with pytest.raises(ValueError, match="layout must be one of"):
        impl.for_capacity(100, layout=["split_block"])


def test_combining_with_a_closed_filter_says_so(impl):
    bf = impl(1024, 3)
    closed = impl(1024, 3)
    closed.close()
    for combine in (lambda: bf | closed, lambda: bf & closed, bf.union, bf.intersection):
        with pytest.raises(ValueError, match="closed"):
            combine() if combine.__name__ == "<lambda>" else combine(closed)
    with pytest.raises(ValueError, match="closed"):
        bf |= closed
    with pytest.raises(ValueError, match="closed"):
        closed |= bf


# ---------------------------------------------------------------------- Arrow and Parquet


def test_sliced_one_column_table_counts_only_its_own_nulls(impl):
    pa = pytest.importorskip("pyarrow")
    column = pa.array([None, None, None, "a", "b"])
    for keys in (pa.StructArray.from_arrays([column], names=["x"]).slice(3),
                 pa.table({"x": column}).slice(3), pa.record_batch({"x": column}).slice(3)):
        bf = impl(1024, 3)
        bf.insert_many(keys)
        assert bf.stats()["keys_inserted"] == 2  # native: was -1 for the struct
        assert bf.contains_many(keys).tolist() == [True, True]


def test_from_parquet_refuses_odd_files_and_types_before_reading_rows(impl, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    empty = tmp_path / "zero.parquet"
    pq.write_table(pa.table({"x": pa.array([], type=pa.float64()),
                             "s": pa.array([], type=pa.string())}), empty)
    with pytest.raises(TypeError, match=r"float64|double"):  # no rows: was accepted
        impl.from_parquet(empty, "x", fp_rate=0.01)
    assert impl.from_parquet(empty, "s", fp_rate=0.01).fill_ratio() == 0.0
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"x": pa.array([None, None], type=pa.float64())}), nulls)
    with pytest.raises(TypeError, match=r"float64|double"):
        impl.from_parquet(nulls, "x", fp_rate=0.01)
    junk = tmp_path / "junk.parquet"
    for content in (b"", b"not parquet at all"):
        junk.write_bytes(content)
        with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
            impl.from_parquet(junk, "x", fp_rate=0.01)
    with pytest.raises(FileNotFoundError):
        impl.from_parquet(tmp_path / "missing.parquet", "x", fp_rate=0.01)
    with pytest.raises(IsADirectoryError):
        impl.from_parquet(tmp_path, "x", fp_rate=0.01)
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    outcome = _outcome_unless_it_blocks(
        fifo, lambda: impl.from_parquet(fifo, "x", fp_rate=0.01))
    assert isinstance(outcome, ValueError)
    assert "not a regular file" in str(outcome)


def test_masked_arrays_never_insert_their_hidden_values(impl):
    keys = np.ma.masked_array([1, 2, 3], mask=[False, True, False])
    bf = impl(1024, 3)
    for method in (bf.insert_many, bf.contains_many):
        with pytest.raises(ValueError, match="1 masked element"):
            method(keys)
    assert not any(bf.bitset())  # 2 was inserted although masked
    bf.insert_many(keys.compressed())
    bf.insert_many(np.ma.masked_array(["a", "b"]))  # nothing masked: its values
    assert bf.contains_many([1, 2, 3, "a", "b"]).tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_refuses_masked_elements(hasher):
    with pytest.raises(ValueError, match="masked"):
        hasher.xxh64_many(np.ma.masked_array([1, 2], mask=[True, False]))


class _LoudStr(str):
    def encode(self, *args, **kwargs):  # type: ignore[override]
        return b"not the characters"


class _LoudBytes(bytes):
    def __bytes__(self) -> bytes:
        return b"not the buffer"


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_key_subclasses_hash_their_characters_and_buffer(hasher):
    # hash_key reads a str's characters and a bytes' buffer; encode_key and the
    # twin called the subclass's encode() / __bytes__ and disagreed with it.
    for key, plain in ((_LoudStr("abc"), "abc"), (_LoudBytes(b"abc"), b"abc")):
        assert hasher.encode_key(key) == hasher.encode_key(plain)
        assert hasher.hash_key(key) == hasher.hash_key(plain) == hasher.xxh64(
            hasher.encode_key(key))
        assert hasher.xxh64_many([key]).tolist() == [hasher.hash_key(plain)]


def test_key_subclasses_set_the_same_bits_in_both_filters(layout):
    filters = [impl.for_capacity(100, 0.01, layout=layout) for impl in (NATIVE, TWIN)]
    for bf in filters:
        bf.insert(_LoudStr("abc"))
        bf.insert_many([_LoudBytes(b"xyz")])
        assert "abc" in bf and b"xyz" in bf
    assert filters[0].bitset() == filters[1].bitset()


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: buttress.bloom.split_block_fp_rate(100, 100), ValueError, "num_bits"),
    (lambda: buttress.bloom.classic_fp_rate(100, 0, 3), ValueError, "num_bits"),
    (lambda: buttress.bloom.classic_fp_rate(100, 1000, 0), ValueError, "num_hashes"),
    (lambda: buttress.bloom.split_block_fp_rate(float("nan"), 1024), ValueError, "num_keys"),
    (lambda: buttress.bloom.classic_fp_rate(-1, 1000, 3), ValueError, "num_keys"),
    (lambda: buttress.bloom.classic_fp_rate("10", 1000, 3), TypeError, "num_keys"),
    (lambda: buttress.bloom.split_block_fp_rate(10, 1024.0), TypeError, "num_bits"),
])
def test_fp_rate_formulas_validate_their_arguments(call, error, match):
    with pytest.raises(error, match=match):  # was ZeroDivisionError, or a NaN's ValueError
        call()


def test_for_capacity_beyond_the_maximum_names_the_capacity(impl, layout):
    with pytest.raises(ValueError, match=r"capacity 1099511627776 at fp_rate 0\.5 needs"):
        impl.for_capacity(2**40, 0.5, layout=layout)


def test_struct_with_null_rows_is_refused_by_both(impl):
    # the struct's own nulls hide rows its field still holds ("b" here)
    pa = pytest.importorskip("pyarrow")
    keys = pa.StructArray.from_arrays([pa.array(["a", "b"])], names=["x"],
                                      mask=pa.array([False, True]))
    bf = impl(1024, 3)
    with pytest.raises(ValueError, match="struct with null rows"):
        bf.insert_many(keys)
    assert not any(bf.bitset())  # the twin inserted "b"


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_refuses_a_struct_with_null_rows(hasher):
    pa = pytest.importorskip("pyarrow")
    keys = pa.StructArray.from_arrays([pa.array(["a", "b"])], names=["x"],
                                      mask=pa.array([False, True]))
    with pytest.raises(ValueError, match="struct with null rows"):
        hasher.xxh64_many(keys)


@pytest.mark.parametrize("fp_rate", [1e-19, 1e-25, 1e-50, 1e-100, 1e-300])
def test_classic_for_capacity_meets_tiny_fp_rates_despite_the_probe_cap(impl, fp_rate):
    # k is capped at 64; the bit count must then grow to keep the promise
    # (1e-100 gave a filter at 1.6e-58)
    bf = impl.for_capacity(1000, fp_rate)
    assert buttress.bloom.classic_fp_rate(1000, bf._modulus, bf.num_hashes) <= fp_rate * 1.02


def _dying_stream():
    pa = pytest.importorskip("pyarrow")

    def batches():
        yield pa.record_batch({"x": ["a", "b"]})
        raise RuntimeError("the source died")

    return pa.RecordBatchReader.from_batches(pa.schema([("x", pa.string())]), batches())


def test_a_stream_failing_midway_raises_in_both_filters(impl):
    # The twin caught the read error as "cannot export", fell back to
    # iterating the half-read stream, and returned having inserted nothing.
    bf = impl(1024, 3)
    with pytest.raises(ValueError, match=r"Arrow stream failed.*the source died"):
        bf.insert_many(_dying_stream())
    with pytest.raises(ValueError, match=r"Arrow stream failed.*the source died"):
        bf.contains_many(_dying_stream())


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_raises_for_a_stream_failing_midway(hasher):
    with pytest.raises(ValueError, match=r"Arrow stream failed.*the source died"):
        hasher.xxh64_many(_dying_stream())


def test_from_parquet_with_threads_reads_one_file_while_it_is_replaced(impl, tmp_path):
    # Each thread opened the path itself: a file replaced mid-build (a batch job
    # rewriting it) had its rows mixed with the old one's in one filter.
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = 4000 if impl is NATIVE else 800
    sources = []
    for prefix in ("old", "new"):
        source = tmp_path / f"{prefix}.parquet"
        pq.write_table(pa.table({"k": [f"{prefix}{i}" for i in range(rows)]}), source,
                       row_group_size=rows // 8)
        sources.append(source.read_bytes())
    live = tmp_path / "live.parquet"
    live.write_bytes(sources[0])
    expected = [impl.from_parquet(tmp_path / "old.parquet", "k", fp_rate=0.01),
                impl.from_parquet(tmp_path / "new.parquet", "k", fp_rate=0.01)]
    staging = tmp_path / "staging.parquet"

    def replace(i: int) -> None:
        staging.write_bytes(sources[i % 2 == 0])
        os.replace(staging, live)

    builds = 0
    deadline = time.monotonic() + 30
    with _repeated_on_a_thread(replace) as swaps:
        while (builds < 5 or swaps[0] < 20) and time.monotonic() < deadline:
            bf = impl.from_parquet(live, "k", fp_rate=0.01, threads=4)
            assert bf in expected  # one file's rows, never a mix
            builds += 1
    assert swaps[0] >= 20


class _LyingLength:
    """An iterable of two keys whose __len__ is the caller's mistake."""

    def __init__(self, length: int | None) -> None:
        self.length = length

    def __len__(self) -> int:
        if self.length is None:
            raise RuntimeError("__len__ broke")
        return self.length

    def __iter__(self):
        return iter(["a", "b"])


@pytest.mark.parametrize("length", [2**62, 0, None], ids=["huge", "zero", "raises"])
def test_batches_do_not_trust_a_keys_objects_len(impl, length):
    # The native filter sized its answers (and list(keys)) by __len__: a huge
    # one was a MemoryError, a raising one an error; the twin only iterates.
    bf = impl(1024, 3)
    bf.insert_many(_LyingLength(length))
    assert bf.contains_many(_LyingLength(length)).tolist() == [True, True]
    assert bf.stats()["keys_inserted"] == 2


@pytest.mark.parametrize("hasher", [_hash, reference_hashing], ids=["native", "reference"])
def test_xxh64_many_does_not_trust_len(hasher):
    assert hasher.xxh64_many(_LyingLength(2**62)).tolist() == hasher.xxh64_many(["a", "b"]).tolist()


def test_damaged_saved_filters_raise_a_buttress_error(impl, tmp_path):
    # raised on purpose, so a ButtressError; still a ValueError, as documented
    good = impl(1024, 3).to_bytes()
    damaged = [good[:10], b"x" * len(good), good[:-1], good + b"\0",
               good[:70] + bytes([good[70] ^ 1]) + good[71:]]
    path = tmp_path / "damaged.bloom"
    for data in damaged:
        with pytest.raises(buttress.CorruptFilterError) as caught:
            impl.from_bytes(data)
        assert isinstance(caught.value, buttress.ButtressError)
        assert isinstance(caught.value, ValueError)
        path.write_bytes(data)
        with pytest.raises(buttress.CorruptFilterError, match=r"damaged\.bloom: "):
            impl.open(path)


def test_guard_get_many_does_not_trust_len(impl):
    bf = impl(1024, 3)
    guard = buttress.BloomGuard({"a": 1, "b": 2}.get, bf)
    guard.add_many(["a", "b"])
    assert guard.get_many(_LyingLength(2**62)) == [1, 2]


def test_extension_columns_are_read_as_their_storage_by_both(impl, layout):
    # the native reader sees an extension type as its storage; the twin
    # refused arrow.uuid with a TypeError
    pa = pytest.importorskip("pyarrow")
    if not hasattr(pa, "uuid"):
        pytest.skip("pyarrow without the arrow.uuid extension type")
    ids = [bytes([i]) * 16 for i in range(5)]
    column = pa.ExtensionArray.from_storage(pa.uuid(), pa.array(ids, type=pa.binary(16)))
    for keys in (column, pa.table({"id": column}), pa.chunked_array([column[:2], column[2:]])):
        bf = impl.for_capacity(100, 0.01, layout=layout)
        bf.insert_many(keys)
        expected = impl.for_capacity(100, 0.01, layout=layout)
        expected.insert_many(ids)
        assert bf == expected


@pytest.mark.parametrize(("make_type", "name"), [
    (lambda pa: pa.timestamp("s"), "timestamp[s]"),  # was "timestamp[s:]"
    (lambda pa: pa.timestamp("us", tz="UTC"), "timestamp[us, tz=UTC]"),
    (lambda pa: pa.duration("ms"), "duration[ms]"),
    (lambda pa: pa.time64("ns"), "time64[ns]"),
])
def test_temporal_columns_are_refused_with_their_type_named(impl, make_type, name):
    pa = pytest.importorskip("pyarrow")
    keys = pa.array([1], type=make_type(pa))
    with pytest.raises(TypeError, match=re.escape(f"unsupported Arrow key type {name}:")):
        impl(1024, 3).insert_many(keys)
