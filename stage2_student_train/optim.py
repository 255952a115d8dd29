"""Optimizer, learning-rate schedule, EMA and the curriculum schedules: small builders."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from pipeline.config import KDConfig, TrainConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices decay, vectors (norms, biases) do not."""
    decay = [p for n, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in params if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # CUDA: the fused kernel (one launch, no per-step temporaries beyond the moments); it needs
    # plain CUDA tensors (FSDP's DTensors keep the per-tensor loop). CPU: the per-tensor loop.
    plain = [p for n, p in params if p.requires_grad]
    fused = bool(plain) and all(p.is_cuda and type(p.data) is torch.Tensor for p in plain)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             **({"fused": True} if fused else {"foreach": False}))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then a true cosine from 1 down to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def linear(start: float, end: float, progress: float) -> float:
    """A curriculum value at ``progress`` in [0, 1]; ``end`` = -1 means constant."""
    return start if end == -1 else start + (end - start) * progress


def kd_schedule(kd: KDConfig, step: int, steps: int) -> tuple[float, float]:
    """(KD weight, temperature) at optimizer step ``step``."""
    progress = step / max(1, steps - 1)
    return linear(kd.weight, kd.weight_final, progress), linear(kd.temperature, kd.temperature_final, progress)


class EMA:
    """fp32 shadow of every trainable weight; decay warms up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params if p.requires_grad}

    @torch.no_grad()
    def update(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        kept = [(self.shadow[n], p.detach().float()) for n, p in named_params if n in self.shadow]
        if kept:  # the same mul_ and add_ per tensor, batched into two calls
            shadows, values = map(list, zip(*kept))
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, values, alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints load on the CPU; the shadow lives beside the weights it follows."""
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {n: t.to(self.shadow[n].device) if n in self.shadow else t for n, t in state["shadow"].items()}

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module, prefix: str = "") -> None:
        for n, p in module.named_parameters():
            if prefix + n in self.shadow:
                p.copy_(self.shadow[prefix + n].to(p.dtype))

    @contextmanager
    def applied(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
        """The EMA weights in place of the trained ones for the block (eval), restored exactly
        after. In place, so it works the same through DDP and on FSDP-sharded parameters."""
        with torch.no_grad():
            saved = [(p, p.detach().clone()) for n, p in named_params if n in self.shadow]
            for n, p in named_params:
                if n in self.shadow:
                    p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in saved:
                    p.copy_(original)
