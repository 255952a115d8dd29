"""The exported student's model card (``README.md``), built with ``huggingface_hub``'s
``ModelCard``/``ModelCardData``: hub metadata (``base_model``, ``license``, ``datasets``,
``language``, ``tags``, ``library_name``, ``pipeline_tag``) and a body stating the teacher, what
the cache holds, its fingerprint, the KD mode, the tokens seen and the held-out numbers (with
which targets they count).

A card is right wherever it is written: what depends on the machine (is a name a local folder or
a hub id? what license does the student's own card give? was it cut from the teacher?) is decided
once, when the run finishes, where its paths mean what they meant in training (``run_facts``),
and kept in the run's ``summary.json``; ``push`` rebuilds the card from that record, not from the
directory it runs in. Only hub ids become hub links or hub metadata; local models and data are
named by folder (or file) name, never by an absolute path.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

MODEL_CARD_KEYS = ("teacher", "cache_fingerprint", "kd_mode", "temperature", "steps", "held_out")
OWN_KEYS = MODEL_CARD_KEYS + ("tokens", "run", "tokenizer", "student_model", "dataset", "chat", "sources",
                               "cache_holds", "license", "language", "pruned_from")
PRUNE_RECORD = "prune.json"
"""What ``prune-teacher`` writes beside a student cut from the teacher; carried into the export."""
HUB = "https://huggingface.co"
TAGS = ["knowledge-distillation", "distillation", "kd-pipeline"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path here (hub ids have exactly one slash). Depends on
    the current directory: the card's own decisions come from ``run_facts``, made at the run's end."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.endswith(_DATA_SUFFIXES)


def source_kind(name: str | None) -> str | None:
    """``hub``, ``local`` or ``tag`` (``embedded:...``) for a model or data name, as it resolves
    from the current directory; None for no name."""
    if not name:
        return None
    if is_hub_id(name):
        return "hub"
    return "tag" if ":" in name and not Path(name).exists() and "://" not in name else "local"


def kind_of(info: dict[str, Any], key: str) -> str | None:
    """What ``info[key]`` is: as recorded when the run finished (``sources``), else (a run
    finished before the record was kept) as it resolves here."""
    recorded = info.get("sources")
    if isinstance(recorded, dict) and key in recorded:
        return recorded[key]
    return source_kind(info.get(key))


def display_name(name: str | None, kind: str | None = None) -> str | None:
    """How a card names a model or dataset: a hub id or a tag such as ``embedded:...`` as given,
    a local path by its folder (or file) name only."""
    if not name:
        return None
    kind = kind or source_kind(name)
    if kind in ("hub", "tag"):
        return name
    return Path(name.rstrip("/")).name or name


def linked(info: dict[str, Any], key: str, dataset: bool = False) -> str | None:
    """The body's name for ``info[key]``: a hub id as a link to its hub page, anything else as text."""
    name, kind = info.get(key), kind_of(info, key)
    if kind == "hub":
        return f"[{name}]({HUB}/{'datasets/' if dataset else ''}{name})"
    return display_name(name, kind)


def local_card_data(model: str | None, fetch: bool = False) -> dict[str, Any]:
    """The metadata of ``model``'s own card: a local folder's README.md, the hub cache's copy, or
    (``fetch``, and the hub not switched off) the hub's; {} when none can be read."""
    if not model:
        return {}
    path = Path(model) / "README.md"
    if not path.is_file() and is_hub_id(model):
        try:
            from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(model, "README.md")
            if not isinstance(cached, str) and fetch and not constants.is_offline_mode():
                cached = hf_hub_download(model, "README.md", etag_timeout=10)
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # no cache, no network, a malformed id: nothing known
            return {}
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception:  # a card without metadata or with broken YAML says nothing
        return {}


def prune_record(model: str | None) -> dict[str, Any] | None:
    """``prune.json`` of a student cut from the teacher by ``prune-teacher``, or None."""
    path = Path(model) / PRUNE_RECORD if model else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cache_holds(spec, has_head: bool) -> list[str]:
    """What a cache holds, in the card's words, from its spec (``pipeline.cache.spec.CacheSpec``)."""
    holds = [f"the top-{spec.top_k} logits per position ({spec.topk_encoding}) with the exact normaliser"]
    if spec.samples:
        holds.append(f"{spec.samples} tokens sampled per position from the full distribution")
    if spec.store_hidden:
        holds.append(f"the last-layer hidden states ({spec.hidden_dtype})")
    if has_head:
        holds.append("the teacher's output head")
    return holds


def holds_from_fingerprint(fp: Any) -> list[str] | None:
    """``cache_holds`` for a run finished before the card recorded it, from its fingerprint."""
    if not isinstance(fp, dict) or "top_k" not in fp:
        return None
    holds = [f"the top-{fp['top_k']} logits per position ({fp.get('topk_encoding', 'sqrt8')}) with the exact normaliser"]
    if fp.get("samples"):
        holds.append(f"{fp['samples']} tokens sampled per position from the full distribution")
    if fp.get("hidden_dtype") not in (None, "none"):
        holds.append(f"the last-layer hidden states ({fp['hidden_dtype']})")
    return holds


def run_facts(student_model: str | None, teacher: str | None, dataset: str | None, spec, has_head: bool) -> dict:
    """The card's facts that depend on where the run's paths resolve, decided when the run finishes
    (from the directory it trained in): each name's kind, the student's license and language from
    its own card, whether it was cut from the teacher, and what the cache holds."""
    own = local_card_data(student_model, fetch=True)  # the run just loaded it: the hub is likely at hand
    facts: dict[str, Any] = {
        "sources": {k: source_kind(v) for k, v in
                    (("student_model", student_model), ("teacher", teacher), ("dataset", dataset)) if v},
        "cache_holds": cache_holds(spec, has_head),
        "license": own.get("license"), "language": own.get("language")}
    if own.get("base_model"):
        facts["student_base_model"] = own["base_model"]
    pruned = prune_record(student_model)
    if pruned is not None:
        facts["pruned_from"] = {k: pruned.get(k) for k in ("teacher", "teacher_shape", "shape", "kept_layers",
                                                             "parameters", "method")}
    return facts


def copy_prune_record(student_model: str | None, export_dir: Path) -> bool:
    """Carry the starting point's ``prune.json`` into the exported student; True if there was one."""
    if prune_record(student_model) is None:
        return False
    shutil.copyfile(Path(student_model) / PRUNE_RECORD, Path(export_dir) / PRUNE_RECORD)
    return True


def card_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The hub metadata of a card for ``info`` (keys with no known value are left out). A student
    cut from a hub teacher has that teacher as its base model."""
    student, dataset = info.get("student_model"), info.get("dataset")
    own = {} if "license" in info else local_card_data(student)  # a run's own record comes first
    pruned = info.get("pruned_from") or {}
    base = (student if kind_of(info, "student_model") == "hub" else
            info.get("student_base_model") or own.get("base_model") or
            (pruned.get("teacher") if pruned and source_kind(pruned.get("teacher")) == "hub" else None))
    tags = TAGS + (["conversational"] if info.get("chat") else []) + (["pruned"] if pruned else [])
    meta = {"base_model": base, "license": info.get("license", own.get("license")),
            "language": info.get("language", own.get("language")),
            "datasets": [dataset] if kind_of(info, "dataset") == "hub" else None,
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


def _fingerprint_rows(fp, info: dict[str, Any]) -> list[str]:
    """The fingerprint's fields that say what the cache holds, paths shortened to names (of the
    kind the run recorded for the same name)."""
    if not isinstance(fp, dict):
        return []

    def name(k: str) -> str | None:
        return display_name(str(fp[k]), kind_of(info, k) if info.get(k) == fp[k] else None)

    shown = {k: name(k) if k in ("teacher", "dataset") else fp[k] for k in
             ("teacher", "tokenizer_hash", "dataset", "dataset_hash", "seq_len", "top_k", "topk_encoding",
              "hidden_dtype", "samples", "loss_mask") if k in fp}
    return [f"| cache {k} | {_fmt(v)} |" for k, v in shown.items()]


def _pruned_text(info: dict[str, Any]) -> list[str]:
    pruned = info.get("pruned_from")
    if not pruned:
        return []
    shape, was = pruned.get("shape") or {}, pruned.get("teacher_shape") or {}
    layers = pruned.get("kept_layers")
    return ["", f"The student was cut from the teacher ({display_name(pruned.get('teacher')) or 'unknown'}) by "
            f"`prune-teacher` before distillation: {len(layers) if layers else '?'} of {was.get('layers', '?')} "
            f"layers kept ({layers}), hidden {shape.get('hidden', '?')} of {was.get('hidden', '?')}, MLP width "
            f"{shape.get('intermediate', '?')} of {was.get('intermediate', '?')} "
            f"({pruned.get('method') or 'pruned'}). `prune.json` in this repo holds the full record."]


def model_card_text(info: dict[str, Any], name: str, repo_id: str | None = None) -> str:
    """The card's text. ``info`` keys (all optional; others are listed as they are): ``teacher``,
    ``student_model`` (the student's starting point: hub id or folder), ``dataset``,
    ``cache_fingerprint`` (dict or text), ``kd_mode``, ``temperature``, ``steps``, ``tokens``,
    ``tokenizer``, ``chat`` (trained on chat data), ``held_out`` (name -> number, and
    ``counted``: which targets), ``run``; from ``run_facts``: ``sources``, ``cache_holds``,
    ``license``, ``language``, ``pruned_from``. ``repo_id``: the hub repo the card is for."""
    return str(model_card(info, name, repo_id))


def model_card(info: dict[str, Any], name: str, repo_id: str | None = None):
    """The card as a ``huggingface_hub.ModelCard`` (``.save(path)``, ``str()``)."""
    from huggingface_hub import ModelCard, ModelCardData

    fp = info.get("cache_fingerprint")
    holds = info.get("cache_holds") or holds_from_fingerprint(fp)
    meta = card_metadata(info)
    rest = {k: v for k, v in info.items() if k not in OWN_KEYS and k != "student_base_model"}
    lines = [f"# {info.get('run', name)}: a distilled student", "",
             "A causal LM trained by kd-pipeline from an offline teacher cache: stage 1 ran the teacher once and "
             f"cached {'; '.join(holds) if holds else 'its outputs'}. Stage 2 trained this student from the cache "
             "alone.", *_pruned_text(info), "",
             "| | |", "|---|---|",
             f"| teacher | {linked(info, 'teacher') or 'unknown'} |",
             f"| student initialised from | {linked(info, 'student_model') or 'random (from config)'}"
             f"{' (cut from the teacher)' if info.get('pruned_from') else ''} |",
             f"| cache fingerprint | `{fingerprint_digest(fp)}` |" if fp is not None else "| cache fingerprint | unknown |",
             *_fingerprint_rows(fp, info),
             f"| KD mode | {_fmt(info.get('kd_mode', 'unknown'))} |"]
    if info.get("dataset"):
        lines.append(f"| data | {linked(info, 'dataset', dataset=True)} |")
    for key, label in (("temperature", "KD temperature"), ("steps", "training steps"),
                       ("tokens", "training tokens (seen)"), ("tokenizer", "tokenizer")):
        if key in info:
            lines.append(f"| {label} | {_fmt(display_name(info[key]) if key == 'tokenizer' else info[key])} |")
    if info.get("chat"):
        lines.append("| data format | chat: loss on the assistant's tokens only (the cache's loss_mask) |")
    lines.append(f"| license | {meta['license']} |" if meta.get("license") else
                 "| license | unknown: the student's starting point states none; choose one before publishing "
                 "(the teacher's and the data's terms may bind it) |")
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rest.items()]
    held = dict(info.get("held_out") or {})
    counted = held.pop("counted", None)
    if held:
        lines += ["", "## Held-out evaluation", "", f"Counted over: {counted or 'all tokens'}.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in held.items()]
    lines += _usage(repo_id or name, bool(info.get("chat")))
    card = ModelCard("---\n{}\n---\n" + "\n".join(lines))  # an empty metadata block, then the hub's own
    card.data = ModelCardData(**meta)
    return card


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
    """Write ``student_dir/README.md`` (``model_card``) and return its path."""
    path = Path(student_dir) / "README.md"
    model_card(info, Path(student_dir).name).save(path)
    return path
