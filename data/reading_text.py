"""Text the default model's reading projector is trained and tested on, from sources no evaluation suite reads.

Sentences from the Python standard library's docstrings: a tenth of them (by the sha256 of the sentence, so the
split is stable across Python versions) are held out as the reading test and never trained on. Word recall is
the reading test's measure: the share of the reference's words that appear in the reply.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import re
import sys
import warnings
from functools import lru_cache

SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtledemo", "turtle")  # print, open windows


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Plain English sentences (30-110 characters) from the standard library's docstrings, sorted."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP_MODULES:
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    module = importlib.import_module(name)
            except BaseException:  # some modules refuse to import on this platform; skip them
                continue
            for obj in [module] + [getattr(module, a, None) for a in dir(module)]:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if (30 <= len(s) <= 110 and re.fullmatch(r"[A-Za-z][A-Za-z0-9 ,.;:'()\-?!]+[.!?]", s)
                            and not re.search(r"[A-Za-z]\.[A-Za-z]|\(\)|__", s)):
                        found.add(s)
    return tuple(sorted(found))


def held_out(sentence: str) -> bool:
    """The reading test's sentences: a tenth by hash, never trained on."""
    return hashlib.sha256(sentence.encode()).hexdigest()[-1] == "0"


def held_out_sentences() -> list[str]:
    """The held-out sentences in a seeded, stable order (a longer list keeps a shorter one's sentences first)."""
    return sorted((s for s in stdlib_sentences() if held_out(s)), key=lambda s: hashlib.sha256(s.encode()).digest())


def training_sentences() -> list[str]:
    return [s for s in stdlib_sentences() if not held_out(s)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def word_recall(reference: str, reply: str) -> float:
    """The share of ``reference``'s words (lower case, letters and digits) found anywhere in ``reply``."""
    ref, got = words(reference), set(words(reply))
    return sum(w in got for w in ref) / max(1, len(ref))
