"""The exporter's own checks: validation against PyTorch catches a wrong graph; chat templates are found."""

from __future__ import annotations

import json

import pytest

from conftest import vision_variants
from safesteer_runtime.errors import ArtifactError, ConfigError, ExportValidationError


def test_wrong_graph_fails_validation_with_every_mismatch(tiny, tmp_path, monkeypatch):
    from safesteer_export.pipeline import ExportConfig, export_artifact
    from safesteer_models import llama

    def off_by_one_percent(*args):  # a plausible export bug: a layer's output slightly wrong
        hidden, k, v = llama.llama_layer_forward(*args)
        return hidden * 1.01, k, v

    monkeypatch.setattr(llama.LlamaFamily, "layer_forward", staticmethod(off_by_one_percent))
    out = tmp_path / "out"
    with pytest.raises(ExportValidationError) as err:
        export_artifact(ExportConfig(tiny.checkpoint("LlamaForCausalLM", "gqa"), out, block_size=2, safety=False))
    names = "\n".join(err.value.mismatches)
    # both blocks, both the prefill and the cached pass, are reported in one error
    for what in ("block 0-1 prefill", "block 0-1 cached", "block 2-3 prefill", "block 2-3 cached"):
        assert what in names
    assert not out.exists()


@pytest.mark.parametrize("where", ["jinja", "json", "tokenizer_config", "processor_config"])
def test_chat_template_found_wherever_the_folder_keeps_it(tmp_path, where):
    from safesteer_export.tokenizer_files import find_chat_template

    template = "{{ messages[0]['content'] }}"
    if where == "jinja":
        (tmp_path / "chat_template.jinja").write_text(template)
    elif where == "json":
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    elif where == "tokenizer_config":
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]}))
    else:
        (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": template}))
    assert find_chat_template(tmp_path, tokenizer=None) == template


def test_sliding_window_layers():
    """Which layers slide (all of them, or those layer_types names) and the window reach the manifest sizes; the
    context is not capped. RoPE scalings that depend on the sequence length are refused before any export work."""
    import transformers

    from safesteer_models.llama import Qwen2Family
    from safesteer_runtime.errors import UnsupportedArchitectureError

    def family(**kw):
        return Qwen2Family(transformers.Qwen2ForCausalLM(Qwen2Family.text_config(64, **kw)))

    every = family(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert every.sliding_layers == {0, 1, 2, 3} and every.sizes().sliding_window == 16
    assert every.sizes().max_positions == 512
    assert family(use_sliding_window=True, sliding_window=16, max_window_layers=2).sliding_layers == {2, 3}
    off = family(use_sliding_window=False, sliding_window=16)
    assert off.sliding_layers == set() and off.sizes().sliding_window is None
    with pytest.raises(UnsupportedArchitectureError, match="dynamic"):
        family(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_quantized_export_runs_and_reports_its_accuracy(safe_artifact, tmp_path, precision):
    """Weight-only MatMulNBits: block and head graphs change, the rest is the float32 export; the
    accuracy check (greedy agreement, perplexity, probe AUROC) lands in quantization.json."""
    import json

    import onnx

    from safesteer_export.quantize import quantize_artifact
    from safesteer_runtime import manifest as m
    from safesteer_rt import Generator

    src = safe_artifact("LlamaForCausalLM", "gqa", 2)
    out = tmp_path / precision
    report = quantize_artifact(src, out, precision)
    manifest = m.load_manifest(out)  # every file's sha256 matches the rewritten manifest
    assert manifest.export.weights == precision and m.load_manifest(src).export.weights == "float32"
    for entry in manifest.graphs:
        graph = onnx.load(str(out / entry.file.path), load_external_data=False).graph
        if precision == "fp16":  # float16 inside, float32 at the boundaries (the runtime is unchanged)
            halves = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
            assert halves == (entry.role in (m.ROLE_EMBED, m.ROLE_BLOCK)), entry.file.path
            assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in [*graph.input, *graph.output])
        else:
            ops = {n.op_type for n in graph.node}
            assert ("MatMulNBits" in ops) == (entry.role == m.ROLE_BLOCK), entry.file.path
            embeds = m.INPUT_IDS in entry.inputs  # the embed graph, or a text-only model's first block
            assert ("GatherBlockQuantized" in ops) == embeds, entry.file.path
    saved = json.loads((out / "quantization.json").read_text())
    assert saved["precision"] == precision and saved["perplexity_quantized"] > 1.0
    assert 0.5 <= report["probe_auroc_quantized"] <= 1.0 and len(report["greedy_tokens_before_first_divergence"]) == 3
    if precision in ("int8", "fp16"):  # these barely move a tiny model
        assert abs(report["perplexity_quantized"] / report["perplexity_float32"] - 1) < 0.05
    result = Generator(out).generate([{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert len(result.token_ids) >= 1 and result.safety_trace


def test_quantize_rejects_unknown_precision(tmp_path):
    from safesteer_export.pipeline import ExportConfig

    with pytest.raises(ConfigError, match="--quantize"):
        ExportConfig(tmp_path, tmp_path / "out", quantize="int3")


def test_export_with_quantize_leaves_only_the_quantized_artifact(tiny, calibration_file, tmp_path):
    from safesteer_export.calibrate import CalibrationConfig
    from safesteer_export.pipeline import ExportConfig, export_artifact

    out = tmp_path / "art"
    cal = CalibrationConfig(user_file=calibration_file, per_source=24, reply_positions=2)
    result = export_artifact(ExportConfig(tiny.checkpoint("Qwen2ForCausalLM", "gqa"), out, quantize="int4",
                                          calibration=cal))
    assert result.manifest.export.weights == "int4" and result.quantization["perplexity_quantized"] > 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .float32 or .partial left behind


def test_decoder_layers_export_as_fused_ops(tiny):
    """Each decoder layer is a handful of fused nodes (every node costs dispatch time on every decode step):
    RotaryEmbedding, GroupQueryAttention over the in-place cache (no Concat of the past), and the residual adds
    folded into the next RMSNorm. The cache buffers are [batch, kv_heads, capacity, head_dim] in and out."""
    import collections

    import onnx

    from safesteer_runtime import manifest as m

    art = tiny.artifact("Qwen2ForCausalLM", "gqa", block_size=2)
    model = onnx.load(str(art / "block_00.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4
    assert ops["Concat"] == 0 and ops["Attention"] == 0
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}["causal"] == 1  # the fast kernel
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    assert shapes[m.past_key(0)] == shapes[m.present_key(0)] == ["batch", 1, "capacity", 16]
    assert m.new_key(0) not in shapes
    # input norm of layer 0 stays plain; the three later norms each absorb the residual add before them
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 3
    assert {o.domain: o.version for o in model.opset_import}[""] == 23


def test_standard_ops_export_matches_the_fused_one(tiny, tmp_path):
    """--standard-ops: blocks in opset-23 ONNX ops only (for TensorRT), validated against PyTorch at export like
    the fused export; both give the same greedy tokens."""
    import onnx

    from safesteer_export.pipeline import ExportConfig, export_artifact
    from safesteer_rt import Generator

    arch = ("Qwen2ForCausalLM", "gqa")
    out = tmp_path / "std"
    export_artifact(ExportConfig(tiny.checkpoint(*arch), out, block_size=2, safety=False, standard_ops=True))
    block = onnx.load(str(out / "block_00.onnx"), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in block.graph.node}
    assert {d for d, _ in ops} == {""} and ("", "RMSNormalization") in ops and ("", "RotaryEmbedding") in ops
    assert [o.domain for o in block.opset_import] == [""]
    msgs = [{"role": "user", "content": "How do I bake bread at home?"}]
    fused = Generator(tiny.artifact(*arch, 2)).generate(msgs, max_new_tokens=32, safety=False).token_ids
    assert Generator(out).generate(msgs, max_new_tokens=32, safety=False).token_ids == fused


def test_graphs_keep_weights_in_one_external_file(tiny, tmp_path):
    """Every graph's weights go to NAME.onnx.data (page-aligned, written tensor by tensor), listed and hashed in the
    manifest (the last block's tied head also lists the first block's file, where its table is); the int4 copy
    keeps the layout; a missing data file is a clear error."""
    import onnx

    from safesteer_export.pipeline import ExportConfig, export_artifact
    from safesteer_export.quantize import quantize_artifact
    from safesteer_runtime import manifest as m
    from safesteer_rt import Generator

    arch = ("LlamaForCausalLM", "gqa")
    out = tmp_path / "ext"
    export_artifact(ExportConfig(tiny.checkpoint(*arch), out, block_size=2, safety=False))
    manifest = m.load_manifest(out)
    for entry in manifest.graphs:
        shared = ["block_00.onnx.data"] if entry.first_layer == 2 else []  # tie_word_embeddings=True
        assert [d.path for d in entry.data_files] == shared + [entry.file.path + ".data"], entry.file.path
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".data") == sorted(
        {d.path for e in manifest.graphs for d in e.data_files})  # no per-tensor leftovers
    block = onnx.load(str(out / "block_00.onnx"), load_external_data=False)
    weights = [t for t in block.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(weights) >= 2 * 7  # 2 layers: 7 Linear weights each, at least
    offsets = [int(e.value) for t in weights for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(weights) and all(o % 4096 == 0 for o in offsets)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in block.graph.initializer if t.ByteSize() > 4096)
    quantize_artifact(out, tmp_path / "int4", "int4")
    assert all(e.data_files for e in m.load_manifest(tmp_path / "int4").graphs)
    (out / "block_00.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="block_00.onnx.data"):
        Generator(out)


def _embedding_rows(graph_file, vocab: int):
    """Every row the quantized embedding (GatherBlockQuantized, with the Reshapes around it when it reads the LM
    head's blocks) returns, run on its own; the graph and the GatherBlockQuantized node."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph_file))
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    before = [n for n in model.graph.node if n.op_type == "Reshape" and n.output[0] in gather.input]
    after = [n for n in model.graph.node if n.op_type == "Reshape" and gather.output[0] in n.input]
    nodes = [*before, gather, *after]
    inits = {t.name: t for t in model.graph.initializer}
    probe = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, vocab])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
        [inits[name] for name in {x for n in nodes for x in n.input} if name in inits])
    sess = ort.InferenceSession(helper.make_model(probe, opset_imports=model.opset_import).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": np.arange(vocab, dtype=np.int64)[None]})[0][0], model, gather


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tied_table_is_stored_once(tiny, tmp_path, precision):
    """A tied embedding in a one-block graph: one [vocab, hidden] table at fp32 (the LM head reads it through a
    Transpose); quantized, the embedding's GatherBlockQuantized reads the head's MatMulNBits bytes, and the rows it
    returns equal the head's dequantized weights exactly."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from safesteer_export.quantize import quantize_artifact
    from safesteer_runtime import manifest as m

    art = tiny.artifact("LlamaForCausalLM", "gqa", 0)  # tie_word_embeddings=True
    graph = onnx.load(str(art / "block_00.onnx"), load_external_data=False).graph
    tables = [t.name for t in graph.initializer if "embed_tokens" in t.name or "lm_head" in t.name]
    assert tables == ["embed_tokens.weight"]
    quantize_artifact(art, tmp_path / precision, precision)
    vocab = m.load_manifest(art).sizes.vocab_size
    rows, model, gather = _embedding_rows(tmp_path / precision / "block_00.onnx", vocab)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert gather.input[0] == head.input[1]  # the head's bytes, read in place (a Reshape would copy them)
    inits = {t.name: t for t in model.graph.initializer}
    per_token = {t.name for t in model.graph.initializer if list(t.dims[:1]) == [vocab]}
    assert per_token <= set(head.input[1:3])  # the head's blocks (and scales); no copy of its own
    hidden = next(a.i for a in head.attribute if a.name == "K")
    dense = helper.make_graph(
        [helper.make_node("MatMulNBits", ["eye", *head.input[1:]], ["w"], domain="com.microsoft",
                          **{a.name: helper.get_attribute_value(a) for a in head.attribute})],
        "dense", [], [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in head.input[1:] if n in inits] + [numpy_helper.from_array(np.eye(hidden, dtype=np.float32), "eye")])
    sess = ort.InferenceSession(helper.make_model(dense, opset_imports=model.opset_import).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(rows, sess.run(None, {})[0].T, atol=1e-6)


def test_untied_int8_embedding_is_8bit_blocks(tiny, tmp_path):
    """An untied table at int8 becomes 8-bit blocks of 32 (a quarter of its float32 bytes), stored [vocab, hidden] and
    read by GatherBlockQuantized directly: every row within half a block's step of the float32 table, and on average
    much closer."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from safesteer_export.quantize import BLOCK, quantize_artifact

    art = tiny.artifact("Qwen2ForCausalLM", "gqa", 0)  # untied LM head
    table = next(numpy_helper.to_array(t) for t in onnx.load(str(art / "block_00.onnx")).graph.initializer
                 if t.name == "embed_tokens.weight")
    quantize_artifact(art, tmp_path / "int8", "int8")
    rows, model, gather = _embedding_rows(tmp_path / "int8" / "block_00.onnx", table.shape[0])
    assert {a.name: a.i for a in gather.attribute}["bits"] == 8
    stored = {t.name: t for t in model.graph.initializer}[gather.input[0]]  # read in place (a Reshape would copy it)
    assert list(stored.dims) == list(table.shape) and stored.data_type == onnx.TensorProto.UINT8
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not [t for t in floats if list(t.dims) == list(table.shape)]  # no float32 copy left
    step = np.abs(table).reshape(len(table), -1, BLOCK).max(axis=2) / 127
    error = np.abs(rows - table).reshape(len(table), -1, BLOCK)
    assert (error <= step[..., None] / 2 + 1e-7).all()
    assert error.mean() < step.mean() / 3


def test_tied_table_is_stored_once_across_blocks(tiny, tmp_path):
    """With several blocks the first embeds and the last holds the LM head: the head's table points into the first
    block's data file (the manifest lists that file for both graphs) instead of a second copy, and decodes as the
    one-block artifact does. Quantized (last graph rewritten first): at int8 and int4 the first block's embedding reads
    the head's 8- or 4-bit table from the last block's data file and decodes as the one-block artifact of the same
    precision (which shares it inside its one graph); at fp16 the first block's table points at the head's float16
    table the same way."""
    import onnx

    from safesteer_export.quantize import quantize_artifact
    from safesteer_runtime import manifest as m
    from safesteer_rt import Generator

    art = tiny.artifact("LlamaForCausalLM", "gqa", 2)  # tie_word_embeddings=True, 4 layers: two blocks
    manifest = m.load_manifest(art)
    first, last = sorted(manifest.graphs_of(m.ROLE_BLOCK), key=lambda g: g.first_layer)
    graph = onnx.load(str(art / last.file.path), load_external_data=False).graph
    table = next(t for t in graph.initializer if t.name == "lm_head.weight")
    where = {e.key: e.value for e in table.external_data}
    assert where["location"] == "block_00.onnx.data"
    assert [f.path for f in last.data_files] == ["block_00.onnx.data", "block_02.onnx.data"]
    assert not [t.name for t in graph.initializer if t.name.startswith(("lm_head", "embed_tokens")) and t is not table]
    assert int(where["length"]) == 4 * manifest.sizes.vocab_size * manifest.sizes.hidden_size  # all of it, float32
    msgs = [{"role": "user", "content": "How do I bake bread at home?"}]
    want = Generator(tiny.artifact("LlamaForCausalLM", "gqa", 0)).generate(msgs, max_new_tokens=24, safety=False)
    assert Generator(art).generate(msgs, max_new_tokens=24, safety=False).token_ids == want.token_ids
    for precision in ("int8", "int4"):
        quantize_artifact(art, tmp_path / precision, precision)
        quantize_artifact(tiny.artifact("LlamaForCausalLM", "gqa", 0), tmp_path / f"{precision}-one", precision)
        first, last = sorted(m.load_manifest(tmp_path / precision).graphs_of(m.ROLE_BLOCK), key=lambda g: g.first_layer)
        assert [f.path for f in first.data_files] == ["block_00.onnx.data", "block_02.onnx.data"]
        assert [f.path for f in last.data_files] == ["block_02.onnx.data"]
        graph = onnx.load(str(tmp_path / precision / first.file.path), load_external_data=False).graph
        gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        table = {t.name: t for t in graph.initializer}[gather.input[0]]
        assert {e.key: e.value for e in table.external_data}["location"] == "block_02.onnx.data"
        per_token = [t for t in graph.initializer if t.dims and t.dims[0] == manifest.sizes.vocab_size]
        assert len(per_token) == 2 and all({e.key: e.value for e in t.external_data}.get("location") == "block_02.onnx.data"
                                 for t in per_token)  # the table and its scales: the head's; no copy of its own
        one = Generator(tmp_path / f"{precision}-one").generate(msgs, max_new_tokens=24, safety=False).token_ids
        assert Generator(tmp_path / precision).generate(msgs, max_new_tokens=24, safety=False).token_ids == one
    quantize_artifact(art, tmp_path / "fp16", "fp16")
    first, last = sorted(m.load_manifest(tmp_path / "fp16").graphs_of(m.ROLE_BLOCK), key=lambda g: g.first_layer)
    assert [f.path for f in first.data_files] == ["block_00.onnx.data", "block_02.onnx.data"]
    graph = onnx.load(str(tmp_path / "fp16" / first.file.path), load_external_data=False).graph
    table = next(t for t in graph.initializer if list(t.dims) == [manifest.sizes.vocab_size, manifest.sizes.hidden_size])
    assert table.data_type == onnx.TensorProto.FLOAT16
    assert {e.key: e.value for e in table.external_data}["location"] == "block_02.onnx.data"
    half = Generator(tmp_path / "fp16").generate(msgs, max_new_tokens=8, safety=False).token_ids
    assert half == want.token_ids[:8]  # float16 leaves the tiny model's greedy tokens as they were


@pytest.mark.parametrize("arch,variant", vision_variants())
def test_quantized_vision_families_run_with_images(tiny, tmp_path, arch, variant):
    """int8 and int4 blocks next to a float32 vision graph, for every family with images: the artifact loads, passes
    its hashes and answers a request with an image; fp16 leaves greedy tokens of the tiny model unchanged."""
    from safesteer_export.quantize import quantize_artifact
    from safesteer_rt import Generator
    from test_parity_tiny import test_image

    src = tiny.artifact(arch, variant, 2)
    content = [{"type": "image", "image": test_image()}, {"type": "text", "text": "What is in the picture?"}]
    want = Generator(src).generate([{"role": "user", "content": content}], max_new_tokens=8).token_ids
    for precision in ("int8", "int4", "fp16"):
        quantize_artifact(src, tmp_path / precision, precision)
        got = Generator(tmp_path / precision).generate([{"role": "user", "content": content}], max_new_tokens=8)
        assert len(got.token_ids) == 8
        if precision == "fp16":
            assert got.token_ids == want


def test_matmuls_reading_one_activation_are_packed_exactly(tiny):
    """Before quantization, q/k/v (with Qwen2's biases) and gate/up, which read the same activation, become one
    MatMul (+ bias Add) and a Split each: per layer 7 MatMuls -> 4. On the float graph no output changes."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort

    from safesteer_export.quantize import _pack_shared_matmuls
    from safesteer_runtime import manifest as m

    art = tiny.artifact("Qwen2ForCausalLM", "gqa", block_size=0)
    plain = onnx.load(str(art / "block_00.onnx"))
    packed = onnx.load(str(art / "block_00.onnx"))
    _pack_shared_matmuls(packed.graph)
    layers = m.load_manifest(art).sizes.num_layers

    def count(model):
        return collections.Counter(n.op_type for n in model.graph.node)

    assert count(plain)["MatMul"] - count(packed)["MatMul"] == 3 * layers
    assert count(packed)["Split"] == 2 * layers and count(packed)["Add"] == count(plain)["Add"] - 2 * layers

    rng = np.random.default_rng(0)
    sess = [ort.InferenceSession(x.SerializeToString(), providers=["CPUExecutionProvider"]) for x in (plain, packed)]
    rows, feeds = 3, {}
    for inp in sess[0].get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        if inp.name.startswith("past_"):
            shape[2] = rows + 1  # an in-place cache buffer
        elif inp.name in (m.INPUT_IDS, m.POSITION_IDS, m.ATTENTION_MASK) or inp.name == m.MSAV_MASK:
            shape[-1] = rows
            if inp.name == m.ATTENTION_MASK:
                shape[2] = rows
        if inp.name == m.INPUT_IDS:
            feeds[inp.name] = rng.integers(0, 50, shape)
        elif inp.name == m.POSITION_IDS:
            feeds[inp.name] = np.arange(rows)[None]
        elif inp.name in (m.HEAD_ROWS, m.TOP_K):
            feeds[inp.name] = np.arange(1 if inp.name == m.TOP_K else rows) + (inp.name == m.TOP_K)
        elif inp.name == m.ATTENTION_MASK:
            feeds[inp.name] = np.triu(np.full((rows, rows), -1e9, np.float32), 1)[None, None]
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    want, got = (s.run(None, feeds) for s in sess)
    for name, a, b in zip([o.name for o in sess[0].get_outputs()], want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=name)


class _Words:
    """A whitespace tokenizer over a growing vocabulary (id 0 is the end token)."""

    eos_token_id, pad_token_id = 0, None

    def __init__(self):
        self.vocab = {"<eos>": 0}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def decode(self, ids):
        names = {i: w for w, i in self.vocab.items()}
        return " ".join(names[i] for i in ids)


def test_refusal_prefix_is_the_models_most_common_refusal_opening():
    from safesteer_export.calibrate import refusal_prefix

    tok = _Words()
    refusals = ["I'm sorry, but I can't help.", "I'm sorry, but I can't do that.", "I'm sorry, but no.",
                "I cannot help with that."]
    # extended while at least half of the refusals (2 of 4) open with it: "I can't" is shared by two, "help." by one
    assert tok.decode(refusal_prefix(tok, refusals)) == "I'm sorry, but I can't"
    assert tok.decode(refusal_prefix(tok, refusals, max_tokens=3)) == "I'm sorry, but"
    assert refusal_prefix(tok, refusals, share=0.9) == ()  # no opening is that common
    assert refusal_prefix(tok, []) == ()
    assert tok.decode(refusal_prefix(tok, ["No <eos>", "No <eos>"])) == "No"  # never an end token
