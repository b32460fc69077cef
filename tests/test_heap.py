"""PriorityDeque, native and twin: order, handles, bad input, references and memory.

The oracle is a plain list sorted by the documented key; hypothesis drives the
native deque, the twin and the oracle through the same random lifecycles.
"""

from __future__ import annotations

import gc
import pickle
import random
import subprocess
import sys
import textwrap
import tracemalloc
import weakref
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from buttress._heap import PriorityDeque as NativeDeque
from buttress.reference.heap import PriorityDeque as TwinDeque

IMPLEMENTATIONS = [pytest.param(NativeDeque, id="native"), pytest.param(TwinDeque, id="twin")]


@pytest.fixture(params=IMPLEMENTATIONS)
def Deque(request):
    return request.param


def rank(entry):
    """The documented order: larger priority first, then older (smaller seq) first."""
    priority, seq, _ = entry
    return (-priority, seq)


# -- order -------------------------------------------------------------------

def test_pop_is_highest_priority_and_fifo_among_equals(Deque):
    d = Deque()
    for name, priority in [("a", 1), ("b", 5), ("c", 1), ("d", 5), ("e", 3)]:
        d.push(name, priority)
    assert [d.pop() for _ in range(5)] == ["b", "d", "e", "a", "c"]
    assert len(d) == 0 and not d


def test_pop_lowest_is_lowest_priority_and_newest_among_equals(Deque):
    d = Deque()
    for name, priority in [("a", 1), ("b", 5), ("c", 1), ("d", 5), ("e", 3)]:
        d.push(name, priority)
    assert [d.pop_lowest() for _ in range(5)] == ["c", "a", "e", "d", "b"]


def test_peek_leaves_items_in_place(Deque):
    d = Deque()
    d.push("low", -1.5)
    d.push("high", 2**53)
    d.push("mid", 0)
    assert (d.peek(), d.peek_lowest(), len(d)) == ("high", "low", 3)


def test_int_and_float_priorities_mix_and_equal_values_are_one_priority(Deque):
    d = Deque()
    d.push("int", 1)
    d.push("float", 1.0)
    d.push("between", 1.5)
    d.push("inf", float("inf"))
    d.push("-inf", float("-inf"))
    assert d.pop_many(10) == ["inf", "between", "int", "float", "-inf"]


def test_pop_many_and_items(Deque):
    d = Deque()
    for i in range(10):
        d.push(i, i % 3)
    assert sorted(d.items()) == sorted((float(i % 3), i) for i in range(10))
    assert d.pop_many(4) == [2, 5, 8, 1]
    assert d.pop_many(0) == []
    assert len(d) == 6
    with pytest.raises(ValueError, match="limit"):
        d.pop_many(-1)


def test_empty_deque_raises_index_error(Deque):
    d = Deque()
    for method in (d.pop, d.pop_lowest, d.peek, d.peek_lowest):
        with pytest.raises(IndexError, match="empty PriorityDeque"):
            method()


def test_large_random_run_matches_sorted_oracle(Deque):
    rng = random.Random(7)
    d, oracle, handles = Deque(), [], {}
    for seq in range(20_000):
        priority = rng.randint(-50, 50)
        handles[seq] = d.push(seq, priority)
        oracle.append((priority, seq, seq))
    for seq in rng.sample(range(20_000), 5_000):
        assert d.remove(handles[seq]) == seq
    oracle = sorted((e for e in oracle if d.holds(handles[e[1]])), key=rank)
    popped = []
    while d:
        popped.append(d.pop() if len(d) % 2 else d.pop_lowest())
    expected, front, back = [], 0, len(oracle) - 1
    for n in range(len(oracle), 0, -1):
        if n % 2:
            expected.append(oracle[front][2])
            front += 1
        else:
            expected.append(oracle[back][2])
            back -= 1
    assert popped == expected


# -- priorities ----------------------------------------------------------------

@pytest.mark.parametrize("priority", [2**53, -(2**53), 0, -7, 3.25, float("inf"), float("-inf"),
                                      np.int64(5), np.float32(0.5), np.uint8(3)])
def test_accepted_priorities(Deque, priority):
    d = Deque()
    d.push("x", priority)
    assert d.items() == [(float(priority), "x")]


@pytest.mark.parametrize(("priority", "error", "match"), [
    (float("nan"), ValueError, "NaN"),
    (np.float64("nan"), ValueError, "NaN"),
    (2**53 + 1, ValueError, r"outside \[-2\*\*53, 2\*\*53\]"),
    (-(2**53) - 1, ValueError, "outside"),
    (2**64, ValueError, "outside"),
    (10**30, ValueError, "outside"),
    ("1", TypeError, "int or a float, got str"),
    (None, TypeError, "got NoneType"),
    (True, TypeError, "got bool"),
    (1j, TypeError, "got complex"),
    (Fraction(10**400, 3), ValueError, "out of range"),  # float() overflows: still a ValueError
    (-Fraction(10**400, 3), ValueError, "out of range"),
])
def test_rejected_priorities(Deque, priority, error, match):
    d = Deque()
    with pytest.raises(error, match=match):
        d.push("x", priority)
    assert len(d) == 0
    with pytest.raises(error, match=match):
        Deque.priority_key(priority)


def test_ints_up_to_the_limit_keep_their_exact_order(Deque):
    # float(2**53) == float(2**53 + 1): beyond the limit ints would collide, so they
    # are refused; up to it, neighbours stay distinct and ordered.
    d = Deque()
    for priority in (2**53 - 1, 2**53, 2**53 - 2, -(2**53), -(2**53) + 1):
        d.push(priority, priority)
    assert d.pop_many(5) == [2**53, 2**53 - 1, 2**53 - 2, -(2**53) + 1, -(2**53)]


# -- handles -------------------------------------------------------------------

def test_remove_returns_the_item_and_keeps_the_order(Deque):
    d = Deque()
    handles = [d.push(i, i) for i in range(10)]
    assert d.remove(handles[9]) == 9
    assert d.remove(handles[0]) == 0
    assert d.remove(handles[5]) == 5
    assert d.pop_many(10) == [8, 7, 6, 4, 3, 2, 1]


def test_stale_handles_are_refused_never_crash(Deque):
    d = Deque()
    h = d.push("a", 1)
    assert d.holds(h)
    assert d.remove(h) == "a"
    assert not d.holds(h)
    with pytest.raises(ValueError, match="already popped, removed or cleared"):
        d.remove(h)
    popped = d.push("b", 1)
    assert d.pop() == "b"
    with pytest.raises(ValueError):
        d.remove(popped)
    cleared = [d.push(i, i) for i in range(100)]
    d.clear()
    assert len(d) == 0
    for handle in cleared:
        with pytest.raises(ValueError):
            d.remove(handle)
    reused = d.push("new", 1)  # reuses a slot a stale handle once named
    for handle in cleared:
        assert not d.holds(handle)
    assert d.remove(reused) == "new"


def test_a_handle_from_another_deque_is_refused(Deque):
    d1, d2 = Deque(), Deque()
    h = d1.push("x", 1)
    d2.push("y", 1)
    with pytest.raises(ValueError, match="another deque"):
        d2.remove(h)
    assert len(d2) == 1 and d1.holds(h)


def test_a_handle_outlives_its_deque(Deque):
    d = Deque()
    h = d.push("x", 1)
    del d
    gc.collect()
    repr(h)  # no crash; the handle keeps what it needs alive


def test_native_handles_cannot_be_pickled_or_forged():
    d = NativeDeque()
    h = d.push("x", 1)
    with pytest.raises(TypeError):
        pickle.dumps(h)
    assert d.remove(h) == "x"


def test_remove_rejects_non_handles(Deque):
    d = Deque()
    with pytest.raises(TypeError):
        d.remove(None)
    with pytest.raises(TypeError):
        d.remove(0)


# -- references and memory -----------------------------------------------------

def assert_no_memory_growth(cycle, *, rounds, limit):
    """Run ``cycle`` to warm up, then ``rounds`` more times: traced memory must stay flat."""
    cycle()
    gc.collect()
    tracemalloc.start()
    try:
        cycle()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(rounds):
            cycle()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < limit, f"grew by {after - before} bytes over {rounds} rounds"


class Item:
    pass


def test_refcounts_return_to_where_they_were(Deque):
    item = Item()
    base = sys.getrefcount(item)
    d = Deque()
    handles = [d.push(item, i % 7) for i in range(50)]
    assert sys.getrefcount(item) > base
    assert [d.remove(h) for h in handles[:10]] == [item] * 10
    d.pop()
    d.pop_lowest()
    d.pop_many(5)
    d.peek()
    d.items()
    d.clear()
    del handles
    gc.collect()
    assert sys.getrefcount(item) == base
    for i in range(30):
        d.push(item, i)
    del d
    gc.collect()
    assert sys.getrefcount(item) == base


def test_items_referencing_their_deque_are_collected(Deque):
    d = Deque()
    item = Item()
    item.deque = d  # a cycle through the deque
    d.push(item, 1)
    ref = weakref.ref(item)
    del d, item
    gc.collect()
    assert ref() is None


def test_a_finaliser_that_uses_the_deque_does_not_crash(Deque):
    d = Deque()
    pushed_back = []

    class Reentrant:
        def __del__(self):
            pushed_back.append(d.push("from __del__", 0))
            d.pop_lowest()

    for i in range(20):
        d.push(Reentrant(), i)
    d.pop()
    d.pop_lowest()
    d.clear()
    assert len(pushed_back) == 20 and len(d) == 0


# A finaliser of unrelated garbage may run at any Python allocation and call
# anything on the deque.  Native code must never hold pointers into its own
# arrays (or borrow items) across an allocation.  Each scenario runs in a
# subprocess, so a crash fails the test instead of killing pytest.
FINALISER_SCENARIO = """
import gc, sys
from buttress._heap import PriorityDeque as Native
from buttress.reference.heap import PriorityDeque as Twin
Deque = {"native": Native, "twin": Twin}[sys.argv[1]]

class Bomb:
    def __init__(self, action):
        self.action, self.cycle = action, self
    def __del__(self):
        self.action()

def arm(action, after):
    gc.collect()
    Bomb(action)              # a cycle: only the collector frees it ...
    gc.set_threshold(after)   # ... after this many more container allocations

def scenario(after):
{body}

for after in range(1, 60):    # one of these lands the finaliser mid-call
    scenario(after)
    gc.set_threshold(700)
print("ok")
"""

FINALISER_BODIES = {
    "items_while_cleared": """
d = Deque()
for i in range(300):
    d.push([i], i)            # items owned by the deque alone
arm(d.clear, after)
pairs = d.items()
assert all(type(item) is list and item[0] == key for key, item in pairs)
""",
    "push_that_grows_while_cleared": """
d = Deque()
for i in range(16):
    d.push([i], i)            # full: the next push grows the arrays
arm(d.clear, after)
d.push(["new"], 99)
gc.set_threshold(700)
assert ["new"] in d.pop_many(100) and len(d) == 0
for i in range(100):
    d.push([i], i)
assert d.pop_many(100) == [[i] for i in reversed(range(100))]
""",
    "clear_while_a_finaliser_pushes": """
d = Deque()
for i in range(100):
    d.push([i], i)
arm(lambda: d.push(["pushed"], 5), after)
d.clear()
gc.set_threshold(700)
assert d.pop_many(100) in ([], [["pushed"]])
d.push(["after"], 1)
assert d.pop() == ["after"]
""",
}


@pytest.mark.parametrize("scenario", sorted(FINALISER_BODIES))
def test_a_gc_finaliser_that_mutates_the_deque_mid_call_does_not_crash(Deque, scenario):
    which = "native" if Deque is NativeDeque else "twin"
    body = textwrap.indent(FINALISER_BODIES[scenario].strip("\n"), "    ")
    script = FINALISER_SCENARIO.replace("{body}", body)
    done = subprocess.run([sys.executable, "-c", script, which], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "ok"


def test_no_memory_growth_over_many_cycles(Deque):
    d = Deque()
    rng = random.Random(3)

    def cycle():
        handles = [d.push(object(), rng.randint(0, 100)) for _ in range(2_000)]
        for h in handles[::3]:
            d.remove(h)
        while len(d) > 10:
            d.pop()
            d.pop_lowest()
        while d:  # no clear(): entries taken at one end must not linger at the other
            d.pop()

    assert_no_memory_growth(cycle, rounds=20, limit=64_000)


def test_no_memory_growth_when_only_one_end_is_used(Deque):
    # The scheduler's pattern: push, then pop_many from the top, never pop_lowest.
    d = Deque()

    def cycle():
        for i in range(2_000):
            d.push(object(), i % 7)
        while d:
            d.pop_many(64)

    assert_no_memory_growth(cycle, rounds=20, limit=64_000)


# -- stateful: native, twin and a sorted oracle in lockstep ----------------------

priorities = st.one_of(st.integers(-3, 3), st.integers(-(2**53), 2**53),
                       st.sampled_from([0.5, -0.5, 1.0, float("inf"), float("-inf")]))


class DequeMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.native, self.twin = NativeDeque(), TwinDeque()
        self.oracle: list[tuple[float, int, int]] = []  # (priority, seq, item)
        self.seq = 0

    @rule(target=handles, priority=priorities)
    def push(self, priority):
        item = self.seq
        self.seq += 1
        pair = (self.native.push(item, priority), self.twin.push(item, priority))
        self.oracle.append((priority, item, item))
        return (pair, item)

    @rule()
    def pop(self):
        if not self.oracle:
            return
        best = min(self.oracle, key=rank)
        self.oracle.remove(best)
        assert self.native.pop() == self.twin.pop() == best[2]

    @rule()
    def pop_lowest(self):
        if not self.oracle:
            return
        worst = max(self.oracle, key=rank)
        self.oracle.remove(worst)
        assert self.native.pop_lowest() == self.twin.pop_lowest() == worst[2]

    @rule(limit=st.integers(0, 4))
    def pop_many(self, limit):
        expected = sorted(self.oracle, key=rank)[:limit]
        for entry in expected:
            self.oracle.remove(entry)
        assert self.native.pop_many(limit) == self.twin.pop_many(limit) == [e[2] for e in expected]

    @rule(entry=handles)
    def remove(self, entry):
        (native_handle, twin_handle), item = entry
        queued = any(e[2] == item for e in self.oracle)
        assert self.native.holds(native_handle) == self.twin.holds(twin_handle) == queued
        if queued:
            assert self.native.remove(native_handle) == self.twin.remove(twin_handle) == item
            self.oracle = [e for e in self.oracle if e[2] != item]
        else:
            with pytest.raises(ValueError):
                self.native.remove(native_handle)
            with pytest.raises(ValueError):
                self.twin.remove(twin_handle)

    @rule()
    def clear(self):
        self.native.clear()
        self.twin.clear()
        self.oracle.clear()

    @invariant()
    def ends_and_sizes_agree(self):
        assert len(self.native) == len(self.twin) == len(self.oracle)
        if self.oracle:
            ordered = sorted(self.oracle, key=rank)
            assert self.native.peek() == self.twin.peek() == ordered[0][2]
            assert self.native.peek_lowest() == self.twin.peek_lowest() == ordered[-1][2]


DequeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60)
TestDequeMachine = DequeMachine.TestCase


# -- the C kernels' portable fallbacks -----------------------------------------

KERNEL_CHECK = r"""
#include <stdio.h>
#include "heap_kernels.h"
int main(void) {
    unsigned long long x;
    int shift;
    for (x = 0; x < 100000; x++)
        printf("%d\n", buttress_heap_level(x));
    for (shift = 0; shift < 64; shift++) {
        x = 1ULL << shift;
        printf("%d %d %d\n", buttress_log2_floor(x), buttress_log2_floor(x | (x >> 1)),
               buttress_log2_floor(x + (x - 1)));
    }
    buttress_prefetch(&x);
    return 0;
}
"""


def test_heap_kernel_fallbacks_agree_with_the_compiler_builtins(tmp_path):
    """heap_kernels.h: the plain-C spellings give what the builtins give (and the truth)."""
    import os
    import shutil
    from pathlib import Path

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build buttress, and this test"
    header_dir = Path(__file__).resolve().parent.parent / "ext" / "buttress"
    source = tmp_path / "check.c"
    source.write_text(KERNEL_CHECK)
    outputs = []
    for flags in ([], ["-DBUTTRESS_PORTABLE_C"]):
        binary = tmp_path / f"check{len(outputs)}"
        subprocess.run([compiler, "-O2", "-std=c99", "-Wall", "-Werror", *flags,
                        f"-I{header_dir}", str(source), "-o", str(binary)], check=True)
        outputs.append(subprocess.run([str(binary)], capture_output=True, text=True,
                                      check=True).stdout)
    assert outputs[0] == outputs[1]
    lines = outputs[0].splitlines()
    assert [int(v) for v in lines[:100000]] == [(x + 1).bit_length() - 1 for x in range(100000)]
    assert lines[100000:] == [f"{s} {s} {s}" for s in range(64)]
