"""Stage 2, top to bottom: cache -> student training -> eval -> checkpoints -> final export.

    python -m pipeline train-student --config configs/default.toml key=value ...
    python -m pipeline resume runs/<run>/checkpoints/step-N
    torchrun --nproc_per_node=2 -m pipeline train-student ...     # DDP (train.parallel=fsdp: sharded)

Reads only the cache: the teacher model is never loaded. The recipe is ``run`` below; the
pieces it is made of are small builders (``state.py``), one step (``step.py``), the objective
(``objective.py``) and the KD-mode registry (``kd_modes.py``).
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from pipeline.config import Config, load_config, to_toml
from pipeline.distributed import Dist, init_distributed
from pipeline.locks import acquire_lock

from .checkpoint import (CheckpointError, begin_checkpoint, commit_checkpoint, load_sharded, load_state,
                         resume_config, save_sharded, write_state)
from .cache_watch import check_cache_unchanged
from .evaluate import evaluate
from .parallel import after_eval
from .rundir import check_location, lock_path, prepare_run_dir, with_cache_facts
from .runlog import MetricsLog, truncate_metrics
from .signals import StopRequest
from .state import RunSetup, TrainState, build_state, gather_rng, setup_run
from .step import TrainingError, step_weights, train_step  # noqa: F401  (TrainingError: part of the API)
from .model_card import copy_prune_record, run_facts
from .student import save_student, write_model_card
from .trackers import Trackers, check_trackers

SHARDED = "sharded"  # FSDP checkpoints: the torch.distributed.checkpoint folder inside a checkpoint


def main(args: argparse.Namespace) -> int:
    return exit_code(train(load_config(args.config, args.overrides)))


def resume_main(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    load_state(ckpt)  # a clear error for a missing or damaged checkpoint before anything else
    return exit_code(train(resume_config(ckpt, args.overrides), resume_from=ckpt))


def exit_code(summary: dict) -> int:
    """128 + the signal's number when a signal stopped the run (the shell's convention), else 0."""
    return 128 + summary["signal"] if summary.get("signal") else 0


def train(cfg: Config, resume_from: Path | None = None, show_progress: bool = True) -> dict:
    dist = init_distributed()
    try:
        with ExitStack() as stack:  # one trainer per run: rank 0 holds the lock (refused on every rank)
            run_dir = Path(cfg.run.runs_dir) / cfg.run.name
            check_location(run_dir, cfg.cache.dir, cfg.cache.views_dir)
            dist.run_on_main(lambda: stack.enter_context(acquire_lock(lock_path(run_dir), f"run {run_dir}")))
            return run(cfg, resume_from, show_progress, dist)
    finally:
        dist.close()


def run(cfg: Config, resume_from: Path | None, show_progress: bool, dist: Dist) -> dict:
    t = cfg.train
    saved = load_state(resume_from) if resume_from else None
    check_trackers(t.report_to)  # a missing tracker package fails before anything is written
    if t.push_to_hub and dist.is_main:  # no token or no network: say so now, not after training
        from .push import check_hub

        check_hub(t.push_to_hub)
    setup = setup_run(cfg, dist, show_progress)
    if saved is not None:
        setup.train_sequences = check_resumable(saved, setup, resume_from)
        setup.cache_fingerprint = saved["cache_fingerprint"]
        if setup.train_sequences < setup.reader.spec.split_sizes()["train"] and dist.is_main:
            print(f"cache {cfg.cache.dir} was extended after this run began; the run continues on the "
                  f"{setup.train_sequences} train sequences it started with", flush=True)
    state = build_state(setup, student=load_student(resume_from) if saved else None)
    if saved is not None:
        resume_state(setup, state, saved, resume_from)
    elif dist.is_main:  # only once everything above is known to work: a failed load leaves nothing
        prepare_run_dir(setup.run_dir, with_cache_facts(cfg, setup.reader))  # records the cache's teacher/data
    dist.barrier()
    kd_floor = setup.kd_floor()
    if kd_floor and dist.is_main:  # what the cache's top-k encoding costs this run, before it starts
        print(fidelity_line(kd_floor, setup.reader.spec.topk_encoding, cfg.kd.mode), flush=True)
    head, autocast = setup.teacher_head(), setup.autocast()
    log = MetricsLog(setup.run_dir / "metrics.jsonl", enabled=dist.is_main,
                     trackers=Trackers(cfg, setup.run_dir) if dist.is_main and t.report_to else None)
    stop_at = min(t.steps, state.step + t.stop_after) if t.stop_after else t.steps
    tokens_per_step = t.batch_size * t.grad_accum * dist.world * (setup.reader.spec.seq_len - 1)
    bar = tqdm(total=t.steps, initial=state.step, desc=f"train {cfg.run.name}", unit="step",
               disable=not (show_progress and dist.is_main), mininterval=1.0)
    last_eval, stop = None, StopRequest()
    with stop:
        while state.step < stop_at:
            t0 = time.perf_counter()
            w = step_weights(cfg, state.step)
            batches = [state.data.next_batch() for _ in range(t.grad_accum)]
            result = train_step(state, batches, cfg, w, dist=dist, kind=setup.parallel, autocast=autocast, head=head)
            tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
            log.train_record(state, result, w, tokens_per_s, setup.device, router=state.parts.router is not None)
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            bar.update(1)
            last_eval = maybe_eval(setup, state, log, show_progress) or last_eval
            if stop.requested(dist):
                stop_at = state.step  # save here, then leave
            maybe_save(setup, state, stop_at)
    bar.close()
    state.data.close()
    log.close()
    summary = {"run_dir": str(setup.run_dir), "step": state.step, "skipped_steps": state.skipped, "eval": last_eval,
               "cache_kd_floor": kd_floor}
    if state.step < t.steps:
        why = f"{stop.name} received" if stop_at == state.step and stop.signum is not None else "train.stop_after"
        if dist.is_main:
            print(f"stopped at step {state.step} of {t.steps} ({why}); continue with: make resume "
                  f"CKPT={setup.run_dir}/checkpoints/step-{state.step:08d}"
                  + (" ARGS=train.stop_after=0" if t.stop_after else ""), flush=True)
        return {**summary, "signal": stop.signum}
    return finish(setup, state, summary, tokens_per_step * state.step, resume_from)


def finish(setup: RunSetup, state: TrainState, summary: dict, tokens: int, resume_from: Path | None) -> dict:
    """The end of a run: the EMA student exported with its model card, and ``summary.json``."""
    cfg = setup.cfg
    summary.update(kd_mode=cfg.kd.mode, cache=cfg.cache.dir, wall_s=round(time.perf_counter() - setup.t_start, 1),
                   resumed_from=str(resume_from) if resume_from else None, parallel=setup.parallel,
                   student_parameters=sum(p.numel() for p in state.parts.student.parameters()),
                   cross_tokenizer=setup.access.coverage)
    final = setup.run_dir / "final" / "student"
    check_cache_unchanged(setup)  # the model card must name the cache the student was trained on
    export(setup, state, final)
    if setup.dist.is_main:
        card = {
            "run": cfg.run.name, "teacher": setup.reader.fingerprint.get("teacher"),
            "student_model": cfg.student.model, "dataset": setup.reader.fingerprint.get("dataset"),
            "chat": setup.reader.spec.has_loss_mask,
            "cache_fingerprint": setup.cache_fingerprint, "cache train sequences": setup.train_sequences,
            "kd_mode": cfg.kd.mode, "temperature": cfg.kd.temperature,
            **({"cache KD floor (nats)": {f"{f['temperature']:g}": f["nats"] for f in summary["cache_kd_floor"]}}
               if summary.get("cache_kd_floor") else {}),
            "steps": state.step, "tokens": tokens, "tokenizer": cfg.student.tokenizer or "the teacher's",
            "held_out": {k: v for k, v in (summary["eval"] or {}).items() if k not in ("step", "split")},
            # decided here, where the run's paths resolve as they did in training; push reuses it
            **run_facts(cfg.student.model, setup.reader.fingerprint.get("teacher"),
                        setup.reader.fingerprint.get("dataset"), setup.reader.spec, setup.reader.has_head)}
        copy_prune_record(cfg.student.model, final)  # a student cut from the teacher keeps its record
        write_model_card(final, card)
        summary["model_card"] = card  # what `push` rewrites the card from, for the hub repo
        (setup.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        if cfg.train.push_to_hub:
            from .push import push

            push(setup.run_dir, cfg.train.push_to_hub)
    return summary


# ---------------------------------------------------------------- the loop's small pieces


def fidelity_line(kd_floor: list[dict], encoding: str, mode: str) -> str:
    """The start-of-run statement of what the cache's encoding costs at the run's temperature(s)."""
    parts = [f"{f['nats']:.2e} nats at kd.temperature={f['temperature']:g}"
             + (f" (measured at {f['measured_at']:g})" if f["measured_at"] != f["temperature"] else "")
             for f in kd_floor]
    return (f"cache fidelity: a student equal to the teacher pays {'; '.join(parts)} "
            f"({encoding} encoding, {mode} loss's direction)")


def maybe_eval(setup: RunSetup, state: TrainState, log: MetricsLog, show_progress: bool) -> dict | None:
    """Every ``eval_every`` steps and at the end: held-out CE/ppl/bpb/agreement with the EMA
    weights (swapped in place and back), every rank over its share of the eval sequences."""
    t = setup.cfg.train
    if state.step % t.eval_every and state.step != t.steps:
        return None
    check_cache_unchanged(setup)  # never eval (or go on) on data that replaced the run's cache
    ids = list(setup.reader.split_indices("eval"))[: t.eval_sequences or None]
    net = state.net if setup.parallel == "fsdp" else state.parts  # DDP needs no wrapper without backward
    with state.ema.applied(state.named) if state.ema is not None else nullcontext():
        record = {"step": state.step, "split": "eval",
                  **evaluate(state.parts, setup.access.load, setup.access.target_bytes, ids, t.batch_size,
                             t.loss_chunk_size, setup.autocast(), net=net, dist=setup.dist)}
        if setup.reader.spec.has_loss_mask:  # say which targets the numbers count
            record["counted"] = setup.access.counted
        after_eval(state.net, setup.parallel)
    log.write(record)
    if show_progress and setup.dist.is_main:
        tqdm.write(f"step {state.step}: eval ppl {record['ppl']:.2f} bpb {record['bpb']:.3f} "
                   f"top1-agree {record['teacher_top1_agree']:.3f}")
    return record


def maybe_save(setup: RunSetup, state: TrainState, stop_at: int) -> Path | None:
    """Every ``save_every`` steps and where this invocation stops: a checkpoint, written to a
    temp directory and renamed. FSDP: every rank writes its shards (torch.distributed.checkpoint)."""
    t, dist = setup.cfg.train, setup.dist
    if state.step % t.save_every and state.step != stop_at:
        return None
    rng = gather_rng(dist)
    sharded = setup.parallel == "fsdp"
    tmp = setup.run_dir / "checkpoints" / f".step-{state.step:08d}.tmp"
    final, failure = None, None
    try:
        if dist.is_main:
            begin_checkpoint(setup.run_dir, state.step)
        dist.barrier()
        if sharded:
            save_sharded(tmp / SHARDED, state.parts, state.optimizer, state.ema)
        else:
            export(setup, state, tmp / "student", ema=False)
        if dist.is_main:
            if sharded:  # the student's config and tokenizer only; its weights are in the shards
                state.parts.student.config.save_pretrained(tmp / "student")
                setup.tokenizer.save_pretrained(tmp / "student")
            write_state(tmp, {**state.state_dict(rng, sharded=sharded), "config_toml": to_toml(setup.cfg),
                              "cache_fingerprint": setup.cache_fingerprint, "parallel": setup.parallel,
                              "cache_train_sequences": setup.train_sequences,
                              "student_config": state.parts.student.config.to_dict()}, to_toml(setup.cfg))
            final = commit_checkpoint(setup.run_dir, state.step, tmp, t.keep_checkpoints)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save / safetensors wrap a failed write
        failure = e
    if not dist.all_ok(failure is None):  # every rank learns of a failure on any rank: no hang
        shutil.rmtree(tmp, ignore_errors=True)
        what = write_failure(failure)
        latest = f"; the last good one is {setup.run_dir / 'LATEST'}" if (setup.run_dir / "LATEST").exists() else ""
        raise CheckpointError(f"could not write the checkpoint of step {state.step} ({what}); its temp directory "
                              f"is removed{latest}: free space and resume")
    return final


def write_failure(failure: BaseException | None) -> str:
    """What stopped a checkpoint write, in words (a full disk is named as such whatever wraps it)."""
    if failure is None:
        return "another rank failed"
    text = str(failure)
    if getattr(failure, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "the disk is full"
    if isinstance(failure, OSError) and failure.strerror:
        return failure.strerror
    return f"{failure.__class__.__name__}: {text.splitlines()[0][:120]}" if text else failure.__class__.__name__


def require_finite(model: torch.nn.Module) -> None:
    """An export never holds NaN/Inf weights (a diverged run is an error, not a model)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"the student's weights hold NaN/Inf ({len(bad)} tensors, first: {bad[0]}); nothing "
                            "is exported. Lower train.lr or kd.temperature and resume from an earlier checkpoint")


def export(setup: RunSetup, state: TrainState, path: Path, ema: bool = True) -> None:
    """The student as a Hugging Face directory (EMA weights unless ``ema=False``), by rank 0;
    under FSDP the full weights are gathered to rank 0 first (every rank takes part)."""
    with state.ema.applied(state.named) if ema and state.ema is not None else nullcontext():
        if setup.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(state.parts, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if setup.dist.is_main:
                student = type(state.parts.student)(state.parts.student.config)
                student.load_state_dict({k.removeprefix("student."): v for k, v in full.items()
                                         if k.startswith("student.")})
                if ema:
                    require_finite(student)
                shutil.rmtree(path, ignore_errors=True)
                save_student(student, setup.tokenizer, path)
        elif setup.dist.is_main:
            if ema:  # the final export (checkpoints keep what a resume needs)
                require_finite(state.parts.student)
            shutil.rmtree(path, ignore_errors=True)
            save_student(state.parts.student, setup.tokenizer, path)


# ---------------------------------------------------------------- run directory and resume


def check_resumable(saved: dict, setup: RunSetup, ckpt: Path) -> int:
    """Refuse a checkpoint this setup cannot continue exactly; return how many train sequences
    (a prefix of the cache's) it trained on: the cache's extent when the run began."""
    seen = setup.reader.spec.train_sequences_of(saved["cache_fingerprint"])
    if seen is None:
        from pipeline.cache import fingerprint_diff
        diff = fingerprint_diff(saved["cache_fingerprint"], setup.reader.fingerprint)
        raise CheckpointError(f"checkpoint {ckpt} was trained on another cache ({'; '.join(diff)}); "
                              "resume with the cache it was trained on (cache.dir)")
    run_dir = ckpt.parent.parent
    if setup.run_dir != run_dir and setup.run_dir.resolve() != run_dir.resolve():
        raise CheckpointError(f"checkpoint {ckpt} belongs to run directory {run_dir}, not "
                              f"{setup.run_dir}; do not move checkpoints between runs")
    if saved.get("cache_train_sequences", seen) != seen:
        raise CheckpointError(f"checkpoint {ckpt} trained on {saved['cache_train_sequences']} train sequences, but "
                              f"the cache says its fingerprint then had {seen}; resume with the cache it was trained on")
    was = saved.get("parallel", "none")
    if (was == "fsdp") != (setup.parallel == "fsdp"):
        raise CheckpointError(f"checkpoint {ckpt} was written with train.parallel={was}; resume it with "
                              f"{'train.parallel=fsdp under torchrun' if was == 'fsdp' else 'train.parallel=none or ddp'}")
    return seen


def load_student(ckpt: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if (ckpt / SHARDED).is_dir():  # weights come from the shards once the model is sharded
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "student"), dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(ckpt / "student", dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a damaged directory
        raise CheckpointError(f"the student in checkpoint {ckpt} is damaged ({e.__class__.__name__}); "
                              "pick an older checkpoint") from None


def resume_state(setup: RunSetup, state: TrainState, saved: dict, ckpt: Path) -> None:
    if (ckpt / SHARDED).is_dir():
        load_sharded(ckpt / SHARDED, state.parts, state.optimizer, state.ema)
    state.load_state_dict(saved, setup.dist.rank)
    if setup.dist.is_main:
        truncate_metrics(setup.run_dir / "metrics.jsonl", state.step)
