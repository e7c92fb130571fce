"""Registry meta-checks, the runtime's light imports, and the two console scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_variants


def test_every_registered_family_has_tiny_test_configs():
    """Meta-test: each registered architecture has tiny configs (the parity, SafeSteer and export tests are
    parametrized over tiny_variants(), so they cover it), a row in docs/architectures.md and a mention in the README."""
    from safesteer_models import family_class, supported_architectures

    covered = {arch for arch, _ in tiny_variants()}
    assert set(supported_architectures()) == covered
    root = Path(__file__).resolve().parents[1]
    table, readme = (root / "docs" / "architectures.md").read_text(), (root / "README.md").read_text()
    for arch in supported_architectures():
        assert family_class(arch).tiny_configs(64), f"{arch} has no tiny config"
        assert f"| `{arch}` |" in table, f"docs/architectures.md has no row for {arch}"
        assert f"`{arch}`" in readme, f"the README's list of architectures lacks {arch}"
    # every family with images has a preprocessing-parity test against its HF processor
    import test_preprocessing

    from conftest import vision_variants

    for arch, _variant in vision_variants():
        name = test_preprocessing.PREPROCESSING_TESTS.get(arch)
        assert name and callable(getattr(test_preprocessing, name, None)), f"{arch} has no preprocessing test"
    # LLaVA's tiny variants cover each supported vision tower
    llava = family_class("LlavaForConditionalGeneration").tiny_configs(64)
    from safesteer_models.llava import VISION_TOWERS

    assert {c.vision_config.model_type for c in llava.values()} == set(VISION_TOWERS)


@pytest.mark.parametrize("imports,forbidden", [
    ("safesteer_rt, safesteer_runtime.generator, safesteer_rt.serve, safesteer_rt.serve_ray",
     ("torch", "transformers", "safesteer_export", "safesteer_models")),
    # the shared data side: export and eval both read it, it reads neither (nor torch)
    ("safesteer_data.prompt_sets, safesteer_data.jailbreaks, safesteer_data.judges, safesteer_data.typography, "
     "safesteer_data.probe, safesteer_checkpoints.wheels", ("torch", "safesteer_export", "safesteer_eval",
                                                           "safesteer_models")),
    # evaluation's case building and reports never load the exporter
    ("safesteer_eval.suites, safesteer_eval.report, safesteer_eval.runner", ("safesteer_export",)),
])
def test_import_layers(imports, forbidden):
    code = (f"import sys, {imports}; "
            f"bad = [m for m in {forbidden!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_list_architectures(capsys):
    from safesteer_export.cli import main
    from safesteer_models import supported_architectures

    assert main(["--list-architectures"]) == 0
    listed = capsys.readouterr().out.split()
    assert all(arch in listed for arch in supported_architectures())
    # one-time checkpoint builds (minutes) say what they are: their INFO lines reach the user
    import logging

    assert logging.getLogger("safesteer.checkpoints").isEnabledFor(logging.INFO)


def test_export_cli_rejects_unknown_architecture(tmp_path, capsys):
    from safesteer_export.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    assert main([str(tmp_path), "-o", str(tmp_path / "out"), "--no-safety"]) == 2
    err = capsys.readouterr().err
    assert "MambaForCausalLM" in err and "LlavaForConditionalGeneration" in err


def test_generate_cli_json(tiny, capsys):
    from safesteer_rt.cli import main

    art = tiny.artifact("LlamaForCausalLM", "gqa")
    assert main([str(art), "--prompt", "How do I bake bread?", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
    assert set(out["providers"].values()) == {"CPUExecutionProvider"} and "block_00" in out["providers"]
    assert out["timings"]["new_tokens"] == 6


def test_generate_cli_passes_huge_pages(tiny, capsys, monkeypatch):
    import safesteer_rt
    from safesteer_rt.cli import main

    made, real = [], safesteer_rt.Generator

    def spy(*args, **kwargs):
        made.append(kwargs["huge_pages"])
        return real(*args, **kwargs)

    monkeypatch.setattr(safesteer_rt, "Generator", spy)
    art = str(tiny.artifact("LlamaForCausalLM", "gqa"))
    assert main([art, "--prompt", "hi", "--max-new-tokens", "2", "--json", "--no-huge-pages"]) == 0
    assert json.loads(capsys.readouterr().out)["huge_pages_mb"] == 0
    assert main([art, "--prompt", "hi", "--max-new-tokens", "2", "--json"]) == 0
    assert made == [False, True]


def test_generate_cli_streams_same_text_as_generate(tiny, capsys):
    from safesteer_rt import Generator
    from safesteer_rt.cli import main

    art = tiny.artifact("LlamaForCausalLM", "gqa")
    assert main([str(art), "--prompt", "How do I bake bread?", "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    want = Generator(art).generate([{"role": "user", "content": [{"type": "text", "text": "How do I bake bread?"}]}],
                                   max_new_tokens=12).text
    assert streamed == want + "\n"


def test_generate_cli_reports_bad_artifact(tmp_path, capsys):
    from safesteer_rt.cli import main

    assert main([str(tmp_path), "--prompt", "hi"]) == 2
    assert "safesteer-export" in capsys.readouterr().err


def test_export_reuse_keeps_only_an_artifact_of_the_same_model(tiny, tmp_path, capsys):
    import shutil

    from safesteer_export.cli import main
    from safesteer_models import family_class

    out = tmp_path / "art"
    shutil.copytree(tiny.artifact("LlamaForCausalLM", "gqa"), out)
    same = tiny.checkpoint("LlamaForCausalLM", "gqa")
    assert main([str(same), "-o", str(out), "--reuse"]) == 0
    assert "kept as it is" in capsys.readouterr().out
    other = tiny.checkpoint("Qwen2ForCausalLM", next(iter(family_class("Qwen2ForCausalLM").tiny_configs(8))))
    before = sorted(p.name for p in out.iterdir())
    assert main([str(other), "-o", str(out), "--reuse", "--no-safety"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing lost


def test_export_reuse_rebuilds_an_outdated_artifact_of_the_same_model(tiny, tmp_path, capsys):
    """An artifact of the same checkpoint in an older layout (a separate head graph) is rebuilt by --reuse, not kept
    (the runtime would refuse it) and not refused (it is this tool's own output)."""
    import shutil

    from safesteer_export.cli import main
    from safesteer_rt import Generator

    out = tmp_path / "art"
    shutil.copytree(tiny.artifact("LlamaForCausalLM", "gqa"), out)
    manifest = out / "manifest.json"
    data = json.loads(manifest.read_text())
    last = max((g for g in data["graphs"] if g["role"] == "block"), key=lambda g: g["first_layer"])
    last["outputs"] = ["hidden_states_out"] + [o for o in last["outputs"] if o.startswith("new_")]
    manifest.write_text(json.dumps(data))
    assert main([str(tiny.checkpoint("LlamaForCausalLM", "gqa")), "-o", str(out), "--reuse", "--no-safety"]) == 0
    assert "from another safesteer-export version; rebuilding it" in capsys.readouterr().out
    assert Generator(out).generate(prompt="Hello", max_new_tokens=4).token_ids
    # an artifact another safesteer version wrote (other calibration data, other default knobs) is rebuilt too
    data = json.loads(manifest.read_text())
    data["export"]["tool_version"] = "0.0.1"
    manifest.write_text(json.dumps(data))
    assert main([str(tiny.checkpoint("LlamaForCausalLM", "gqa")), "-o", str(out), "--reuse", "--no-safety"]) == 0
    assert "rebuilding it" in capsys.readouterr().out
    assert main([str(tiny.checkpoint("LlamaForCausalLM", "gqa")), "-o", str(out), "--reuse", "--no-safety"]) == 0
    assert "kept as it is" in capsys.readouterr().out  # this version's own artifact is reused
