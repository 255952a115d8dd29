"""Device and precision policy (README "GPU notes").

- CPU: fp32.
- CUDA compute capability >= 8.0 (Ampere and newer): bf16 autocast.
- CUDA below 8.0 (P100 = 6.0, T4 = 7.5): fp16 autocast with a GradScaler. We do not trust
  ``torch.cuda.is_bf16_supported()``: it says True on those cards through slow emulation.
- A forced bf16 below 8.0 is an error. A torch build without kernels for the GPU (CUDA 12.8+
  wheels dropped Pascal's sm_60) is an error that names the build to install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .distributed import Dist

PRECISIONS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype
    """Compute dtype: autocast dtype for training, weight dtype for teacher inference."""
    use_grad_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use device=auto or cpu")
    return dev


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def choose_precision(device: torch.device, requested: str = "auto",
                     capability: tuple[int, int] | None = None) -> Precision:
    """The policy as a pure function of the device, its capability and the user's request."""
    if requested not in ("auto",) + PRECISIONS:
        raise ConfigError(f"precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if requested in ("auto", "float32"):
            return Precision(device, torch.float32, False, "CPU: fp32")
        return Precision(device, getattr(torch, requested), False, f"CPU: {requested} forced by config")
    cap = capability if capability is not None else compute_capability(device)
    native_bf16 = cap is not None and cap >= (8, 0)
    if requested == "bfloat16" and not native_bf16:
        raise ConfigError(
            f"bfloat16 asked for, but this GPU has compute capability {cap[0]}.{cap[1]} < 8.0: "
            "bf16 is only emulated there (slow); use dtype=auto (fp16 + GradScaler) or float32")
    if requested == "float32":
        return Precision(device, torch.float32, False, "CUDA: fp32 forced by config")
    if requested == "float16" or (requested == "auto" and not native_bf16):
        return Precision(device, torch.float16, True,
                         f"CUDA capability {cap[0]}.{cap[1]}: fp16 autocast + GradScaler")
    return Precision(device, torch.bfloat16, False, f"CUDA capability {cap[0]}.{cap[1]} >= 8.0: bf16 autocast")


def check_cuda_build(device: torch.device) -> str | None:
    """None if this torch build has kernels for the GPU, else a message saying what to install."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    archs = torch.cuda.get_arch_list()
    if arch in archs or any(a.startswith("compute_") and int(a[8:]) <= major * 10 + minor for a in archs):
        return None
    return (f"this torch build ({torch.__version__}) has no kernels for {arch} ({torch.cuda.get_device_name(device)}); "
            f"it ships {', '.join(archs)}. For a P100 install a CUDA 12.6 build: "
            "pip install torch --index-url https://download.pytorch.org/whl/cu126")


def cpu_threads(local_processes: int = 1, requested: int = 0) -> int:
    """Threads for one process: the request, else the cores shared by the local processes."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def set_up_device(name: str, precision: str, dist: Dist, threads: int = 0) -> Precision:
    """A stage's device, precision and CPU threads, checked before anything is written: ``name``
    (auto, cpu, cuda[:N]; each rank of a torchrun job takes its local GPU), ``precision`` (auto or
    one of ``PRECISIONS``, see ``choose_precision``), ``threads`` (0: the cores shared by the
    local processes). ConfigError if this torch build has no kernels for the GPU."""
    torch.set_num_threads(cpu_threads(dist.local_world, threads))
    device = resolve_device(name)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    chosen = choose_precision(device, precision)
    if (problem := check_cuda_build(device)) is not None:
        raise ConfigError(problem)
    return chosen
