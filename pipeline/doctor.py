"""``doctor``: what this machine has and what the pipeline would do on it."""

from __future__ import annotations

import argparse
import platform

import torch

from .device import check_cuda_build, choose_precision, cpu_threads, resolve_device


def report() -> list[tuple[str, str]]:
    import numpy
    import transformers
    import zarr

    device = resolve_device("auto")
    precision = choose_precision(device)
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("zarr", zarr.__version__),
        ("numpy", numpy.__version__),
        ("device", str(device)),
    ]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        free, total = torch.cuda.mem_get_info(device)
        rows += [
            ("gpu", torch.cuda.get_device_name(device)),
            ("compute capability", f"{major}.{minor}"),
            ("gpu memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"),
            ("torch cuda archs", " ".join(torch.cuda.get_arch_list())),
            ("kernels for this gpu", check_cuda_build(device) or "yes"),
        ]
    else:
        rows += [("compute capability", "n/a (no CUDA device)"), ("cpu threads", str(cpu_threads()))]
    rows += [("precision", f"{precision.name} ({precision.reason})"),
             ("grad scaler", "yes" if precision.use_grad_scaler else "no")]
    return rows


def main(args: argparse.Namespace | None = None) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
