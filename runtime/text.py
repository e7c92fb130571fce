"""Tokenization (``tokenizers``), chat templates in a sandboxed Jinja environment, streaming detokenization."""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .errors import ArtifactError, InputError
from .manifest import TokenizerInfo, inside


class TextCodec:
    def __init__(self, root: Path, info: TokenizerInfo):
        try:
            self.tokenizer = Tokenizer.from_file(str(inside(root, info.tokenizer_file)))
        except ArtifactError:
            raise
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{info.tokenizer_file} could not be read ({exc}); re-export the artifact") from exc
        self.info = info
        # the tokenizer's control tokens (special added tokens: turn markers, image placeholders), longest first
        self.control = sorted({t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special},
                              key=len, reverse=True)
        self._nonce = secrets.token_hex(8)  # unguessable: user text cannot forge an escape marker
        self._marker = re.compile("\ue000" + self._nonce + r":(\d+)\ue001")
        self._controls = re.compile("|".join(re.escape(c) for c in self.control)) if self.control else None
        self._index = {c: i for i, c in enumerate(self.control)}

    def escape(self, text: str) -> str:
        """``text`` with every control-token string in it marked, so that ``encode`` spells it out as plain text
        ("<", "|", "im", "_end", ...) instead of the control token: user content cannot open or close turns."""
        if self._controls is None:
            return text
        return self._controls.sub(lambda hit: f"\ue000{self._nonce}:{self._index[hit.group(0)]}\ue001", text)

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        pieces = self._marker.split(text)  # plain text, control index, plain text, ...
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=False).ids
        for n in range(1, len(pieces), 2):
            self.tokenizer.encode_special_tokens = True
            try:
                ids += self.tokenizer.encode(self.control[int(pieces[n])], add_special_tokens=False).ids
            finally:
                self.tokenizer.encode_special_tokens = False
            ids += self.tokenizer.encode(pieces[n + 1], add_special_tokens=False).ids if pieces[n + 1] else []
        if add_bos and self.info.bos_token_id is not None and (not ids or ids[0] != self.info.bos_token_id):
            ids = [self.info.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Turns a growing id list into text pieces without splitting multi-byte characters (the tokenizers library's
    DecodeStream: one call per token, in Rust)."""

    def __init__(self, codec: TextCodec):
        self.tokenizer = codec.tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer, token_id) or ""


def _tojson(value: Any, indent: Optional[int] = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)


MAX_RENDERED_CHARS = 4_000_000  # a prompt this long is far past any model's context


class ChatTemplate:
    """A model's chat template, rendered with no access to Python internals (ImmutableSandboxedEnvironment)."""

    def __init__(self, source: str, info: TokenizerInfo):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ArtifactError(f"the artifact's chat template does not parse ({exc}); re-export the artifact") from exc
        self.info = info
        # Templates that walk content lists themselves ({"type": "image"} parts); others get plain strings.
        self.takes_content_lists = "'type'" in source or '"type"' in source or ".type" in source

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text; an InputError when the template fails on these messages or writes more than
        MAX_RENDERED_CHARS (an artifact's template is code from its author: it may loop)."""
        pieces, size = [], 0
        try:
            for piece in self.template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "", eos_token=self.info.eos_token or "",
                pad_token=self.info.pad_token or "",
            ):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise InputError(f"the chat template wrote more than {MAX_RENDERED_CHARS} characters for these "
                                     "messages; shorten them (or check the artifact's chat template)")
                pieces.append(piece)
        except InputError:
            raise
        except TemplateError as exc:
            raise InputError(f"the chat template rejected these messages: {exc}") from exc
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise InputError(f"the chat template failed on these messages ({type(exc).__name__}: {exc}); check "
                             "the messages' structure, or the artifact's chat template") from exc
        return "".join(pieces)


def load_chat_template(root: Path, info: TokenizerInfo) -> Optional[ChatTemplate]:
    if info.chat_template_file is None:
        return None
    try:
        source = inside(root, info.chat_template_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{info.chat_template_file} is not UTF-8 text; re-export the artifact") from None
    return ChatTemplate(source, info)


def render_messages(chat: ChatTemplate, messages, placeholder: Optional[str],
                    escape: Optional[Callable[[str], str]] = None) -> tuple[str, list]:
    """HF/OpenAI-style messages -> (prompt text, images in order).

    Content may be a string or a list of {"type": "text", "text": ...} / {"type": "image", "image": ...}
    parts. Templates that walk content lists get them (image parts without the pixels); for templates
    that expect strings, each image part becomes the image placeholder followed by a newline. ``escape``
    (TextCodec.escape) is applied to every text the messages carry, never to what the template or an image adds.
    """
    escape = escape or (lambda text: text)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    images: list = []
    rendered = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content'")
        content = msg["content"]
        if not isinstance(msg["role"], str):
            raise InputError(f"messages[{i}]['role'] must be a string, got {type(msg['role']).__name__}")
        if isinstance(content, str):
            rendered.append({**msg, "content": escape(content)})
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"messages[{i}]['content'] must be a string or a list of parts, got "
                             f"{type(content).__name__}")
        parts, flat = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text", ""), str):
                    raise InputError(f"messages[{i}] has a text part whose 'text' is not a string")
                text = escape(part.get("text", ""))
                parts.append({"type": "text", "text": text})
                flat.append(text)
            elif kind == "image":
                if "image" not in part:
                    raise InputError(f"messages[{i}] has an image part without an 'image' (PIL.Image or path)")
                images.append(part["image"])
                parts.append({"type": "image"})
                flat.append((placeholder or "") + "\n")
            else:
                raise InputError(f"messages[{i}] content parts must be {{'type': 'text'|'image', ...}}, got {part!r}")
        rendered.append({**msg, "content": parts if chat.takes_content_lists else "".join(flat)})
    return chat.render(rendered, add_generation_prompt=True), images
