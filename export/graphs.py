"""The torch modules that become the artifact's graphs, and their ONNX export.

Each wrapper holds references to the checkpoint's own submodules (no weight copies) and computes what
one graph computes. Node names follow the module paths (``/layers.12/self_attn/q_proj/MatMul``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from safesteer_models.onnx_ops import OPSET23_DOMAIN
from safesteer_runtime import manifest as m

OPSET = 17  # what the TorchScript exporter writes
BLOCK_OPSET = 23  # decoder blocks, after finish_block: the standard Attention op
TOPK_PLACEHOLDER = 7  # exported as a constant, then rewired to the graph input `top_k`
# Graphs with more weight bytes than this keep them in one external file NAME.data beside NAME (a protobuf
# file cannot exceed 2 GB; 7B-class models pass that with a single 4-layer block or their embedding table).
EXTERNAL_DATA_BYTES = 1 << 30


def data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def load_graph(path: Path) -> tuple[onnx.ModelProto, set[Path]]:
    """The graph at ``path`` with its weights in memory (one parse), and the external files they came from
    (torch writes one per tensor past 2 GB; save_graph removes them)."""
    model = onnx.load(str(path), load_external_data=False)
    files = {path.parent / e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    if files:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model, files


def settle_weights(path: Path, module: nn.Module) -> None:
    """For graphs not rewritten after export (embed, vision): weights where save_graph puts them. Decided from the
    module's own weights, so a small graph is not parsed again."""
    if sum(t.numel() * t.element_size() for t in module.state_dict().values()) > EXTERNAL_DATA_BYTES:
        model, stale = load_graph(path)
        save_graph(model, path, stale)


def data_refs(root: Path, path: Path) -> tuple[m.FileRef, ...]:
    """The manifest's data_files for the graph at ``path``."""
    data = data_path(path)
    return (m.file_ref(root, data),) if data.exists() else ()


def save_graph(model: onnx.ModelProto, path: Path, stale: frozenset[Path] | set[Path] = frozenset()) -> None:
    """Write ``model`` (weights in memory) to ``path``: weights inline, or in ``path``.data past
    EXTERNAL_DATA_BYTES. ``stale``: external files of the graph it replaces, removed first."""
    for f in stale | {data_path(path)}:
        f.unlink(missing_ok=True)  # onnx appends to an existing data file
    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path(path).name, size_threshold=1024)
        data_path(path).chmod(0o644)  # onnx creates it owner-only; the artifact is read by whoever serves it
    else:
        onnx.save_model(model, str(path))


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
    then reads harm_logit there and applies the gated correction (method.md, decoding steps 5 and 6).
    """

    def __init__(self, family, first: int, count: int, probe_layer: int | None = None,
                 msav_layer: int | None = None):
        super().__init__()
        self.family, self.first, self.count = family, first, count
        layers = range(first, first + count)
        self.probe_layer = probe_layer if probe_layer in layers else None
        self.msav_layer = msav_layer if msav_layer in layers else None
        self.layers = nn.ModuleDict({str(i): LayerScope(family, family.text.layers[i]) for i in layers})
        cos, sin = family.rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.probe = ProbeOps()
        self.msav = MsavOps()

    def forward(self, hidden, mask, position_ids, *rest):
        past = rest[: 2 * self.count]
        extra = dict(zip(self.extra_inputs(), rest[2 * self.count :]))
        rope = (position_ids, self.rope_cos, self.rope_sin)
        new_kv, harm_logit = [], None
        for j, (name, layer) in enumerate(self.layers.items()):
            hidden, k, v = layer(hidden, mask, rope, past[2 * j], past[2 * j + 1])
            new_kv += [k, v]
            if int(name) == self.msav_layer:
                hidden = self.msav(hidden, extra[m.MSAV_VECTOR], extra[m.MSAV_BETA], extra[m.MSAV_MASK])
            if int(name) == self.probe_layer:
                hidden, harm_logit = self.probe(hidden, *(extra[n] for n in m.PROBE_INPUTS))
        return (hidden, *new_kv) + ((harm_logit,) if harm_logit is not None else ())

    def extra_inputs(self) -> list[str]:
        names = list(m.MSAV_INPUTS) if self.msav_layer is not None else []
        return names + (list(m.PROBE_INPUTS) if self.probe_layer is not None else [])

    def io_names(self) -> tuple[list[str], list[str]]:
        layers = range(self.first, self.first + self.count)
        inputs = [m.HIDDEN_IN, m.ATTENTION_MASK, m.POSITION_IDS]
        outputs = [m.HIDDEN_OUT]
        for i in layers:
            inputs += [m.past_key(i), m.past_value(i)]
            outputs += [m.new_key(i), m.new_value(i)]
        if self.probe_layer is not None:
            outputs.append(m.HARM_LOGIT)
        return inputs + self.extra_inputs(), outputs

    def sample_extra(self, hidden_size: int, rows: int) -> list[torch.Tensor]:
        one = torch.ones(1)
        values = {m.MSAV_VECTOR: torch.randn(hidden_size), m.MSAV_BETA: one, m.MSAV_MASK: torch.ones(1, rows),
                  m.PROBE_WEIGHT: torch.randn(hidden_size), m.PROBE_BIAS: torch.zeros(1),
                  m.SAFETY_DIRECTION: torch.randn(hidden_size), m.STEER_ALPHA: one, m.GATE_LOGIT: torch.zeros(1)}
        return [values[name] for name in self.extra_inputs()]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {
            m.HIDDEN_IN: {0: "batch", 1: "sequence_length"},
            m.HIDDEN_OUT: {0: "batch", 1: "sequence_length"},
            m.ATTENTION_MASK: {0: "batch", 2: "sequence_length", 3: "total_sequence_length"},
            m.POSITION_IDS: {0: "batch", 1: "sequence_length"},
        }
        for i in range(self.first, self.first + self.count):
            for name in (m.past_key(i), m.past_value(i)):
                axes[name] = {0: "batch", 1: "past_sequence_length"}
            for name in (m.new_key(i), m.new_value(i)):
                axes[name] = {0: "batch", 1: "sequence_length"}
        for name in (m.MSAV_MASK, m.HARM_LOGIT):
            axes[name] = {0: "batch", 1: "sequence_length"}
        return axes


class HeadGraph(nn.Module):
    """Final norm + LM head; full logits plus an in-graph TopK of the log-probabilities."""

    def __init__(self, family):
        super().__init__()
        self.norm = family.text.norm
        self.lm_head = family.text.lm_head

    def forward(self, hidden):
        logits = self.lm_head(self.norm(hidden))
        logprobs = torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, TOPK_PLACEHOLDER, dim=-1)
        return logits, values, ids


def export_module(module: nn.Module, args: tuple, path: Path, inputs, outputs, axes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module, args, str(path), input_names=list(inputs), output_names=list(outputs),
            dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def rewire_topk(path: Path) -> None:
    """Make the head's TopK take K from a graph input, so the runtime picks K per call."""
    model, stale = load_graph(path)
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
    onnx.checker.check_model(model)
    save_graph(model, path, stale)


def finish_block(path: Path, dims: dict[str, list]) -> None:
    """Name the output dims the exporter left anonymous (the K/V head_dim) and move the graph to opset 23
    for the standard Attention op (TorchScript exports up to opset 20; see to_opset23)."""
    model, stale = load_graph(path)
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
    save_graph(model, path, stale)


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


def export_embed(family, path: Path) -> tuple[list[str], list[str]]:
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
    io = ([m.INPUT_IDS], [m.INPUTS_EMBEDS])
    axes = {m.INPUT_IDS: {0: "batch", 1: "sequence_length"}, m.INPUTS_EMBEDS: {0: "batch", 1: "sequence_length"}}
    module = EmbedGraph(family)
    export_module(module, (ids,), path, *io, axes)
    settle_weights(path, module)
    return io


def export_block(family, first: int, count: int, path: Path, probe_layer: int | None = None,
                 msav_layer: int | None = None) -> tuple[list[str], list[str]]:
    sizes = family.sizes()
    block = BlockGraph(family, first, count, probe_layer, msav_layer)
    past_len, rows = 3, 2
    hidden = torch.randn(1, rows, sizes.hidden_size)
    mask = torch.zeros(1, 1, rows, past_len + rows)
    positions = torch.arange(past_len, past_len + rows).unsqueeze(0)
    past = [torch.randn(1, past_len, sizes.num_kv_heads * sizes.head_dim) for _ in range(2 * count)]
    inputs, outputs = block.io_names()
    args = (hidden, mask, positions, *past, *block.sample_extra(sizes.hidden_size, rows))
    export_module(block, args, path, inputs, outputs, block.dynamic_axes())
    kv_shape = ["batch", "sequence_length", sizes.num_kv_heads * sizes.head_dim]
    finish_block(path, {name: kv_shape for name in outputs[1:] if name != m.HARM_LOGIT})
    return inputs, outputs


def export_head(family, path: Path) -> tuple[list[str], list[str]]:
    hidden = torch.randn(1, 2, family.sizes().hidden_size)
    outputs = [m.LOGITS, m.TOPK_LOGPROBS, m.TOPK_IDS]
    axes = {name: {0: "batch", 1: "sequence_length"} for name in [m.HIDDEN_IN, *outputs]}
    export_module(HeadGraph(family), (hidden,), path, [m.HIDDEN_IN], outputs, axes)
    rewire_topk(path)
    return [m.HIDDEN_IN, m.TOP_K], outputs


def export_vision(family, path: Path, image_hw: tuple[int, int]) -> tuple[list[str], list[str]]:
    pixels = torch.randn(1, 3, *image_hw)
    io = ([m.PIXEL_VALUES], [m.IMAGE_FEATURES])
    axes = {m.PIXEL_VALUES: {0: "num_images"}, m.IMAGE_FEATURES: {0: "num_images"}}
    module = family.vision_module()
    export_module(module, (pixels,), path, *io, axes)
    settle_weights(path, module)
    return io
