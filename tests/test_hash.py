"""XXH64 and the key-encoding rule: native against xxhash, the known answers, and the twin."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from buttress import _hash
from buttress.reference import hashing as reference

IMPLEMENTATIONS = [pytest.param(_hash, id="native"), pytest.param(reference, id="reference")]

UINT64 = st.integers(min_value=0, max_value=2**64 - 1)


def sanity_buffer(length: int) -> bytes:
    """The xxHash sanity-check generator's buffer (PRIME32 multiplicative byte stream)."""
    prime32, prime64 = 2654435761, 11400714785074694797
    out = bytearray(length)
    byte_gen = prime32
    for i in range(length):
        out[i] = (byte_gen >> 56) & 0xFF
        byte_gen = (byte_gen * prime64) & 0xFFFFFFFFFFFFFFFF
    return bytes(out)


# (length of the sanity buffer, seed, XXH64) from xxHash's sanity-check vectors.
KNOWN_ANSWERS = [
    (0, 0, 0xEF46DB3751D8E999),
    (0, 2654435761, 0xAC75FDA2929B17EF),
    (1, 0, 0xE934A84ADB052768),
    (1, 2654435761, 0x5014607643A9B4C3),
    (4, 0, 0x9136A0DCA57457EE),
    (14, 0, 0x8282DCC4994E35C8),
    (14, 2654435761, 0xC3BD6BF63DEB6DF0),
    (222, 0, 0xB641AE8CB691C174),
    (222, 2654435761, 0x20CB8AB7AE10C14A),
]


@pytest.mark.parametrize(("length", "seed", "expected"), KNOWN_ANSWERS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_answer_vectors(impl, length, seed, expected):
    assert impl.xxh64(sanity_buffer(length), seed) == expected


def test_empty_input_matches_the_specification():
    assert _hash.xxh64(b"") == 0xEF46DB3751D8E999


def test_every_length_up_to_4096_matches_xxhash():
    rng = np.random.default_rng(0)
    data = rng.bytes(4096)
    for length in range(4097):
        chunk = data[:length]
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        assert _hash.xxh64(chunk, seed) == xxhash.xxh64_intdigest(chunk, seed), length


@given(data=st.binary(max_size=4096), seed=UINT64)
def test_bytes_match_xxhash(data, seed):
    assert _hash.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)


@given(text=st.text(max_size=300), seed=UINT64)
def test_str_hashes_its_utf8(text, seed):
    expected = xxhash.xxh64_intdigest(text.encode("utf-8"), seed)
    assert _hash.xxh64(text, seed) == expected
    assert reference.xxh64(text, seed) == expected


def test_bytes_like_inputs_hash_their_bytes():
    data = b"buttress"
    expected = xxhash.xxh64_intdigest(data)
    for form in (data, bytearray(data), memoryview(data), memoryview(b"xxbuttress")[2:]):
        assert _hash.xxh64(form) == expected
        assert _hash.hash_key(form) == expected
    assert _hash.xxh64(np.frombuffer(data, dtype=np.uint8).data) == expected


@given(key=st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_int_keys_follow_the_encoding_rule(key):
    encoded = (key % 2**64).to_bytes(8, "little")
    assert _hash.encode_key(key) == reference.encode_key(key) == encoded
    assert _hash.hash_key(key) == reference.hash_key(key) == xxhash.xxh64_intdigest(encoded)


def test_int64_and_uint64_encodings_agree_on_shared_bits():
    assert _hash.encode_key(-1) == b"\xff" * 8 == _hash.encode_key(2**64 - 1)
    assert _hash.hash_key(np.int64(-1)) == _hash.hash_key(-1)
    assert _hash.hash_key(np.uint64(7)) == _hash.hash_key(7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("key", [2**64, -(2**63) - 1, 10**30])
def test_out_of_range_int_raises_overflow(impl, key):
    with pytest.raises(OverflowError, match="int64 or uint64"):
        impl.hash_key(key)
    with pytest.raises(OverflowError):
        impl.encode_key(key)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("key", [1.5, None, object(), True, [1], ("a",)])
def test_unsupported_key_types_raise_type_error_naming_the_type(impl, key):
    with pytest.raises(TypeError, match=type(key).__name__):
        impl.hash_key(key)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_xxh64_rejects_int_and_bad_seeds(impl):
    with pytest.raises(TypeError, match="hash_key"):
        impl.xxh64(5)
    with pytest.raises(TypeError, match="seed"):
        impl.xxh64(b"x", seed="1")
    with pytest.raises(ValueError, match="seed"):
        impl.xxh64(b"x", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        impl.xxh64(b"x", seed=2**64)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(keys=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50),
       seed=UINT64)
def test_many_int64_matches_one_by_one(impl, keys, seed):
    array = np.array(keys, dtype=np.int64)
    expected = [xxhash.xxh64_intdigest(_hash.encode_key(k), seed) for k in keys]
    result = impl.xxh64_many(array, seed)
    assert result.dtype == np.uint64
    assert result.tolist() == expected
    assert impl.xxh64_many(array.view(np.uint64), seed).tolist() == expected
    assert impl.xxh64_many(keys, seed).tolist() == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.uint32, ">i8", ">u8"])
def test_other_integer_dtypes_hash_by_value(impl, dtype):
    values = np.array([0, 1, 2, 100], dtype=dtype)
    assert impl.xxh64_many(values).tolist() == [_hash.hash_key(int(v)) for v in values]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(keys=st.lists(st.binary(min_size=0, max_size=12), max_size=30))
def test_fixed_width_bytes_hash_like_tolist(impl, keys):
    array = np.array(keys, dtype="S12")
    expected = [xxhash.xxh64_intdigest(k) for k in array.tolist()]
    assert impl.xxh64_many(array).tolist() == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_many_accepts_lists_of_mixed_keys_and_iterables(impl):
    keys = ["a", b"b", 3, bytearray(b"d")]
    expected = [_hash.hash_key(k) for k in keys]
    assert impl.xxh64_many(keys).tolist() == expected
    assert impl.xxh64_many(iter(keys)).tolist() == expected
    assert impl.xxh64_many(tuple(keys), seed=9).tolist() == [_hash.hash_key(k, 9) for k in keys]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_many_rejects_float_object_bool_and_2d_arrays(impl):
    for bad in (np.zeros(3), np.array(["a"], dtype=object), np.array([True]),
                np.zeros((2, 2), dtype=np.int64)):
        with pytest.raises(TypeError):
            impl.xxh64_many(bad)
    with pytest.raises(TypeError, match="collection"):
        impl.xxh64_many(b"single key")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_many_of_empty_inputs(impl):
    assert impl.xxh64_many(np.array([], dtype=np.uint64)).shape == (0,)
    assert impl.xxh64_many(np.array([], dtype="S4")).shape == (0,)
    assert impl.xxh64_many([]).shape == (0,)


def test_non_contiguous_arrays_are_hashed_by_value():
    array = np.arange(20, dtype=np.int64)[::3]
    assert _hash.xxh64_many(array).tolist() == [_hash.hash_key(int(v)) for v in array]


def test_hashes_are_stable_across_processes():
    code = (
        "from buttress import _hash; import numpy as np;"
        "print(_hash.hash_key('stable'), _hash.xxh64_many(np.arange(3)).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split(maxsplit=1)
    assert int(out[0]) == _hash.hash_key("stable")
    assert out[1].strip() == str(_hash.xxh64_many(np.arange(3)).tolist())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_contiguous_memoryview_hashes_the_bytes_it_shows(impl):
    # Issue 13 defect 5: "bytes-like -> as is" means the bytes bytes(key) gives,
    # for a strided view too; the native module used to raise TypeError.
    data = bytes(range(40))
    strided = memoryview(data)[::3]
    assert not strided.c_contiguous
    expected = xxhash.xxh64_intdigest(bytes(strided))
    assert impl.hash_key(strided) == expected
    assert impl.xxh64(strided) == expected
    assert impl.encode_key(strided) == bytes(strided)
    assert impl.xxh64_many([strided, bytes(strided)]).tolist() == [expected, expected]
    grid = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for view in (memoryview(grid.T), memoryview(grid[:, 1:])):  # 2-D, not C-contiguous
        assert impl.hash_key(view) == xxhash.xxh64_intdigest(view.tobytes())


def test_a_key_list_mutated_while_it_is_hashed_does_not_crash():
    # A key's own Python code (here __int__ of an int subclass) empties the
    # list being hashed; the native loop must not read past the list's end.
    script = """
import buttress, buttress._hash as h
keys = []
class Sneaky(int):
    def __int__(self):
        keys.clear()
        return 7
bf = buttress.BloomFilter(1 << 16, 3)
for call in (h.xxh64_many, bf.insert_many, bf.contains_many):
    keys.extend([Sneaky(1)] + [str(i) for i in range(10_000)])
    try:
        call(keys)
    except RuntimeError as exc:
        assert "shrank" in str(exc), exc
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
