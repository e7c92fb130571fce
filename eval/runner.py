"""Run every (suite, case, mode) that the store does not hold yet, judge it, append it."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from safesteer_export.typography import render_request
from safesteer_rt import Generator
from safesteer_runtime.errors import InputError

from . import modes as md
from .store import Store
from .suites import Case

log = logging.getLogger("safesteer.eval")


@dataclass(frozen=True)
class Preset:
    n: int  # cases per suite
    new_tokens: int


PRESETS = {"quick": Preset(n=6, new_tokens=24), "full": Preset(n=24, new_tokens=32)}


def artifact_hash(root: Path) -> str:
    """sha256 of manifest.json, which itself records the sha256 of every artifact file."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def _number(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


RESULT_FIELDS = ("text", "finish_reason", "new_tokens", "prompt_tokens", "ms_per_token", "time_to_first_token_s",
                 "prompt_score", "safety_trace", "filtered", "error")


def generate(gen: Generator, case: Case, mode: str, new_tokens: int, steer: Any = True) -> dict:
    """One generation; ``steer`` is the ``safety=`` of the safesteer mode (True: the artifact's defaults)."""
    image = render_request(case.image_text) if case.image_text is not None else None
    try:
        out = gen.generate(md.messages(mode, case.prompt, image), max_new_tokens=new_tokens,
                           safety=steer if mode == "safesteer" else False)
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


def run(gen: Generator, cases: Sequence[Case], modes: Sequence[str], store: Store, judges: Sequence,
        new_tokens: int, progress: Optional[Callable[[int, str], None]] = None, steer: Any = True) -> int:
    """Generate what is missing; returns how many records were added."""
    tau = getattr(steer, "tau", None) or (gen.manifest.safety.defaults.tau if gen.manifest.safety else None)
    added = 0
    for case in cases:
        spare: dict[str, dict] = {}  # an undefended generation made only for the input filter
        for mode in modes:
            k = (case.suite, mode, case.id)
            if k in store:
                continue
            if mode == "input-filter":
                base = store.get((case.suite, "undefended", case.id)) or spare.get("undefended")
                result = filtered(base or generate(gen, case, "undefended", new_tokens), tau)
            else:
                result = generate(gen, case, mode, new_tokens, steer)
                spare[mode] = result
            record = {**{k2: v for k2, v in result.items() if k2 in RESULT_FIELDS},
                      "suite": case.suite, "mode": mode, "id": case.id, "request": case.request,
                      "prompt": md.messages(mode, case.prompt), "template": case.template,
                      "image_text": case.image_text}
            record["verdicts"] = {j.name: bool(j.is_refusal(record["text"], case.request)) for j in judges}
            store.add(record)
            added += 1
            if progress:
                progress(1, f"{case.suite}/{mode}")
    return added


def pending(cases: Sequence[Case], modes: Sequence[str], store: Store) -> int:
    return sum((c.suite, m, c.id) not in store for c in cases for m in modes)
