"""The calibration report written into the artifact: calibration.json, calibration.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from safesteer_runtime import manifest as m

from .calibrate import Calibration, CalibrationConfig

REPORT_JSON, REPORT_MD = m.CALIBRATION_REPORT, m.CALIBRATION_REPORT_MD
PLOT_SWEEP = "calibration_auroc_by_layer.png"
PLOT_STEPS = "calibration_score_by_step.png"
PLOT_MODES = "calibration_text_vs_image.png"


def _plots(cal: Calibration, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = [r["layer"] for r in cal.sweep]
    ax.plot(layers, [r["auroc_validation"] for r in cal.sweep], marker="o", label="validation (random split)")
    if "auroc_held_out" in cal.sweep[0]:
        ax.plot(layers, [r["auroc_held_out"] for r in cal.sweep], marker="s", label="held-out source")
    ax.axvline(cal.probe_layer, color="grey", linestyle="--", label=f"probe layer {cal.probe_layer}")
    ax.set_xlabel("layer")
    ax.set_ylabel("probe AUROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOT_SWEEP, dpi=100)
    plt.close(fig)
    written.append(out / PLOT_SWEEP)

    scores = np.array(cal.scores["validation"])
    labels = np.array(cal.scores["validation_labels"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(scores.shape[1])
    for lab, name in ((1, "harmful"), (0, "harmless")):
        sel = scores[labels == lab]
        ax.errorbar(steps, sel.mean(0), yerr=sel.std(0), marker="o", capsize=3, label=name)
    ax.axhline(cal.tau, color="grey", linestyle="--", label=f"tau {cal.tau:.3f}")
    ax.set_xlabel("decoding step (0 = last prompt position)")
    ax.set_ylabel("probe score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT_STEPS, dpi=100)
    plt.close(fig)
    written.append(out / PLOT_STEPS)

    if cal.image_form:
        f = cal.image_form
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ["text form", "image form", "image form + MSAV"]
        ax.bar(names, [f["auroc_text_form"], f["auroc_image_form"], f["auroc_image_form_with_msav"]])
        ax.set_ylabel("probe AUROC (paired prompts)")
        ax.set_ylim(0, 1.05)
        fig.tight_layout()
        fig.savefig(out / PLOT_MODES, dpi=100)
        plt.close(fig)
        written.append(out / PLOT_MODES)
    return written


def write_report(cal: Calibration, cfg: CalibrationConfig, out: Path, model_name: str) -> list[Path]:
    data = {
        "model": model_name,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "probe_layer": cal.probe_layer, "tau": cal.tau, "class_gap": cal.class_gap,
        "msav_layer": cal.msav_layer, "sweep": cal.sweep, "per_step": cal.per_step,
        "image_form": cal.image_form, "data": cal.sets.describe(),
        "refused_harmful_calibration": list(cal.refused_harmful), "refusal_ids": list(cal.refusal_ids),
        "refusal_prefix": list(cal.refusal_prefix),
    }
    (out / REPORT_JSON).write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    best = cal.sweep[cal.probe_layer]
    lines = [
        f"# SafeSteer calibration: {model_name}", "",
        f"Probe layer **{cal.probe_layer}**: validation AUROC {best['auroc_validation']:.3f}"
        + (f", held-out-source AUROC {best['auroc_held_out']:.3f}" if "auroc_held_out" in best else "")
        + f"; tau {cal.tau:.4f} (target FPR {cfg.fpr:.0%} on validation harmless prompts); "
        f"class gap along r {cal.class_gap:.3f}.", "",
        "Data (prompts per source): calibration " + json.dumps(data["data"]["calibration"])
        + ", validation " + json.dumps(data["data"]["validation"]) + ", held out " + json.dumps(data["data"]["held_out"])
        + f"; split seed {cal.sets.seed}. Features: last prompt position + first {cfg.reply_positions} positions of the"
        " model's own greedy reply. Labels: a prompt position carries its prompt's label; a reply position is harmful"
        " only if the prompt is harmful and the model's reply does not refuse (keyword judge): the model refused "
        f"{cal.refused_harmful[0]} of {cal.refused_harmful[1]} harmful calibration prompts. AUROC columns use these labels. "
        f"Token ids that open its refusals (always among the lookahead candidates): {list(cal.refusal_ids)}; its most "
        f"common refusal opening (the prompt gate's refusal prefix): {list(cal.refusal_prefix)}.", "",
        "| layer | validation AUROC | held-out AUROC |", "|---|---|---|",
    ]
    for r in cal.sweep:
        lines.append(f"| {r['layer']} | {r['auroc_validation']:.3f} | {r.get('auroc_held_out', float('nan')):.3f} |")
    lines += ["", "| step | validation AUROC | mean score harmful | mean score harmless |", "|---|---|---|---|"]
    for r in cal.per_step:
        lines.append(f"| {r['step']} | {r['auroc_validation']:.3f} | {r['mean_score_harmful']:.3f} | "
                     f"{r['mean_score_harmless']:.3f} |")
    if cal.image_form:
        f = cal.image_form
        lines += ["", f"Text form vs typographic image form ({f['pairs']} paired prompts): probe AUROC text "
                  f"{f['auroc_text_form']:.3f}, image {f['auroc_image_form']:.3f}, image + MSAV "
                  f"{f['auroc_image_form_with_msav']:.3f}; mean score of harmful image-form prompts "
                  f"{f['mean_score_image_harmful']:.3f} -> {f['mean_score_image_harmful_with_msav']:.3f} with the MSAV."]
    (out / REPORT_MD).write_text("\n".join(lines) + "\n")
    return [out / REPORT_JSON, out / REPORT_MD, *_plots(cal, out)]
