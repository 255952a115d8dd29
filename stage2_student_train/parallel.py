"""Data parallelism with torch's own engine: ``train.parallel = none | ddp | fsdp``.

- ``ddp``: ``DistributedDataParallel`` over the student and its extra modules. Gradient
  accumulation runs under ``no_sync`` so the step's gradients are reduced once, bucketed and
  overlapped with the last micro-batch's backward.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer is its own unit,
  the root (embeddings, tied head, norm, router, feature map) another, kept unsharded between
  forward and backward because the chunked loss reads the head outside ``forward``. Parameters,
  gradients and optimizer state are sharded across ranks: a student that does not fit one device.

The objective does ONE backward per micro-batch (see ``objective.py``), which is what both
engines hook into; everything trained is one ``Trainable`` module, so nothing is reduced by hand.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from pipeline.distributed import Dist
from pipeline.errors import ConfigError

from .objective import Trainable


def choose(requested: str, dist: Dist) -> str:
    """``auto``: ddp under torchrun (more than one process), else none."""
    if requested == "auto":
        return "ddp" if dist.enabled else "none"
    if requested != "none" and not dist.enabled:
        raise ConfigError(f"train.parallel={requested} needs several processes: start with "
                          f"`torchrun --nproc_per_node=N -m pipeline train-student ...`, or use train.parallel=none")
    if requested == "none" and dist.enabled:
        raise ConfigError(f"train.parallel=none under torchrun ({dist.world} processes) would train {dist.world} "
                          "unsynchronised copies; use train.parallel=ddp or fsdp")
    return requested


def wrap(parts: Trainable, kind: str, device: torch.device) -> nn.Module:
    """The module the forward runs through. ``parts`` stays the owner of the parameters (under
    FSDP they become sharded DTensors in place, so build the optimizer after this)."""
    if kind == "none":
        return parts
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(parts, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    from .student import decoder_layers

    for layer in decoder_layers(parts.student):
        fully_shard(layer, mesh=mesh)
    fully_shard(parts, mesh=mesh, reshard_after_forward=False)
    return parts


@contextmanager
def gradient_sync(net: nn.Module, kind: str, sync: bool) -> Iterator[None]:
    """Reduce gradients in this backward only when ``sync`` (the step's last micro-batch)."""
    if kind == "ddp":
        with (nullcontext() if sync else net.no_sync()):
            yield
    elif kind == "fsdp":
        net.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def after_eval(net: nn.Module, kind: str) -> None:
    """FSDP keeps the root unsharded after a forward that has no backward: free it, so weights
    swapped in place (EMA) are gathered afresh by the next forward."""
    if kind == "fsdp":
        net.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) one; a collective under FSDP: call on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Total gradient norm over ``params`` (one device sync), clipped to ``max_norm`` when > 0.
    Non-finite gradients give a non-finite norm: the caller skips the step."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], error_if_nonfinite=False)
    return float(full_tensor(norm))
