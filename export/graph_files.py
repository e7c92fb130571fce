"""Graph files on disk: each graph's weights live in one NAME.onnx.data beside it, and the export's weight writer.

A tensor one graph already wrote is not written again: a tied LM head in the last block reads the embedding table
from the data file of the graph that embeds (the first block, or the embed graph), through a Transpose, so the
table is on disk once whatever the block size. The export passes one ``Written`` record through its graphs.

The export traces each graph without its weights (an exporter writing them would hold two or three copies: its
parameter dict, the serialized protobuf, the bytes handed back to Python) and then writes the checkpoint's tensors
itself, one at a time, straight from the torch module into the data file. So exporting a graph costs about one
tensor of memory on top of the loaded checkpoint, whatever the graph's size. External data also keeps every graph
under protobuf's 2 GB limit; tensors start page-aligned so onnxruntime can map rather than copy them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    """The manifest's data_files for the graph at ``path``: every file its external tensors are in (its own
    NAME.onnx.data, and another graph's where it shares a tensor)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    files = sorted({e.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    return tuple(m.file_ref(root, path.parent / name) for name in files)


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
    stored: Optional[tuple[str, int, int]] = None  # already in another graph's data file: (file, offset, length)


Written = dict  # torch storage address -> (data file name, offset, length) of tensors written untransposed


def bind_weights(model: onnx.ModelProto, module: nn.Module, written: Optional[Written] = None) -> dict[str, _Weight]:
    """Turn the graph inputs the exporter made for ``module``'s weights (``export_params=False``) into initializer
    declarations (no data yet: write_graph fills them in), folding each Linear's ``Transpose`` into its weight
    unless the tensor is in ``written`` already (a tied LM head: it keeps its Transpose and reads those bytes), and
    move large Constant nodes (traced buffers such as rotary tables) into initializers."""
    written = {} if written is None else written
    graph = model.graph
    state = module.state_dict()
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan: dict[str, _Weight] = {}

    def declare(name: str, source: str, transpose: bool) -> None:
        tensor = state[source]
        plan[name] = _Weight(source, transpose, None if transpose else written.get(tensor.data_ptr()))
        graph.initializer.append(onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype),
            dims=list(tensor.shape[::-1] if transpose else tensor.shape)))

    for inp in [i for i in graph.input if i.name in state]:
        graph.input.remove(inp)
        users = consumers.get(inp.name, [])
        transposes = [u for u in users if u.op_type == "Transpose" and state[inp.name].dim() == 2
                      and list(onnx.helper.get_attribute_value(u.attribute[0])) == [1, 0]]
        shared = state[inp.name].data_ptr() in written
        if transposes and len(transposes) == len(users) and not shared:  # Linear weights: stored as the [in, out]
            for t in transposes:  # matrix their MatMul reads, named NAME.T
                for node in consumers.get(t.output[0], []):
                    node.input[:] = [inp.name + ".T" if x == t.output[0] else x for x in node.input]
                graph.node.remove(t)
            declare(inp.name + ".T", inp.name, True)
        else:  # a tied embedding table (its Gather and the LM head's Transpose, or another graph's) is stored once
            declare(inp.name, inp.name, False)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        value = numpy_helper.to_array(node.attribute[0].t)
        if value.nbytes > INLINE_BYTES:
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            graph.node.remove(node)
    return plan


def write_graph(model: onnx.ModelProto, module: nn.Module, plan: dict[str, _Weight], path: Path,
                written: Optional[Written] = None) -> None:
    """Save ``model`` with its weights in ``path``.data: those bind_weights declared, read from ``module`` one tensor
    at a time (or pointed at another graph's file where it holds them), and any other initializer over INLINE_BYTES
    (rotary tables, ...). Untransposed weights written here are recorded in ``written``."""
    state = module.state_dict()
    written = {} if written is None else written

    def point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)

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
    for t in [t for t in external if t.name in plan and plan[t.name].stored]:
        point(t, *plan[t.name].stored)
        external.remove(t)
    data_path(path).unlink(missing_ok=True)
    if external:
        with open(data_path(path), "wb") as fh:
            for t in external:
                fh.write(b"\0" * (-fh.tell() % ALIGN))
                offset = fh.tell()
                for piece in pieces(t):
                    fh.write(memoryview(piece).cast("B"))
                point(t, data_path(path).name, offset, fh.tell() - offset)
                if t.name in plan and not plan[t.name].transpose:
                    written[state[plan[t.name].source].data_ptr()] = (data_path(path).name, offset, fh.tell() - offset)
        data_path(path).chmod(0o644)
    onnx.save_model(model, str(path))
