"""The torch modules that become the artifact's graphs, and their ONNX export.

Each wrapper holds references to the checkpoint's own submodules (no weight copies) and computes what
one graph computes. Node names follow the module paths (``/layers.12/self_attn/q_proj/MatMul``), weights keep
their checkpoint names (``layers.12.self_attn.q_proj.weight``). Graphs are traced without weights, rewritten,
then written with the weights streamed from the module (graph_files.py).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from safesteer_models.onnx_ops import OPSET23_DOMAIN, in_place_cache, rows_may_look_ahead
from safesteer_runtime import manifest as m

from .graph_files import Written, bind_weights, write_graph

OPSET = 17  # what the TorchScript exporter writes
BLOCK_OPSET = 23  # decoder blocks, after finish_block: the standard Attention op
TOPK_PLACEHOLDER = 7  # exported as a constant, then rewired to the graph input `top_k`
class EmbedGraph(nn.Module):
    def __init__(self, family):
        super().__init__()
        self.family = family
        self.embed_tokens = family.text.embed_tokens

    def forward(self, input_ids):
        return self.family.embed(input_ids)


class LayerScope(nn.Module):
    """Holds one HF decoder layer's submodules under their own names, so graph nodes read
    ``/layers.N/self_attn/q_proj/MatMul``; other attributes fall through to the HF layer."""

    def __init__(self, family, layer: nn.Module):
        super().__init__()
        self.family = family
        for name, child in layer.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_hf_layer", layer)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_hf_layer"), name)

    def forward(self, hidden, mask, rope, past_k, past_v):
        return self.family.layer_forward(self, hidden, mask, rope, past_k, past_v)


class ProbeOps(nn.Module):
    """SafeSteer's Decoding-Probe and gated activation correction at the probe layer's output."""

    def forward(self, hidden, weight, bias, direction, alpha, gate_logit):
        harm_logit = torch.matmul(hidden, weight) + bias  # [b, s], read before the correction
        gate = (harm_logit >= gate_logit).to(hidden.dtype)
        return hidden + alpha * gate.unsqueeze(-1) * direction, harm_logit


class MsavOps(nn.Module):
    """The modal semantic alignment vector, added where ``mask`` is 1 (post-image text, generated tokens)."""

    def forward(self, hidden, vector, beta, mask):
        return hidden + beta * mask.unsqueeze(-1) * vector


class BlockGraph(nn.Module):
    """Decoder layers [first, first + count) with an external KV cache and a 4-D additive mask.

    The block holding the MSAV layer adds the MSAV after that layer; the block holding the probe layer
    then reads harm_logit there and applies the gated correction (docs/method.md, section 2).
    ``embeds``: the first block of a text-only model takes input_ids and embeds them itself; ``head``: the last
    block ends in the final norm and LM head over the rows ``head_rows`` picks, with full logits and an in-graph
    TopK of the log-probabilities. So a text-only model in one block is one graph call per decoding step.
    """

    def __init__(self, family, first: int, count: int, probe_layer: int | None = None,
                 msav_layer: int | None = None, *, embeds: bool = False, head: bool = False):
        super().__init__()
        self.family, self.first, self.count = family, first, count
        layers = range(first, first + count)
        self.probe_layer = probe_layer if probe_layer in layers else None
        self.msav_layer = msav_layer if msav_layer in layers else None
        if embeds:
            self.embed_tokens = family.text.embed_tokens
        self.layers = nn.ModuleDict({str(i): LayerScope(family, family.text.layers[i]) for i in layers})
        if head:
            self.norm, self.lm_head = family.text.norm, family.text.lm_head
        self.embeds, self.head = embeds, head
        self.sliding = {i for i in layers if i in family.sliding_layers}  # these read SLIDING_MASK
        self.full = len(self.sliding) < count  # some layer reads ATTENTION_MASK
        self.rope_kinds = {i: family.rope_kind(i) for i in layers}
        for kind in sorted(set(self.rope_kinds.values())):
            cos, sin = family.rope_tables(kind)
            self.register_buffer(f"rope_cos_{kind}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{kind}", sin, persistent=False)
        self.in_place = in_place_cache()  # GroupQueryAttention over cache buffers (else standard ops, new rows out)
        self.probe = ProbeOps()
        self.msav = MsavOps()

    def forward(self, *inputs):
        x = dict(zip(self.io_names()[0], inputs))  # the graph inputs, by name
        hidden = self.family.embed(x[m.INPUT_IDS]) if self.embeds else x[m.HIDDEN_IN]
        new_kv, harm_logit = [], None
        ropes = {kind: self.family.rope_inputs(x[m.POSITION_IDS], getattr(self, f"rope_cos_{kind}"),
                                               getattr(self, f"rope_sin_{kind}"))
                 for kind in sorted(set(self.rope_kinds.values()))}
        for i in range(self.first, self.first + self.count):
            rope = ropes[self.rope_kinds[i]]
            mask = x[m.SLIDING_MASK if i in self.sliding else m.ATTENTION_MASK]
            hidden, k, v = self.layers[str(i)](hidden, mask, rope, x[m.past_key(i)], x[m.past_value(i)])
            new_kv += [k, v]
            if i == self.msav_layer:
                hidden = self.msav(hidden, x[m.MSAV_VECTOR], x[m.MSAV_BETA], x[m.MSAV_MASK])
            if i == self.probe_layer:
                hidden, harm_logit = self.probe(hidden, *(x[n] for n in m.PROBE_INPUTS))
        out = self.lm_outputs(hidden.index_select(1, x[m.HEAD_ROWS])) if self.head else (hidden,)
        return (*out, *new_kv) + ((harm_logit,) if harm_logit is not None else ())

    def lm_outputs(self, hidden):
        logits = self.lm_head(self.norm(hidden))
        cap = self.family.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logprobs = torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, TOPK_PLACEHOLDER, dim=-1)
        return logits, values, ids

    def extra_inputs(self) -> list[str]:
        names = list(m.MSAV_INPUTS) if self.msav_layer is not None else []
        return names + (list(m.PROBE_INPUTS) if self.probe_layer is not None else [])

    def io_names(self) -> tuple[list[str], list[str]]:
        """Graph inputs and outputs in the order forward takes and returns them (top_k is added by rewire_topk)."""
        inputs = [m.INPUT_IDS if self.embeds else m.HIDDEN_IN]
        inputs += [m.ATTENTION_MASK] if self.full else []
        inputs += [m.SLIDING_MASK] if self.sliding else []
        inputs += [m.POSITION_IDS]
        inputs += [m.HEAD_ROWS] if self.head else []
        outputs = [m.LOGITS, m.TOPK_LOGPROBS, m.TOPK_IDS] if self.head else [m.HIDDEN_OUT]
        inputs += self.past_names()
        outputs += self.new_kv_names()
        if self.probe_layer is not None:
            outputs.append(m.HARM_LOGIT)
        return inputs + self.extra_inputs(), outputs

    def past_names(self) -> list[str]:
        return [f(i) for i in range(self.first, self.first + self.count) for f in (m.past_key, m.past_value)]

    def new_kv_names(self) -> list[str]:
        names = (m.present_key, m.present_value) if self.in_place else (m.new_key, m.new_value)
        return [f(i) for i in range(self.first, self.first + self.count) for f in names]

    def kv_shapes(self, sizes) -> tuple[list, list]:
        """(past input shape, K/V output shape), dims named where they vary."""
        if self.in_place:
            buffer = ["batch", sizes.num_kv_heads, "capacity", sizes.head_dim]
            return buffer, buffer
        return (["batch", "past_sequence_length", sizes.num_kv_heads * sizes.head_dim],
                ["batch", "sequence_length", sizes.num_kv_heads * sizes.head_dim])

    def sample_inputs(self, sizes, past_len: int = 3, rows: int = 2) -> tuple:
        """Tracing inputs, in io_names order."""
        hidden, one = sizes.hidden_size, torch.ones(1)
        values = {m.INPUT_IDS: torch.tensor([[5] * rows]), m.HIDDEN_IN: torch.randn(1, rows, hidden),
                  m.ATTENTION_MASK: torch.zeros(1, 1, rows, past_len + rows),
                  m.SLIDING_MASK: torch.zeros(1, 1, rows, past_len + rows),
                  m.POSITION_IDS: self.positions(torch.arange(past_len, past_len + rows).unsqueeze(0), sizes),
                  m.HEAD_ROWS: torch.tensor([rows - 1]),
                  m.MSAV_VECTOR: torch.randn(hidden), m.MSAV_BETA: one, m.MSAV_MASK: torch.ones(1, rows),
                  m.PROBE_WEIGHT: torch.randn(hidden), m.PROBE_BIAS: torch.zeros(1),
                  m.SAFETY_DIRECTION: torch.randn(hidden), m.STEER_ALPHA: one, m.GATE_LOGIT: torch.zeros(1)}
        named = {"batch": 1, "capacity": past_len + rows + 1, "past_sequence_length": past_len}
        past = [named.get(d, d) for d in self.kv_shapes(sizes)[0]]
        values.update({name: torch.randn(*past) for name in self.past_names()})
        return tuple(values[name] for name in self.io_names()[0])

    @staticmethod
    def positions(rows: torch.Tensor, sizes) -> torch.Tensor:
        """position_ids for ``rows`` [b, s]: the same on all three rows for multimodal RoPE."""
        return rows.expand(3, -1, -1).contiguous() if sizes.mrope_sections else rows

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        rows = {0: "batch", 1: "sequence_length"}
        axes = {name: rows for name in (m.INPUT_IDS, m.HIDDEN_IN, m.HIDDEN_OUT, m.POSITION_IDS, m.MSAV_MASK,
                                        m.HARM_LOGIT)}
        past, new = self.kv_shapes(self.family.sizes())
        axes.update({name: {i: d for i, d in enumerate(past) if isinstance(d, str)} for name in self.past_names()})
        axes.update({name: {i: d for i, d in enumerate(new) if isinstance(d, str)} for name in self.new_kv_names()})
        axes[m.ATTENTION_MASK] = {0: "batch", 2: "sequence_length", 3: "total_sequence_length"}
        axes[m.SLIDING_MASK] = axes[m.ATTENTION_MASK]
        if self.family.sizes().mrope_sections:
            axes[m.POSITION_IDS] = {1: "batch", 2: "sequence_length"}
        axes[m.HEAD_ROWS] = {0: "head_rows"}
        axes.update({name: {0: "batch", 1: "head_rows"} for name in (m.LOGITS, m.TOPK_LOGPROBS, m.TOPK_IDS)})
        inputs, outputs = self.io_names()
        return {name: axis for name, axis in axes.items() if name in inputs or name in outputs}


@contextlib.contextmanager
def _weights_hidden_from_shape_inference():
    """The TorchScript exporter's ONNX shape inference pass serializes every parameter it is given (two transient
    copies of the graph's weights, even with export_params=False). Weights never decide a shape in our graphs, so
    the pass gets none: the graph and its inferred shapes are the same, the copies are gone."""
    infer = torch._C._jit_pass_onnx_graph_shape_type_inference
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda graph, _params, opset: infer(graph, {}, opset)
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


def export_module(module: nn.Module, args: tuple, path: Path, inputs, outputs, axes, rewrite=None,
                  written: Written | None = None) -> None:
    """Trace ``module`` without its weights, apply ``rewrite`` (a function of the ModelProto) and write it to
    ``path`` with the weights (those in ``written`` by an earlier graph are referenced there, not written again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _weights_hidden_from_shape_inference():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module, args, buf, input_names=list(inputs), output_names=list(outputs), dynamic_axes=axes,
            opset_version=OPSET, export_params=False, do_constant_folding=False, dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    plan = bind_weights(model, module, written)
    if rewrite is not None:
        rewrite(model)
    write_graph(model, module, plan, path, written)


def rewire_topk(model: onnx.ModelProto) -> None:
    """Make the head's TopK take K from a graph input, so the runtime picks K per call."""
    graph = model.graph
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert len(topk) == 1, "head graph must hold exactly one TopK"
    placeholder = topk[0].input[1]
    topk[0].input[1] = m.TOP_K
    if not any(placeholder in n.input for n in graph.node):
        keep = [n for n in graph.node if placeholder not in n.output]
        del graph.node[:]
        graph.node.extend(keep)
        keep_init = [t for t in graph.initializer if t.name != placeholder]
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
    graph.input.append(onnx.helper.make_tensor_value_info(m.TOP_K, onnx.TensorProto.INT64, [1]))
    for out in graph.output:
        if out.name in (m.TOPK_LOGPROBS, m.TOPK_IDS):
            dim = out.type.tensor_type.shape.dim[2]
            dim.Clear()
            dim.dim_param = "top_k"


def finish_block(model: onnx.ModelProto, dims: dict[str, list]) -> None:
    """Name the output dims the exporter left anonymous (the K/V head_dim) and move the graph to opset 23
    for the standard Attention op (TorchScript exports up to opset 20; see to_opset23)."""
    for out in model.graph.output:
        if out.name in dims:
            shape = out.type.tensor_type.shape
            for dim, want in zip(shape.dim, dims[out.name]):
                dim.Clear()
                if isinstance(want, str):
                    dim.dim_param = want
                else:
                    dim.dim_value = want
    fuse_residual_norms(model.graph)
    _import_domain(model, "com.microsoft")
    to_opset23(model)


def fuse_residual_norms(graph: onnx.GraphProto) -> None:
    """Fold each residual Add that feeds an RMSNorm (the previous layer's output into the next layer's input norm)
    into one com.microsoft SkipSimplifiedLayerNormalization, which also yields the sum for the residual path.
    A wrong shape here cannot pass silently: the exporter's validation runs every block against PyTorch."""
    producers = {out: node for node in graph.node for out in node.output}
    consts = {t.name for t in graph.initializer}
    norms = [n for n in graph.node if n.op_type == "SimplifiedLayerNormalization" and n.domain == OPSET23_DOMAIN]
    for norm in norms:
        add = producers.get(norm.input[0])
        if add is None or add.op_type != "Add" or any(name in consts for name in add.input):
            continue
        eps = [a for a in norm.attribute if a.name == "epsilon"]
        fused = onnx.helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=f"{norm.name}/skip", domain="com.microsoft")
        fused.attribute.extend(eps)
        at = list(graph.node).index(add)
        graph.node.remove(norm)
        graph.node.remove(add)
        graph.node.insert(at, fused)


def _import_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    used = any(n.domain == domain for n in model.graph.node)
    if used and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def to_opset23(model: onnx.ModelProto) -> None:
    """Raise the default-domain opset of a graph exported at OPSET to BLOCK_OPSET in place: the ops our blocks use
    are unchanged between them except the Reduce* family (axes became an input in opset 18); nodes in the
    placeholder domain (onnx_ops.OPSET23_DOMAIN) become standard ops."""
    graph = model.graph
    for node in graph.node:
        if node.domain == OPSET23_DOMAIN:
            node.domain = ""
        elif node.domain == "" and node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            axes = [a for a in node.attribute if a.name == "axes"]
            if axes:
                name = f"{node.name}/axes"
                graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes[0].ints, np.int64), name))
                node.input.append(name)
                node.attribute.remove(axes[0])
    imports = [o for o in model.opset_import if o.domain != OPSET23_DOMAIN]
    for o in imports:
        if o.domain == "":
            o.version = BLOCK_OPSET
    del model.opset_import[:]
    model.opset_import.extend(imports)
    model.ir_version = max(model.ir_version, 10)


def export_embed(family, path: Path, written: Written | None = None) -> tuple[list[str], list[str]]:
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    io_names = ([m.INPUT_IDS], [m.INPUTS_EMBEDS])
    axes = {m.INPUT_IDS: {0: "batch", 1: "sequence_length"}, m.INPUTS_EMBEDS: {0: "batch", 1: "sequence_length"}}
    export_module(EmbedGraph(family), (ids,), path, *io_names, axes, written=written)
    return io_names


def export_block(family, first: int, count: int, path: Path, probe_layer: int | None = None,
                 msav_layer: int | None = None, *, embeds: bool = False, head: bool = False,
                 written: Written | None = None) -> tuple[list[str], list[str]]:
    sizes = family.sizes()
    block = BlockGraph(family, first, count, probe_layer, msav_layer, embeds=embeds, head=head)
    inputs, outputs = block.io_names()
    dims = {name: block.kv_shapes(sizes)[1] for name in block.new_kv_names()}

    def rewrite(model: onnx.ModelProto) -> None:
        if head:
            rewire_topk(model)
        finish_block(model, dims)

    with rows_may_look_ahead(family.bidirectional_images):
        export_module(block, block.sample_inputs(sizes), path, inputs, outputs, block.dynamic_axes(), rewrite,
                      written)
    return inputs + ([m.TOP_K] if head else []), outputs


def export_vision(family, path: Path, feeds: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """``feeds``: sample inputs by name (the validation sample's). Dimension 0 of every input and of the features
    is the number of vision calls (or patches); masks over patches are [1, 1, patches, patches]."""
    io_names = (family.vision_inputs(), family.vision_outputs())
    axes = {name: {0: "calls"} for name in (m.PIXEL_VALUES, m.VISION_POSITIONS, m.IMAGE_FEATURES)}
    axes.update({name: {2: "calls", 3: "calls"} for name in (m.VISION_MASK, m.VISION_WINDOW_MASK)})
    axes = {name: axis for name, axis in axes.items() if name in io_names[0] or name in io_names[1]}
    if m.VISION_POSITIONS in io_names[0]:  # merged tokens: a quarter of the patches
        axes[m.IMAGE_FEATURES] = {0: "tokens"}
    sample = tuple(torch.from_numpy(feeds[name]) for name in io_names[0])
    export_module(family.vision_module(), sample, path, *io_names, axes)
    return io_names
