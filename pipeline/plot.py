"""``plot``: eval and training curves from runs' ``metrics.jsonl`` to PNG, with the teacher's
level (from the run's cache) as a reference line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import PipelineError


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; is {run_dir} a run directory (runs/<name>)?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "split" not in r], [r for r in records if r.get("split") == "eval"]


def teacher_level(run_dir: Path) -> dict | None:
    """The teacher's eval ppl/bpb from the manifest of the cache the run trained on."""
    from .tomlcompat import tomllib

    from .cache.store import open_storage
    try:
        cache_dir = tomllib.loads((run_dir / "config.toml").read_text())["cache"]["dir"]
        summary = json.loads(open_storage(cache_dir).read_bytes("manifest.json"))["summary"]
        return {"ppl": summary.get("teacher_eval_ppl"), "bpb": summary.get("teacher_eval_bpb")}
    except (OSError, KeyError, ValueError):
        return None


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    teacher = None
    for run_dir in run_dirs:
        train, evals = read_metrics(run_dir)
        label = run_dir.name
        if evals:
            axes[0].plot([r["step"] for r in evals], [r["ppl"] for r in evals], marker="o", label=label)
            axes[1].plot([r["step"] for r in evals], [r["bpb"] for r in evals], marker="o", label=label)
        if train:
            axes[2].plot([r["step"] for r in train], [r["ce"] for r in train], label=f"{label} (train CE)", alpha=0.8)
        teacher = teacher or teacher_level(run_dir)
    if teacher and teacher.get("ppl"):
        axes[0].axhline(teacher["ppl"], color="black", linestyle="--", label=f"teacher ({teacher['ppl']:.1f})")
        axes[1].axhline(teacher["bpb"], color="black", linestyle="--", label=f"teacher ({teacher['bpb']:.3f})")
    axes[0].set(title="held-out perplexity", xlabel="optimizer step", ylabel="perplexity (log scale)", yscale="log")
    axes[1].set(title="held-out bits per byte", xlabel="optimizer step", ylabel="bits per byte")
    axes[2].set(title="training cross-entropy", xlabel="optimizer step", ylabel="CE (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "curves.png"
    print(plot_runs(runs, out))
    return 0
