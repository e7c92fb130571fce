"""Run every (suite, case, mode) that the store does not hold yet, judge it, append it."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from safesteer_data.typography import render_request
from safesteer_rt import Generator
from safesteer_runtime import manifest as m
from safesteer_runtime.errors import InputError
from safesteer_runtime.safety import SafetyConfig

from . import modes as md
from .store import Store
from .suites import Case

log = logging.getLogger("safesteer.eval")


@dataclass(frozen=True)
class Preset:
    n: int  # cases per suite
    new_tokens: int


PRESETS = {"quick": Preset(n=6, new_tokens=24), "full": Preset(n=100, new_tokens=32)}


def artifact_hash(root: Path) -> str:
    """sha256 of manifest.json, which itself records the sha256 of every artifact file."""
    return hashlib.sha256((Path(root) / m.MANIFEST_NAME).read_bytes()).hexdigest()


def _number(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


RESULT_FIELDS = ("text", "finish_reason", "new_tokens", "prompt_tokens", "ms_per_token", "time_to_first_token_s",
                 "prompt_score", "safety_trace", "filtered", "error", "derived")


def generate(gen: Generator, case: Case, mode: str, new_tokens: int, steer: Any = True) -> dict:
    """One generation; ``steer`` is the ``safety=`` of a safesteer mode (True: the artifact's defaults)."""
    image = render_request(case.image_text) if case.image_text is not None else None
    try:
        out = gen.generate(md.messages(mode, case.prompt, image), max_new_tokens=new_tokens,
                           safety=steer if md.parse(mode)[0] == "safesteer" else False)
    except InputError as exc:  # e.g. a jailbreak prompt longer than a small model's context: skipped, said why
        log.warning("%s/%s/%s skipped: %s", case.suite, mode, case.id, exc)
        return {"text": "", "error": str(exc), "finish_reason": "error", "new_tokens": 0, "prompt_tokens": None,
                "ms_per_token": None, "time_to_first_token_s": None, "prompt_score": None, "safety_trace": []}
    t = out.timings
    return {"text": out.text, "finish_reason": out.finish_reason, "new_tokens": t.new_tokens,
            "prompt_tokens": t.prompt_tokens, "ms_per_token": _number(t.ms_per_token),
            "time_to_first_token_s": t.prefill_s, "prompt_score": out.prompt_score, "safety_trace": out.safety_trace}


def filtered(undefended: dict, tau: float) -> dict:
    """The input-filter's outcome, from the undefended generation of the same case."""
    score = undefended["prompt_score"]
    if score is None or score < tau or undefended.get("error"):
        return {**undefended, "filtered": False}
    return {**undefended, "text": md.FILTER_REPLY, "finish_reason": "filtered", "new_tokens": 0,
            "ms_per_token": None, "safety_trace": [], "filtered": True}


def gate_fires(undefended: dict, cfg) -> bool:
    """Whether SafeSteer with ``cfg`` would act on this case, read off the undefended generation's probe trace.

    The gate fires at step t when the row that produced step t's logits scores >= tau: the prompt's last row for
    t = 0, else the token fed at step t - 1. The undefended run feeds the same tokens up to the first firing and
    records each fed token's score, and with alpha = 0 and no image the graphs compute exactly what they compute
    undefended. So where this is False, SafeSteer's reply IS the undefended reply (tested against real runs)."""
    if undefended.get("error") or undefended.get("prompt_score") is None or undefended.get("image_text"):
        return True
    if cfg.alpha != 0 or cfg.forces(undefended["prompt_score"]):  # the correction may act at any row; the prompt gate
        return True
    if cfg.lookahead_steps <= 0:
        return False
    if undefended["prompt_score"] >= cfg.tau:
        return True
    return any(t["score_chosen"] >= cfg.tau for t in undefended["safety_trace"] if t["step"] <= cfg.lookahead_steps - 2)


def sibling(store: Store, case: Case, mode: str, cfg, configs: dict, undefended: Optional[dict]) -> Optional[dict]:
    """Another safesteer mode's record of this case whose reply is provably this mode's: the same knobs but for
    refuse_above, and the prompt gate forces both or neither (under the gate its threshold plays no part, and a
    forced reply does not depend on the threshold that forced it). Tested against real runs."""
    score = (undefended or {}).get("prompt_score")
    if score is None:
        return None
    for other, known in configs.items():
        if other != mode and replace(known, refuse_above=cfg.refuse_above) == cfg \
                and known.forces(score) == cfg.forces(score):
            rec = store.get((case.suite, other, case.id))
            if rec is not None and not rec.get("error"):
                return {**rec, "derived": other}
    return None


def make_record(case: Case, mode: str, result: dict, judges: Sequence) -> dict:
    record = {**{k: v for k, v in result.items() if k in RESULT_FIELDS},
              "suite": case.suite, "mode": mode, "id": case.id, "request": case.request,
              "prompt": md.messages(mode, case.prompt), "template": case.template, "kind": case.kind,
              "image_text": case.image_text}
    record["verdicts"] = {j.name: bool(j.is_refusal(record["text"], case.request)) for j in judges}
    return record


def run(gen: Generator, cases: Sequence[Case], modes: Sequence[str], store: Store, judges: Sequence,
        new_tokens: int, progress: Optional[Callable[[int, str], None]] = None,
        steer: Optional[dict[str, Any]] = None) -> int:
    """Generate what is missing; returns how many records were added. ``steer``: each safesteer mode's ``safety=``
    (absent: the artifact's defaults). Swept ``safesteer@...`` modes copy the undefended reply where the gate
    provably does not fire (``gate_fires``) and skip image cases; a safesteer mode that differs from another only in
    refuse_above copies that one's reply where they provably agree (``sibling``). Copied records say ``derived``
    (from which mode) and are left out of the cost medians."""
    steer = steer or {}
    defaults = steer.get("safesteer", True)
    tau = getattr(defaults, "tau", None) or (gen.manifest.safety.defaults.tau if gen.manifest.safety else None)
    configs = {} if gen.manifest.safety is None else {  # every safesteer mode's knobs, the default's resolved
        mode: SafetyConfig.from_manifest(gen.manifest.safety) if cfg is True else cfg
        for mode, cfg in {"safesteer": defaults, **steer}.items() if mode in modes}
    added = 0
    for case in cases:
        spare: dict[str, dict] = {}  # an undefended generation made only for the input filter
        for mode in modes:
            k = (case.suite, mode, case.id)
            if k in store or (case.image_text is not None and mode not in md.MODES):
                continue  # swept modes trace the text trade-off curve: they skip the image suite
            undefended = store.get((case.suite, "undefended", case.id)) or spare.get("undefended")
            cfg = steer.get(mode)
            if mode == "input-filter":
                result = filtered(undefended or generate(gen, case, "undefended", new_tokens), tau)
            elif mode != "safesteer" and cfg is not None and undefended and not gate_fires(undefended, cfg):
                result = {**undefended, "derived": "undefended"}
            elif mode in configs and (shared := sibling(store, case, mode, configs[mode], configs, undefended)):
                result = shared
            else:
                result = generate(gen, case, mode, new_tokens, cfg if cfg is not None else True)
                spare[mode] = result
            store.add(make_record(case, mode, result, judges))
            added += 1
            if progress:
                progress(1, f"{case.suite}/{mode}")
    return added


def pending(cases: Sequence[Case], modes: Sequence[str], store: Store) -> int:
    return sum((c.suite, mode, c.id) not in store for c in cases for mode in modes
               if c.image_text is None or mode in md.MODES)
