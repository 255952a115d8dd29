"""The exported student's model card (``README.md``), in the hub's format: YAML metadata
(``base_model``, ``license``, ``datasets``, ``language``, ``tags``, ``library_name``,
``pipeline_tag``) and a body stating the teacher, the cache's fingerprint, the KD mode, the tokens
seen and the held-out numbers (with which targets they count).

Models and data are named by hub id or folder name, never by an absolute local path (a card is
read on other machines). ``license`` and ``language`` come from the student's own card when it
is at hand without the network (a local folder's README.md, or the hub cache's copy).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MODEL_CARD_KEYS = ("teacher", "cache_fingerprint", "kd_mode", "temperature", "steps", "held_out")
OWN_KEYS = MODEL_CARD_KEYS + ("tokens", "run", "tokenizer", "student_model", "dataset", "chat")
TAGS = ["knowledge-distillation", "distillation", "kd-pipeline"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path (hub ids have exactly one slash)."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.endswith(_DATA_SUFFIXES)


def display_name(name: str | None) -> str | None:
    """How a card names a model or dataset: a hub id or a tag such as ``embedded:...`` as given,
    a local path by its folder (or file) name only."""
    if not name:
        return None
    if is_hub_id(name) or ":" in name and not Path(name).exists():
        return name
    return Path(name.rstrip("/")).name or name


def local_card_data(model: str | None) -> dict[str, Any]:
    """The metadata of ``model``'s own card if it is readable offline, else {}."""
    if not model:
        return {}
    path = Path(model) / "README.md"
    if not path.is_file() and is_hub_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "README.md")
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # no cache, a malformed id: nothing known
            return {}
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception:  # a card without metadata or with broken YAML says nothing
        return {}


def card_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The hub metadata of a card for ``info`` (keys with no known value are left out)."""
    student = info.get("student_model")
    own = local_card_data(student)
    dataset = info.get("dataset")
    tags = TAGS + (["conversational"] if info.get("chat") else [])
    meta = {"base_model": student if is_hub_id(student) else own.get("base_model"),
            "license": own.get("license"), "language": own.get("language"),
            "datasets": [dataset] if is_hub_id(dataset) else None,
            "tags": tags, "library_name": "transformers", "pipeline_tag": "text-generation"}
    return {k: v for k, v in meta.items() if v}


def fingerprint_digest(fingerprint: dict | str | None) -> str | None:
    """16 hex digits naming a cache's fingerprint (sha256 of its sorted JSON), or the given text."""
    if fingerprint is None or isinstance(fingerprint, str):
        return fingerprint
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, sort_keys=True, default=str) + "`"
    return str(v)


def _fingerprint_rows(fp) -> list[str]:
    """The fingerprint's fields that say what the cache holds, paths shortened to names."""
    if not isinstance(fp, dict):
        return []
    shown = {k: display_name(str(fp[k])) if k in ("teacher", "dataset") else fp[k] for k in
             ("teacher", "tokenizer_hash", "dataset", "dataset_hash", "seq_len", "top_k", "topk_encoding",
              "loss_mask") if k in fp}
    return [f"| cache {k} | {_fmt(v)} |" for k, v in shown.items()]


def model_card_text(info: dict[str, Any], name: str, repo_id: str | None = None) -> str:
    """The card's text. ``info`` keys (all optional; others are listed as they are): ``teacher``,
    ``student_model`` (the student's starting point: hub id or folder), ``dataset``,
    ``cache_fingerprint`` (dict or text), ``kd_mode``, ``temperature``, ``steps``, ``tokens``,
    ``tokenizer``, ``chat`` (trained on chat data), ``held_out`` (name -> number, and
    ``counted``: which targets), ``run``. ``repo_id``: the hub repo the card is for."""
    from huggingface_hub import ModelCardData

    meta = ModelCardData(**card_metadata(info)).to_yaml()
    fp = info.get("cache_fingerprint")
    rest = {k: v for k, v in info.items() if k not in OWN_KEYS}
    lines = ["---", meta, "---", "", f"# {info.get('run', name)}: a distilled student", "",
             "A causal LM trained by kd-pipeline from an offline teacher cache (stage 1 cached the teacher's",
             "top-k logits and hidden states; stage 2 trained this student from the cache alone).", "",
             "| | |", "|---|---|",
             f"| teacher | {display_name(info.get('teacher')) or 'unknown'} |",
             f"| student initialised from | {display_name(info.get('student_model')) or 'random (from config)'} |",
             f"| cache fingerprint | `{fingerprint_digest(fp)}` |" if fp is not None else "| cache fingerprint | unknown |",
             *_fingerprint_rows(fp),
             f"| KD mode | {_fmt(info.get('kd_mode', 'unknown'))} |"]
    if info.get("dataset"):
        lines.append(f"| data | {display_name(info['dataset'])} |")
    for key, label in (("temperature", "KD temperature"), ("steps", "training steps"),
                       ("tokens", "training tokens (seen)"), ("tokenizer", "tokenizer")):
        if key in info:
            lines.append(f"| {label} | {_fmt(display_name(info[key]) if key == 'tokenizer' else info[key])} |")
    if info.get("chat"):
        lines.append("| data format | chat: loss on the assistant's tokens only (the cache's loss_mask) |")
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rest.items()]
    held = dict(info.get("held_out") or {})
    counted = held.pop("counted", None)
    if held:
        lines += ["", "## Held-out evaluation", "", f"Counted over: {counted or 'all tokens'}.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in held.items()]
    lines += _usage(repo_id or name, bool(info.get("chat")))
    return "\n".join(lines)


def _usage(path: str, chat: bool) -> list[str]:
    prompt = (['messages = [{"role": "user", "content": "To be, or not to be?"}]',
               "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
               'inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)'] if chat else
              ['inputs = tokenizer("To be, or not to be", return_tensors="pt")'])
    return ["", "## Load it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'path = "{path}"' + ("" if "/" in path else "  # this folder, or the hub id it was pushed to"),
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForCausalLM.from_pretrained(path)", *prompt,
            "out = model.generate(**inputs, max_new_tokens=30, do_sample=False)",
            "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", ""]


def write_model_card(student_dir: Path, info: dict) -> Path:
    """Write ``student_dir/README.md`` (``model_card_text``) and return its path."""
    path = Path(student_dir) / "README.md"
    path.write_text(model_card_text(info, Path(student_dir).name), encoding="utf-8")
    return path
