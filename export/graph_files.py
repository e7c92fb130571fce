"""Graph files on disk: each graph's weights live in one NAME.onnx.data beside it, and the export's weight writer.

The export traces each graph without its weights (an exporter writing them would hold two or three copies: its
parameter dict, the serialized protobuf, the bytes handed back to Python) and then writes the checkpoint's tensors
itself, one at a time, straight from the torch module into the data file. So exporting a graph costs about one
tensor of memory on top of the loaded checkpoint, whatever the graph's size. External data also keeps every graph
under protobuf's 2 GB limit; tensors start page-aligned so onnxruntime can map rather than copy them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from safesteer_runtime import manifest as m

INLINE_BYTES = 1024  # tensors up to this size (shapes, scalars, axes) stay inside the graph
CHUNK_BYTES = 32 << 20  # a transposed weight is written in bands of about this size
ALIGN = 4096  # external tensors start on a page boundary: onnxruntime maps those instead of reading them


def data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def data_refs(root: Path, path: Path) -> tuple[m.FileRef, ...]:
    """The manifest's data_files for the graph at ``path``."""
    data = data_path(path)
    return (m.file_ref(root, data),) if data.exists() else ()


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` (weights in memory) to ``path``, its weights to ``path``.data."""
    data_path(path).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_path(path).name, size_threshold=INLINE_BYTES)
    if data_path(path).exists():
        data_path(path).chmod(0o644)  # onnx creates it owner-only; the artifact is read by whoever serves it


@dataclass(frozen=True)
class _Weight:
    source: str  # the module's state_dict key
    transpose: bool  # a Linear weight, stored as the [in, out] matrix its MatMul reads


def bind_weights(model: onnx.ModelProto, module: nn.Module) -> dict[str, _Weight]:
    """Turn the graph inputs the exporter made for ``module``'s weights (``export_params=False``) into initializer
    declarations (no data yet: write_graph fills them in), folding each Linear's ``Transpose`` into its weight, and
    move large Constant nodes (traced buffers such as rotary tables) into initializers."""
    graph = model.graph
    state = module.state_dict()
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan: dict[str, _Weight] = {}

    def declare(name: str, source: str, transpose: bool) -> None:
        tensor = state[source]
        plan[name] = _Weight(source, transpose)
        graph.initializer.append(onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype),
            dims=list(tensor.shape[::-1] if transpose else tensor.shape)))

    for inp in [i for i in graph.input if i.name in state]:
        graph.input.remove(inp)
        users = consumers.get(inp.name, [])
        transposes = [u for u in users if u.op_type == "Transpose" and state[inp.name].dim() == 2
                      and list(onnx.helper.get_attribute_value(u.attribute[0])) == [1, 0]]
        if transposes and len(transposes) == len(users):  # Linear weights: stored as the [in, out] matrix their
            for t in transposes:  # MatMul reads, named NAME.T
                for node in consumers.get(t.output[0], []):
                    node.input[:] = [inp.name + ".T" if x == t.output[0] else x for x in node.input]
                graph.node.remove(t)
            declare(inp.name + ".T", inp.name, True)
        else:  # a tied embedding table (its Gather and the LM head's Transpose) is stored once
            declare(inp.name, inp.name, False)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        value = numpy_helper.to_array(node.attribute[0].t)
        if value.nbytes > INLINE_BYTES:
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            graph.node.remove(node)
    return plan


def write_graph(model: onnx.ModelProto, module: nn.Module, plan: dict[str, _Weight], path: Path) -> None:
    """Save ``model`` with its weights in ``path``.data: those bind_weights declared, read from ``module`` one tensor
    at a time, and any other initializer over INLINE_BYTES (rotary tables, ...)."""
    state = module.state_dict()

    def pieces(t: onnx.TensorProto):
        """The tensor's bytes in order; a transposed weight in row bands, so no whole transposed copy is made."""
        if t.name not in plan:
            yield numpy_helper.to_array(t)
            return
        w = plan[t.name]
        weight = state[w.source].detach().numpy()
        if not w.transpose:
            yield np.ascontiguousarray(weight)
            return
        rows = max(1, CHUNK_BYTES // max(1, weight.shape[0] * weight.itemsize))
        for start in range(0, weight.shape[1], rows):
            yield np.ascontiguousarray(weight[:, start:start + rows].T)

    external = [t for t in model.graph.initializer if t.name in plan or len(t.raw_data) > INLINE_BYTES]
    data_path(path).unlink(missing_ok=True)
    if external:
        with open(data_path(path), "wb") as fh:
            for t in external:
                fh.write(b"\0" * (-fh.tell() % ALIGN))
                offset = fh.tell()
                for piece in pieces(t):
                    fh.write(memoryview(piece).cast("B"))
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_path(path).name), ("offset", str(offset)),
                                   ("length", str(fh.tell() - offset))):
                    t.external_data.add(key=key, value=value)
        data_path(path).chmod(0o644)
    onnx.save_model(model, str(path))
