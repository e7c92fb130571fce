"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be a non-negative integer or None, got {self.seed!r}")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, banned=(), best: Optional[int] = None) -> int:
        """``logits`` [vocab] -> token id, never one of ``banned`` (min_new_tokens holds end tokens off). ``best``: the
        graph's top-1 id for these logits (its TopK breaks ties towards the lower id, as argmax does), which spares
        greedy decoding a pass over the vocabulary."""
        if not self.cfg.do_sample:
            token = int(np.argmax(logits)) if best is None else int(best)
            return token if token not in banned else int(np.argmax(ban(logits, banned)))
        z = ban(logits, banned).astype(np.float64) / self.cfg.temperature
        if self.cfg.top_k and self.cfg.top_k < z.size:
            kth = np.partition(z, -self.cfg.top_k)[-self.cfg.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - np.max(z))
        probs /= probs.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < self.cfg.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def ban(logits: np.ndarray, banned) -> np.ndarray:
    """``logits`` with the ``banned`` ids made unchoosable (a copy; the input is left as it is)."""
    if not banned:
        return logits
    out = logits.copy()
    out[list(banned)] = -np.inf
    return out
