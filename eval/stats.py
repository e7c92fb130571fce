"""The statistics every reported rate carries: a 95% Wilson interval, and for a defence against the undefended
model on the same cases an exact McNemar test over the discordant pairs."""

from __future__ import annotations

import math
from typing import Optional

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """95% Wilson score interval of k successes in n trials (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant pairs (one way and the other). Under the null
    each discordant pair goes either way with probability 1/2: p = 2 * P(Binomial(b + c, 1/2) <= min(b, c))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)
