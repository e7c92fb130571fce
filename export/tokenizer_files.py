"""Copy the tokenizer and chat template into the artifact and describe their special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from safesteer_runtime.errors import ArtifactError
from safesteer_runtime import manifest as m
from safesteer_runtime.manifest import TokenizerInfo

TOKENIZER_FILE, CHAT_TEMPLATE_FILE = m.TOKENIZER_FILE, m.CHAT_TEMPLATE_FILE


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here
        raise ArtifactError(
            f"could not load a tokenizer from {model_dir} ({type(exc).__name__}: {exc}); the folder needs "
            "tokenizer.json (or files a fast tokenizer can be built from) next to config.json"
        ) from exc


def _template_from_value(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def find_chat_template(model_dir: Path, tokenizer) -> Optional[str]:
    """Wherever the HF folder keeps it: chat_template.jinja/.json, tokenizer or processor config."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            template = _template_from_value(json.loads(path.read_text(encoding="utf-8")).get("chat_template"))
            if template:
                return template
    return _template_from_value(getattr(tokenizer, "chat_template", None))


def eos_ids(model_dir: Path, tokenizer, model_config) -> tuple[int, ...]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.is_file() else []
    text_cfg = getattr(model_config, "text_config", model_config)
    sources += [getattr(text_cfg, "eos_token_id", None), tokenizer.eos_token_id]
    for value in sources:
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def write_tokenizer_files(model_dir: Path, tokenizer, model_config, out_dir: Path) -> tuple[TokenizerInfo, list[Path]]:
    written = []
    src = model_dir / TOKENIZER_FILE
    dst = out_dir / TOKENIZER_FILE
    if src.is_file():
        shutil.copyfile(src, dst)
    else:
        tokenizer.backend_tokenizer.save(str(dst))
    written.append(dst)
    template = find_chat_template(model_dir, tokenizer)
    template_file = None
    if template:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        template_file = CHAT_TEMPLATE_FILE
        written.append(out_dir / CHAT_TEMPLATE_FILE)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id
    info = TokenizerInfo(
        tokenizer_file=TOKENIZER_FILE,
        chat_template_file=template_file,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=eos_ids(model_dir, tokenizer, model_config),
        pad_token_id=tokenizer.pad_token_id,
        add_bos_token=bool(add_bos),
    )
    return info, written
