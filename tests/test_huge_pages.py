"""Weights onto transparent huge pages after loading (runtime/huge_pages.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from safesteer_runtime import huge_pages
from safesteer_rt import ConfigError, Generator

LLAMA = ("LlamaForCausalLM", "gqa")


def test_new_ranges_are_what_the_old_ones_do_not_cover():
    before = [(100, 200), (300, 400)]
    after = [(100, 250), (300, 400), (50, 120), (500, 600), (150, 180)]
    assert huge_pages.new_ranges(before, after) == [(200, 250), (50, 100), (500, 600)]


def _huge_bytes(start: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [start, end) (madvise splits a mapping where its advice changes)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < end and start < hi
            elif overlaps and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not huge_pages.available(), reason="needs Linux with transparent huge pages not switched off")
def test_memory_made_after_the_snapshot_moves_onto_huge_pages_unchanged():
    want = np.random.default_rng(0).bytes(64 << 20)
    before = huge_pages.anonymous_ranges()
    data = bytearray(want)  # plain malloc, as onnxruntime's (numpy asks for huge pages for its own large arrays)
    start = np.frombuffer(data, np.uint8).ctypes.data
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert _huge_bytes(start, start + len(data)) == 0  # 4 KB pages until asked
    done = huge_pages.collapse_new(before)
    assert done.bytes >= 32 << 20, "the kernel moved nothing (MADV_COLLAPSE needs Linux 6.1+)"
    assert _huge_bytes(start, start + len(data)) >= 32 << 20
    assert data == want


def test_generator_tokens_do_not_depend_on_huge_pages(tiny):
    art = tiny.artifact(*LLAMA)
    ids = [5, 17, 42, 9, 33]
    off = Generator(art, huge_pages=False)
    assert off.huge_pages.bytes == 0
    on = Generator(art)
    assert on.generate(prompt_ids=ids, max_new_tokens=12).token_ids == off.generate(prompt_ids=ids, max_new_tokens=12).token_ids
    with pytest.raises(ConfigError, match="huge_pages"):
        Generator(art, huge_pages="yes")
