"""``safesteer-eval ARTIFACT [--suite quick|full] [--out DIR] [--modes ...]``: what the defence buys and costs.

Re-running the same command resumes: finished generations are read back from DIR/generations.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from safesteer_runtime.errors import ConfigError, SafeSteerError

from . import modes as md
from . import suites as st
from .runner import PRESETS, artifact_hash, pending, run
from .store import Store


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="safesteer-eval", description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path, help="an artifact folder made by safesteer-export")
    p.add_argument("--suite", choices=sorted(PRESETS), default="quick",
                   help="quick: %(q)s cases/suite, %(qt)s tokens (~10 min for a 0.5B model on 2 cores); "
                        "full: %(f)s cases/suite, %(ft)s tokens" % {"q": PRESETS["quick"].n, "qt": PRESETS["quick"].new_tokens,
                                                                   "f": PRESETS["full"].n, "ft": PRESETS["full"].new_tokens})
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval-<suite> inside the artifact's parent)")
    p.add_argument("--modes", nargs="+", default=None, help=f"any of {', '.join(md.MODES)} (default: all that apply)")
    p.add_argument("--suites", nargs="+", default=None, help=f"a subset of {', '.join(st.SUITES)}")
    p.add_argument("--n", type=int, default=None, help="cases per suite (overrides the preset)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generation (overrides the preset)")
    p.add_argument("--seed", type=int, default=0, help="case sampling seed")
    p.add_argument("--knob", nargs="+", default=[], metavar="NAME=VALUE",
                   help="SafeSteer knobs for the safesteer mode instead of the artifact's defaults, e.g. lam=2 k=4")
    p.add_argument("--judges", nargs="+", default=["keyword", "embed"], choices=["keyword", "embed"])
    p.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no tables on stdout")
    return p.parse_args(argv)


def _judges(names: Sequence[str], exclude: set[str]) -> list:
    from safesteer_export.judges import KeywordJudge, judge_accuracy

    out = []
    for name in names:
        if name == "keyword":
            judge = KeywordJudge()
            out.append((judge, judge_accuracy(judge)))
        else:
            from .embed_judge import load_judge

            judge = load_judge(exclude)
            out.append((judge, judge.accuracy))
    return out


def excluded_prompts() -> set[str]:
    """Every packaged prompt text the suites can draw from: the embedding judge never trains on them."""
    from safesteer_export.prompt_sets import SOURCES, load_source

    return {p.text for name in SOURCES for p in load_source(name)}


def knobs(gen, pairs: Sequence[str]):
    """--knob NAME=VALUE ... -> a SafetyConfig over the artifact's defaults (True: the defaults as they are)."""
    if not pairs:
        return True
    if gen.manifest.safety is None:
        raise ConfigError("--knob needs a SafeSteer-calibrated artifact")
    from safesteer_rt import SafetyConfig

    values = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        try:
            values[name] = int(raw) if name in ("k", "lookahead_steps") else float(raw)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--knob takes NAME=NUMBER (e.g. lam=2), got {pair!r}")
    return SafetyConfig.from_manifest(gen.manifest.safety, **values)


def evaluate(args: argparse.Namespace) -> dict:
    from safesteer_rt import Generator

    from . import report as rp

    gen = Generator(args.artifact, threads=args.threads)
    calibrated = gen.manifest.safety is not None
    default_modes = list(md.MODES) if calibrated else ["undefended", "system-prompt"]
    modes = md.check_modes(args.modes or default_modes, calibrated)
    if "input-filter" in modes and "undefended" in modes:  # the filter reuses the undefended generation
        modes = [m for m in modes if m != "input-filter"] + ["input-filter"]
    preset = PRESETS[args.suite]
    n = args.n or preset.n
    new_tokens = args.new_tokens or preset.new_tokens
    if n < 1 or new_tokens < 1:
        raise ConfigError(f"--n and --new-tokens must be >= 1, got {n} and {new_tokens}")
    suites = args.suites or [s for s in st.SUITES if s != "image" or gen.manifest.image is not None]
    if "image" in suites and gen.manifest.image is None:
        raise SafeSteerError("the image suite needs an artifact with a vision graph; drop 'image' from --suites")
    steer = knobs(gen, args.knob)
    cal = st.Calibration.of_artifact(args.artifact)
    cases = [c for s in suites for c in st.build(s, n, cal, seed=args.seed)]
    out = args.out or args.artifact.parent / f"eval-{args.suite}"
    judges = _judges(args.judges, excluded_prompts() if "embed" in args.judges else set())
    settings = {"artifact": str(args.artifact.resolve()), "artifact_sha256": artifact_hash(args.artifact),
                "suite": args.suite, "n_per_suite": n, "new_tokens": new_tokens, "seed": args.seed,
                "split_seed": cal.seed, "suites": suites, "judges": [j.version for j, _ in judges],
                "mode_texts": md.fingerprint(), "knobs": asdict(steer) if steer is not True else "artifact defaults",
                "modes": modes}
    store = Store(out, settings, restart=args.restart)
    todo = pending(cases, modes, store)
    bar = None
    if todo and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="gen", desc="safesteer-eval", file=sys.stderr)
    try:
        run(gen, cases, modes, store, [j for j, _ in judges], new_tokens,
            progress=(lambda k, what: (bar.update(k), bar.set_postfix_str(what))) if bar else None, steer=steer)
    finally:
        if bar:
            bar.close()
    wanted = {(c.suite, m, c.id) for c in cases for m in modes}
    records = [r for r in store if (r["suite"], r["mode"], r["id"]) in wanted]
    provenance = {**settings, "cases": {s: [c.id for c in cases if c.suite == s] for s in suites},
                  "calibration_ids_excluded": len(cal.used_ids), "decoding": "greedy",
                  "out": str(out)}
    return rp.write(records, [acc for _, acc in judges], provenance, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        report = evaluate(args)
    except SafeSteerError as exc:
        print(f"safesteer-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safesteer-eval: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        from .report import markdown

        print(markdown(report))
        print(f"written to {report['provenance']['out']}: generations.jsonl, report.json, report.md, "
              + ", ".join(report["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
