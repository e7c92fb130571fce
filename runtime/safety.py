"""SafeSteer's run-time side: knobs (SafetyConfig), the graph feeds, and the candidate selection rule."""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import manifest as m
from .errors import ArtifactError, ConfigError


@dataclass(frozen=True)
class SafetyConfig:
    """SafeSteer knobs (docs/method.md). ``SafetyConfig.from_manifest`` fills the artifact's calibrated defaults.

    enabled=False, or alpha = beta = 0 with lookahead_steps = 0, gives exactly the undefended model.

    For the first ``lookahead_steps`` steps the gate is watched: when the row that produces a step's logits (the
    prompt's last row at step 0, then the last fed token's) scores >= tau, the step chooses among the top-``k``
    candidates plus the artifact's refusal openers, each extended by ``depth`` greedy tokens, by
    argmax(logprob - lam_eff * the branch's mean probe score) (see Generator._lookahead), where
    lam_eff = lam * (odds(gate score) / odds(tau)) ** gamma: the steering grows with the probe's evidence.

    The prompt gate: when the prompt's last row scores >= ``refuse_above`` (< 1), the reply opens with the
    artifact's refusal prefix (the model's own most common refusal opening, from calibration), fed token by token;
    decoding then goes on under the rules above. refuse_above = 1 never forces.
    """

    enabled: bool = True
    k: int = 8  # lookahead candidates (top-K of the next-token distribution)
    lam: float = 8.0  # once the gate fires: argmax(logprob - lam_eff * branch score), lam_eff = lam at the gate
    tau: float = 0.5  # probe score threshold, a probability in (0, 1)
    alpha: float = 0.0  # in-graph correction h += alpha * gate * r at the probe layer
    beta: float = 0.0  # in-graph MSAV h += beta * v at the MSAV layer (requests with an image)
    lookahead_steps: int = 16  # lookahead for the first T_look steps, then probe + correction only
    depth: int = 0  # greedy tokens each candidate is extended by before it is scored (0: the candidate alone)
    gamma: float = 0.0  # lam grows as (odds(gate score) / odds(tau)) ** gamma (0: a constant lam)
    refuse_above: float = 1.0  # prompt score at or above which the reply opens with the refusal prefix (1: never)

    def __post_init__(self):
        def real(name, lo=-math.inf, hi=math.inf, lo_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < lo or v > hi or (lo_open and v == lo):
                raise ConfigError(f"safety knob {name} must be a finite number in [{lo}, {hi}], got {v!r}")

        if not isinstance(self.enabled, bool):
            raise ConfigError(f"safety knob enabled must be True or False, got {self.enabled!r}")
        for name, lo, hi in (("k", 1, 256), ("lookahead_steps", 0, 1 << 20), ("depth", 0, 64)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"safety knob {name} must be an integer in [{lo}, {hi}], got {v!r}")
        real("lam", 0.0)
        real("gamma", 0.0, 8.0)
        real("tau", 0.0, 1.0, lo_open=True)
        if self.tau >= 1.0:
            raise ConfigError(f"safety knob tau must be < 1, got {self.tau!r}")
        real("alpha")
        real("beta")
        real("refuse_above", 0.0, 1.0, lo_open=True)

    @classmethod
    def from_manifest(cls, info: m.SafetyInfo, **overrides) -> "SafetyConfig":
        d = info.defaults
        base = cls(k=d.k, lam=d.lam, tau=d.tau, alpha=d.alpha, beta=d.beta, lookahead_steps=d.lookahead_steps,
                   depth=d.depth, gamma=d.gamma, refuse_above=d.refuse_above)
        try:
            return replace(base, **overrides)
        except TypeError as exc:
            raise ConfigError(f"unknown safety knob: {exc}") from None

    def forces(self, prompt_score: float) -> bool:
        """Whether the prompt gate opens the reply with the refusal prefix."""
        return self.refuse_above < 1.0 and prompt_score >= self.refuse_above

    @property
    def gate_logit(self) -> float:
        return math.log(self.tau / (1.0 - self.tau))


def sigmoid(x):
    """Probe score from harm_logit (float64, any shape)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def score(logit: float) -> float:
    """The probe score of one harm logit, in plain Python: a numpy call right after a graph call costs ~45 us (cold
    caches), which is per decoding step."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


def resolve(safety: Any, info: Optional[m.SafetyInfo]) -> Optional[SafetyConfig]:
    """"auto" -> the artifact's defaults if it was calibrated, else off; False/None -> off;
    True -> the artifact's defaults; a SafetyConfig as given."""
    if isinstance(safety, str) and safety == "auto":
        safety = info is not None
    if safety is None or safety is False:
        return None
    if safety is True:
        cfg = SafetyConfig.from_manifest(info) if info is not None else None
    elif isinstance(safety, SafetyConfig):
        cfg = safety
    else:
        raise ConfigError(f"safety must be 'auto', True, False or a SafetyConfig, got {safety!r}")
    if info is None:
        raise ConfigError(
            "this artifact was exported without SafeSteer calibration (--no-safety); re-export it without "
            "--no-safety to use safety=..."
        )
    return cfg if cfg.enabled else None


def load_vectors(root: Path, info: m.SafetyInfo, hidden: int) -> dict[str, np.ndarray]:
    try:
        data = np.load(m.inside(root, info.vectors_file), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive of named arrays")
        with data:
            vectors = {k: np.ascontiguousarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{info.vectors_file} could not be read ({exc}); re-export the artifact") from None
    need = [m.PROBE_WEIGHT, m.PROBE_BIAS, m.SAFETY_DIRECTION] + ([m.MSAV_VECTOR] if info.msav_layer is not None else [])
    for name in need:
        size = 1 if name == m.PROBE_BIAS else hidden
        if name not in vectors or vectors[name].shape != (size,):
            raise ArtifactError(f"{info.vectors_file} lacks a [{size}] array '{name}'; re-export the artifact")
    return vectors


def static_feeds(vectors: dict[str, np.ndarray], cfg: Optional[SafetyConfig]) -> dict[str, np.ndarray]:
    """Graph inputs that stay fixed for a request; alpha = beta = 0 when SafeSteer is off."""
    one = lambda x: np.array([x], np.float32)  # noqa: E731
    feeds = dict(vectors)
    feeds[m.STEER_ALPHA] = one(cfg.alpha if cfg else 0.0)
    feeds[m.GATE_LOGIT] = one(cfg.gate_logit if cfg else 0.0)
    feeds[m.MSAV_BETA] = one(cfg.beta if cfg else 0.0)
    if m.MSAV_VECTOR not in feeds:
        feeds[m.MSAV_VECTOR] = np.zeros_like(vectors[m.SAFETY_DIRECTION])
    return feeds


def steering_strength(cfg: SafetyConfig, gate_score: float) -> float:
    """lam_eff = lam * (odds(gate score) / odds(tau)) ** gamma: lam at the threshold, more the surer the probe is
    (the odds ratio is capped at 1e6 so a score that rounds to 1 stays finite)."""
    if cfg.gamma == 0.0:
        return cfg.lam
    s = min(max(gate_score, cfg.tau), 1.0 - 1e-12)
    ratio = min((s / (1.0 - s)) / (cfg.tau / (1.0 - cfg.tau)), 1e6)
    return cfg.lam * ratio ** cfg.gamma


def select(logprobs: np.ndarray, scores: np.ndarray, cfg: SafetyConfig, rng: Optional[np.random.Generator],
           temperature: float, gate_score: float) -> int:
    """Index of the chosen candidate once the gate fired (``gate_score``: the score that fired it):
    argmax(lp - lam_eff * s) (greedy), or with ``rng`` a sample from softmax((lp - lam_eff * s) / temperature) over
    the candidates; lam_eff from ``steering_strength``."""
    adjusted = logprobs.astype(np.float64) - steering_strength(cfg, gate_score) * scores.astype(np.float64)
    if rng is None:
        return int(np.argmax(adjusted))
    z = adjusted / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))
