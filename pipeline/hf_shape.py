"""The shape fields of a Hugging Face model config, checked before anything is planned from them:
a ``config.json`` with a size of 0, a negative count, a string, a missing field or heads that do
not divide the width is a one-line ``ValueError`` naming the field (``doctor`` turns it into its
usual error), never a plan of negative memory or a traceback from building the model."""

from __future__ import annotations

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL = ("num_key_value_heads", "intermediate_size", "head_dim", "moe_intermediate_size", "num_experts",
            "num_local_experts", "num_experts_per_tok")


def check_hf_shape(hf, where: str = "the model config") -> None:
    """Raise ``ValueError`` naming the first shape field of ``hf`` that is missing, not a whole
    number or below 1, or heads that do not fit the width."""
    values = {}
    for name in REQUIRED + OPTIONAL:
        value = getattr(hf, name, None)
        if value is None:
            if name in REQUIRED:
                raise ValueError(f"{where} has no {name}; give a complete Hugging Face config.json")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} has {name} = {value!r}, not a whole number; write it as a number")
        if value < 1 and not (name in ("num_experts", "num_local_experts", "num_experts_per_tok") and value == 0):
            raise ValueError(f"{where} has {name} = {value}; it must be at least 1")
        values[name] = value
    heads, kv = values["num_attention_heads"], values.get("num_key_value_heads", values["num_attention_heads"])
    if "head_dim" not in values and values["hidden_size"] % heads:
        raise ValueError(f"{where} has hidden_size = {values['hidden_size']}, not divisible by num_attention_heads "
                         f"= {heads}; fix one of them (or give head_dim)")
    if heads % kv:
        raise ValueError(f"{where} has num_attention_heads = {heads}, not a multiple of num_key_value_heads = {kv}; "
                         "fix one of them")


def local_hf_config(path: str):
    """A ``transformers`` config from a local ``config.json`` (or a folder holding one): planning
    without the hub."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import AutoConfig

    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    raw = json.loads(p.read_text(encoding="utf-8"))  # OSError / ValueError name a missing or bad file
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{p} has no model_type; give a Hugging Face config.json")
    if missing := [k for k in REQUIRED if k not in raw]:  # never planned from the library's defaults
        raise ValueError(f"{p} has no {missing[0]}; give a complete Hugging Face config.json")
    check_hf_shape(SimpleNamespace(**raw), str(p))  # as written, before the library reads it
    try:
        hf = AutoConfig.for_model(raw.pop("model_type"), **raw)
    except Exception as e:  # transformers / huggingface_hub validation raise many types
        raise ValueError(f"{p} is not a valid config ({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    check_hf_shape(hf, str(p))
    return hf
