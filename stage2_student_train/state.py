"""What a stage-2 run is made of: ``RunSetup`` (facts fixed for the run: device, precision,
cache, tokenizer, KD mode, data access) and ``TrainState`` (what changes step by step and what a
checkpoint holds), with the small builders that make them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.cache import CacheReader
from pipeline.cache.summary import kd_floor_at
from pipeline.config import Config
from pipeline.device import set_up_device
from pipeline.distributed import Dist
from pipeline.errors import ConfigError

from . import kd_modes, parallel
from .checkpoint import rng_state, set_rng_state
from .data import BatchStream, DataAccess, Prefetcher, data_access
from .objective import Trainable
from .optim import EMA, build_optimizer, build_scheduler
from .router import ProjectorRouter
from .student import build_student, check_document_mask, load_student_tokenizer


@dataclass
class RunSetup:
    cfg: Config
    dist: Dist
    device: torch.device
    precision: Any
    reader: CacheReader
    tokenizer: Any
    same_tokenizer: bool
    mode: kd_modes.KDMode
    access: DataAccess
    run_dir: Path
    parallel: str
    need_hidden: bool
    t_start: float = field(default_factory=time.perf_counter)
    cache_fingerprint: dict = field(default_factory=dict)
    """The cache's fingerprint when this run began (an extended cache keeps it in its history)."""
    train_sequences: int = 0
    """How many of the cache's train sequences (a prefix) this run trains on: all of them for a
    new run; on resume, as many as the cache held when the run began (it may have been extended)."""

    def train_indices(self):
        return self.reader.split_indices("train")[:self.train_sequences]

    def kd_floor(self) -> list[dict[str, float]]:
        """The cache encoding's fidelity at this run's temperature(s), in the loss's direction: the
        KD loss a student equal to the exact teacher pays (``kd_floor`` of the cache's summary; the
        recorded temperature nearest to the run's). Empty for modes that read no cached top-k
        values, or a cache that did not record it."""
        if "topk" not in self.mode.needs:
            return []
        floor = self.reader.summary_stats().get("kd_floor")
        out = []
        for tau in dict.fromkeys(t for t in (self.cfg.kd.temperature, self.cfg.kd.temperature_final) if t != -1):
            found = kd_floor_at(floor, tau)
            if found is not None:
                out.append({"temperature": tau, "measured_at": found[0], "nats": found[1]})
        return out

    def autocast(self):
        low = self.device.type == "cuda" and self.precision.dtype != torch.float32
        return (torch.autocast("cuda", dtype=self.precision.dtype) if low
                else torch.autocast(self.device.type, enabled=False))

    def teacher_head(self) -> torch.Tensor | None:
        return torch.from_numpy(self.reader.head()).to(self.device) if "head" in self.mode.needs else None


def setup_run(cfg: Config, dist: Dist, show_progress: bool) -> RunSetup:
    """Everything checked before anything is written: device, cache, tokenizer, KD mode, data."""
    t = cfg.train
    kd_modes.get(cfg.kd.mode)  # a mistyped mode is named before any file is opened
    precision = set_up_device(t.device, t.precision, dist, t.num_threads)
    device = precision.device
    kind = parallel.choose(t.parallel, dist)
    reader = CacheReader(cfg.cache.dir, views_dir=cfg.cache.views_dir or None)
    reader.require_complete()
    if "eval" not in reader.spec.splits:
        raise ConfigError(f"cache {cfg.cache.dir} has no held-out eval sequences; rebuild it with data.eval_documents")
    for split in ("train", "eval") if reader.spec.has_loss_mask else ():
        if reader.stat_total(f"{split}_masked_targets") == 0:  # every step's loss would be 0, silently
            raise ConfigError(f"cache {cfg.cache.dir}: its {split} sequences hold no assistant (completion) token, so "
                              f"there is nothing to {'train' if split == 'train' else 'evaluate'} on; rebuild it with "
                              "chat rows that fill a sequence of that split (cache.overwrite=true)")
    tokenizer, same_tokenizer = load_student_tokenizer(cfg, reader)
    cache_has = {"topk"} | ({"hidden"} if reader.spec.store_hidden else set()) | (
        {"head"} if reader.has_head else set()) | ({"samples"} if reader.spec.samples else set())
    temperatures = (cfg.kd.temperature,) + ((cfg.kd.temperature_final,) if cfg.kd.temperature_final != -1 else ())
    mode = kd_modes.check(cfg.kd.mode, same_tokenizer=same_tokenizer, cache_has=cache_has,
                          teacher=reader.spec.teacher, cache_dir=cfg.cache.dir, temperatures=temperatures,
                          divergence=cfg.kd.divergence)
    if mode.student_k and cfg.kd.union_student_k > reader.spec.vocab_size:
        raise ConfigError(f"kd.union_student_k={cfg.kd.union_student_k} exceeds the vocabulary "
                          f"({reader.spec.vocab_size}); lower it (8 is typical)")
    need_hidden = "hidden" in mode.needs or cfg.kd.feature_weight > 0
    if need_hidden and not reader.spec.store_hidden:
        raise ConfigError(f"kd.feature_weight needs the teacher hidden states, and cache {cfg.cache.dir} has none; "
                          "rebuild it with cache.store_hidden=true cache.overwrite=true, or set kd.feature_weight=0")
    access = data_access(reader, tokenizer, same_tokenizer, need_hidden, dist, show_progress,
                         need_samples="samples" in mode.needs, need_chunks="next_logprob" in mode.needs)
    return RunSetup(cfg, dist, device, precision, reader, tokenizer, same_tokenizer, mode, access,
                    Path(cfg.run.runs_dir) / cfg.run.name, kind, need_hidden,
                    cache_fingerprint=reader.fingerprint, train_sequences=reader.spec.split_sizes()["train"])


@dataclass
class TrainState:
    """The model and everything that moves with it; ``state_dict`` / ``load_state_dict`` are
    symmetric, and together with the student weights they are what an exact resume needs."""

    parts: Trainable
    net: nn.Module  # what the forward runs through (DDP/FSDP wrapper, or ``parts``)
    named: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    data: Prefetcher
    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named if p.requires_grad]

    def state_dict(self, rng: list[dict], sharded: bool = False) -> dict[str, Any]:
        """``rng``: every rank's RNG state (``gather_rng``), so each rank resumes its own stream.
        ``sharded`` (FSDP): without the tensors that ``checkpoint.save_sharded`` writes in shards
        (optimizer, extra modules, EMA weights)."""
        ema = self.ema.state_dict() if self.ema else None
        out = {"step": self.step, "skipped_steps": self.skipped, "scheduler": self.scheduler.state_dict(),
               "scaler": self.scaler.state_dict(), "data": self.data.state_dict(), "rng": rng}
        if sharded:
            return {**out, "ema": {k: v for k, v in ema.items() if k != "shadow"} if ema else None}
        return {**out, "optimizer": self.optimizer.state_dict(), "ema": ema,
                **{name: m.state_dict() if m is not None else None for name, m in self.parts.extras().items()}}

    def load_state_dict(self, state: dict[str, Any], rank: int = 0) -> None:
        """The inverse of ``state_dict``; for a sharded state, after ``checkpoint.load_sharded``."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        init_scaler(self.scaler, self.params[0].device)
        if self.ema is not None:
            self.ema.load_state_dict({"shadow": self.ema.shadow, **state["ema"]})
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            for name, module in self.parts.extras().items():
                if module is not None:
                    module.load_state_dict(state[name])
        self.data.load_state_dict(state["data"])
        self.step, self.skipped = state["step"], state["skipped_steps"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])


def build_state(run: RunSetup, student: nn.Module | None = None) -> TrainState:
    """A fresh state (or around ``student``, the weights of a checkpoint being resumed)."""
    cfg, reader = run.cfg, run.reader
    torch.manual_seed(cfg.run.seed)
    if student is None:
        # Same tokenizer: the cached ids range over the teacher's head, which may exceed len(tokenizer).
        vocab = max(len(run.tokenizer), reader.spec.vocab_size) if run.same_tokenizer else len(run.tokenizer)
        student = build_student(cfg, vocab, run.access.seq_len, added_tokens=getattr(run.tokenizer, "kd_added_tokens", 0))
    if reader.spec.document_mask:  # a family that ignores the mask is refused before any step
        check_document_mask(student)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    hidden = student.config.hidden_size
    feature_map = nn.Linear(hidden, reader.spec.hidden_dim, bias=False) if cfg.kd.feature_weight > 0 else None
    router = None
    if "router" in run.mode.modules:
        r = cfg.router
        router = ProjectorRouter(reader.spec.hidden_dim, hidden, r.num_experts, r.noise_std)
    parts = Trainable(student, feature_map, router).to(run.device).train()
    net = parallel.wrap(parts, run.parallel, run.device)
    named = list(student.named_parameters()) + [(f"{name}.{n}", p) for name, m in parts.extras().items()
                                                if m is not None for n, p in m.named_parameters()]
    optimizer = build_optimizer(named, cfg.train)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision.use_grad_scaler)
    init_scaler(scaler, run.device)
    stream = BatchStream(run.train_indices(), cfg.train.batch_size, cfg.run.seed, run.access.load,
                         rank=run.dist.rank, world=run.dist.world)
    return TrainState(parts, net, named, optimizer, build_scheduler(optimizer, cfg.train), scaler,
                      EMA(named, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
                      Prefetcher(stream, pin_memory=run.device.type == "cuda"))


def enable_checkpointing(student: nn.Module) -> None:
    """The HF student's own activation checkpointing (transformers 5 renamed it), non-reentrant:
    it works with the objective's chunked backward from the last hidden state."""
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def init_scaler(scaler: torch.amp.GradScaler, device: torch.device) -> None:
    """The objective scales its chunks by hand (``get_scale``), so create the scale tensor the way
    ``scale()`` does on first use."""
    if scaler.is_enabled():
        scaler.scale(torch.ones((), device=device))


def gather_rng(dist: Dist) -> list:
    """Every rank's RNG state (a collective: call on every rank)."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, mine)
    return out
