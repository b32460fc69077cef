"""BloomFilter under hostile and careless use: races with files and writers,
odd files at the path, unusual numpy and Arrow inputs, arguments at their edges.

Each test pins a defect found by a hostile review, against the native filter
and its pure-Python twin (the ``impl`` fixture), which must agree on results
and on errors.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import buttress
import buttress.reference
from buttress import _hash
from buttress.reference import hashing as reference_hashing

NATIVE = buttress.BloomFilter
TWIN = buttress.reference.BloomFilter
LAYOUTS = ["classic", "split_block"]


@pytest.fixture(params=[NATIVE, TWIN], ids=["native", "twin"])
def impl(request):
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


# ---------------------------------------------------------------------- files and writers


def test_save_and_to_bytes_racing_inserts_write_a_consistent_snapshot(impl, tmp_path):
    # A snapshot taken while another thread inserts: the checksum and the bits
    # must come from the same moment, or the file fails its own checksum.
    bf = impl.for_capacity(2_000_000, 0.01, layout="split_block")
    batch = 20_000 if impl is NATIVE else 2_000
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            bf.insert_many(rng.integers(0, 2**62, batch))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for round_ in range(8):
            path = tmp_path / f"snap{round_}.bloom"
            bf.save(path)
            impl.open(path).close()  # verifies the checksum
            impl.from_bytes(bf.to_bytes())
    finally:
        stop.set()
        thread.join()


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
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        while not stop.is_set():
            (new if swaps[0] % 2 else old).save(path)
            swaps[0] += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(300):
            with impl.open(path) as bf:
                assert bf in (old, new)
    finally:
        stop.set()
        thread.join()
    assert swaps[0] > 10  # the race was on


def test_open_refuses_a_fifo_without_blocking(impl, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def opener() -> None:
        try:
            outcome.append(impl.open(fifo))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=opener, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # it blocked waiting for a writer: let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("BloomFilter.open blocked on a FIFO")
    assert isinstance(outcome[0], ValueError)
    assert "not a regular file" in str(outcome[0])
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
