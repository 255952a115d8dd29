"""Process-group helpers for runs started with ``torchrun`` (gloo on CPU, nccl on CUDA).

A single process (no ``WORLD_SIZE`` in the environment) gets a no-op ``Dist`` so callers never
branch on whether they are distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import PipelineError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is True on every rank."""
        if not self.enabled:
            return ok
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if ok else 1], device=device)  # nccl reduces CUDA tensors only
        dist.all_reduce(flag)
        return int(flag) == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (one collective); the values themselves alone."""
        if not self.enabled:
            return [float(v) for v in values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; a PipelineError there is raised on every rank (no hang)."""
        error: list[str | None] = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
            except PipelineError as e:
                error[0] = f"{e.__class__.__name__}\0{e}"
                if not self.enabled:
                    raise
        if self.enabled:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            cls_name, message = error[0].split("\0", 1)
            from . import errors
            raise getattr(errors, cls_name, PipelineError)(message)
        return result

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":  # one GPU per rank; object collectives use the current device
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))))
