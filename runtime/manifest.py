"""The artifact contract: every manifest key and graph IO name lives here, and only here.

The exporter imports this module to write ``manifest.json``; the runtime imports it to read one.
Each dataclass field is a key of the JSON document; ``load_manifest`` rejects unknown or missing keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ArtifactError
from .onnx_refs import external_files

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The artifact's other files (written by safesteer-export / safesteer-tune; the manifest names and hashes them).
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SAFETY_VECTORS_FILE = "safety.npz"
CALIBRATION_REPORT, CALIBRATION_REPORT_MD = "calibration.json", "calibration.md"
TUNING_REPORT, TUNING_REPORT_MD = "tuning.json", "tuning.md"
QUANTIZATION_REPORT = "quantization.json"

# Graph roles, in the order the runtime runs them. A text-only model's first block embeds input_ids itself (no embed
# graph); the last block of every model ends in the LM head (logits over the rows head_rows picks).
ROLE_VISION = "vision"
ROLE_EMBED = "embed"
ROLE_BLOCK = "block"

# Graph input / output names. Symbolic dims are named in the graphs (batch, sequence_length, ...).
PIXEL_VALUES = "pixel_values"  # vision in:  [num_images, 3, H, W] float
IMAGE_FEATURES = "image_features"  # vision out: [num_images, tokens_per_image, hidden]
IMAGE_NEWLINE = "image_newline"  # vision out (LLaVA-NeXT): [hidden], appended to each row of an image's tile grid
# Patch-based vision (Qwen2-VL): pixel_values are [patches, C * T * P * P]; each patch's (row, column) in its image,
# and additive masks [1, 1, patches, patches] that keep attention within an image (within a window: Qwen2.5-VL).
VISION_POSITIONS = "vision_position_ids"  # vision in: [patches, 2] int64
VISION_MASK = "vision_attention_mask"  # vision in: [1, 1, patches, patches]
VISION_WINDOW_MASK = "vision_window_mask"  # vision in (Qwen2.5-VL): [1, 1, patches, patches]
INPUT_IDS = "input_ids"  # embed / first block in:   [batch, sequence_length] int64
INPUTS_EMBEDS = "inputs_embeds"  # embed out:  [batch, sequence_length, hidden]
HIDDEN_IN = "hidden_states"  # block in:   [batch, sequence_length, hidden]
HIDDEN_OUT = "hidden_states_out"  # block out
ATTENTION_MASK = "attention_mask"  # block in: [batch, 1, sequence_length, total_sequence_length], additive
SLIDING_MASK = "sliding_attention_mask"  # block in (blocks with sliding-window layers): ATTENTION_MASK with keys
# sliding_window or more positions behind their query blocked too (masks.windowed)
POSITION_IDS = "position_ids"  # block in: [batch, sequence_length] int64 ([3, batch, sequence_length]: sizes.mrope_sections)
HEAD_ROWS = "head_rows"  # last block in: [head_rows] int64, the rows (of this call's) the LM head runs on
LOGITS = "logits"  # last block out: [batch, head_rows, vocab]
TOP_K = "top_k"  # last block in: [1] int64, how many candidates TopK returns
TOPK_LOGPROBS = "topk_logprobs"  # last block out: [batch, head_rows, top_k] log-softmax values
TOPK_IDS = "topk_ids"  # last block out: [batch, head_rows, top_k] int64


# SafeSteer inputs/outputs of the block(s) holding the probe layer and the MSAV layer.
PROBE_WEIGHT = "probe_weight"  # [hidden]    harm_logit = h . probe_weight + probe_bias
PROBE_BIAS = "probe_bias"  # [1]
SAFETY_DIRECTION = "safety_direction"  # [hidden]  unit r
STEER_ALPHA = "steer_alpha"  # [1]      h += steer_alpha * gate * r
GATE_LOGIT = "gate_logit"  # [1]        gate = harm_logit >= gate_logit  (= logit(tau))
MSAV_VECTOR = "msav_vector"  # [hidden]
MSAV_BETA = "msav_beta"  # [1]          h += msav_beta * msav_mask * v
MSAV_MASK = "msav_mask"  # [batch, sequence_length] float, 1 where the MSAV applies
HARM_LOGIT = "harm_logit"  # out: [batch, sequence_length], read before the correction
PROBE_INPUTS = (PROBE_WEIGHT, PROBE_BIAS, SAFETY_DIRECTION, STEER_ALPHA, GATE_LOGIT)
MSAV_INPUTS = (MSAV_VECTOR, MSAV_BETA, MSAV_MASK)
VECTOR_NAMES = (PROBE_WEIGHT, PROBE_BIAS, SAFETY_DIRECTION, MSAV_VECTOR)  # arrays in the safety .npz


def past_key(layer: int) -> str:
    """Block input: a layer's cached keys. Blocks with an in-place cache (they output present_key): the whole buffer,
    [batch, kv_heads, capacity, head_dim]; standard-ops blocks: the past positions, [batch, past, kv_heads * head_dim]."""
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    """Block output of an in-place cache: the buffer bound to past_key, with this call's rows (RoPE applied) written at
    positions [total - rows, total); the runtime binds input and output to the same memory."""
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def new_key(layer: int) -> str:
    """Block output of standard-ops blocks: the keys of this call's positions (RoPE applied),
    [batch, sequence_length, kv_heads * head_dim]; the runtime stores them."""
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


@dataclass(frozen=True)
class FileRef:
    path: str  # relative to the artifact directory
    sha256: str
    size: int


@dataclass(frozen=True)
class GraphEntry:
    role: str
    file: FileRef
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    data_files: tuple[FileRef, ...] = ()  # ONNX external data files the graph's weights are in (its own, and
    # another graph's where it shares a tensor: a tied LM head reads the embedding graph's table)
    first_layer: int = -1  # blocks: global index of the first decoder layer in the graph
    num_layers: int = 0  # blocks: how many decoder layers the graph holds


@dataclass(frozen=True)
class ModelSizes:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    sliding_window: Optional[int] = None  # the window of the blocks' sliding layers (they take SLIDING_MASK)
    # multimodal RoPE (Qwen2-VL): position_ids hold (temporal, height, width) rows and the rotary half-dims are split
    # into these sections, each rotated by its own row
    mrope_sections: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer_file: str
    chat_template_file: Optional[str]
    bos_token: Optional[str]
    eos_token: Optional[str]
    pad_token: Optional[str]
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    pad_token_id: Optional[int]
    add_bos_token: bool  # prepend BOS to raw (non-chat) prompts


@dataclass(frozen=True)
class Tiling:
    """Images cut into tiles, one vision call each (runtime/tiling.py).

    kind "idefics3" (Idefics3 / SmolVLM): resize so the longest edge is ``longest_edge``, then up to whole tiles;
    tiles of tile x tile in rows, then the whole image at tile x tile; the text lists tiles by row and column.
    kind "anyres" (LLaVA-NeXT): fit the image into the best of the ``grid`` resolutions (height, width), pad,
    cut tile x tile tiles after the whole image (squashed to the processor's size); the features of the tiles are
    laid out as one grid, cropped to the image's aspect ratio, with IMAGE_NEWLINE after each row.
    """

    kind: str
    tile: int
    longest_edge: Optional[int] = None  # idefics3; None: the processor does not resize first
    split: bool = True  # idefics3; False: the whole image only, resized to tile x tile
    grid: tuple[tuple[int, int], ...] = ()  # anyres


@dataclass(frozen=True)
class Patching:
    """Patch-based images (Qwen2-VL, runtime/qwen_vl.py): resized so both sides are multiples of patch * merge and
    the area lies in [min_pixels, max_pixels], cut into patch x patch squares (each repeated over temporal frames),
    ordered merge x merge block by block; every merge x merge block becomes one image token. ``window``: Qwen2.5-VL's
    attention window in pixels (None: attention over the whole image in every vision layer)."""

    patch: int
    merge: int
    temporal: int
    min_pixels: int
    max_pixels: int
    window: Optional[int] = None


@dataclass(frozen=True)
class ImageInfo:
    """Image preprocessing equal to the model's HF image processor, and how images enter the prompt."""

    image_token: str  # the placeholder a chat template writes once per image
    image_token_id: int
    tokens_per_image: int  # image tokens per vision call: per image, or per tile (patching: unused, 1)
    resize: str  # "shortest_edge" | "exact" | "none"
    size: tuple[int, ...]  # (shortest_edge,) or (height, width)
    resample: str  # "nearest" | "bilinear" | "bicubic" | "lanczos"
    crop: Optional[tuple[int, int]]  # center crop (height, width), None = no crop
    rescale_factor: Optional[float]
    mean: Optional[tuple[float, float, float]]
    std: Optional[tuple[float, float, float]]
    convert_rgb: bool
    # pad to a square of this colour (centred) before resizing, as LLaVA's processor with do_pad does: the whole
    # canvas reaches the tower (typographic images lose no text to the crop). None = no padding (absent before 0.15)
    pad: Optional[tuple[int, int, int]] = None
    # Templates may write a marker other than the image token; each image's marker becomes prefix + image tokens +
    # suffix (text, tokenized with the prompt). Gemma 3: <start_of_image> -> "\n\n<start_of_image>" + tokens +
    # "<end_of_image>\n\n", and an image's tokens see each other both ways at prefill. Qwen2-VL:
    # <|vision_start|><|image_pad|><|vision_end|> -> the same with the pad repeated.
    marker: Optional[str] = None  # what a chat template or prompt writes once per image; None = image_token
    prefix: str = ""
    suffix: str = ""
    bidirectional: bool = False
    tiling: Optional[Tiling] = None  # None: one vision call per image at pixel_size
    patching: Optional[Patching] = None

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the pixel values the vision graph takes."""
        if self.crop is not None:
            return self.crop
        return (self.size[0], self.size[0]) if len(self.size) == 1 else (self.size[0], self.size[1])

    @property
    def placeholder(self) -> str:
        return self.marker or self.image_token

    def expansion(self) -> str:
        """The text one image's placeholder becomes."""
        return self.prefix + self.image_token * self.tokens_per_image + self.suffix


@dataclass(frozen=True)
class SafetyDefaults:
    """Run-time knobs of SafeSteer; a deployment overrides them per request (SafetyConfig)."""

    k: int  # lookahead candidates
    lam: float  # selection weight on the branch score at the gate threshold (grown by gamma above it)
    tau: float  # probe score threshold (probability)
    alpha: float  # activation correction strength
    beta: float  # MSAV strength (requests with an image)
    lookahead_steps: int  # first T_look decoding steps use lookahead
    depth: int = 0  # greedy tokens each lookahead candidate is extended by before scoring (absent before 0.11)
    gamma: float = 0.0  # the steering strength's growth with the gate score (absent before 0.12)
    refuse_above: float = 1.0  # prompt score at or above which the reply opens with refusal_prefix (1: never; 0.14)


@dataclass(frozen=True)
class SafetyInfo:
    probe_layer: int
    msav_layer: Optional[int]  # None for text-only models
    vectors_file: str  # .npz (loaded with allow_pickle=False): probe_weight, probe_bias, safety_direction[, msav_vector]
    defaults: SafetyDefaults
    auroc_validation: float
    auroc_held_out: Optional[float]
    report_file: str  # calibration.json
    # token ids that open the model's own refusals (calibration): always among the lookahead candidates
    refusal_ids: tuple[int, ...] = ()
    # the model's own most common refusal opening, as token ids (calibration; absent before 0.14): the prompt gate
    # (SafetyConfig.refuse_above) starts the reply with it
    refusal_prefix: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExportInfo:
    tool_version: str
    block_size: int
    source: str  # the checkpoint's name or folder name (never an absolute path)
    opset: int
    safety_calibrated: bool
    weights: str = "float32"  # "int8" / "int4": weight-only MatMulNBits in the block and head graphs; "fp16"


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    family: str
    architecture: str
    dtype: str
    sizes: ModelSizes
    graphs: tuple[GraphEntry, ...]
    tokenizer: TokenizerInfo
    export: ExportInfo
    image: Optional[ImageInfo] = None
    # SafeSteer calibration (probe layer, vectors, default knobs); None when exported with --no-safety.
    safety: Optional[SafetyInfo] = None
    extra_files: tuple[FileRef, ...] = field(default=())  # tokenizer, template, reports: hashed too

    def graphs_of(self, role: str) -> list[GraphEntry]:
        return [g for g in self.graphs if g.role == role]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_ref(root: Path, path: Path) -> FileRef:
    return FileRef(path=path.relative_to(root).as_posix(), sha256=sha256_of(path), size=path.stat().st_size)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ArtifactError(f"manifest key '{where}' must be a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ArtifactError(f"manifest key '{where}' must have {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ArtifactError(f"manifest key '{where}' must be an object")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ArtifactError(f"manifest key '{where}' must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} is not handled")  # a bug in this module, not in the artifact


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ArtifactError(f"manifest key '{where}' must be an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ArtifactError(f"manifest '{where}' has unknown keys {unknown}: written by a newer safesteer?")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"manifest is missing key '{key}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], key)
    return cls(**kwargs)


def in_place_cache(manifest: Manifest) -> bool:
    """The blocks keep the KV cache in place (GroupQueryAttention: present_key outputs), or take the past and return
    the new rows (--standard-ops exports, and 0.6 artifacts)."""
    blocks = manifest.graphs_of(ROLE_BLOCK)
    first = min(blocks, key=lambda g: g.first_layer) if blocks else None
    return first is not None and present_key(first.first_layer) in first.outputs


def layout_problem(manifest: Manifest) -> Optional[str]:
    """Why this runtime cannot run the artifact's graphs as laid out (an older exporter's layout), or None."""
    blocks = sorted(manifest.graphs_of(ROLE_BLOCK), key=lambda g: g.first_layer)
    if not blocks or LOGITS not in blocks[-1].outputs:
        return ("its last block has no LM head (a separate head.onnx, safesteer < 0.6): re-export it with this "
                "version's safesteer-export")
    if INPUT_IDS not in blocks[0].inputs and not manifest.graphs_of(ROLE_EMBED):
        return "it lists no embed graph and its first block does not take input_ids: re-export it"
    return None


def parse_manifest(text: str) -> Manifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{MANIFEST_NAME} is not valid JSON ({exc}); re-export the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{MANIFEST_NAME} must hold a JSON object; re-export the artifact")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"manifest schema_version {version!r} is not supported by this runtime (it reads version "
            f"{SCHEMA_VERSION}); re-export the model with a matching safesteer-export or upgrade safesteer"
        )
    return _from_dict(Manifest, data, "")


def load_manifest(artifact_dir: str | Path, *, verify_files: bool = True,
                  expected_sha256: Optional[str] = None) -> Manifest:
    """Read and check an artifact's manifest; with ``verify_files`` every listed file's size and sha256 too.
    ``expected_sha256``: the manifest file's own sha256 as the operator pinned it (every other file is pinned by
    the hashes in it). Every file the manifest names must lie inside the artifact and be listed with its hash."""
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist; build one with `safesteer-export`")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {root} is not a safesteer artifact; build one with `safesteer-export`")
    raw = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != str(expected_sha256).lower():
        raise ArtifactError(f"{path} has sha256 {hashlib.sha256(raw).hexdigest()}, not the pinned {expected_sha256}: "
                            "this is not the artifact you expect; get the right one or update the pin")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text; re-export the artifact") from None
    manifest = parse_manifest(text)
    refs = [g.file for g in manifest.graphs] + [d for g in manifest.graphs for d in g.data_files]
    refs += list(manifest.extra_files)
    for ref in dict.fromkeys(refs):  # once each: a data file two graphs share (a tied table) is listed twice
        check_file(root, ref, hash_it=verify_files)
    for graph in manifest.graphs:  # every file a graph reads weights from is one the manifest hashes for it
        reads = {os.path.normpath(os.path.join(os.path.dirname(graph.file.path), name))
                 for name in external_files((root / graph.file.path).read_bytes(), graph.file.path)}
        unlisted = sorted(reads - {os.path.normpath(d.path) for d in graph.data_files})
        if unlisted:
            raise ArtifactError(f"{graph.file.path} reads weights from {unlisted}, which the manifest does not list "
                                "(and so does not hash) for it; re-export the artifact")
    listed = {ref.path for ref in refs}
    named = [manifest.tokenizer.tokenizer_file, manifest.tokenizer.chat_template_file]
    named += [manifest.safety.vectors_file] if manifest.safety else []
    for name in filter(None, named):
        if name not in listed:
            raise ArtifactError(f"the manifest names {name!r} but does not list it among its hashed files; "
                                "re-export the artifact")
    if manifest.safety is not None:
        vocab = manifest.sizes.vocab_size
        bad = [i for i in manifest.safety.refusal_ids + manifest.safety.refusal_prefix if not 0 <= i < vocab]
        if bad:
            raise ArtifactError(f"the manifest's refusal token ids {bad[:5]} lie outside the vocabulary [0, {vocab}); "
                                "re-export the artifact")
    return manifest


def inside(root: Path, name: str) -> Path:
    """``root / name`` if it is a regular file inside ``root`` (no absolute path, no '..', no symlink leading out,
    no device or directory); an ArtifactError otherwise."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise ArtifactError(f"artifact file name {name!r} is not a relative path; re-export the artifact")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ArtifactError(f"artifact file {name!r} points outside the artifact directory; it is not a "
                            "safesteer artifact file (re-export the artifact)")
    path = root / rel
    try:
        real, base = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ArtifactError(f"artifact file {name} is missing from {root}; re-copy or re-export the artifact") from None
    if not real.is_relative_to(base):
        raise ArtifactError(f"artifact file {name} is a link to outside the artifact directory; copy the file "
                            "itself into the artifact")
    if not stat.S_ISREG(real.stat().st_mode):
        raise ArtifactError(f"artifact file {name} is not a regular file; re-copy or re-export the artifact")
    return path


def check_file(root: Path, ref: FileRef, *, hash_it: bool) -> Path:
    path = inside(root, ref.path)
    size = path.stat().st_size
    if size != ref.size:
        raise ArtifactError(
            f"artifact file {ref.path} has {size} bytes, the manifest says {ref.size}: the copy is "
            "truncated or was modified; re-copy or re-export the artifact"
        )
    if hash_it and sha256_of(path) != ref.sha256:
        raise ArtifactError(
            f"artifact file {ref.path} fails its sha256 check: the file is corrupt or was modified; "
            "re-copy or re-export the artifact"
        )
    return path
