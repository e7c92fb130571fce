"""SafeSteer calibration on the PyTorch checkpoint (docs/method.md, section 1).

Hidden states of every decoder layer are read with forward hooks at the last prompt position and at
the first m positions of the model's own greedy reply. Per layer a probe is fitted on the calibration
split and scored on the validation split and on a held-out source; the best layer becomes the probe
layer. tau is set at a target false-positive rate on validation harmless prompts, r is the unit
harmful-minus-harmless mean direction there, and for models with a vision tower the modal semantic
alignment vector v is mean(text form) - mean(typographic image form) over paired prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from safesteer_runtime.image_tokens import with_images
from safesteer_runtime.text import ChatTemplate, render_messages

from safesteer_data.judges import KeywordJudge
from safesteer_data.probe import Probe, auroc, fit_probe, sigmoid, threshold_at_fpr
from safesteer_data.prompt_sets import HARMFUL, HARMLESS, Prompt, PromptSets, build_sets, load_user_file, packaged_prompts
from safesteer_data.typography import NEUTRAL_INSTRUCTION, render_request

log = logging.getLogger("safesteer.export")


@dataclass(frozen=True)
class CalibrationConfig:
    user_file: Optional[Path] = None  # JSON lines instead of the packaged sets
    per_source: int = 48  # prompts per source in the calibration split (half that in validation)
    reply_positions: int = 4  # m: reply positions read besides the last prompt position
    pca_k: int = 32
    l2: float = 1.0
    fpr: float = 0.05  # tau's target false-positive rate on validation harmless prompts
    seed: int = 0
    batch_size: int = 8
    msav_pairs: int = 24  # prompts rendered as images for the MSAV (vision models only)


@dataclass
class Calibration:
    probe_layer: int
    probe: Probe
    tau: float
    direction: np.ndarray  # unit r, [hidden]
    class_gap: float  # (mean harmful - mean harmless) . r: the default alpha
    msav_layer: Optional[int]
    msav: Optional[np.ndarray]
    sweep: list[dict]
    per_step: list[dict]
    image_form: Optional[dict]
    sets: PromptSets
    scores: dict = field(default_factory=dict)  # validation scores by step and label (plots)
    refused_harmful: tuple[int, int] = (0, 0)  # calibration harmful prompts the model itself refused / all
    refusal_ids: tuple[int, ...] = ()  # first tokens of the model's own refusals (lookahead always offers them)
    refusal_prefix: tuple[int, ...] = ()  # the model's most common refusal opening (the prompt gate forces it)


class FeatureReader:
    """Runs the HF model on prompts and keeps every layer's hidden state at the positions we read."""

    def __init__(self, family, tokenizer, chat: Optional[ChatTemplate], image_info):
        self.family, self.tokenizer, self.chat, self.image_info = family, tokenizer, chat, image_info
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt(self, messages) -> tuple[list[int], list]:
        """(prompt ids with every image's tokens written out, the prepared images in prompt order)."""
        placeholder = self.image_info.placeholder if self.image_info else None
        if self.chat is not None:
            text, images = render_messages(self.chat, messages, placeholder)
        else:
            text, images = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else "", []
        prepared = []
        if images:
            text, prepared = with_images(text, images, self.image_info)
        return self.tokenizer(text, add_special_tokens=self.chat is None)["input_ids"], prepared

    @torch.no_grad()
    def read(self, batch_ids: list[list[int]], steps: int, images=()) -> tuple[np.ndarray, list[str]]:
        """-> ([layers, batch, steps, hidden], replies): step 0 = last prompt position, step i = i-th reply
        token; replies = the greedy reply text of each row (``steps`` tokens)."""
        layers = self.family.text.layers
        width = max(len(x) for x in batch_ids)
        ids = torch.full((len(batch_ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(batch_ids):  # left padding: the last position is every row's own
            ids[row, width - len(x):] = torch.tensor(x)
            mask[row, width - len(x):] = 1
        calls: list[list[torch.Tensor]] = [[] for _ in layers]

        def hook(i):
            def grab(_mod, _args, out):
                calls[i].append((out[0] if isinstance(out, tuple) else out)[:, -1].float().clone())
            return grab

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            kwargs = self.family.hf_image_kwargs(ids, images) if images else {}
            out = self.family.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                                             min_new_tokens=steps, do_sample=False, pad_token_id=self.pad, **kwargs)
        finally:
            for h in handles:
                h.remove()
        replies = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return torch.stack([torch.stack(c[:steps], dim=1) for c in calls]).numpy(), replies

    def features(self, prompts: list[Prompt], steps: int, batch_size: int,
                 tick: Callable[[int], None]) -> tuple[np.ndarray, list[str]]:
        feats, replies = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [self.prompt([{"role": "user", "content": p.text}])[0] for p in chunk]
            f, r = self.read(ids, steps)
            feats.append(f)
            replies += r
            tick(len(chunk))
        return np.concatenate(feats, axis=1), replies

    def image_form_features(self, prompts: list[Prompt], layer: int, tick: Callable[[int], None]) -> np.ndarray:
        rows = []
        for p in prompts:
            image = render_request(p.text)
            content = [{"type": "image", "image": image}, {"type": "text", "text": NEUTRAL_INSTRUCTION}]
            ids, prepared = self.prompt([{"role": "user", "content": content}])
            rows.append(self.read([ids], 1, images=prepared)[0][layer, 0, 0])
            tick(1)
        return np.stack(rows)


def _labels(prompts: list[Prompt]) -> np.ndarray:
    return np.array([p.label for p in prompts])


def output_labels(prompts: list[Prompt], replies: list[str], steps: int) -> np.ndarray:
    """[n, steps] labels of the positions read. Step 0 (the prompt) carries the prompt's label; reply
    positions are harmful only when the prompt is harmful AND the model's own reply does not refuse
    (keyword judge): the probe is meant to flag harmful *output* while decoding, and a refusal of a
    harmful request is the safe output that lookahead should steer toward."""
    judge = KeywordJudge()
    y = np.repeat(_labels(prompts)[:, None], steps, axis=1)
    for i, reply in enumerate(replies):
        if y[i, 0] == HARMFUL and judge.is_refusal(reply):
            y[i, 1:] = HARMLESS
    return y


def calibrate(family, tokenizer, chat: Optional[ChatTemplate], image_info, cfg: CalibrationConfig,
              progress: Optional[Callable[[int, int], None]] = None) -> Calibration:
    prompts = load_user_file(cfg.user_file) if cfg.user_file else packaged_prompts(seed=cfg.seed)
    sets = build_sets(prompts, seed=cfg.seed, per_source=cfg.per_source)
    reader = FeatureReader(family, tokenizer, chat, image_info)
    steps = cfg.reply_positions + 1
    total = len(sets.calibration) + len(sets.validation) + len(sets.held_out)
    total += min(cfg.msav_pairs, len(sets.calibration)) if image_info is not None else 0
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    cal, cal_replies = reader.features(sets.calibration, steps, cfg.batch_size, tick)  # [L, n, steps, H]
    val, val_replies = reader.features(sets.validation, steps, cfg.batch_size, tick)
    held, held_replies = (reader.features(sets.held_out, steps, cfg.batch_size, tick) if sets.held_out
                          else (None, []))
    y_cal, y_val = _labels(sets.calibration), _labels(sets.validation)
    out_cal = output_labels(sets.calibration, cal_replies, steps).ravel()
    out_val = output_labels(sets.validation, val_replies, steps)
    hidden = cal.shape[-1]

    def flat(feats, layer):
        return feats[layer].reshape(-1, hidden)

    sweep, probes = [], []
    harmless_val = y_val == HARMLESS
    for layer in range(cal.shape[0]):
        probe = fit_probe(flat(cal, layer), out_cal, pca_k=cfg.pca_k, l2=cfg.l2)
        probes.append(probe)
        row = {"layer": layer, "auroc_validation": auroc(probe.logits(flat(val, layer)), out_val.ravel())}
        if held is not None:
            out_held = output_labels(sets.held_out, held_replies, steps).ravel()
            neg = val[layer][harmless_val].reshape(-1, hidden)
            pos = held[layer].reshape(-1, hidden)
            scores = np.concatenate([probe.logits(pos), probe.logits(neg)])
            row["auroc_held_out"] = auroc(scores, np.r_[out_held, np.zeros(len(neg))])
        sweep.append(row)

    def merit(row):
        return np.nanmean([row["auroc_validation"], row.get("auroc_held_out", np.nan)])

    best = max(range(len(sweep)), key=lambda i: (merit(sweep[i]), -i))
    probe = probes[best]
    val_scores = sigmoid(probe.logits(flat(val, best))).reshape(-1, steps)
    tau = threshold_at_fpr(val_scores[harmless_val].ravel(), cfg.fpr)
    # r: harmful minus harmless prompts at the last prompt position (the refusal-direction recipe)
    x = cal[best, :, 0]
    gap_vec = x[y_cal == HARMFUL].mean(0) - x[y_cal == HARMLESS].mean(0)
    direction = gap_vec / (np.linalg.norm(gap_vec) + 1e-12)
    per_step = [{"step": s, "auroc_validation": auroc(val_scores[:, s], out_val[:, s]),
                 "mean_score_harmful": float(val_scores[~harmless_val, s].mean()),
                 "mean_score_harmless": float(val_scores[harmless_val, s].mean())} for s in range(steps)]
    judge = KeywordJudge()
    refusals = [r for r, p in zip(cal_replies, sets.calibration) if p.label == HARMFUL and judge.is_refusal(r)]

    msav, image_form = None, None
    if image_info is not None:
        plain = [p for p in sets.calibration if not p.source.startswith("wrapped_")]  # short requests only
        pairs = plain[: cfg.msav_pairs]
        if len({p.label for p in pairs}) < 2:  # keep both labels in the paired set
            pairs = sorted(plain, key=lambda p: p.label)[: cfg.msav_pairs // 2]
            pairs += sorted(plain, key=lambda p: -p.label)[: cfg.msav_pairs - len(pairs)]
        index = {p.id: i for i, p in enumerate(sets.calibration)}
        text_form = np.stack([cal[best, index[p.id], 0] for p in pairs])
        image_feats = reader.image_form_features(pairs, best, tick)
        msav = (text_form.mean(0) - image_feats.mean(0)).astype(np.float32)
        yp = _labels(pairs)
        image_form = {
            "pairs": len(pairs),
            "auroc_text_form": auroc(probe.logits(text_form), yp),
            "auroc_image_form": auroc(probe.logits(image_feats), yp),
            "auroc_image_form_with_msav": auroc(probe.logits(image_feats + msav), yp),
            "mean_score_image_harmful": float(sigmoid(probe.logits(image_feats[yp == 1])).mean()),
            "mean_score_image_harmful_with_msav": float(sigmoid(probe.logits(image_feats[yp == 1] + msav)).mean()),
        }
    return Calibration(
        probe_layer=best, probe=probe, tau=tau, direction=direction.astype(np.float32),
        class_gap=float(gap_vec @ direction), msav_layer=best if msav is not None else None, msav=msav,
        sweep=sweep, per_step=per_step, image_form=image_form, sets=sets,
        scores={"validation": val_scores.tolist(), "validation_labels": y_val.tolist()},
        refused_harmful=(len(refusals), int((y_cal == HARMFUL).sum())),
        refusal_ids=refusal_openers(tokenizer, refusals),
        refusal_prefix=refusal_prefix(tokenizer, refusals),
    )


def refusal_openers(tokenizer, refusals: list[str], share: float = 0.25) -> tuple[int, ...]:
    """The first token ids of the model's own refusals: the most common one, and any other that opens at least
    ``share`` of them. Lookahead always offers these candidates, so a refusal is within reach at every fired step."""
    counts: dict[int, int] = {}
    for reply in refusals:
        ids = tokenizer(reply.strip(), add_special_tokens=False)["input_ids"]
        if ids:
            counts[ids[0]] = counts.get(ids[0], 0) + 1
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    return tuple(i for n, i in enumerate(ranked) if n == 0 or counts[i] >= share * len(refusals))


def refusal_prefix(tokenizer, refusals: list[str], share: float = 0.5, max_tokens: int = 8) -> tuple[int, ...]:
    """The model's own most common refusal opening: starting empty, add the most common next token among the
    refusals that open with the prefix so far, while at least ``share`` of all refusals still open with it (at most
    ``max_tokens``, never an end token). The prompt gate starts a reply with it; the model words the rest."""
    seqs = [tokenizer(r.strip(), add_special_tokens=False)["input_ids"] for r in refusals]
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    prefix: list[int] = []
    while len(prefix) < max_tokens:
        n = len(prefix)
        nexts: dict[int, int] = {}
        for ids in seqs:
            if len(ids) > n and ids[:n] == prefix and ids[n] not in ends:
                nexts[ids[n]] = nexts.get(ids[n], 0) + 1
        if not nexts:
            break
        best = min(nexts, key=lambda i: (-nexts[i], i))
        if nexts[best] < share * len(seqs):
            break
        prefix.append(best)
    return tuple(prefix)
