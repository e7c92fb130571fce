"""Transparent huge pages for the weights onnxruntime keeps in memory (Linux 6.1+).

A decoding step on the CPU streams every weight once. On 4 KB pages that stream crosses a page boundary every 4 KB,
where the hardware prefetchers stop and the TLB misses; on 2 MB pages it does not. onnxruntime allocates its
(prepacked) weights with malloc, which gives huge pages only when the system's THP mode is "always" or the process
started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 — neither is the usual default ("madvise"). So the runtime notes
the process's anonymous memory before it opens the sessions and afterwards asks the kernel to rebuild what appeared
meanwhile from huge pages (madvise MADV_HUGEPAGE + MADV_COLLAPSE). That copies the memory once, at load time; the
contents do not change. Anywhere this is unavailable (other systems, older kernels, THP off) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("safesteer.runtime")

HUGE = 2 << 20  # x86-64 / arm64 PMD size: the huge pages THP makes
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_RESIDENT = 0.9  # only mappings this full are collapsed (collapsing fills the holes of sparse ones)


@dataclass(frozen=True)
class Collapsed:
    bytes: int = 0
    seconds: float = 0.0


def available() -> bool:
    """Linux with THP not switched off."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _anonymous(header: str) -> Optional[tuple[int, int]]:
    """[start, end) if a /proc/self/maps (or smaps header) line is a private anonymous read-write mapping (what malloc
    hands out), else None."""
    fields = header.split()
    if (len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]")) and fields[1][:2] == "rw" \
            and fields[1][-1] == "p":
        start, end = (int(x, 16) for x in fields[0].split("-"))
        return start, end
    return None


def anonymous_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's private anonymous read-write mappings."""
    with open("/proc/self/maps") as f:
        return [r for r in map(_anonymous, f) if r is not None]


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``after`` that no range in ``before`` covers (mappings made, or grown, in between)."""
    out = []
    for start, end in after:
        pieces = [(start, end)]
        for b0, b1 in before:
            pieces = [p for a0, a1 in pieces for p in ((a0, min(a1, b0)), (max(a0, b1), a1)) if p[0] < p[1]]
        out.extend(pieces)
    return out


def _well_filled_anonymous_ranges() -> list[tuple[int, int]]:
    """anonymous_ranges() that are at least _RESIDENT resident (from /proc/self/smaps, one pass)."""
    out, mapping = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line, as in /proc/self/maps
                mapping = _anonymous(line)
            elif head == "Rss:" and mapping is not None:
                start, end = mapping
                if int(line.split()[1]) * 1024 >= _RESIDENT * (end - start):
                    out.append(mapping)
    return out


def collapse_new(before: list[tuple[int, int]]) -> Collapsed:
    """Rebuild the well-filled anonymous memory made since ``before`` (anonymous_ranges()) from huge pages."""
    started = time.perf_counter()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, refused = 0, 0
    for start, end in new_ranges(before, _well_filled_anonymous_ranges()):
        lo, hi = -(-start // HUGE) * HUGE, end // HUGE * HUGE  # whole huge pages inside the range
        if hi <= lo:
            continue
        libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)
        if libc.madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            done += hi - lo
        else:
            refused += 1
    if refused and not done:
        log.info("huge pages: the kernel refused MADV_COLLAPSE (it needs Linux 6.1+); the weights stay on 4 KB pages")
    return Collapsed(done, time.perf_counter() - started)
