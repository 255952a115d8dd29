"""One fresh process: build the student and a batch, reset the peak-RSS mark, run 3 training
steps; print the RSS before the steps and the peak during them (MB) as JSON. Used by ``bench``
for P6 (Linux: /proc/self/clear_refs resets VmHWM)."""

import argparse
import json

from pipeline.config import load_config


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--config")
    a = p.parse_args()
    from bench.run import student_setup, train_step

    cfg = load_config(a.config, [f"cache.dir={json.dumps(a.cache)}", f"train.batch_size={a.batch_size}"])
    run, state = student_setup(cfg)
    batch = state.data.next_batch()
    train_step(run, state, batch, a.mode, cfg)  # optimizer state exists from here on
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current size
    base = status_mb("VmRSS")
    for _ in range(3):
        train_step(run, state, batch, a.mode, cfg)
    peak = status_mb("VmHWM")
    state.data.close()
    print(json.dumps({"mode": a.mode, "base_mb": round(base, 1), "peak_mb": round(peak, 1)}))


if __name__ == "__main__":
    main()
