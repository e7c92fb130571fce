"""Probe statistics on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer_data.probe import auroc, fit_probe, logit, sigmoid, threshold_at_fpr


def brute_auroc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=80).astype(float)  # many ties
    labels = rng.integers(0, 2, size=80)
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0


@pytest.mark.parametrize("pca_k", [0, 4])
def test_folded_probe_separates_and_equals_pipeline(pca_k):
    rng = np.random.default_rng(1)
    n, d = 400, 16
    direction = rng.standard_normal(d)
    y = rng.integers(0, 2, size=n)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, size=d) + 50.0 + np.outer(y, direction) * 3.0
    probe = fit_probe(x, y, pca_k=pca_k)
    assert probe.weight.shape == (d,)
    assert auroc(probe.logits(x), y) > 0.9
    # the folded map is affine: logits of a mean = mean of logits
    assert probe.logits(x.mean(0, keepdims=True))[0] == pytest.approx(probe.logits(x).mean(), rel=1e-4, abs=1e-4)


def test_threshold_hits_target_false_positive_rate():
    rng = np.random.default_rng(2)
    harmless = rng.uniform(size=200)
    tau = threshold_at_fpr(harmless, 0.05)
    assert np.mean(harmless >= tau) <= 0.05
    assert np.mean(harmless >= np.nextafter(tau, -np.inf) - 1e-9) >= 0.05  # no slack: next lower value exceeds it
    assert sigmoid(logit(0.3)) == pytest.approx(0.3)
