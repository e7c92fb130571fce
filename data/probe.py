"""The Decoding-Probe's statistics: standardise -> PCA -> logistic regression (scikit-learn), folded into one
affine map; the graph then computes harm_logit = h . weight + bias. Also AUROC and the false-positive threshold.
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


def standardised_logistic(x: np.ndarray, y: np.ndarray, *, pca_k: int, l2: float) -> tuple[np.ndarray, float]:
    """scikit-learn's StandardScaler -> PCA(pca_k, exact SVD) -> L2 logistic regression (C = 1 / l2, intercept not
    penalised), folded into one affine map on the raw features: -> (weight [d], bias). ``pca_k`` 0 (or >= the
    rank): no PCA. Same optimum as the Newton solver this replaced (max logit difference 3e-8 of the logit range
    on calibration-shaped data, 3600 x 896)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = x.astype(np.float64)
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    proj = (PCA(pca_k, svd_solver="full").fit(z).components_.T if pca_k and pca_k < min(z.shape)
            else np.eye(z.shape[1]))
    lr = LogisticRegression(C=1.0 / l2, tol=1e-10, max_iter=10_000).fit(z @ proj, y.astype(int))
    weight = (proj @ lr.coef_[0]) / scaler.scale_
    return weight, float(lr.intercept_[0] - weight @ scaler.mean_)


def fit_probe(x: np.ndarray, y: np.ndarray, *, pca_k: int = 32, l2: float = 1.0) -> Probe:
    """x [n, hidden], y [n] (1 harmful) -> the folded affine probe."""
    weight, bias = standardised_logistic(x, y, pca_k=pca_k, l2=l2)
    return Probe(weight.astype(np.float32), bias)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's; ties count half); labels 1 = positive. NaN with one class only."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, np.float64)))


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
