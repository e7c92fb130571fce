"""``safesteer-eval ARTIFACT [--suite quick|full] [--out DIR] [--modes ...]``: what the defence buys and costs.

Re-running the same command resumes: finished generations are read back from DIR/generations.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
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
    p.add_argument("--sweep", nargs="+", default=[], metavar="NAME=V1,V2",
                   help="extra safesteer modes, one per value (e.g. tau=0.3,0.5,0.7): the trade-off curve's points")
    p.add_argument("--split", choices=st.EVAL_SPLITS, default="test",
                   help="test (default) or validation: choose knobs on validation, report on test")
    p.add_argument("--judges", nargs="+", default=["keyword", "embed"], choices=["keyword", "embed"])
    p.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    p.add_argument("--report-only", action="store_true",
                   help="generate nothing: write the report from what --out holds (an interrupted run's cases so far)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no tables on stdout")
    return p.parse_args(argv)


def _judges(names: Sequence[str], exclude: set[str]) -> list:
    from safesteer_data.judges import KeywordJudge, judge_accuracy

    out = []
    for name in names:
        if name == "keyword":
            judge = KeywordJudge()
            out.append((judge, judge_accuracy(judge)))
        else:
            from .embed_judge import load_judge

            from tqdm import tqdm

            bars = []  # a bar only while fitting: a cached judge loads at once

            def tick(done: int, total: int) -> None:
                if not bars:
                    bars.append(tqdm(total=total, unit="reply", file=sys.stderr,
                                     desc="fitting the embedding judge (once, then cached)"))
                bars[0].update(done - bars[0].n)

            judge = load_judge(exclude, progress=tick)
            for bar in bars:
                bar.close()
            out.append((judge, judge.accuracy))
    return out


def excluded_prompts() -> set[str]:
    """Every packaged prompt text the suites can draw from: the embedding judge never trains on them."""
    from safesteer_data.prompt_sets import SOURCES, load_source

    return {p.text for name in SOURCES for p in load_source(name)}


def knobs(gen, pairs: Sequence[str], sweep: Sequence[str] = (), named: Sequence[str] = ()) -> dict:
    """--knob NAME=VALUE ..., --sweep and the ``safesteer@...`` modes named in --modes -> {safesteer mode: its
    ``safety=``} (True: the artifact's defaults)."""
    modes = md.sweep_modes(list(sweep)) + [m for m in named if md.parse(m)[1]]
    if (pairs or modes) and gen.manifest.safety is None:
        raise ConfigError("--knob and --sweep need a SafeSteer-calibrated artifact")
    from safesteer_rt import SafetyConfig

    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--knob takes NAME=NUMBER (e.g. lam=2), got {pair!r}")
    try:
        base = md.parse("safesteer@" + ",".join(pairs))[1]
    except ConfigError:
        raise ConfigError(f"--knob takes NAME=NUMBER (e.g. lam=2), got {' '.join(pairs)!r}") from None
    steer = {"safesteer": SafetyConfig.from_manifest(gen.manifest.safety, **base) if base else True}
    for mode in modes:
        steer[mode] = SafetyConfig.from_manifest(gen.manifest.safety, **{**base, **md.parse(mode)[1]})
    return steer


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
    suites = args.suites or [s for s in st.SUITES if s not in st.IMAGE_SUITES or gen.manifest.image is not None]
    if set(suites) & set(st.IMAGE_SUITES) and gen.manifest.image is None:
        raise SafeSteerError(f"the suites {', '.join(st.IMAGE_SUITES)} need an artifact with a vision graph; drop "
                             "them from --suites")
    steer = knobs(gen, args.knob, args.sweep, modes)
    modes += [m for m in steer if m not in modes and "safesteer" in modes]
    cal = st.Calibration.of_artifact(args.artifact)
    per_suite = [st.build(s, n, cal, seed=args.seed, split=args.split) for s in suites]
    # suites interleaved, so an interrupted run (--report-only) holds the first cases of every suite
    cases = [c for group in itertools.zip_longest(*per_suite) for c in group if c is not None]
    out = args.out or args.artifact.parent / (f"eval-{args.suite}" + ("" if args.split == "test" else f"-{args.split}"))
    judges = _judges(args.judges, excluded_prompts() if "embed" in args.judges else set())
    settings = {"artifact": args.artifact.name, "artifact_sha256": artifact_hash(args.artifact), "split": args.split,
                "suite": args.suite, "n_per_suite": n, "new_tokens": new_tokens, "seed": args.seed,
                "split_seed": cal.seed, "suites": suites, "judges": [j.version for j, _ in judges],
                "mode_texts": md.fingerprint(),
                "knobs": asdict(steer["safesteer"]) if steer["safesteer"] is not True else "artifact defaults",
                "modes": modes}
    with Store(out, settings, restart=args.restart) as store:
        todo = 0 if args.report_only else pending(cases, modes, store)
        bar = None
        if todo and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=todo, unit="gen", desc="safesteer-eval", file=sys.stderr)
        try:
            if not args.report_only:
                tick = (lambda k, what: (bar.update(k), bar.set_postfix_str(what))) if bar else None
                run(gen, cases, modes, store, [j for j, _ in judges], new_tokens, progress=tick, steer=steer)
        finally:
            if bar:
                bar.close()
        wanted = {(c.suite, m, c.id) for c in cases for m in modes if c.image_text is None or m in md.MODES}
        records = [r for r in store if (r["suite"], r["mode"], r["id"]) in wanted]
        provenance = {**settings, "cases": {s: [c.id for c in cases if c.suite == s] for s in suites},
                      "calibration_ids_excluded": len(cal.used_ids), "decoding": "greedy",
                      "out": str(out), "case_kinds": {c.id: c.kind for c in cases if c.kind},
                      "generations": {"done": len(records), "planned": len(wanted)}}
        return rp.write(records, [acc for _, acc in judges], provenance, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("safesteer.checkpoints").setLevel(logging.INFO)  # one-time builds say what they are
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
