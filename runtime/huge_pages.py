"""Transparent huge pages for the weights onnxruntime keeps in memory (Linux 6.1+).

A decoding step on the CPU streams every weight once. On 4 KB pages that stream crosses a page boundary every 4 KB,
where the hardware prefetchers stop and the TLB misses; on 2 MB pages it does not. onnxruntime allocates its
(prepacked) weights with malloc, which gives huge pages only when the system's THP mode is "always" or the process
started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 — neither is the usual default ("madvise"). So the runtime notes
how much of each anonymous mapping of the process is resident before it opens the sessions, and afterwards asks the
kernel to rebuild what filled up meanwhile from huge pages (madvise MADV_HUGEPAGE + MADV_COLLAPSE): new mappings,
the new parts of grown ones, and mappings an earlier owner freed that the loading filled again. Memory that was
resident before is left alone. That copies the memory once, at load time; the contents do not change. Anywhere
this is unavailable (other systems, older kernels, THP off) it does nothing.
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


Ranges = dict  # [start, end) of a private anonymous read-write mapping -> its resident bytes


def resident() -> Ranges:
    """This process's private anonymous read-write mappings and how much of each is resident (one /proc/self/smaps
    pass)."""
    out, mapping = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line, as in /proc/self/maps
                mapping = _anonymous(line)
            elif head == "Rss:" and mapping is not None:
                out[mapping] = int(line.split()[1]) * 1024
    return out


def filled(before: Ranges, after: Ranges) -> list[tuple[int, int]]:
    """What of ``after`` to collapse: only its mappings that are at least _RESIDENT resident; of those, a mapping that
    was there before with the same bounds as a whole if it holds at least a huge page more than then (memory freed
    by an earlier owner and filled again), and any other one the parts that no mapping of ``before`` covered (new
    mappings, and what grew onto or merged with old ones; the old parts are left alone)."""
    out = []
    for (start, end), rss in after.items():
        if rss < _RESIDENT * (end - start):
            continue
        if (start, end) in before:
            if rss - before[start, end] >= HUGE:
                out.append((start, end))
            continue
        pieces = [(start, end)]
        for b0, b1 in before:
            pieces = [p for a0, a1 in pieces for p in ((a0, min(a1, b0)), (max(a0, b1), a1)) if p[0] < p[1]]
        out.extend(pieces)
    return out


def collapse_filled(before: Ranges) -> Collapsed:
    """Rebuild from huge pages the anonymous memory that filled up since ``before`` (resident())."""
    started = time.perf_counter()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, refused = 0, 0
    for start, end in filled(before, resident()):
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
