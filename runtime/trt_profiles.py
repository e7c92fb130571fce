"""TensorRT optimisation profiles for the artifact's graphs: one for decoding, one for prefill.

TensorRT builds kernels for a range of input shapes per profile and picks them for the "opt" shape. A
decode step feeds 1 row (or the K lookahead candidates) over a long past; a prefill feeds many rows over
no past. One profile covering both would tune for neither, so each graph gets two: profile 0 for decoding
(rows 1..DECODE_MAX_ROWS, opt 1), profile 1 for prefill (rows 1..max_tokens, opt PREFILL_OPT_ROWS). Shapes
are given for every dynamic input (onnxruntime needs all or none) in its provider-option syntax: the same
input listed once per profile, ``name:1x1x896,name:1x512x896``.
"""

from __future__ import annotations

from . import manifest as m

DECODE_MAX_ROWS = 256  # SafetyConfig.k's upper bound: the lookahead candidates are rows of one call
PREFILL_OPT_ROWS = 256
DECODE_OPT_PAST = 512


def _template(name: str, hidden: int, kv_row: tuple[int, ...], mrope: bool):
    """Input shape in symbols: S rows in this call, P past positions, T = P + S, R head rows (1 at min and opt,
    up to S); None for static inputs. ``mrope``: position_ids have three rows (sizes.mrope_sections)."""
    if name in (m.HIDDEN_IN,):
        return (1, "S", hidden)
    if name in (m.ATTENTION_MASK, m.SLIDING_MASK):
        return (1, 1, "S", "T")
    if name == m.POSITION_IDS and mrope:
        return (3, 1, "S")
    if name in (m.POSITION_IDS, m.MSAV_MASK, m.INPUT_IDS):
        return (1, "S")
    if name.startswith(("past_key", "past_value")):
        return (1, "P", *kv_row)
    if name == m.HEAD_ROWS:  # the LM head's rows: usually 1, the K candidates in a lookahead step
        return ("R",)
    return None  # top_k, SafeSteer vectors and knobs: fixed shapes; pixel_values: left to onnxruntime


def profile_options(inputs: list[str], hidden: int, kv_row: tuple[int, ...], max_tokens: int,
                    mrope: bool = False) -> dict[str, str]:
    """TensorRT provider options (trt_profile_min/opt/max_shapes) for a graph with these input names;
    {} when none of them is dynamic."""
    decode_rows = min(DECODE_MAX_ROWS, max_tokens)
    opt_past = min(DECODE_OPT_PAST, max_tokens - 1)
    opt_rows = min(PREFILL_OPT_ROWS, max_tokens)
    # (S, P) for min / opt / max, per profile
    profiles = [((1, 0), (1, opt_past), (decode_rows, max_tokens)),
                ((1, 0), (opt_rows, 0), (max_tokens, max_tokens))]
    dynamic = [(n, t) for n in inputs if (t := _template(n, hidden, kv_row, mrope)) is not None]
    if not dynamic:
        return {}
    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        specs = []
        for profile in profiles:
            rows, past = profile[i]
            env = {"S": rows, "P": past, "T": rows + past, "R": rows if key.endswith("max_shapes") else 1}
            for name, template in dynamic:
                dims = [env[d] if isinstance(d, str) else d for d in template]
                specs.append(f"{name}:{'x'.join(str(d) for d in dims)}")
        out[key] = ",".join(specs)
    return out
