"""Which external-data files an ONNX graph names, read from its protobuf bytes without the onnx package.

onnxruntime reads a tensor's weights from the file its ``external_data`` entry ``location`` names (relative to the
graph). The manifest hashes the files it lists; this module lets the loader check that a graph names no other
file. Only the message fields that can hold a TensorProto are walked (model -> graph / functions -> nodes ->
attributes -> tensors, subgraphs, sparse tensors); everything else is skipped by length.
"""

from __future__ import annotations

from typing import Iterator

from .errors import ArtifactError

# message -> {field number: the message type it holds} (onnx.proto, the fields that can lead to a TensorProto)
_SCHEMA = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_MAX_DEPTH = 64


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value): bytes for length-delimited fields, int for varints; fixed ones skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ValueError("field runs past the end")
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            value = None
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def _walk(buf: bytes, kind: str, depth: int, found: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("nesting too deep")
    if kind == "entry":
        entry = {f: v for f, w, v in _fields(buf) if w == 2}
        if entry.get(1) == b"location":
            found.add(entry.get(2, b"").decode("utf-8", "replace"))
        return
    children = _SCHEMA[kind]
    for field, wire, value in _fields(buf):
        if wire == 2 and field in children:
            _walk(value, children[field], depth + 1, found)


def external_files(raw: bytes, name: str) -> set[str]:
    """The external-data locations a serialized ModelProto names; an ArtifactError if it does not parse."""
    found: set[str] = set()
    try:
        _walk(raw, "model", 0, found)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{name} is not a readable ONNX graph ({exc}); re-export the artifact") from None
    return found
