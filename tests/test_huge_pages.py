"""Weights onto transparent huge pages after loading (runtime/huge_pages.py)."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from safesteer_runtime import huge_pages
from safesteer_rt import ConfigError, Generator

LLAMA = ("LlamaForCausalLM", "gqa")


def test_filled_memory_is_new_mappings_new_parts_and_refilled_mappings():
    huge = huge_pages.HUGE
    before = {(0, 4 * huge): 4 * huge, (10 * huge, 20 * huge): huge, (30 * huge, 31 * huge): huge,
              (80 * huge, 90 * huge): 10 * huge}
    after = {(0, 4 * huge): 4 * huge,  # full, but it was before
             (10 * huge, 20 * huge): 10 * huge,  # the same mapping, filled up since (memory reused): all of it
             (30 * huge, 32 * huge): 2 * huge,  # grown: the new part
             (40 * huge, 50 * huge): 5 * huge,  # new but half empty: collapsing would fill it
             (60 * huge, 70 * huge): 10 * huge - 4096,  # new, full but for a page
             (80 * huge, 100 * huge): 20 * huge}  # a new mapping merged onto an old one: the new part
    assert huge_pages.filled(before, after) == [(10 * huge, 20 * huge), (31 * huge, 32 * huge),
                                                (60 * huge, 70 * huge), (90 * huge, 100 * huge)]


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


needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="needs Linux with transparent huge pages not switched off")


def _on_small_pages(start: int, size: int) -> None:
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert _huge_bytes(start, start + size) == 0  # 4 KB pages until asked


@needs_thp
def test_memory_made_after_the_snapshot_moves_onto_huge_pages_unchanged():
    want = np.random.default_rng(0).bytes(64 << 20)
    before = huge_pages.resident()
    data = bytearray(want)  # plain malloc, as onnxruntime's (numpy asks for huge pages for its own large arrays)
    start = np.frombuffer(data, np.uint8).ctypes.data
    _on_small_pages(start, len(data))
    done = huge_pages.collapse_filled(before)
    assert done.bytes >= 32 << 20, "the kernel moved nothing (MADV_COLLAPSE needs Linux 6.1+)"
    assert _huge_bytes(start, start + len(data)) >= 32 << 20
    assert data == want


@needs_thp
def test_a_mapping_that_existed_empty_and_filled_up_moves_too():
    """What a Generator opened after another was closed meets: memory the process already had mapped (freed by
    its earlier owner) that the loading fills again."""
    size, want = 64 << 20, np.random.default_rng(1).bytes(64 << 20)
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(area, np.uint8).ctypes.data
    before = huge_pages.resident()
    area[:] = want
    _on_small_pages(start, size)
    done = huge_pages.collapse_filled(before)
    assert done.bytes >= 32 << 20 and _huge_bytes(start, start + size) >= 32 << 20
    assert area[:] == want


def test_generator_tokens_do_not_depend_on_huge_pages(tiny):
    art = tiny.artifact(*LLAMA)
    ids = [5, 17, 42, 9, 33]
    off = Generator(art, huge_pages=False)
    assert off.huge_pages.bytes == 0
    on = Generator(art)
    assert on.generate(prompt_ids=ids, max_new_tokens=12).token_ids == off.generate(prompt_ids=ids, max_new_tokens=12).token_ids
    with pytest.raises(ConfigError, match="huge_pages"):
        Generator(art, huge_pages="yes")
