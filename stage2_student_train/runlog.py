"""``metrics.jsonl``: one JSON object per line, written by rank 0, flushed as it goes (and
passed to the run's experiment trackers, ``trackers.py``, at the same points)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True, trackers=None):
        self.file = open(path, "a") if enabled else None
        self.trackers = trackers if enabled else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def train_record(self, state, result, w, tokens_per_s: float, device: torch.device, router: bool) -> None:
        self.write({"step": state.step, "loss": result.loss, "ce": result.ce, "kd": result.kd,
                    "lr": result.lr, "grad_norm": result.grad_norm,
                    "skipped_steps": state.skipped, "kd_weight": w.kd, "temperature": w.temperature,
                    "tokens_per_s": round(tokens_per_s, 1), "data_stall_s": round(state.data.stall_s, 3),
                    **memory_mb(device),
                    **({"router_k": w.router_k, "router_utilisation": result.router_utilisation} if router else {})})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint's step (a crashed run got further than its
    last checkpoint); the resumed run writes them again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the crash
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def memory_mb(device: torch.device) -> dict:
    """CUDA: peak allocated by torch, and the device's free/total (mem_get_info, which sees other
    processes too). CPU: the process's resident set now and at its peak."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "gpu_free_mb": round(free / 2**20, 1), "gpu_total_mb": round(total / 2**20, 1)}
    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        with open("/proc/self/statm") as f:
            rss = round(int(f.read().split()[1]) * resource.getpagesize() / 2**20, 1)
    except OSError:  # not Linux
        rss = peak
    return {"mem_mb": rss, "mem_peak_mb": peak}
