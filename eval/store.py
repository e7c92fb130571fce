"""The resumable record of one evaluation: ``run.json`` (settings) + ``generations.jsonl`` (one line each).

Each finished generation is appended as one line and flushed to disk before the next starts, so an
interrupted run loses at most the generation in flight; a torn last line is cut off on reopening, a damaged line
elsewhere is skipped with a warning (its case is generated again). One evaluation writes to a folder at a time
(an exclusive lock on ``.lock`` there).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

from safesteer_runtime.errors import ConfigError

RUN_FILE = "run.json"
GENERATIONS = "generations.jsonl"
LOCK_FILE = ".lock"
log = logging.getLogger("safesteer.eval")
FREE = ("modes", "artifact")  # may change between runs: modes add up; a moved artifact keeps its sha256


def key(record: dict) -> tuple[str, str, str]:
    return record["suite"], record["mode"], record["id"]


class Store:
    def __init__(self, out: Path, settings: dict, *, restart: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.out)
        self.path = self.out / GENERATIONS
        run_file = self.out / RUN_FILE
        if restart:
            self.path.unlink(missing_ok=True)
            run_file.unlink(missing_ok=True)
        if run_file.is_file():
            old = json.loads(run_file.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(old) | set(settings) if k not in FREE and old.get(k) != settings.get(k))
            if diff:
                raise ConfigError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)} differ); pass another --out, "
                    "or --restart to discard that run"
                )
            settings = {**settings, "modes": list(dict.fromkeys(old.get("modes", []) + settings["modes"]))}
        run_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        self.settings = settings
        self.records: dict[tuple, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1  # a line without its newline was torn by an interruption
        for number, line in enumerate(raw[:good].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[key(rec)] = rec
            except (ValueError, TypeError, KeyError):
                log.warning("%s line %d is damaged; skipped (its case will be generated again)", self.path, number)
        if good < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def close(self) -> None:
        """Release the folder's lock (the Store still reads; a closed Store should not add)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, k: tuple) -> bool:
        return k in self.records

    def get(self, k: tuple):
        return self.records.get(k)

    def add(self, record: dict) -> None:
        k = key(record)
        if k in self.records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[k] = record

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records.values())


def _lock(out: Path):
    """An exclusive lock on OUT/.lock held for the Store's life; a second evaluation on OUT is refused."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(out / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"another safesteer-eval is writing to {out}; wait for it to finish or pass another --out") from None
    return handle
