"""safesteer-export's work: load a local HF checkpoint, export its graphs block by block, validate, write."""

from __future__ import annotations

import gc
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Optional

from safesteer_models.onnx_ops import standard_ops
from safesteer_runtime import manifest as m
from safesteer_runtime.errors import ArtifactError, ConfigError
from safesteer_runtime.image_tokens import vision_inputs

from . import graph_files, graphs
from .calibrate import Calibration, CalibrationConfig, calibrate
from .quantize import PRECISIONS, quantize_artifact
from .tokenizer_files import load_tokenizer, write_tokenizer_files
from .validate import ValidationReport, reference, sample_inputs, validate_block, validate_embed, validate_vision

log = logging.getLogger("safesteer.export")
TOOL_VERSION = version("safesteer")  # recorded in every manifest


@dataclass(frozen=True)
class ExportConfig:
    model_dir: Path
    out_dir: Path
    block_size: int = 4  # decoder layers per block graph; 0 = the whole model in one block
    safety: bool = True  # SafeSteer calibration and in-graph probe / steering
    calibration: CalibrationConfig = CalibrationConfig()
    validate: bool = True
    overwrite: bool = False
    quantize: Optional[str] = None  # None (float32), "int8" / "int4" (weight-only) or "fp16"; see quantize.py
    standard_ops: bool = False  # blocks in standard ONNX ops only (TensorRT), not onnxruntime's fused contrib ops

    def __post_init__(self):
        if self.block_size < 0:
            raise ConfigError(f"--block-size must be >= 0 (0 = whole model in one block), got {self.block_size}")
        if self.quantize not in (None, *PRECISIONS):
            raise ConfigError(f"--quantize must be one of {', '.join(PRECISIONS)}, got {self.quantize!r}")


@dataclass
class ExportResult:
    out_dir: Path
    manifest: m.Manifest
    seconds: float
    peak_rss_mb: float
    validation: ValidationReport
    steps: list[tuple[str, float, float]] = field(default_factory=list)  # (what, seconds, peak RSS MB)
    quantization: Optional[dict] = None  # the accuracy check of a quantized export (quantization.json)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def read_architecture(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ArtifactError(f"model folder {model_dir} does not exist; pass a local Hugging Face checkpoint folder")
    if not cfg_path.is_file():
        raise ArtifactError(f"{model_dir} has no config.json: it is not a Hugging Face checkpoint folder")
    try:
        archs = json.loads(cfg_path.read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not archs:
        raise ArtifactError(f"{cfg_path} names no 'architectures'; add the model class name (e.g. LlamaForCausalLM)")
    return archs[0]


def load_model(model_dir: Path, architecture: str):
    import torch
    import transformers

    cls = getattr(transformers, architecture)
    return cls.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=False, dtype=torch.float32,
        attn_implementation="eager",
    ).eval()


def block_ranges(num_layers: int, block_size: int) -> list[tuple[int, int]]:
    size = block_size or num_layers
    return [(start, min(size, num_layers - start)) for start in range(0, num_layers, size)]


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(f"{out_dir} exists and is not empty; choose another -o or pass --overwrite")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Export into OUT.partial and move it into place at the end: a failed export never leaves a broken OUT."""
    check_out_dir(out_dir, overwrite)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


SAFETY_VECTORS = m.SAFETY_VECTORS_FILE


def safety_vectors(cal: Calibration) -> dict:
    import numpy as np

    vectors = {m.PROBE_WEIGHT: cal.probe.weight.astype(np.float32),
               m.PROBE_BIAS: np.array([cal.probe.bias], np.float32),
               m.SAFETY_DIRECTION: cal.direction.astype(np.float32)}
    if cal.msav is not None:
        vectors[m.MSAV_VECTOR] = cal.msav.astype(np.float32)
    return vectors


def safety_info(cal: Calibration) -> m.SafetyInfo:
    best = cal.sweep[cal.probe_layer]
    return m.SafetyInfo(
        probe_layer=cal.probe_layer, msav_layer=cal.msav_layer, vectors_file=SAFETY_VECTORS,
        # lam, depth, gamma: chosen on the default model's validation split (docs/evaluation.md); alpha 0: the correction
        # at the probe layer turned refusals into answers there (docs/method.md); tau: safesteer-tune re-chooses it
        defaults=m.SafetyDefaults(k=8, lam=32.0, tau=cal.tau, alpha=0.0, beta=1.0, lookahead_steps=16, depth=4,
                                   gamma=1.0),
        auroc_validation=float(best["auroc_validation"]), auroc_held_out=best.get("auroc_held_out"),
        report_file=m.CALIBRATION_REPORT, refusal_ids=tuple(int(i) for i in cal.refusal_ids),
        refusal_prefix=tuple(int(i) for i in cal.refusal_prefix),
    )


def export_artifact(cfg: ExportConfig, progress: Optional[Callable[[str], None]] = None,
                    tick: Optional[Callable[[int, int], None]] = None) -> ExportResult:
    """Export (and validate) float32 graphs; with ``cfg.quantize``, export them beside OUT, write the
    quantized artifact to OUT with its accuracy check, then remove the float32 copy."""
    if cfg.quantize is None:
        return _export_float32(cfg, progress, tick)
    check_out_dir(cfg.out_dir, cfg.overwrite)
    float32_dir = cfg.out_dir.with_name(cfg.out_dir.name + ".float32")
    result = _export_float32(replace(cfg, out_dir=float32_dir, overwrite=True, quantize=None), progress, tick)
    t0 = time.perf_counter()
    result.quantization = quantize_artifact(float32_dir, cfg.out_dir, cfg.quantize, progress)
    shutil.rmtree(float32_dir)
    result.out_dir, result.manifest = cfg.out_dir, m.load_manifest(cfg.out_dir)
    result.seconds += time.perf_counter() - t0
    result.steps.append((f"{cfg.quantize} quantization + accuracy check", time.perf_counter() - t0, peak_rss_mb()))
    return result


class _Steps:
    """The export's steps with their seconds and peak RSS, each told as it finishes."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.done = say, []

    def finished(self, what: str, t0: float) -> None:
        self.done.append((what, time.perf_counter() - t0, peak_rss_mb()))
        self.say(f"{what}: {self.done[-1][1]:.1f}s, peak RSS {self.done[-1][2]:.0f} MB")


@dataclass
class _Checkpoint:
    """The loaded Hugging Face model and what the stages read from it."""

    arch: str
    model: Any
    family: Any  # safesteer_models family wrapping ``model``
    tokenizer: Any
    image_info: Optional[m.ImageInfo]
    sizes: m.ModelSizes


@dataclass
class _Graphs:
    entries: list[m.GraphEntry] = field(default_factory=list)
    checks: list[Callable[[ValidationReport], None]] = field(default_factory=list)  # run once the model is released


def _export_float32(cfg: ExportConfig, progress: Optional[Callable[[str], None]] = None,
                    tick: Optional[Callable[[int, int], None]] = None) -> ExportResult:
    """The stages: load the checkpoint, write the tokenizer files, calibrate SafeSteer, export the graphs, release
    the checkpoint, validate the graphs against PyTorch's outputs, write the manifest and move OUT into place."""
    import torch

    from safesteer_models import family_class

    start = time.perf_counter()
    steps = _Steps(progress or log.info)
    arch = read_architecture(cfg.model_dir)
    family_cls = family_class(arch)  # unknown architectures fail here, before any weights load
    staging = prepare_out_dir(cfg.out_dir, cfg.overwrite)
    torch.manual_seed(0)
    ck = _load(cfg.model_dir, arch, family_cls, steps)
    token_info, token_files = write_tokenizer_files(cfg.model_dir, ck.tokenizer, ck.model.config, staging)
    cal = _calibrate(cfg, ck, staging, token_info, tick, steps) if cfg.safety else None
    vectors = safety_vectors(cal) if cal is not None else None
    graphs_out = _export_graphs(cfg, ck, staging, cal, vectors, steps)
    # The checkpoint is not needed past this point; releasing it before onnxruntime loads the graphs keeps the
    # export's peak near the checkpoint's own size.
    family_name, sizes, image_info = ck.family.name, ck.sizes, ck.image_info
    del ck
    gc.collect()
    report = _validate(graphs_out.checks, steps) if cfg.validate else ValidationReport()
    report.raise_if_failed()
    extra = list(token_files) + (_write_safety_files(staging, cal, vectors, cfg) if cal is not None else [])
    manifest = m.Manifest(
        schema_version=m.SCHEMA_VERSION, family=family_name, architecture=arch, dtype="float32", sizes=sizes,
        graphs=tuple(graphs_out.entries), tokenizer=token_info,
        export=m.ExportInfo(tool_version=TOOL_VERSION, block_size=cfg.block_size, source=cfg.model_dir.name,
                            opset=graphs.BLOCK_OPSET, safety_calibrated=cal is not None),
        image=image_info, safety=safety_info(cal) if cal is not None else None,
        extra_files=tuple(m.file_ref(staging, p) for p in extra),
    )
    (staging / m.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    if cfg.out_dir.exists():
        shutil.rmtree(cfg.out_dir)
    staging.rename(cfg.out_dir)
    return ExportResult(cfg.out_dir, manifest, time.perf_counter() - start, peak_rss_mb(), report, steps.done)


def _load(model_dir: Path, arch: str, family_cls, steps: _Steps) -> _Checkpoint:
    t0 = time.perf_counter()
    model = load_model(model_dir, arch)
    family = family_cls(model)
    tokenizer = load_tokenizer(model_dir)
    ck = _Checkpoint(arch, model, family, tokenizer, family.image_info(model_dir, tokenizer), family.sizes())
    steps.finished(f"loaded {arch} ({ck.sizes.num_layers} layers)", t0)
    return ck


def _calibrate(cfg: ExportConfig, ck: _Checkpoint, staging: Path, token_info: m.TokenizerInfo,
               tick: Optional[Callable[[int, int], None]], steps: _Steps) -> Calibration:
    from safesteer_runtime.text import load_chat_template

    t0 = time.perf_counter()
    chat = load_chat_template(staging, token_info)
    cal = calibrate(ck.family, ck.tokenizer, chat, ck.image_info, cfg.calibration, tick)
    steps.finished(f"calibration (probe layer {cal.probe_layer}, validation AUROC "
                   f"{cal.sweep[cal.probe_layer]['auroc_validation']:.3f}, tau {cal.tau:.3f})", t0)
    return cal


def _export_graphs(cfg: ExportConfig, ck: _Checkpoint, staging: Path, cal: Optional[Calibration],
                   vectors: Optional[dict], steps: _Steps) -> _Graphs:
    """Every graph into ``staging`` (vision and embed for models with images, then the blocks), each with the check
    that compares it with PyTorch's outputs on sample inputs (computed here, while the model is loaded)."""
    import torch

    probe_layer = cal.probe_layer if cal else None
    msav_layer = cal.msav_layer if cal else None
    ids, images = sample_inputs(ck.family, ck.image_info)
    vision_feeds = vision_inputs(images, ck.image_info)[0] if images else {}
    ref = reference(ck.family, ids, images, ck.image_info) if cfg.validate else None
    out = _Graphs()

    def add(role: str, name: str, io, check, **extra) -> None:
        path = staging / name
        out.entries.append(m.GraphEntry(role=role, file=m.file_ref(staging, path), inputs=tuple(io[0]),
                                        outputs=tuple(io[1]), data_files=graph_files.data_refs(staging, path), **extra))
        out.checks.append(lambda report: check(report, path, ref))

    written: graph_files.Written = {}  # tensors already in a data file (a tied table: the head reads it there)
    with torch.no_grad():
        if ck.image_info is not None:
            t0 = time.perf_counter()
            add(m.ROLE_VISION, "vision.onnx", graphs.export_vision(ck.family, staging / "vision.onnx", vision_feeds),
                validate_vision)
            steps.finished("vision graph", t0)
            # image features are merged into the embeddings between the embed graph and the first block
            t0 = time.perf_counter()
            add(m.ROLE_EMBED, "embed.onnx", graphs.export_embed(ck.family, staging / "embed.onnx", written),
                validate_embed)
            steps.finished("embed graph", t0)
        ranges = block_ranges(ck.sizes.num_layers, cfg.block_size)
        for first, count in ranges:
            t0 = time.perf_counter()
            name = f"block_{first:02d}.onnx"
            with standard_ops(cfg.standard_ops):
                io = graphs.export_block(ck.family, first, count, staging / name, probe_layer, msav_layer,
                                         embeds=first == 0 and ck.image_info is None, head=first == ranges[-1][0],
                                         written=written)
            add(m.ROLE_BLOCK, name, io, partial(validate_block, first=first, count=count, sizes=ck.sizes,
                                                vectors=vectors, probe_layer=probe_layer),
                first_layer=first, num_layers=count)
            steps.finished(f"block layers {first}-{first + count - 1}", t0)
    return out


def _validate(checks: list[Callable[[ValidationReport], None]], steps: _Steps) -> ValidationReport:
    t0 = time.perf_counter()
    report = ValidationReport()
    for check in checks:
        check(report)
    steps.finished(f"validated {len(checks)} graphs against PyTorch", t0)
    return report


def _write_safety_files(staging: Path, cal: Calibration, vectors: dict, cfg: ExportConfig) -> list[Path]:
    """The probe / steering vectors (.npz, no pickle) and the calibration report; -> the files written."""
    import numpy as np

    from .report import write_report

    with open(staging / SAFETY_VECTORS, "wb") as fh:
        np.savez(fh, **vectors)
    return [staging / SAFETY_VECTORS, *write_report(cal, cfg.calibration, staging, cfg.model_dir.name)]
