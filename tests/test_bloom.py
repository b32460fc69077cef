"""BloomFilter and BloomGuard: API, bad input, persistence, Parquet layout, threads, processes.

Every test runs against the native filter and its pure-Python twin (the
``impl`` fixture), which share one Python layer over different kernels.
"""

from __future__ import annotations

import math
import os
import pickle
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
import xxhash

import buttress
import buttress.reference
from bloom_support import LAYOUTS, NATIVE, TWIN
from buttress.bloom import BloomGuard, classic_fp_rate, split_block_fp_rate

SALT = [0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D,
        0x705495C7, 0x2DF1424B, 0x9EFC4947, 0x5C6BFB31]


# ---------------------------------------------------------------------- API


def test_insert_and_lookup_every_key_kind(impl, layout):
    bf = impl.for_capacity(1000, 0.01, layout=layout)
    keys = ["user:1", "", "ünïcödé", b"raw", bytearray(b"ba"), memoryview(b"mv"), 0, -1,
            2**63 - 1, -(2**63), 2**64 - 1, np.int32(7), np.uint64(2**64 - 2)]
    for key in keys:
        bf.insert(key)
    for key in keys:
        assert key in bf
        assert bf.possibly_contains(key)
    assert bf.contains_many(keys).all()


def test_key_rule_aliases_are_the_same_key(impl, layout):
    bf = impl(4096, 8, layout=layout) if layout == "split_block" else impl(4096, 5)
    bf.insert(-1)
    assert 2**64 - 1 in bf  # same 8 bytes
    bf.insert("abc")
    assert b"abc" in bf


def test_numpy_inputs_match_python_inputs(impl, layout):
    rng = np.random.default_rng(1)
    ints = rng.integers(-(2**62), 2**62, size=500, dtype=np.int64)
    words = np.array([f"w{i}".encode() for i in range(300)], dtype="S6")
    a = impl.for_capacity(2000, layout=layout)
    b = impl.for_capacity(2000, layout=layout)
    a.insert_many(ints)
    a.insert_many(words)
    b.insert_many(ints.tolist())
    b.insert_many(iter(words.tolist()))  # any iterable; NUL padding is not part of the key
    assert a.to_bytes() == b.to_bytes()
    for dtype in (np.int8, np.int16, np.uint32, np.uint64):
        small = np.arange(100, dtype=dtype)
        assert a.contains_many(small).tolist() == a.contains_many(small.tolist()).tolist()


def test_contains_many_returns_a_bool_array(impl, layout):
    bf = impl.for_capacity(100, layout=layout)
    bf.insert_many(range(50))
    result = bf.contains_many(np.arange(50, dtype=np.uint64))
    assert result.dtype == np.bool_ and result.shape == (50,) and result.all()
    empty = bf.contains_many([])
    assert empty.dtype == np.bool_ and empty.shape == (0,)
    bf.insert_many(np.array([], dtype=np.int64))


def test_properties_and_sizing(impl):
    bf = impl(1000, 3)
    assert (bf.num_bits, bf.num_hashes, bf.layout) == (1000, 3, "classic")
    sb = impl(1000, 8, layout="split_block")
    assert sb.num_bits == 1024 and len(sb.bitset()) == 128  # whole 256-bit blocks
    for layout in LAYOUTS:
        for p in (0.01, 0.001):
            sized = impl.for_capacity(10_000, p, layout=layout)
            if layout == "classic":
                expected = classic_fp_rate(10_000, sized.num_bits, sized.num_hashes)
                assert sized.num_hashes == round(-math.log2(p))
            else:
                expected = split_block_fp_rate(10_000, sized.num_bits)
                # the fewest blocks: one block less would miss the rate
                assert split_block_fp_rate(10_000, sized.num_bits - 256) > p
            assert expected <= p * 1.02


def test_split_block_sizing_uses_the_exact_formula():
    # The closed form (1 - e^(-8n/m))^8 under-sizes split-block filters.
    n, p = 100_000, 0.01
    bf = NATIVE.for_capacity(n, p, layout="split_block")
    closed_form = (1 - math.exp(-8 * n / bf.num_bits)) ** 8
    assert closed_form < split_block_fp_rate(n, bf.num_bits) <= p


def test_approx_count_and_estimated_fp_rate_track_the_fill(impl, layout):
    n = 3000 if impl is TWIN else 20_000
    bf = impl.for_capacity(n, 0.01, layout=layout)
    assert bf.approx_count() == 0.0 and bf.estimated_fp_rate() == 0.0
    bf.insert_many(np.arange(n, dtype=np.int64))
    assert abs(bf.approx_count() - n) < 0.05 * n
    assert 0.006 < bf.estimated_fp_rate() < 0.014
    stats = bf.stats()
    assert stats["keys_inserted"] == n and 0.3 < stats["fill_ratio"] < 0.7
    assert stats["layout"] == layout and stats["bytes"] == len(bf.bitset())
    full = impl(64, 2)
    full.insert_many(range(2000))
    assert full.approx_count() == math.inf and full.estimated_fp_rate() == 1.0


def test_clear_copy_and_equality(impl, layout):
    bf = impl.for_capacity(100, layout=layout)
    bf.insert("a")
    clone = bf.copy()
    assert clone == bf and clone is not bf
    clone.insert("b")
    assert "b" not in bf or bf != clone
    bf.clear()
    assert "a" not in bf and bf.bitset() == bytes(len(bf.bitset()))
    assert "a" in clone
    with pytest.raises(TypeError):
        hash(bf)  # mutable


def test_set_operations(impl, layout):
    a = impl.for_capacity(1000, layout=layout)
    b = impl.for_capacity(1000, layout=layout)
    a.insert_many(["x", "both"])
    b.insert_many(["y", "both"])
    union = a | b
    assert all(k in union for k in ("x", "y", "both"))
    assert union == a.union(b)
    inter = a & b
    assert "both" in inter and inter == a.intersection(b)
    expected = np.bitwise_and(np.frombuffer(a.bitset(), np.uint8),
                              np.frombuffer(b.bitset(), np.uint8)).tobytes()
    assert inter.bitset() == expected
    a_copy = a.copy()
    a_copy |= b
    assert a_copy == union
    a_copy &= a
    assert a_copy == a
    # native and twin filters combine: they share the bit format
    other = (TWIN if impl is NATIVE else NATIVE).for_capacity(1000, layout=layout)
    other.insert("z")
    assert "z" in (a | other)


def test_set_operations_reject_mismatched_filters(impl):
    a = impl(1024, 4)
    with pytest.raises(ValueError, match="num_bits"):
        a | impl(2048, 4)
    with pytest.raises(ValueError, match="num_hashes"):
        a |= impl(1024, 5)
    with pytest.raises(ValueError, match="layout"):
        a & impl(1024, 8, layout="split_block")
    with pytest.raises(TypeError):
        a | {"x"}
    with pytest.raises(TypeError, match="BloomFilter"):
        a &= 3


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((0, 3), {}, ValueError, "num_bits"),
    ((-5, 3), {}, ValueError, "num_bits"),
    ((2**41, 3), {}, ValueError, "num_bits"),
    ((100, 0), {}, ValueError, "num_hashes"),
    ((100, 65), {}, ValueError, "num_hashes"),
    ((256, 7), {"layout": "split_block"}, ValueError, "num_hashes=8"),
    ((100, 3), {"layout": "bloomier"}, ValueError, "layout"),
    ((100.0, 3), {}, TypeError, "num_bits"),
    ((100, True), {}, TypeError, "num_hashes"),
])
def test_constructor_rejects_bad_arguments(impl, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        impl(*args, **kwargs)


@pytest.mark.parametrize(("capacity", "fp_rate", "error", "match"), [
    (0, 0.01, ValueError, "capacity"),
    (-1, 0.01, ValueError, "capacity"),
    (100, 0.0, ValueError, "fp_rate"),
    (100, 1.0, ValueError, "fp_rate"),
    (100, -0.5, ValueError, "fp_rate"),
    (100, float("nan"), ValueError, "fp_rate"),
    (100, "0.01", TypeError, "fp_rate"),
    (1.5, 0.01, TypeError, "capacity"),
])
def test_for_capacity_rejects_bad_arguments(impl, capacity, fp_rate, error, match):
    with pytest.raises(error, match=match):
        impl.for_capacity(capacity, fp_rate)


def test_bad_keys_raise_type_error_never_cast(impl, layout):
    bf = impl.for_capacity(100, layout=layout)
    for key in (1.5, None, True, ("t",), object()):
        with pytest.raises(TypeError):
            bf.insert(key)
        with pytest.raises(TypeError):
            _ = key in bf
    with pytest.raises(OverflowError):
        bf.insert(2**64)
    for array in (np.zeros(3), np.array(["a"], dtype=object), np.array([True]),
                  np.zeros((2, 2), dtype=np.int64)):
        with pytest.raises(TypeError):
            bf.insert_many(array)
        with pytest.raises(TypeError):
            bf.contains_many(array)
    for single in ("abc", b"abc"):
        with pytest.raises(TypeError, match="collection"):
            bf.insert_many(single)
    with pytest.raises(TypeError):
        bf.insert_many(["ok", 2.5])
    assert not any(bf.bitset())  # a batch with a bad key inserts nothing


# ---------------------------------------------------------------------- persistence


def test_to_bytes_round_trip_and_header(impl, layout):
    bf = impl.for_capacity(500, layout=layout)
    bf.insert_many([f"k{i}" for i in range(300)])
    data = bf.to_bytes()
    assert data[:8] == b"BTRSBLM\x00" and len(data) == 64 + len(bf.bitset())
    back = impl.from_bytes(data)
    assert back == bf and back.to_bytes() == data
    assert impl.from_bytes(bytearray(data)) == bf
    assert impl.from_bytes(memoryview(data)) == bf
    assert pickle.loads(pickle.dumps(bf)) == bf


@pytest.mark.parametrize(("mangle", "match"), [
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"\0", "trailing"),
    (lambda d: b"XXXXXXXX" + d[8:], "magic"),
    (lambda d: d[:8] + b"\x09\x00" + d[10:], "version"),
    (lambda d: d[:10] + b"\x07" + d[11:], "layout"),
    (lambda d: d[:11] + b"\x02" + d[12:], "hash algorithm"),
    (lambda d: d[:16] + b"\x01" + d[17:], "seed"),
    (lambda d: d[:12] + b"\x00" + d[13:], "num_hashes"),
    (lambda d: d[:24] + b"\xff" + d[25:], "num_bits"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: d[:60] + b"\x01" + d[61:], "reserved"),
])
def test_from_bytes_explains_what_is_wrong(impl, mangle, match):
    bf = impl(1000, 4)
    bf.insert("x")
    with pytest.raises(ValueError, match=match):
        impl.from_bytes(mangle(bf.to_bytes()))
    with pytest.raises(TypeError, match="bytes-like"):
        impl.from_bytes("not bytes")


def test_save_and_open_memory_mapped(impl, layout, tmp_path):
    path = tmp_path / "users.bloom"
    bf = impl.for_capacity(5000, layout=layout)
    bf.insert_many(np.arange(5000, dtype=np.int64))
    bf.save(path)
    assert path.read_bytes() == bf.to_bytes()
    with impl.open(path) as shared:
        assert shared.read_only and shared == bf
        assert shared.contains_many(np.arange(5000)).all()
        assert isinstance(shared._bits, np.memmap)  # mapped, not copied
        with pytest.raises(ValueError, match="read-only"):
            shared.insert("new")
        with pytest.raises(ValueError, match="read-only"):
            shared.insert_many(["new"])
        with pytest.raises(ValueError, match="read-only"):
            shared |= bf
        with pytest.raises(ValueError, match="read-only"):
            shared.clear()
        writable = shared.copy()
        writable.insert("new")
        assert "new" in writable and "new" not in shared
    with pytest.raises(ValueError, match="closed"):
        _ = 1 in shared
    for use in (shared.bitset, shared.to_bytes, shared.stats, lambda: shared.insert(1)):
        with pytest.raises(ValueError, match="closed"):
            use()
    shared.close()  # idempotent
    with impl.open(path, mode="r+") as live:
        live.insert("new")
        assert "new" in live
    reopened = impl.open(path)  # verifies the checksum written on close
    assert "new" in reopened and impl.from_bytes(path.read_bytes()) == reopened


def test_open_rejects_bad_files(impl, tmp_path):
    path = tmp_path / "f.bloom"
    bf = impl(4096, 3)
    bf.insert("x")
    bf.save(path)
    with pytest.raises(ValueError, match="mode"):
        impl.open(path, mode="w")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        impl.open(path)
    assert impl.open(path, verify=False).num_bits == 4096  # salvage on request
    path.write_bytes(bytes(data[:80]))
    with pytest.raises(ValueError, match="truncated"):
        impl.open(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        impl.open(path)
    with pytest.raises(FileNotFoundError):
        impl.open(tmp_path / "missing.bloom")


def test_close_during_a_batch_lookup_does_not_crash(tmp_path):
    path = tmp_path / "big.bloom"
    NATIVE.for_capacity(1_000_000, layout="split_block").save(path)
    bf = NATIVE.open(path)
    keys = np.arange(2_000_000, dtype=np.int64)
    outcomes = []
    started = threading.Event()

    def reader():
        started.set()
        for _ in range(20):
            try:
                outcomes.append(int(bf.contains_many(keys).sum()))
            except ValueError as exc:  # closed before the call began
                outcomes.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait(10)
    bf.close()
    thread.join(60)
    assert not thread.is_alive() and len(outcomes) == 20
    assert all(o == 0 or "closed" in str(o) for o in outcomes)


def test_unflushed_writer_is_detected_then_flush_fixes_it(tmp_path):
    path = tmp_path / "f.bloom"
    NATIVE(4096, 3).save(path)
    live = NATIVE.open(path, "r+")
    live.insert("x")
    live._bits.flush()  # bits on disk, checksum stale: what a crashed writer leaves
    with pytest.raises(ValueError, match="flush"):
        NATIVE.open(path)
    live.flush()
    assert "x" in NATIVE.open(path)
    live.close()


def test_writer_whose_file_was_replaced_does_not_write_into_the_new_file(impl, layout,
                                                                         tmp_path):
    # Issue 13 defect 4: open mode="r+", then rebuild-and-swap with save(); the
    # old writer's close() used to reopen the path by name and write its header
    # and bits into the new file (checksum mismatch, or trailing bytes).
    path = tmp_path / "live.bloom"
    old = impl.for_capacity(1000, layout=layout)
    old.insert_many(["a", "b"])
    old.save(path)
    writer = impl.open(path, mode="r+")
    writer.insert("written-after-open")
    for capacity in (1000, 50_000):  # same size, then a bigger file
        rebuilt = impl.for_capacity(capacity, layout=layout)
        rebuilt.insert_many(["c", "d"])
        rebuilt.save(path)
        writer.flush()
        assert impl.open(path) == rebuilt  # the new file is untouched
    writer.insert("still-writable")
    writer.close()
    fresh = impl.open(path)
    assert fresh == rebuilt and "still-writable" not in fresh
    assert path.read_bytes() == rebuilt.to_bytes()


# ---------------------------------------------------------------------- Parquet layout


def parquet_bitset(keys, num_blocks):
    """The spec's algorithm, written out independently of buttress."""
    words = np.zeros(num_blocks * 8, dtype="<u4")
    for key in keys:
        data = key.encode() if isinstance(key, str) else key.to_bytes(8, "little", signed=True)
        h = xxhash.xxh64_intdigest(data, 0)
        block = ((h >> 32) * num_blocks) >> 32
        x = h & 0xFFFFFFFF
        for i in range(8):
            words[block * 8 + i] |= np.uint32(1 << (((x * SALT[i]) & 0xFFFFFFFF) >> 27))
    return words.tobytes()


@pytest.mark.parametrize("num_blocks", [1, 7, 32, 1000])
def test_split_block_bitset_is_the_parquet_bitset(impl, num_blocks):
    keys = [0, 1, -1, 42, 2**40 + 3, "parquet", "", "ü"] + [f"row-{i}" for i in range(200)]
    bf = impl(num_blocks * 256, 8, layout="split_block")
    bf.insert_many(keys)
    assert bf.bitset() == parquet_bitset(keys, num_blocks)
    loaded = impl.from_bitset(parquet_bitset(keys, num_blocks))
    assert loaded == bf and all(k in loaded for k in keys)


def test_from_bitset_validates(impl):
    with pytest.raises(ValueError, match="32-byte"):
        impl.from_bitset(b"\0" * 33)
    with pytest.raises(ValueError, match="32-byte"):
        impl.from_bitset(b"")
    with pytest.raises(ValueError, match="num_hashes"):
        impl.from_bitset(b"\0" * 8, layout="classic")
    classic = impl(1001, 4)
    classic.insert("k")
    back = impl.from_bitset(classic.bitset(), "classic", num_hashes=4, num_bits=1001)
    assert back == classic
    with pytest.raises(ValueError, match="bitset"):
        impl.from_bitset(classic.bitset(), "classic", num_hashes=4, num_bits=2000)


# ---------------------------------------------------------------------- threads, processes


def test_concurrent_inserts_never_lose_bits(layout):
    # Four threads insert disjoint keys into a small (L1-resident) filter with
    # batches (GIL released) and single inserts interleaved; the result must be
    # exactly the bits of inserting everything in one thread.
    parts = [np.arange(i * 50_000, (i + 1) * 50_000, dtype=np.int64) for i in range(4)]
    bf = NATIVE(1 << 16, 8 if layout == "split_block" else 3, layout=layout)
    barrier = threading.Barrier(len(parts))

    def writer(keys):
        barrier.wait()
        for chunk in np.array_split(keys, 50):
            bf.insert_many(chunk)
            bf.insert(int(chunk[0]))

    threads = [threading.Thread(target=writer, args=(keys,)) for keys in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = NATIVE(1 << 16, bf.num_hashes, layout=layout)
    expected.insert_many(np.concatenate(parts))
    assert bf.bitset() == expected.bitset()
    assert bf.stats()["keys_inserted"] == 200_000 + 4 * 50


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_filters_take_the_prefetching_path_with_the_same_bits(layout):
    # Above 4 MiB the kernels prefetch ahead and classic lookups stop at the
    # first clear bit: a different code path, the same answers.
    rng = np.random.default_rng(5)
    members = rng.integers(0, 2**64, size=20_000, dtype=np.uint64)
    outsiders = rng.integers(0, 2**64, size=5_000, dtype=np.uint64)
    num_hashes = 8 if layout == "split_block" else 4
    native = NATIVE(48_000_000, num_hashes, layout=layout)
    twin = TWIN(48_000_000, num_hashes, layout=layout)
    native.insert_many(members)
    twin.insert_many(members)
    assert native.bitset() == twin.bitset()
    assert native.contains_many(members).all()
    saturated = NATIVE(48_000_000, num_hashes, layout=layout)
    saturated.insert_many(np.arange(12_000_000, dtype=np.int64))  # many hits and misses
    twin = TWIN.from_bytes(saturated.to_bytes())
    assert (saturated.contains_many(outsiders).tolist()
            == twin.contains_many(outsiders).tolist())


PORTABLE = """
import sys
import numpy as np
from buttress import _bloom
from buttress.bloom import BloomFilter
assert not _bloom.USES_AVX2
out = []
for layout in ("split_block", "classic"):
    bf = BloomFilter.for_capacity(5000, layout=layout)
    bf.insert_many(np.arange(4000, dtype=np.int64))
    bf.insert("portable")
    hits = bf.contains_many(np.arange(8000, dtype=np.int64))
    out.append(bf.to_bytes().hex() + ":" + str(int(hits.sum())))
sys.stdout.write(" ".join(out))
"""


def test_portable_kernels_give_the_same_bits_as_the_vector_ones():
    env = dict(os.environ, BUTTRESS_BLOOM_PORTABLE="1")
    out = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True,
                         timeout=60, check=True, env=env).stdout.split()
    for layout, result in zip(("split_block", "classic"), out, strict=True):
        bf = NATIVE.for_capacity(5000, layout=layout)
        bf.insert_many(np.arange(4000, dtype=np.int64))
        bf.insert("portable")
        hits = int(bf.contains_many(np.arange(8000, dtype=np.int64)).sum())
        assert result == f"{bf.to_bytes().hex()}:{hits}"


SUBPROCESS = """
import sys
import buttress
bf = buttress.BloomFilter.for_capacity(1000, layout=sys.argv[1])
bf.insert_many(["alpha", b"beta", 7, -7, 2**64 - 1])
shared = buttress.BloomFilter.open(sys.argv[2])
sys.stdout.write(bf.to_bytes().hex() + " " + str(sum(shared.contains_many(range(1000)))))
"""


def test_same_keys_give_the_same_bits_in_a_fresh_process(layout, tmp_path):
    path = tmp_path / "shared.bloom"
    shared = NATIVE.for_capacity(1000, layout=layout)
    shared.insert_many(range(1000))
    shared.save(path)
    out = subprocess.run([sys.executable, "-c", SUBPROCESS, layout, str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    bits_hex, found = out.split()
    here = TWIN.for_capacity(1000, layout=layout)
    here.insert_many(["alpha", b"beta", 7, -7, 2**64 - 1])
    assert bits_hex == here.to_bytes().hex()
    assert int(found) == 1000


# ---------------------------------------------------------------------- BloomGuard


@pytest.fixture
def store(tmp_path):
    db = sqlite3.connect(tmp_path / "store.db", check_same_thread=False)
    db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO kv VALUES (?, ?)", [(f"user:{i}", f"v{i}") for i in range(2000)])
    db.commit()
    yield db
    db.close()


def test_guard_skips_backend_for_absent_keys(store):
    calls = []

    def lookup(key):
        calls.append(key)
        row = store.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else row[0]

    guard = BloomGuard(lookup, NATIVE.for_capacity(2000, 0.01, layout="split_block"))
    guard.add_many([f"user:{i}" for i in range(2000)])
    assert guard.get("user:5") == "v5"
    absent = [f"ghost:{i}" for i in range(20_000)]
    assert all(guard.get(k, "none") == "none" for k in absent[:10_000])
    assert guard.get_many([*absent[10_000:], "user:7"])[-1] == "v7"
    stats = guard.stats()
    assert stats["lookups"] == 20_002
    assert stats["backend_calls"] == len(calls) == 2 + stats["false_positive_hits"]
    assert stats["backend_calls_avoided"] == 20_000 - stats["false_positive_hits"]
    # measured false positives within a generous band of the prediction (seeded keys)
    predicted = stats["predicted_false_positive_hits"]
    assert 0.5 * predicted <= stats["false_positive_hits"] <= 2 * predicted + 5
    guard.add("user:new")
    store.execute("INSERT INTO kv VALUES ('user:new', 'fresh')")
    assert guard.get("user:new") == "fresh"


def test_guard_custom_missing_sentinel_and_validation():
    missing = object()
    data = {"a": None}  # None is a real value here
    guard = BloomGuard(lambda k: data.get(k, missing), NATIVE(1024, 3), missing=missing)
    guard.add("a")
    assert guard.get("a", "dflt") is None
    with pytest.raises(TypeError, match="lookup"):
        BloomGuard("not callable", NATIVE(64, 1))
    with pytest.raises(TypeError, match="bloom"):
        BloomGuard(data.get, {"a"})


def test_twin_mirrors_native_signatures():
    import inspect

    for name in ("insert_many", "from_bitset", "open", "for_capacity", "__init__"):
        assert (inspect.signature(getattr(NATIVE, name))
                == inspect.signature(getattr(TWIN, name)))
    assert os.path.basename(buttress.bloom.__file__) == "bloom.py"
