"""Shared by the Bloom filter test files: the two implementations and the layouts.

Every Bloom test runs against the native filter and its pure-Python twin
(the ``impl`` fixture), which share one Python layer over different kernels.
"""

from __future__ import annotations

import pytest

import buttress
import buttress.reference

NATIVE = buttress.BloomFilter
TWIN = buttress.reference.BloomFilter
LAYOUTS = ["classic", "split_block"]


@pytest.fixture(params=[NATIVE, TWIN], ids=["native", "twin"])
def impl(request):
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param
