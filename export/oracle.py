"""The PyTorch reference of SafeSteer decoding (method.md), on the Hugging Face model with forward hooks.

Deliberately the plain way: no KV cache, no tree mask. Every candidate is scored by a full forward over
prefix + [candidate], so the runtime's one-pass lookahead, tree mask and KV commit are checked against
an implementation that has none of them. Greedy only. Never imported by the runtime.
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
        z = logits[-1]
        for step in range(max_new_tokens):
            lp = torch.log_softmax(z, dim=-1)
            if cfg.k > 1 and step < cfg.lookahead_steps:
                top_lp, top_ids = torch.topk(lp, cfg.k)
                rows = [self.forward(ids + [int(c)], images, cfg, msav_from) for c in top_ids]
                harm_rows = torch.stack([r[1][-1] for r in rows])
                scores = torch.sigmoid(harm_rows).numpy()
                choice = select(top_lp.numpy(), scores, cfg, None, 1.0)
                token = int(top_ids[choice])
                z = rows[choice][0][-1]
                out.trace.append({"token": token, "score_top1": float(scores[0]), "score_chosen": float(scores[choice]),
                                  "harm_logits": harm_rows.numpy().tolist()})
            else:
                token = int(torch.argmax(z))
                if token not in eos_ids and step < max_new_tokens - 1:  # the last token is not fed (as in the Generator)
                    logits, harm = self.forward(ids + [token], images, cfg, msav_from)
                    z = logits[-1]
                    out.trace.append({"token": token, "score_chosen": float(torch.sigmoid(harm[-1]))})
            ids.append(token)
            out.token_ids.append(token)
            if token in eos_ids:
                break
        return out
