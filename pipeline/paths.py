"""Local paths given in a config: one whose parent chain runs into a file is named in one line
before anything is written (``mkdir`` would otherwise fail half-way with a traceback)."""

from __future__ import annotations

from pathlib import Path

from .config import resolve_work  # noqa: F401  (re-exported: the work: rule for command-line paths)
from .errors import ConfigError


def require_directory_path(path: str | Path, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` when ``path`` or one of its parents is an existing
    file (or a link to one): no directory can be made there."""
    path = Path(path)
    for p in (path, *path.absolute().parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"cannot be made: {p} is a file"
                raise ConfigError(f"{key} {path} {where}, not a directory; set {key} to a path under a directory")
            return
