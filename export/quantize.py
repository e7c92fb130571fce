"""Lower-precision copies of an exported artifact: int8 / int4 weights, or float16, with an accuracy check.

int8 / int4: onnxruntime's own MatMulNBits quantizer rewrites every MatMul with a constant weight in the
block graphs (block size 32, symmetric; the LM head is in the last block); the embedding table (in the embed
graph, or a text-only model's first block) becomes GatherBlockQuantized with the same blocks (the quantizer's own
at int4; written here at int8, which it has no Gather form for); vision graphs stay float32. A tied embedding
table stays on disk once (the embedding reads the LM head's copy, in its graph or in the last block's data file).
fp16 (for GPUs): onnxruntime's float16 converter turns the embed and block graphs to float16 inside,
float32 at their inputs and outputs (so the runtime and the KV cache layout are unchanged); the head's
LogSoftmax and TopK stay float32 so candidate log-probabilities keep their precision, and GroupQueryAttention
stays float32 so it keeps reading and writing the float32 cache buffers in place.
The check compares the float32 artifact with the quantized one on the runtime itself:
greedy agreement on fixed chat prompts, perplexity on a fixed text, and (calibrated artifacts) the
probe's AUROC at the last prompt position on packaged validation prompts. It is written into the
artifact as quantization.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from safesteer_runtime import manifest as m
from safesteer_runtime.errors import ConfigError

log = logging.getLogger("safesteer.export")

BITS = {"int8": 8, "int4": 4}
PRECISIONS = (*BITS, "fp16")
BLOCK = 32
REPORT = m.QUANTIZATION_REPORT
CHECK_PROMPTS = ("Explain how a refrigerator keeps food cold, step by step.",
                 "Write a short poem about autumn leaves.", "What are three good habits for learning to code?")
CHECK_TOKENS = 32
CHECK_TEXT = (
    "The river rose slowly through the night. By morning the low fields were under water, and the farmers "
    "who had moved their animals to the ridge watched the brown current carry fence posts and branches past "
    "the old mill. Nobody had seen a flood like it since the spring their grandparents were married."
)
PROBE_PROMPTS_PER_CLASS = 24


# a tied table's place in the float32 artifact (data file, offset) -> what its LM head's graph stored for it, as
# TensorProtos that point into that graph's data file (quantize_artifact rewrites the head's graph first): the 8- or
# 4-bit weight and scales at int8 / int4, the float16 table at fp16
Heads = dict


def _quantize_graph(path: Path, bits: int, heads: Heads) -> None:
    """MatMul -> MatMulNBits, and the embedding table's Gather (on input_ids) -> GatherBlockQuantized: at int4 the
    quantizer's (int4 tensors need opset 21, so the graph is raised first), at int8 ours (_blocks_8bit). A tied table
    keeps one quantized copy: the LM head's, which the embedding reads too (in the same graph, or in ``heads`` from
    the last block's graph when the artifact has several)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq
    from onnxruntime.quantization import quant_utils

    from .graph_files import save_graph
    from .graphs import to_opset23

    places = _places(path)
    model = quant_utils.load_model_with_shape_infer(path)
    tied = _transposed_weights(model)
    _pack_shared_matmuls(model.graph)
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    widths = {t.name: t.dims[-1] for t in model.graph.initializer}
    tables = [n.input[0] for n in gathers if n.input[1] == m.INPUT_IDS and widths.get(n.input[0], 1) % BLOCK == 0]
    by_quantizer = bits == 4 and bool(tables)
    if by_quantizer:
        to_opset23(model)
    # accuracy_level 4: activations are quantized to int8 per block inside the kernel (what onnxruntime-genai's
    # CPU builds use for int8 and int4); the accuracy check below measures what that costs
    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                                          quant_format=quant_utils.QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul", "Gather") if by_quantizer else ("MatMul",),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits)
    others = [n.name for n in gathers if n.input[1] != m.INPUT_IDS or n.input[0] not in tables]
    quantizer = mq.MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=others)
    quantizer.process()
    quantized = quantizer.model.model
    for table in tables:
        head = _head_of(quantized.graph, table + ".T", bits) if table in tied else heads.get(places.get(table))
        if head is not None or bits == 8:
            _embed_from_blocks(quantized.graph, table, bits, head)
    _drop_unused_initializers(quantized.graph)  # e.g. a float32 table whose head is now 8- or 4-bit
    save_graph(quantized, path)
    assert not tables or any(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node)
    if tied and not tables:  # the last block's LM head: the graph that embeds reads its table
        saved = onnx.load(str(path), load_external_data=False).graph
        heads.update({places[table]: _head_of(saved, table + ".T", bits) for table in tied if places.get(table)})


def _places(path: Path) -> dict[str, Optional[tuple[str, str]]]:
    """Initializer name -> (data file, offset) of its bytes, None for one stored inside the graph: a tensor two
    graphs share has the same place in both, whatever each names it."""
    import onnx

    places = {}
    for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
        where = {e.key: e.value for e in tensor.external_data}
        places[tensor.name] = (where["location"], where.get("offset", "0")) if "location" in where else None
    return places


def _head_of(graph, weight: str, bits: int):
    """The quantized weight and scales TensorProtos of the MatMulNBits that read ``weight``, or None."""
    node = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{weight}_Q{bits}"), None)
    if node is None:
        return None
    inits = {t.name: t for t in graph.initializer}
    return inits[node.input[1]], inits[node.input[2]]


def _transposed_weights(model) -> list[str]:
    """A tied table is stored once, [vocab, hidden], and the LM head reads it through a Transpose. The quantizer
    wants the MatMul weight as an initializer: add the transposed copy NAME.T (in memory) for it, and return the
    tables so treated (after quantization _embed_from_blocks makes the embedding read the head's copy)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    tied = []
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        users = [n for n in graph.node if node.output[0] in n.input]
        if not users or any(u.op_type != "MatMul" for u in users):
            continue
        name = node.input[0]
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]).T.copy(), name + ".T"))
        for u in users:
            u.input[:] = [name + ".T" if x == node.output[0] else x for x in u.input]
        graph.node.remove(node)
        tied.append(name)
    return tied


def _pack_shared_matmuls(graph) -> None:
    """MatMuls with constant weights that read the same activation (q/k/v, gate/up) become one MatMul over the
    weights side by side, then a Split into the original outputs; a constant bias Add that is each one's only user
    moves before the Split too. Exact (each output column is computed as before), and at int8/int4 it saves per
    layer two kernel calls and two quantizations of the activation (accuracy level 4 quantizes it per call)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    # the exporter writes equal constants once and the others as Identity of it (tiny models' zero biases)
    inits.update({n.output[0]: inits[n.input[0]] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits})
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    stems: set[str] = set()
    for source, matmuls in groups.items():
        if len(matmuls) < 2:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in matmuls]
        adds = [users.get(n.output[0], []) for n in matmuls]
        biased = all(len(u) == 1 and u[0].op_type == "Add" and _bias_of(u[0], n.output[0], inits) is not None
                     for u, n in zip(adds, matmuls))
        stem = matmuls[0].name.rsplit("/", 2)[0] + "/packed"  # /layers.N/packed (q/k/v), /layers.N/mlp/packed
        stem += f"_{len(stems)}" if stem in stems else ""
        stems.add(stem)
        outputs = [u[0].output[0] for u in adds] if biased else [n.output[0] for n in matmuls]
        graph.initializer.extend([
            numpy_helper.from_array(np.concatenate(weights, axis=1), f"{stem}.weight"),
            numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{stem}/split")])
        new = [helper.make_node("MatMul", [source, f"{stem}.weight"], [f"{stem}/MatMul_output_0"], name=f"{stem}/MatMul")]
        packed = new[0].output[0]
        if biased:
            bias = np.concatenate([numpy_helper.to_array(inits[_bias_of(u[0], n.output[0], inits)])
                                   for u, n in zip(adds, matmuls)])
            graph.initializer.append(numpy_helper.from_array(bias, f"{stem}.bias"))
            new.append(helper.make_node("Add", [packed, f"{stem}.bias"], [f"{stem}/Add_output_0"], name=f"{stem}/Add"))
            packed = new[1].output[0]
        new.append(helper.make_node("Split", [packed, f"{stem}/split"], outputs, axis=-1, name=f"{stem}/Split"))
        at = list(graph.node).index(matmuls[0])
        for old in matmuls + ([u[0] for u in adds] if biased else []):
            graph.node.remove(old)
        for i, node in enumerate(new):
            graph.node.insert(at + i, node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]:
        graph.node.remove(node)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _bias_of(add, matmul_output: str, inits) -> Optional[str]:
    """The constant 1-D operand of ``add`` (the other one being ``matmul_output``), or None."""
    other = [x for x in add.input if x != matmul_output]
    return other[0] if len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) == 1 else None


def _embed_from_blocks(graph, table: str, bits: int, head) -> None:
    """The embedding over TABLE becomes a GatherBlockQuantized over ``head`` = the LM head's MatMulNBits weight and
    scales (TensorProtos: this graph's, or another graph's whose bytes stay in that graph's data file), or at int8
    without one over TABLE quantized here the same way (_blocks_8bit). MatMulNBits stores rows of the table in
    blocks of 32 along hidden, [vocab, blocks, bytes per block] (bits < 8: two values per byte, low first), with
    one scale per block and the default zero point (2^(bits-1)), GatherBlockQuantized's default too. Exact: both
    dequantize the same bytes. The stored bytes are read in place (the rows read become resident, the rest stays
    in the mapped data file): a table of our own is stored [vocab, hidden]; the head's is gathered in its own
    [vocab, blocks, bytes] shape, quantized along its last axis, and the gathered rows reshaped to hidden after
    (a Reshape of the table itself would be folded into a copy held in memory)."""
    from onnx import helper, numpy_helper

    node = next(n for n in graph.node if n.input[1:2] == [m.INPUT_IDS]
                and n.input[0] in (table, f"{table}_Q{bits}"))  # the float32 Gather, or the quantizer's
    at = list(graph.node).index(node)
    graph.node.remove(node)
    attrs = dict(domain="com.microsoft", gather_axis=0, block_size=BLOCK, bits=bits)
    if head is None:
        inits = {t.name: t for t in graph.initializer}
        data, scales = _blocks_8bit(numpy_helper.to_array(inits[table]))
        graph.initializer.extend([numpy_helper.from_array(data.reshape(len(data), -1), f"{table}/table"),
                                  numpy_helper.from_array(scales, f"{table}_scales")])
        graph.node.insert(at, helper.make_node(
            "GatherBlockQuantized", [f"{table}/table", m.INPUT_IDS, f"{table}_scales"], list(node.output),
            name=node.name, quantize_axis=1, **attrs))
        return
    weight, scales = head
    names = {t.name for t in graph.initializer}
    graph.initializer.extend(t for t in head if t.name not in names)
    vocab, blocks, _ = weight.dims
    graph.initializer.extend([  # scales as [vocab, blocks, 1]: one per block along the last axis
        numpy_helper.from_array(np.array([vocab, blocks, 1], np.int64), f"{table}/scales_shape"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{table}/rows_shape")])
    graph.node.insert(at, helper.make_node(
        "Reshape", [scales.name, f"{table}/scales_shape"], [f"{table}/scales"], name=f"{node.name}/scales"))
    graph.node.insert(at + 1, helper.make_node(
        "GatherBlockQuantized", [weight.name, m.INPUT_IDS, f"{table}/scales"], [f"{table}/blocks"],
        name=node.name, quantize_axis=2, **attrs))
    graph.node.insert(at + 2, helper.make_node(
        "Reshape", [f"{table}/blocks", f"{table}/rows_shape"], list(node.output), name=f"{node.name}/rows"))


def _blocks_8bit(table: np.ndarray, rows_at_once: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks of BLOCK along the rows (as MatMulNBits stores its weight's columns; the row length a
    multiple of BLOCK): uint8 value + 128, one float32 scale per block (its largest magnitude / 127); [rows, blocks,
    BLOCK] and [rows, blocks]. In slices of rows, so a large table needs little more memory than its 8-bit copy."""
    rows, cols = table.shape
    data = np.empty((rows, cols // BLOCK, BLOCK), np.uint8)
    scales = np.empty((rows, cols // BLOCK), np.float32)
    for start in range(0, rows, rows_at_once):
        part = table[start:start + rows_at_once].reshape(-1, cols // BLOCK, BLOCK)
        scale = np.abs(part).max(axis=2) / np.float32(127.0)
        q = np.rint(part / np.where(scale == 0, np.float32(1.0), scale)[..., None])
        data[start:start + len(part)] = (np.clip(q, -127, 127) + 128).astype(np.uint8)
        scales[start:start + len(part)] = scale
    return data, scales


def _half_graph(path: Path, tables: Heads) -> None:
    """float16 inside, float32 at the graph's inputs and outputs. A tied table stays on disk once: the LM head's graph
    (rewritten first) keeps its float16 copy, recorded in ``tables`` by the float32 table's place, and the graph that
    embeds points its table at those bytes."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from .graph_files import save_graph

    places = _places(path)
    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "LogSoftmax", "TopK", "GroupQueryAttention"])
    graph = model.graph
    embedded = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == m.INPUT_IDS}
    for t in graph.initializer:
        shared = tables.get(places.get(t.name)) if t.name in embedded else None
        if shared is not None and list(shared.dims) == list(t.dims) and shared.data_type == t.data_type:
            name = t.name
            t.CopyFrom(shared)  # dims, type and the pointer into the head graph's data file
            t.name = name
    save_graph(model, path)
    transposed = {n.input[0] for n in graph.node if n.op_type == "Transpose"} - embedded
    saved = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    tables.update({places[name]: saved[name] for name in transposed if places.get(name) and name in saved})


def _probe_prompts(root: Path) -> tuple[list[str], list[int]]:
    from safesteer_data.prompt_sets import HARMFUL, build_sets, packaged_prompts

    seed = json.loads((root / m.CALIBRATION_REPORT).read_text())["config"]["seed"]
    val = [p for p in build_sets(packaged_prompts(seed=seed), seed=seed).validation
           if not p.source.startswith("wrapped_")]  # short plain requests: the check runs on small models too
    pick = [p for p in val if p.label == HARMFUL][:PROBE_PROMPTS_PER_CLASS]
    pick += [p for p in val if p.label != HARMFUL][:PROBE_PROMPTS_PER_CLASS]
    return [p.text for p in pick], [int(p.label == HARMFUL) for p in pick]


def check(fp32_dir: Path, quant_dir: Path) -> dict:
    """Float32 vs quantized on the runtime: greedy agreement, perplexity, probe AUROC."""
    from safesteer_rt import Generator

    from safesteer_data.probe import auroc

    ref, quant = Generator(fp32_dir, verify=False), Generator(quant_dir, verify=False)
    agree, matched, total = [], 0, 0
    for prompt in CHECK_PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        a = ref.generate(msgs, max_new_tokens=CHECK_TOKENS, safety=False).token_ids
        b = quant.generate(msgs, max_new_tokens=CHECK_TOKENS, safety=False).token_ids
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        matched += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    ids = ref.codec.encode(CHECK_TEXT, add_bos=ref.manifest.tokenizer.add_bos_token)
    nll_ref, nll_quant = -ref.token_logprobs(ids).mean(), -quant.token_logprobs(ids).mean()
    out = {"greedy_tokens_before_first_divergence": agree, "greedy_tokens": CHECK_TOKENS,
           "greedy_position_match": matched / total, "perplexity_float32": float(np.exp(nll_ref)),
           "perplexity_quantized": float(np.exp(nll_quant)), "perplexity_text_tokens": len(ids)}
    if ref.manifest.safety is not None:
        texts, labels = _probe_prompts(fp32_dir)
        scores = {name: [g.generate([{"role": "user", "content": t}], max_new_tokens=1, safety=False).prompt_score
                         for t in texts] for name, g in (("float32", ref), ("quantized", quant))}
        out["probe_auroc_float32"] = auroc(np.array(scores["float32"]), np.array(labels))
        out["probe_auroc_quantized"] = auroc(np.array(scores["quantized"]), np.array(labels))
        out["probe_prompts"] = f"{len(texts)} packaged validation prompts (half harmful), last prompt position"
    return out


def quantize_artifact(fp32_dir: Path, out_dir: Path, precision: str,
                      progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write a quantized copy of the artifact at ``fp32_dir`` to ``out_dir`` (via out_dir.partial)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--quantize must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from .graph_files import data_refs

    say = progress or log.info
    manifest = m.load_manifest(fp32_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(fp32_dir, staging)
    # last graph first: a tied LM head reads the table from the embedding graph's data file, which must still hold
    # the float32 bytes when the head's graph is loaded; at int4 the embedding then reads the head's 4-bit table
    heads: Heads = {}
    for entry in reversed(manifest.graphs):
        if precision == "fp16" and entry.role in (m.ROLE_EMBED, m.ROLE_BLOCK):
            _half_graph(staging / entry.file.path, heads)
            say(f"converted {entry.file.path} to float16")
        elif precision in BITS and entry.role in (m.ROLE_EMBED, m.ROLE_BLOCK):
            _quantize_graph(staging / entry.file.path, BITS[precision], heads)
            say(f"quantized {entry.file.path} to {precision}")
    graphs = [dataclasses.replace(entry, file=m.file_ref(staging, staging / entry.file.path),
                                  data_files=data_refs(staging, staging / entry.file.path))
              for entry in manifest.graphs]
    report = check(fp32_dir, _with_manifest(staging, manifest, graphs, precision, extra=()))
    block = {"block_size": BLOCK} if precision in BITS else {}
    (staging / REPORT).write_text(json.dumps({"precision": precision, **block, **report}, indent=2))
    _with_manifest(staging, manifest, graphs, precision, extra=(m.file_ref(staging, staging / REPORT),))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return report


def _with_manifest(root: Path, manifest: m.Manifest, graphs: list, precision: str, extra: tuple) -> Path:
    updated = dataclasses.replace(manifest, graphs=tuple(graphs),
                                  export=dataclasses.replace(manifest.export, weights=precision),
                                  extra_files=tuple(manifest.extra_files) + tuple(extra))
    (root / m.MANIFEST_NAME).write_text(updated.to_json(), encoding="utf-8")
    return root
