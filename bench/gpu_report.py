"""``bench.gpu``'s results as ``gpu-results.json`` (everything) and ``gpu-results.md`` (the table)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"none": "none (teacher's tokenizer)", "topk_tail": "topk_tail", "sampled": "sampled",
          "cross_none": "none (SmolLM2 tokenizer)"}


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:.4g}"
    return f"{v}{unit}"


def header(r: dict) -> list[str]:
    env, t = r["environment"], r.get("teacher") or {}
    where = env.get("gpu", env["device"]) + (f" (capability {env['capability']})" if "capability" in env else "")
    lines = [f"# GPU check: {where}, torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}",
             "", f"{env['date_utc']} UTC, python {env['python']}. Wall {r['wall_s']} s of a {r['budget_s']:.0f} s "
             f"budget. Matmul rate: {fmt((r.get('matmul') or {}).get('tflops'))} TFLOP/s "
             f"({(r.get('matmul') or {}).get('dtype')} {(r.get('matmul') or {}).get('n')}^3), the MFU denominator."]
    if t:
        lines += ["", f"Teacher: random Qwen3-MoE, {t['params'] / 1e6:.1f}M parameters ({t['active_params'] / 1e6:.1f}M "
                      f"active), hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_experts']} experts "
                      f"(top-{t['num_experts_per_tok']}, width {t['moe_intermediate_size']}), vocabulary "
                      f"{t['vocab_size']}."]
    return lines


def stage_rows(r: dict) -> list[str]:
    s1, s2, ra = r.get("stage1") or {}, r.get("stage2") or {}, r.get("ratios") or {}
    rows = ["", "| what | value | planner / target |", "|---|---|---|",
            f"| stage 1: teacher tokens/s | {fmt(s1.get('teacher_tokens_per_s'))} | |",
            f"| stage 1: P1 pass / pure forward ({s1.get('tokens')} tokens) | {fmt(ra.get('P1'))} | <= 1.05 |",
            f"| stage 1: peak MiB | {fmt(s1.get('peak_mb'))} | planner {fmt(r.get('plan_stage1_peak_mb'))} |"]
    for label, s in s2.items():
        name = LABELS.get(label, label.replace("cross_", "") + " (SmolLM2 tokenizer)")
        p2 = ra.get(f"P2_{label}")
        rows += [f"| stage 2 {name}: tokens/s, batch {s['batch']} x {s['seq_len']} | {fmt(s['tokens_per_s'])} | |",
                 f"| stage 2 {name}: MFU ({s['student_params'] / 1e6:.1f}M params, vocab {s['student_vocab']}) | "
                 f"{fmt(s['mfu'])} | >= 0.40 (SmolLM2 vocab) |",
                 f"| stage 2 {name}: data stall per step | {fmt(s['data_stall_s_per_step'], ' s')} "
                 f"({fmt(s['data_stall_fraction'])} of the step) | < 0.02 |",
                 f"| stage 2 {name}: peak MiB | {fmt(s['peak_mb'])} | planner {fmt(s['planner_peak_mb'])} |"]
        if p2 is not None:
            rows.append(f"| stage 2 {name}: P2 KD step / CE step | {fmt(p2)} | <= 1.10 |")
    rows += [f"| P3 offline / online KD step (topk_tail) | {fmt(ra.get('P3'))} | <= 0.5 |",
             f"| training tokens/s with the teacher online | {fmt(ra.get('online_tokens_per_s'))} | seed: ~400 on a P100 |"]
    return rows


def p100_rows(r: dict) -> list[str]:
    p = r.get("p100")
    if not p:
        return ["", f"P100 emulation: not run ({r['errors'].get('p100') or r['skipped'].get('p100')})."]
    return ["", f"P100 emulation ({p['config']}, kd.mode={p['kd_mode']}, {p['precision']}, usable memory capped at "
                f"{p['cap_mb']} MiB{'' if p['emulated'] else ': NOT emulated on the CPU'}): batch {p['batch']} x "
                f"grad_accum {p['grad_accum']} x seq {p['seq_len']}: fits {p['fits']}, peak {fmt(p.get('peak_mb'))} MiB "
                f"allocated / {fmt(p.get('peak_reserved_mb'))} MiB reserved, headroom {fmt(p.get('headroom_mb'))} MiB "
                f"({fmt(p.get('headroom_fraction'))}); planner {fmt(p.get('planner_peak_mb'))} MiB"
                f"{' at capability 6.0' if p['emulated'] else ''}, "
                f"its largest batch at 16 GiB {fmt(p.get('planner_largest_batch'))}; {fmt(p.get('tokens_per_s'))} "
                f"tokens/s here (not a P100's speed)."]


def write(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-results.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    lines = [*header(r), *stage_rows(r), *p100_rows(r), "", "| target | figure | holds |", "|---|---|---|",
             *[f"| {k} | {fmt(v['value'])} | {fmt(v['holds'])} |" for k, v in r["targets"].items()],
             "", "Phase times (s): " + ", ".join(f"{k} {v}" for k, v in r["phase_s"].items())]
    lines += [f"FAILED {k}: {v}" for k, v in r["errors"].items()] + [f"skipped {k}: {v}" for k, v in r["skipped"].items()]
    (out / "gpu-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
