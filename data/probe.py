"""The Decoding-Probe's statistics: standardise -> PCA -> logistic regression, folded into one affine map.

Everything here is numpy on feature matrices; the graph then computes harm_logit = h . weight + bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safesteer_runtime.safety import sigmoid  # noqa: F401  (one definition; calibration imports it from here)


@dataclass(frozen=True)
class Probe:
    weight: np.ndarray  # [hidden] float32
    bias: float

    def logits(self, h: np.ndarray) -> np.ndarray:
        return h.astype(np.float64) @ self.weight.astype(np.float64) + self.bias


def _logistic_newton(f: np.ndarray, y: np.ndarray, l2: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (bias unpenalised) by Newton's method; f [n, d], y in {0, 1}."""
    n, d = f.shape
    x = np.hstack([f, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


def fit_probe(x: np.ndarray, y: np.ndarray, *, pca_k: int = 32, l2: float = 1.0) -> Probe:
    """x [n, hidden], y [n] (1 harmful) -> the folded affine probe."""
    x = x.astype(np.float64)
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    z = (x - mu) / sd
    if pca_k and pca_k < min(z.shape):
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        proj = vt[:pca_k].T  # [hidden, k]
    else:
        proj = np.eye(z.shape[1])
    w_f, b = _logistic_newton(z @ proj, y.astype(np.float64), l2)
    weight = (proj @ w_f) / sd
    return Probe(weight.astype(np.float32), float(b - weight @ mu))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); labels 1 = positive."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def threshold_at_fpr(harmless_scores: np.ndarray, fpr: float) -> float:
    """The smallest tau with at most ``fpr`` of these harmless scores >= tau."""
    s = np.sort(np.asarray(harmless_scores, np.float64))[::-1]
    allowed = int(np.floor(fpr * len(s)))
    if allowed >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[allowed], np.inf))


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return float(np.log(p / (1 - p)))
