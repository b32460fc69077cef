"""Columnar keys (Arrow, the Arrow PyCapsule interface, numpy 'U' and StringDType),
threads=, and BloomFilter.from_parquet, for the native filter and its twin.

The rule under test: a column's keys give the same hashes and the same bits as
the same keys as a Python list (strings as ``str``, integers as ``int``), nulls
are skipped on insert and answer False, and the twin agrees bit for bit.
"""

from __future__ import annotations

import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloom_support import NATIVE, TWIN
from buttress import _bloom, _hash
from buttress.reference import hashing as reference_hashing

HASHERS = [pytest.param(_hash, id="native"), pytest.param(reference_hashing, id="reference")]

WORDS = [f"user:{i:08d}" for i in range(300)] + [
    "", "héllo", "日本語のキー", "emoji 🙂", "x" * 40, "trailing\x00nul", "a\x00"]
INTS = [-(2**63), -129, -1, 0, 1, 127, 255, 2**15, 2**31 - 1, 2**63 - 1]
STRING_TYPES = [pa.string(), pa.large_string(), pa.string_view()]
BINARY_TYPES = [pa.binary(), pa.large_binary(), pa.binary_view()]
INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(),
             pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]


def ints_for(arrow_type):
    info = np.iinfo(arrow_type.to_pandas_dtype())
    return [v for v in INTS if info.min <= v <= info.max] + [int(info.min), int(info.max)]


def filled(impl, layout, keys, **kwargs):
    bf = impl.for_capacity(2000, 0.01, layout=layout)
    bf.insert_many(keys, **kwargs)
    return bf


def column_cases():
    """(Arrow column, the same keys as a Python list) for every supported type."""
    for arrow_type in STRING_TYPES:
        yield pa.array(WORDS, type=arrow_type), WORDS
    for arrow_type in BINARY_TYPES:
        encoded = [w.encode() for w in WORDS]
        yield pa.array(encoded, type=arrow_type), encoded
    for arrow_type in INT_TYPES:
        values = ints_for(arrow_type)
        yield pa.array(values, type=arrow_type), values
    fixed = [b"abc\x00", b"\x00\x00\x00\x00", b"wxyz"]  # as is: no NUL stripping
    yield pa.array(fixed, type=pa.binary(4)), fixed


CASES = list(column_cases())
CASE_IDS = [str(column.type) for column, _ in CASES]


@pytest.mark.parametrize("hasher", HASHERS)
@pytest.mark.parametrize(("column", "keys"), CASES, ids=CASE_IDS)
def test_each_arrow_type_hashes_like_the_same_python_keys(hasher, column, keys):
    expected = _hash.xxh64_many(keys)
    assert hasher.xxh64_many(column).tolist() == expected.tolist()
    chunked = pa.chunked_array([column[:1], column[1:1], column[1:]], type=column.type)
    assert hasher.xxh64_many(chunked).tolist() == expected.tolist()
    assert hasher.xxh64_many(column.slice(3)).tolist() == expected[3:].tolist()  # offset
    assert hasher.xxh64_many(column.slice(2, 3)).tolist() == expected[2:5].tolist()


@pytest.mark.parametrize(("column", "keys"), CASES, ids=CASE_IDS)
def test_each_arrow_type_sets_the_bits_of_the_python_keys(impl, layout, column, keys):
    expected = filled(NATIVE, layout, keys)
    assert filled(impl, layout, column) == expected
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)], type=column.type)
    assert filled(impl, layout, chunked) == expected
    assert impl.from_bytes(expected.to_bytes()).contains_many(column).all()
    assert all(key in expected for key in keys)  # a column-built filter answers str/int


def test_nulls_are_skipped_on_insert_and_answer_false(impl, layout):
    with_nulls = [None, "a", None, "héllo", "b", None]
    present = [k for k in with_nulls if k is not None]
    for arrow_type in STRING_TYPES:
        column = pa.array(with_nulls, type=arrow_type)
        bf = filled(impl, layout, column)
        assert bf == filled(NATIVE, layout, present)
        assert bf.stats()["keys_inserted"] == len(present)
        assert bf.contains_many(column).tolist() == [k is not None for k in with_nulls]
        sliced = column.slice(1, 4)  # offset into the validity bitmap
        assert bf.contains_many(sliced).tolist() == [True, False, True, True]
    ints = pa.array([None, 5, None, -7], type=pa.int32())
    assert filled(impl, layout, ints) == filled(NATIVE, layout, [5, -7])
    assert filled(impl, layout, ints).contains_many(ints).tolist() == [False, True, False, True]
    nulls = pa.nulls(5)
    assert filled(impl, layout, nulls) == impl.for_capacity(2000, 0.01, layout=layout)
    assert not filled(impl, layout, ["x"]).contains_many(nulls).any()


INDEX_TYPES = [pa.int8(), pa.uint8(), pa.int16(), pa.uint16(), pa.int32(), pa.uint32(),
               pa.int64(), pa.uint64()]


def dictionary_column(keys, index_type, arrow_type=None):
    """``keys`` dictionary-encoded with ``index_type`` indices (entries in reverse order)."""
    entries = list(dict.fromkeys(k for k in keys if k is not None))[::-1]
    position = {k: i for i, k in enumerate(entries)}
    indices = pa.array([None if k is None else position[k] for k in keys], type=index_type)
    return pa.DictionaryArray.from_arrays(indices, pa.array(entries, type=arrow_type))


@pytest.mark.parametrize("hasher", HASHERS)
@pytest.mark.parametrize(("column", "keys"), CASES, ids=CASE_IDS)
def test_dictionary_columns_hash_like_their_values(hasher, column, keys):
    encoded = column.dictionary_encode()
    assert pa.types.is_dictionary(encoded.type)
    expected = _hash.xxh64_many(keys).tolist()
    assert hasher.xxh64_many(encoded).tolist() == expected
    assert hasher.xxh64_many(encoded.slice(2, 5)).tolist() == expected[2:7]  # offset
    # chunks with different dictionaries
    chunked = pa.chunked_array([column.slice(0, 3).dictionary_encode(),
                                column.slice(3).dictionary_encode()])
    assert hasher.xxh64_many(chunked).tolist() == expected


@pytest.mark.parametrize("index_type", INDEX_TYPES, ids=str)
def test_dictionary_columns_set_the_bits_of_their_values(impl, layout, index_type):
    words = WORDS[:100] + WORDS[-7:] + WORDS[:50]  # repeats share an entry
    expected = filled(NATIVE, layout, words)
    column = dictionary_column(words, index_type)
    assert filled(impl, layout, column) == expected
    assert filled(impl, layout, column, threads=2) == expected
    assert expected.contains_many(column).all()
    assert filled(impl, layout, column.slice(100)) == filled(NATIVE, layout, words[100:])
    large = dictionary_column(words, index_type, pa.large_string())
    assert filled(impl, layout, large) == expected


def test_dictionary_nulls_follow_the_null_rule(impl, layout):
    # a null index and an index to a null entry are both nulls
    indices = pa.array([0, None, 1, 2, 1, None, 0], type=pa.int16())
    column = pa.DictionaryArray.from_arrays(indices, pa.array(["a", None, "héllo"]))
    bf = filled(impl, layout, column)
    assert bf == filled(NATIVE, layout, ["a", "héllo", "a"])
    assert bf.stats()["keys_inserted"] == 3
    answers = [True, False, False, True, False, False, True]
    assert bf.contains_many(column).tolist() == answers
    assert bf.contains_many(column.slice(2, 3)).tolist() == answers[2:5]
    assert bf.contains_many(pa.chunked_array([column, column])).tolist() == answers * 2
    only_nulls = pa.DictionaryArray.from_arrays(pa.array([None, None], pa.int32()),
                                                pa.array([], pa.string()))
    assert filled(impl, layout, only_nulls) == impl.for_capacity(2000, 0.01, layout=layout)
    assert bf.contains_many(only_nulls).tolist() == [False, False]


@pytest.mark.parametrize("hasher", HASHERS)
def test_xxh64_many_refuses_dictionary_nulls(hasher):
    column = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int8()), pa.array(["a", None]))
    with pytest.raises(ValueError, match="null"):
        hasher.xxh64_many(column)


def test_dictionary_columns_from_producers_and_parquet(impl, layout, tmp_path):
    expected = filled(NATIVE, layout, WORDS)
    categorical = pl.Series("id", WORDS).cast(pl.Categorical)
    assert filled(impl, layout, categorical) == expected
    assert filled(impl, layout, pd.Series(WORDS, dtype="category")) == expected
    path = tmp_path / "categories.parquet"
    pq.write_table(pa.table({"id": WORDS * 3}), path, row_group_size=250)  # dictionary pages
    read = pq.read_table(path, read_dictionary=["id"]).column("id")
    assert pa.types.is_dictionary(read.type)
    assert filled(impl, layout, read) == expected
    assert impl.from_parquet(path, "id", fp_rate=0.01, layout=layout) == \
        NATIVE.from_parquet(path, "id", fp_rate=0.01, layout=layout)
    assert all(word in impl.from_parquet(path, "id", fp_rate=0.01, layout=layout)
               for word in WORDS)
    stored = tmp_path / "stored_dictionary.parquet"  # read back as a dictionary column
    pq.write_table(pa.table({"id": pa.array(WORDS * 2).dictionary_encode()}), stored)
    assert pa.types.is_dictionary(pq.read_schema(stored).field("id").type)
    built = impl.from_parquet(stored, "id", fp_rate=0.01, layout=layout)
    same = NATIVE.for_capacity(len(WORDS) * 2, 0.01, layout=layout)
    same.insert_many(WORDS)
    assert built == same


@pytest.mark.parametrize("hasher", HASHERS)
def test_xxh64_many_refuses_nulls(hasher):
    with pytest.raises(ValueError, match="null"):
        hasher.xxh64_many(pa.array(["a", None]))
    assert hasher.xxh64_many(pa.array(["a", None]).drop_null()).tolist() == [
        _hash.hash_key("a")]


def test_empty_columns(impl, layout):
    empty_filter = impl.for_capacity(2000, 0.01, layout=layout)
    for column in (pa.array([], type=pa.string()), pa.chunked_array([], type=pa.int64()),
                   pa.array([], type=pa.string_view()), pl.Series([], dtype=pl.String)):
        bf = filled(impl, layout, column)
        assert bf == empty_filter
        assert bf.contains_many(column).shape == (0,)
        assert impl is TWIN or _hash.xxh64_many(column).shape == (0,)


def test_polars_pandas_and_duckdb_through_the_capsule_interface(impl, layout):
    expected = filled(NATIVE, layout, WORDS)
    series = pl.Series("id", WORDS)  # exports string_view
    assert filled(impl, layout, series) == expected
    assert filled(impl, layout, pl.Series(WORDS).cast(pl.Categorical).cast(pl.String)) == expected
    assert filled(impl, layout, pd.Series(WORDS, dtype="string[pyarrow]")) == expected
    assert filled(impl, layout, pd.Series(WORDS, dtype=pd.ArrowDtype(pa.large_string()))) \
        == expected
    relation = duckdb.sql("SELECT 'user:' || lpad(i::VARCHAR, 8, '0') AS id "
                          "FROM range(300) t(i) ORDER BY i")
    assert filled(impl, layout, relation) == filled(NATIVE, layout, WORDS[:300])
    assert filled(impl, layout, pl.Series([1, None, -3])) == filled(NATIVE, layout, [1, -3])
    assert expected.contains_many(series).all()


def test_numpy_unicode_and_string_dtype_arrays(impl, layout):
    expected = filled(NATIVE, layout, WORDS)
    unicode = np.array(WORDS)  # 'U': numpy drops trailing NULs, as tolist() does
    assert unicode.dtype.kind == "U"
    assert filled(impl, layout, unicode) == filled(NATIVE, layout, unicode.tolist())
    assert filled(impl, layout, unicode[::2]) == filled(NATIVE, layout, unicode[::2].tolist())
    assert _hash.xxh64_many(unicode).tolist() == reference_hashing.xxh64_many(unicode).tolist()
    strings = np.array(WORDS, dtype=np.dtypes.StringDType())
    assert filled(impl, layout, strings) == expected  # StringDType keeps every character
    with_na = np.array(["a", None, "b"], dtype=np.dtypes.StringDType(na_object=None))
    bf = filled(impl, layout, with_na)
    assert bf == filled(NATIVE, layout, ["a", "b"])
    assert bf.contains_many(with_na).tolist() == [True, False, True]


@pytest.mark.parametrize("hasher", HASHERS)
def test_unicode_arrays_refuse_what_utf8_cannot_encode(hasher):
    with pytest.raises(UnicodeEncodeError):
        hasher.xxh64_many(np.array(["ok", "bad \ud800"]))


@pytest.mark.parametrize("hasher", HASHERS)
def test_unsupported_arrow_types_raise_type_error_naming_the_type(hasher):
    cases = [(pa.array([1.5]), "double"), (pa.array([[1, 2]]), "list"),
             (pa.array([{"a": 1, "b": "x"}]), "struct"), (pa.array([True]), "bool"),
             (pa.array([1.5, 1.5]).dictionary_encode(), r"dictionary<values=.*double"),
             (pa.chunked_array([[1.5]]), "double"), (pl.Series([1.5]), "double")]
    for column, name in cases:
        with pytest.raises(TypeError, match=name):
            hasher.xxh64_many(column)
    with pytest.raises(TypeError, match="float"):
        NATIVE.for_capacity(100).insert_many(pa.array([1.5], type=pa.float32()))


def test_threads_argument_is_validated(impl):
    bf = impl.for_capacity(100)
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="threads"):
            bf.insert_many([1], threads=bad)
        with pytest.raises(error, match="threads"):
            bf.contains_many([1], threads=bad)


@pytest.mark.parametrize("threads", [0, 2, 3, 16])
def test_threads_give_the_single_thread_bits(layout, threads, monkeypatch):
    monkeypatch.setattr(_bloom, "PARALLEL_MIN_KEYS", 1000)  # drive the threads on small data
    monkeypatch.setattr(_bloom, "PARALLEL_INSERT_CHUNK", 7_000)  # and several rounds
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 2**63, size=40_000, dtype=np.int64)
    words = pa.array([f"k{i}" if i % 13 else None for i in range(30_000)])
    for batch in (keys, words, words.dictionary_encode(), [f"w{i}" for i in range(20_000)]):
        one = NATIVE.for_capacity(60_000, 0.01, layout=layout)
        one.insert_many(batch)
        many = NATIVE.for_capacity(60_000, 0.01, layout=layout)
        many.insert_many(batch, threads=threads)
        assert many == one
        assert many.stats()["keys_inserted"] == one.stats()["keys_inserted"]
        assert one.contains_many(batch, threads=threads).tolist() == \
            one.contains_many(batch).tolist()
    tiny = ["a", "b", "c"]  # many threads on a tiny batch
    bf = NATIVE.for_capacity(100, layout=layout)
    bf.insert_many(tiny, threads=threads)
    assert bf == filled_small(layout, tiny)
    assert bf.contains_many([*tiny, "zzz"], threads=threads).tolist()[:3] == [True] * 3


def filled_small(layout, keys):
    bf = NATIVE.for_capacity(100, layout=layout)
    bf.insert_many(keys)
    return bf


def test_from_parquet_builds_row_group_by_row_group(impl, layout, tmp_path):
    path = tmp_path / "users.parquet"
    ids = [f"user:{i:08d}" if i % 17 else None for i in range(5000)]
    table = pa.table({"id": ids, "n": list(range(5000))})
    pq.write_table(table, path, row_group_size=1000)
    bf = impl.from_parquet(path, "id", fp_rate=0.01, layout=layout)
    expected = NATIVE.for_capacity(5000, 0.01, layout=layout)
    expected.insert_many([k for k in ids if k is not None])
    assert bf == expected
    assert "user:00000001" in bf
    by_ints = impl.from_parquet(str(path), "n", fp_rate=0.01, layout=layout, threads=2)
    assert all(i in by_ints for i in range(0, 5000, 97))
    with pytest.raises(ValueError, match=r"no column 'user'.*'id', 'n'"):
        impl.from_parquet(path, "user", fp_rate=0.01)
    with pytest.raises(ValueError, match="fp_rate"):
        impl.from_parquet(path, "id", fp_rate=1.5)


def test_from_parquet_rejects_unsupported_column_types(tmp_path):
    path = tmp_path / "prices.parquet"
    pq.write_table(pa.table({"price": [1.5, 2.5]}), path)
    with pytest.raises(TypeError, match="double"):
        NATIVE.from_parquet(path, "price", fp_rate=0.01)


def test_without_pyarrow_lists_numpy_and_capsule_producers_still_work():
    # pyarrow is optional: the native path reads the Arrow C interface itself.
    script = """
import sys
sys.modules["pyarrow"] = None  # import pyarrow now fails
import numpy as np, polars as pl
from buttress import BloomFilter, hash_key, xxh64_many
bf = BloomFilter.for_capacity(1000, layout="split_block")
bf.insert_many(["a", "b"])
bf.insert_many(np.array(["c"]))
bf.insert_many(pl.Series(["d", None]))
assert all(k in bf for k in "abcd")
assert xxh64_many(pl.Series(["é"])).tolist() == [hash_key("é")]
try:
    BloomFilter.from_parquet("x.parquet", "id", fp_rate=0.01)
except ImportError as exc:
    assert "buttress[arrow]" in str(exc)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("hasher", HASHERS)
def test_runs_of_one_length_hash_like_mixed_lengths(hasher):
    # one length everywhere (the fixed-width fast path), empty keys, and a
    # single odd length late in a run
    for keys in (["abc"] * 70, [""] * 40, ["abc"] * 69 + ["abcd"], [b"xy"] * 33 + [b"x"]):
        for arrow_type in (pa.large_binary(), pa.binary()) if isinstance(keys[0], bytes) \
                else (pa.string(), pa.large_string()):
            column = pa.array(keys, type=arrow_type)
            assert hasher.xxh64_many(column).tolist() == _hash.xxh64_many(keys).tolist()
            assert hasher.xxh64_many(column.slice(1)).tolist() == \
                _hash.xxh64_many(keys[1:]).tolist()
            assert filled(NATIVE, "split_block", column) == filled(NATIVE, "split_block", keys)
