"""Tables and plots from a store: report.json, report.md and three PNGs.

Refusal rates are per judge (each row names its judge). ASR, on the harmful suites only, is the share
of replies the judge does not call a refusal: an upper bound on harm (a non-refusal may still be
useless or harmless). On the benign suites the refusal rate is the over-refusal cost.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

from .modes import MODES
from .suites import HARMFUL_SUITES, SUITES

PLOTS = ("refusal_by_suite.png", "harm_score_by_step.png", "cost_by_mode.png")


def _median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rows(records: Sequence[dict], judges: Sequence[str]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["mode"]), []).append(r)
    base = {(r["suite"], r["id"]): r["text"] for r in records if r["mode"] == "undefended"}
    out = []
    for suite in SUITES:
        for mode in MODES:
            recs = groups.get((suite, mode), [])
            if not recs:
                continue
            errors = sum(bool(r.get("error")) for r in recs)  # skipped (said why in generations.jsonl)
            recs = [r for r in recs if not r.get("error")]
            share = (lambda k: k / len(recs)) if recs else (lambda k: None)
            agree = share(sum(len({r["verdicts"][j] for j in judges}) == 1 for r in recs))
            paired = [r for r in recs if (suite, r["id"]) in base]
            unchanged = (sum(r["text"] == base[(suite, r["id"])] for r in paired) / len(paired)) if paired else None
            for judge in judges:
                refusals = sum(r["verdicts"][judge] for r in recs)
                rate = share(refusals)
                out.append({
                    "suite": suite, "mode": mode, "judge": judge, "n": len(recs), "skipped": errors, "refusals": refusals,
                    "refusal_rate": rate, "asr": (1.0 - rate) if suite in HARMFUL_SUITES and rate is not None else None,
                    "ms_per_token": _median(r["ms_per_token"] for r in recs),
                    "time_to_first_token_s": _median(r["time_to_first_token_s"] for r in recs),
                    "judges_agree": agree, "unchanged_vs_undefended": unchanged if mode != "undefended" else None,
                    "filtered": sum(r.get("filtered", False) for r in recs) if mode == "input-filter" else None,
                })
    return out


def cost(records: Sequence[dict]) -> dict[str, Optional[float]]:
    """Median ms/token per mode over every generation that decoded more than one token."""
    return {mode: _median(r["ms_per_token"] for r in records if r["mode"] == mode)
            for mode in MODES if any(r["mode"] == mode for r in records)}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(report: dict) -> str:
    judges = [j["judge"] for j in report["judges"]]
    lines = [f"# safesteer-eval: {report['provenance']['artifact']}", "",
             f"Suite `{report['provenance']['suite']}`: {report['provenance']['n_per_suite']} cases per suite, "
             f"{report['provenance']['new_tokens']} new tokens, greedy. Cases: the test split (seed "
             f"{report['provenance']['split_seed']}) disjoint from the artifact's calibration. "
             f"Artifact sha256 (manifest) `{report['provenance']['artifact_sha256'][:16]}`.", "",
             "## Judges", "", "| judge | accuracy on pyrit refusal.csv | n |", "|---|---|---|"]
    lines += [f"| {j['judge']} | {j['accuracy']:.1%} | {j['n']} |" for j in report["judges"]]
    for judge in judges:
        lines += ["", f"## Refusal rate, judge `{judge}` (ASR = 1 - refusal on harmful suites)", "",
                  "| suite | " + " | ".join(report["modes"]) + " |", "|---|" + "---|" * len(report["modes"])]
        for suite in report["suites"]:
            cells = []
            for mode in report["modes"]:
                row = next((r for r in report["results"]
                            if r["suite"] == suite and r["mode"] == mode and r["judge"] == judge), None)
                skipped = f", {row['skipped']} skipped" if row and row["skipped"] else ""
                cells.append("-" if row is None else f"{_pct(row['refusal_rate'])} (n={row['n']}{skipped})")
            lines.append(f"| {suite} | " + " | ".join(cells) + " |")
    lines += ["", "## Judges agree (share of generations)", "", "| suite | " + " | ".join(report["modes"]) + " |",
              "|---|" + "---|" * len(report["modes"])]
    for suite in report["suites"]:
        cells = [_pct(next((r["judges_agree"] for r in report["results"]
                            if r["suite"] == suite and r["mode"] == mode), None)) for mode in report["modes"]]
        lines.append(f"| {suite} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost (median ms/token over the suites' generations)", "", "| mode | ms/token | vs undefended |",
              "|---|---|---|"]
    off = report["cost_ms_per_token"].get("undefended")
    for mode, ms in report["cost_ms_per_token"].items():
        ratio = f"{ms / off:.2f}x" if ms and off else "-"
        lines.append(f"| {mode} | {'-' if ms is None else f'{ms:.1f}'} | {ratio} |")
    lines += ["", "input-filter decodes nothing for the requests it refuses; its ms/token is over the others.",
              "Short generations put the lookahead steps (the first 16) in a larger share of tokens than long ones."]
    if report.get("example"):
        ex = report["example"]
        lines += ["", f"## Example ({ex['suite']}, {ex['id']})", "", f"> {ex['request']}", "",
                  f"undefended: {ex['undefended']!r}", "", f"safesteer: {ex['safesteer']!r}"]
    return "\n".join(lines) + "\n"


def example(records: Sequence[dict]) -> Optional[dict]:
    """A harmful-suite case SafeSteer turned from compliance into refusal (in some judge's eyes), text suites
    before the image suite, most judges agreeing first; else any case SafeSteer changed."""
    by = {(r["suite"], r["mode"], r["id"]): r for r in records}
    scored = []
    for (suite, mode, cid), r in by.items():
        u = by.get((suite, "undefended", cid))
        if mode != "safesteer" or suite not in HARMFUL_SUITES or u is None or u["text"] == r["text"]:
            continue
        quality = sum(r["verdicts"][j] and not u["verdicts"][j] for j in r["verdicts"])  # judges that saw it flip
        cand = {"suite": suite, "id": cid, "request": r["request"], "undefended": u["text"], "safesteer": r["text"]}
        first = next(iter(r["verdicts"]))  # the first judge listed (keyword by default) breaks ties
        lead = r["verdicts"][first] and not u["verdicts"][first]
        scored.append(((-min(quality, 1), suite == "image", -quality, -lead, HARMFUL_SUITES.index(suite), cid), cand))
    return min(scored, key=lambda x: x[0])[1] if scored else None


def plots(records: Sequence[dict], report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    judges = [j["judge"] for j in report["judges"]]
    suites, modes = report["suites"], report["modes"]
    fig, axes = plt.subplots(1, len(judges), figsize=(5.5 * len(judges), 3.8), squeeze=False)
    width = 0.8 / max(len(modes), 1)
    for ax, judge in zip(axes[0], judges):
        for i, mode in enumerate(modes):
            vals = [next((r["refusal_rate"] for r in report["results"]
                          if r["suite"] == suite and r["mode"] == mode and r["judge"] == judge), None)
                    for suite in suites]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(np.arange(len(suites)) + i * width, vals, width, label=mode)
        ax.set_xticks(np.arange(len(suites)) + 0.4 - width / 2, suites)
        ax.set_ylim(0, 1)
        ax.set_title(f"refusal rate, judge: {judge}\n(harmful/jailbreak/image: higher = safer)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colours = plt.get_cmap("tab10")
    for i, suite in enumerate(suites):
        for mode, style in (("undefended", "--"), ("safesteer", "-")):
            traces = [r["safety_trace"] for r in records if r["suite"] == suite and r["mode"] == mode and r["safety_trace"]]
            if not traces:
                continue
            steps = max(len(t) for t in traces)
            mean = [np.mean([t[s]["score_chosen"] for t in traces if len(t) > s]) for s in range(steps)]
            ax.plot(range(steps), mean, style, color=colours(i), label=f"{suite} / {mode}")
    ax.set_xlabel("decoding step")
    ax.set_ylabel("probe score of the chosen token (mean)")
    ax.set_title("dashed: undefended (probe reads along), solid: SafeSteer", fontsize=9)
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.text(0.5, 0.5, "no probe scores: the artifact has no SafeSteer calibration", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    items = [(m, ms) for m, ms in report["cost_ms_per_token"].items() if ms is not None]
    ax.bar([m for m, _ in items], [ms for _, ms in items])
    ax.set_ylabel("ms per token (median)")
    ax.set_title("decode cost by mode", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)
    return list(PLOTS)


def write(records: Sequence[dict], judges: Sequence[dict], provenance: dict, out: Path) -> dict:
    names = [j["judge"] for j in judges]
    suites = [s for s in SUITES if any(r["suite"] == s for r in records)]
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    report = {"results": rows(records, names), "judges": list(judges), "provenance": provenance,
              "suites": suites, "modes": modes, "cost_ms_per_token": cost(records), "example": example(records)}
    report["plots"] = plots(records, report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report
