"""The exporter's own checks: validation against PyTorch catches a wrong graph; chat templates are found."""

from __future__ import annotations

import json

import pytest

from safesteer_runtime.errors import ExportValidationError


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


def test_sliding_window_checkpoints_are_refused():
    import transformers

    from safesteer_models.llama import Qwen2Family
    from safesteer_runtime.errors import UnsupportedArchitectureError

    cfg = Qwen2Family.text_config(64, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window"):
        Qwen2Family(transformers.Qwen2ForCausalLM(cfg))
