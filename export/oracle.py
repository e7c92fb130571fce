"""The PyTorch reference of SafeSteer decoding (docs/method.md), on the Hugging Face model with forward hooks.

Deliberately the plain way: no KV cache, no tree mask. Every candidate, and every token of its greedy
continuation, is scored by a full forward over prefix + branch, so the runtime's one-pass lookahead, tree
mask, branch passes and KV commit are checked against an implementation that has none of them. Greedy
only. Never imported by the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from safesteer_runtime import manifest as m
from safesteer_runtime.safety import SafetyConfig, select


@dataclass
class OracleResult:
    token_ids: list[int]
    trace: list[dict] = field(default_factory=list)
    prompt_logit: Optional[float] = None


class TorchSafeSteer:
    def __init__(self, family, info: m.SafetyInfo, vectors: dict[str, np.ndarray], image_token_id: Optional[int]):
        self.family, self.info, self.image_token_id = family, info, image_token_id
        self.v = {k: torch.from_numpy(np.asarray(a, np.float32)) for k, a in vectors.items()}

    @torch.no_grad()
    def forward(self, ids: list[int], images, cfg: SafetyConfig, msav_from: Optional[int]):
        """Logits and harm_logit at every position of ``ids``, with MSAV and correction hooked in."""
        layers = self.family.text.layers
        seen: dict[str, torch.Tensor] = {}
        gate_logit = cfg.gate_logit

        def msav_hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            mask = torch.zeros(h.shape[1])
            if msav_from is not None:
                mask[msav_from:] = 1.0
            h = h + cfg.beta * mask[None, :, None] * self.v[m.MSAV_VECTOR]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        def probe_hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            harm = h @ self.v[m.PROBE_WEIGHT] + self.v[m.PROBE_BIAS]
            seen["harm"] = harm
            gate = (harm >= gate_logit).to(h.dtype)
            h = h + cfg.alpha * gate[..., None] * self.v[m.SAFETY_DIRECTION]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles = []
        if self.info.msav_layer is not None:
            handles.append(layers[self.info.msav_layer].register_forward_hook(msav_hook))
        handles.append(layers[self.info.probe_layer].register_forward_hook(probe_hook))
        try:
            input_ids = torch.tensor([ids])
            kwargs = self.family.hf_image_kwargs(input_ids, images) if images else {}
            logits = self.family.model(input_ids=input_ids, use_cache=False, **kwargs).logits[0]
        finally:
            for h in handles:
                h.remove()
        return logits.double(), seen["harm"][0].double()

    def generate(self, prompt_ids: list[int], cfg: SafetyConfig, max_new_tokens: int,
                 images=(), eos_ids=()) -> OracleResult:
        msav_from = None
        if images and self.info.msav_layer is not None and cfg.beta != 0:
            msav_from = max(i for i, t in enumerate(prompt_ids) if t == self.image_token_id) + 1
        ids = list(prompt_ids)
        logits, harm = self.forward(ids, images, cfg, msav_from)
        out = OracleResult([], prompt_logit=float(harm[-1]))
        z, gate_score = logits[-1], float(torch.sigmoid(harm[-1]))
        forced = list(self.info.refusal_prefix) if cfg.forces(gate_score) else []  # the prompt gate
        for step in range(max_new_tokens):
            forcing = bool(forced)
            if forcing or not (step < cfg.lookahead_steps and gate_score >= cfg.tau):
                token = forced.pop(0) if forcing else int(torch.argmax(z))
                if token not in eos_ids and step < max_new_tokens - 1:  # the last token is not fed (as in the Generator)
                    logits, harm = self.forward(ids + [token], images, cfg, msav_from)
                    z, gate_score = logits[-1], float(torch.sigmoid(harm[-1]))
                    out.trace.append({"token": token, "score_chosen": gate_score, **({"forced": True} if forcing else {})})
            else:  # the row that produced z scored >= tau: lookahead
                lp = torch.log_softmax(z, dim=-1)
                top_lp, top_ids = torch.topk(lp, cfg.k)
                extra = [i for i in self.info.refusal_ids if i not in top_ids.tolist()] if step == 0 else []
                cands = top_ids.tolist() + extra
                cand_lp = np.array(top_lp.tolist() + [float(lp[i]) for i in extra])
                branches = [self._branch(ids, c, cfg, images, msav_from, eos_ids) for c in cands]
                scores = np.array([np.mean(b[1]) for b in branches])
                choice = select(cand_lp, scores, cfg, None, 1.0, gate_score)
                token = cands[choice]
                z, gate_score = branches[choice][0][-1], branches[choice][1][0]
                out.trace.append({"token": token, "lookahead": True, "score_gate": None, "score_chosen": gate_score,
                                  "branch_scores": scores.tolist(), "candidate_scores": [b[1][0] for b in branches]})
            ids.append(token)
            out.token_ids.append(token)
            if token in eos_ids:
                break
        return out

    def _branch(self, ids: list[int], candidate: int, cfg: SafetyConfig, images, msav_from, eos_ids):
        """(logits after ids + [candidate], probe scores of the candidate and its ``cfg.depth`` greedy continuation
        tokens, up to and including the first end token)."""
        seq = ids + [candidate]
        logits, harm = self.forward(seq, images, cfg, msav_from)
        first, scores = logits, [float(torch.sigmoid(harm[-1]))]
        for _ in range(cfg.depth):
            if seq[-1] in eos_ids:
                break
            seq = seq + [int(torch.argmax(logits[-1]))]
            logits, harm = self.forward(seq, images, cfg, msav_from)
            scores.append(float(torch.sigmoid(harm[-1])))
        return first, scores
