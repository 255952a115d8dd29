"""Shipped model shapes: ``config.json`` files of the hub models the ready configs name, so the
memory planner (``doctor --config``) works offline and without a 30 s hub retry.

A shape for the hub id ``OWNER/NAME`` lives in ``hf/OWNER--NAME/config.json`` (the hub cache's
own spelling of a repo as a folder) beside the config file that names it, or in the project's
``configs/hf/``. Each file is written in keys that every supported ``transformers`` reads the
same way (``num_experts``, not 5.x's ``num_local_experts``; ``rope_theta``, not 5.x's
``rope_parameters``); ``tests/test_shapes.py`` loads each one and checks it.

Only the shape is shipped (no weights, no tokenizer): stages 1 and 2 still read the hub.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_SHAPES = Path(__file__).resolve().parent.parent / "configs" / "hf"
"""``configs/hf`` of this checkout (an editable install; absent from a wheel)."""


def shape_folder_name(hub_id: str) -> str:
    """``OWNER/NAME`` -> ``OWNER--NAME``."""
    return hub_id.replace("/", "--")


def shipped_shape(model: str, config_file: str | Path | None = None) -> Path | None:
    """The shipped ``config.json`` for the hub id ``model``, or None (a local folder, an embedded
    teacher, a hub id with no shipped shape). Looked for beside ``config_file`` first, then in
    the project's ``configs/hf``."""
    if not model or model.count("/") != 1 or Path(model).exists():
        return None
    roots = ([Path(config_file).resolve().parent / "hf"] if config_file else []) + [PROJECT_SHAPES]
    for root in roots:
        path = root / shape_folder_name(model) / "config.json"
        if path.is_file():
            return path
    return None


def display_path(path: Path) -> str:
    """``path`` relative to the current directory when it is below it, else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
