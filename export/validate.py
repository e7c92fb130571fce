"""Check every exported graph against the PyTorch checkpoint right after export.

Each graph gets the reference's own inputs (block N gets HF's hidden state at its first layer), so a
mismatch points at one graph. Blocks run twice: a prefill over the first positions with an empty
cache, then the remaining positions with the K/V the prefill returned, which checks the cache path.
All mismatches are collected and raised together as one ExportValidationError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from safesteer_runtime import manifest as m
from safesteer_runtime.errors import ExportValidationError
from safesteer_runtime.image_tokens import image_runs, vision_inputs
from safesteer_runtime.qwen_vl import mrope_positions
from safesteer_runtime.images import prepare
from safesteer_runtime.masks import both_ways, causal_mask, windowed

RTOL = 1e-4  # of the reference's largest magnitude
ATOL = 1e-4


@dataclass
class Reference:
    input_ids: np.ndarray  # [1, n]
    vision_feeds: dict[str, np.ndarray]  # the vision graph's inputs for the sample's image (runtime's own)
    embeds: np.ndarray  # the embedding of input_ids (image tokens included, before features are merged in)
    vision: dict[str, np.ndarray]  # the vision module's outputs by graph output name
    layer_inputs: list[np.ndarray]  # hidden state entering layer i
    last_hidden: np.ndarray  # leaving the last layer, before the final norm
    logits: np.ndarray
    both_ways: list[tuple[int, int]]  # image runs that attend both ways at prefill (ImageInfo.bidirectional)
    rope_positions: np.ndarray | None  # multimodal RoPE: the blocks' position_ids [3, 1, n]


@dataclass
class ValidationReport:
    max_diff: dict[str, float] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def check(self, name: str, got: np.ndarray, want: np.ndarray) -> None:
        if got.shape != want.shape:
            self.mismatches.append(f"{name}: shape {got.shape}, PyTorch {want.shape}")
            return
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        self.max_diff[name] = diff
        limit = ATOL + RTOL * float(np.max(np.abs(want))) if want.size else ATOL
        if not np.isfinite(diff) or diff > limit:
            self.mismatches.append(f"{name}: max |diff| {diff:.3g} > tolerance {limit:.3g}")

    def raise_if_failed(self) -> None:
        if self.mismatches:
            raise ExportValidationError(self.mismatches)


def sample_inputs(family, image_info, seed: int = 0) -> tuple[np.ndarray, list]:
    """(input ids [1, n], prepared images): random text ids, with one random-noise image prepared the way the runtime
    prepares images (its tiles, if the family tiles) and its image tokens after the third id."""
    rng = np.random.default_rng(seed)
    vocab = family.sizes().vocab_size
    text = rng.integers(3, vocab - 1, size=12)
    if image_info is None:
        return text[None, :].astype(np.int64), []
    image = prepare(Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)), image_info)
    slots = np.full(image.text.count(image_info.image_token), image_info.image_token_id)
    return np.concatenate([text[:3], slots, text[3:]])[None, :].astype(np.int64), [image]


@torch.no_grad()
def reference(family, input_ids: np.ndarray, images: list, image_info=None) -> Reference:
    """The checkpoint's own outputs on the sample, with the images given as the family's HF model takes them."""
    layers = family.text.layers
    inputs: dict[int, np.ndarray] = {}
    outputs: dict[int, np.ndarray] = {}

    def grab_in(i):
        def hook(_mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[i] = hidden.detach().numpy().copy()
        return hook

    def grab_out(i):
        def hook(_mod, _args, out):
            outputs[i] = (out[0] if isinstance(out, tuple) else out).detach().numpy().copy()
        return hook

    handles = [layer.register_forward_pre_hook(grab_in(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layers[-1].register_forward_hook(grab_out(len(layers) - 1))]
    try:
        ids = torch.from_numpy(input_ids)
        kwargs = family.hf_image_kwargs(ids, images) if images else {}
        logits = family.model(input_ids=ids, use_cache=False, **kwargs).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    embeds = family.embed(torch.from_numpy(input_ids)).numpy()
    feeds, vision = {}, {}
    if images:
        feeds, _order = vision_inputs(images, image_info)
        out = family.vision_module()(*(torch.from_numpy(feeds[name]) for name in family.vision_inputs()))
        out = out if isinstance(out, tuple) else (out,)
        vision = {name: o.numpy() for name, o in zip(family.vision_outputs(), out)}
    runs = image_runs(input_ids[0], image_info.image_token_id) if images else []
    rope = None
    if family.sizes().mrope_sections:
        rows = np.arange(input_ids.shape[1])[None]
        rope = mrope_positions(input_ids[0], images, image_info, runs)[0] if images else np.stack([rows] * 3)
    return Reference(input_ids, feeds, embeds, vision, [inputs[i] for i in range(len(layers))],
                     outputs[len(layers) - 1], logits, runs if image_info and image_info.bidirectional else [], rope)


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def neutral_safety_feeds(vectors: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Safety inputs with alpha = beta = 0: the block must then equal the undefended checkpoint."""
    zero = np.zeros(1, np.float32)
    return {m.STEER_ALPHA: zero, m.GATE_LOGIT: zero, m.MSAV_BETA: zero,
            m.MSAV_MASK: np.ones((1, rows), np.float32), **vectors}


def validate_block(report: ValidationReport, path, ref: Reference, *, first: int, count: int, sizes,
                   vectors: dict[str, np.ndarray] | None = None, probe_layer: int | None = None) -> None:
    """A prefill over the first positions with an empty cache, then the rest over the returned K/V. A first block
    that embeds gets the ids, others HF's hidden state at their first layer; a block ending in the LM head is
    checked on logits (all rows) and its TopK, others on the hidden state leaving it."""
    sess = _session(path)
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    label = f"block {first}-{first + count - 1}"
    n = ref.input_ids.shape[1]
    split = n - 4
    source = ref.input_ids if m.INPUT_IDS in wanted else ref.layer_inputs[first]
    layers = range(first, first + count)
    in_place = m.present_key(first) in names  # cache buffers (with slack) in and out; else past rows in, new rows out
    empty = np.zeros((1, sizes.num_kv_heads, n + 3, sizes.head_dim) if in_place
                     else (1, 0, sizes.num_kv_heads * sizes.head_dim), np.float32)
    k = 5

    def feeds(start: int, stop: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = stop - start
        mask, positions = causal_mask(start, rows), np.arange(start, stop, dtype=np.int64)[None]
        if start == 0:
            mask = both_ways(mask, ref.both_ways)
        rope = positions if ref.rope_positions is None else np.ascontiguousarray(ref.rope_positions[:, :, start:stop])
        f = {m.INPUT_IDS if m.INPUT_IDS in wanted else m.HIDDEN_IN: source[:, start:stop],
             m.ATTENTION_MASK: mask, m.POSITION_IDS: rope,
             m.HEAD_ROWS: np.arange(rows, dtype=np.int64), m.TOP_K: np.array([k], np.int64), **past}
        if m.SLIDING_MASK in wanted:
            f[m.SLIDING_MASK] = windowed(mask, positions, sizes.sliding_window)
        f.update(neutral_safety_feeds(vectors or {}, rows))
        return {name: value for name, value in f.items() if name in wanted}

    def check(stage: str, out: dict[str, np.ndarray], start: int, stop: int) -> None:
        if m.LOGITS not in out:
            want = ref.layer_inputs[first + count] if first + count < len(ref.layer_inputs) else ref.last_hidden
            report.check(f"{label} {stage} {m.HIDDEN_OUT}", out[m.HIDDEN_OUT], want[:, start:stop])
            return
        report.check(f"{label} {stage} {m.LOGITS}", out[m.LOGITS], ref.logits[:, start:stop])
        lp = torch.log_softmax(torch.from_numpy(ref.logits[:, start:stop]).double(), dim=-1)
        report.check(f"{label} {stage} {m.TOPK_LOGPROBS}", out[m.TOPK_LOGPROBS], torch.topk(lp, k, dim=-1).values.numpy())
        chosen = np.take_along_axis(lp.numpy(), out[m.TOPK_IDS], axis=-1)
        report.check(f"{label} {stage} {m.TOPK_IDS} (log-prob of the returned ids)", chosen,
                     out[m.TOPK_LOGPROBS].astype(np.float64))

    past = {name: empty for i in layers for name in (m.past_key(i), m.past_value(i))}
    prefill = dict(zip(names, sess.run(None, feeds(0, split, past))))
    check("prefill", prefill, 0, split)
    if m.HARM_LOGIT in prefill:
        layer_out = ref.layer_inputs[probe_layer + 1] if probe_layer + 1 < len(ref.layer_inputs) else ref.last_hidden
        probe = layer_out[0, :split].astype(np.float64) @ vectors[m.PROBE_WEIGHT] + vectors[m.PROBE_BIAS][0]
        report.check(f"{label} {m.HARM_LOGIT}", prefill[m.HARM_LOGIT][0], probe)
    out_k, out_v = (m.present_key, m.present_value) if in_place else (m.new_key, m.new_value)
    past = {m.past_key(i): prefill[out_k(i)] for i in layers}
    past.update({m.past_value(i): prefill[out_v(i)] for i in layers})
    decode = dict(zip(names, sess.run(None, feeds(split, n, past))))
    check("cached", decode, split, n)


def validate_embed(report: ValidationReport, path, ref: Reference) -> None:
    (got,) = _session(path).run(None, {m.INPUT_IDS: ref.input_ids})
    report.check(f"embed {m.INPUTS_EMBEDS}", got, ref.embeds)


def validate_vision(report: ValidationReport, path, ref: Reference) -> None:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    for name, got in zip(names, sess.run(names, ref.vision_feeds)):
        report.check(f"vision {name}", got, ref.vision[name])
