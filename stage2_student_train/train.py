"""Stage 2, top to bottom: cache -> student training -> eval -> checkpoints -> final export.

    python -m pipeline train-student --config configs/default.toml key=value ...
    python -m pipeline resume runs/<run>/checkpoints/step-N
    torchrun --nproc_per_node=2 -m pipeline train-student ...     # data parallel

Reads only the cache: the teacher model is never loaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache import CacheReader
from pipeline.config import Config, load_config, to_toml
from pipeline.device import check_cuda_build, choose_precision, cpu_threads, resolve_device
from pipeline.distributed import init_distributed
from pipeline.errors import ConfigError, PipelineError

from .checkpoint import CheckpointError, load_state, rng_state, save_checkpoint, set_rng_state
from .data import BatchStream, data_access
from .evaluate import evaluate
from .objective import Weights, batch_objective
from .optim import EMA, build_optimizer, build_scheduler, kd_schedule
from .router import ProjectorRouter, topk_schedule
from .student import build_student, load_student_tokenizer, save_student


class TrainingError(PipelineError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def main(args: argparse.Namespace) -> int:
    train(load_config(args.config, args.overrides))
    return 0


def resume_main(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    load_state(ckpt)  # a clear error for a missing or damaged checkpoint before anything else
    train(load_config(ckpt / "config.toml", args.overrides), resume_from=ckpt)
    return 0


def train(cfg: Config, resume_from: Path | None = None, show_progress: bool = True) -> dict:
    dist = init_distributed()
    try:
        return _train(cfg, resume_from, show_progress, dist)
    finally:
        dist.close()


def _train(cfg: Config, resume_from: Path | None, show_progress: bool, dist) -> dict:
    t_start = time.perf_counter()
    t = cfg.train
    torch.set_num_threads(cpu_threads(dist.local_world, t.num_threads))
    device = resolve_device(t.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    precision = choose_precision(device, t.precision)
    if (problem := check_cuda_build(device)) is not None:
        raise ConfigError(problem)
    autocast = (torch.autocast("cuda", dtype=precision.dtype) if device.type == "cuda" and precision.dtype != torch.float32
                else torch.autocast(device.type, enabled=False))

    reader = CacheReader(cfg.cache.dir)
    reader.require_complete()
    if "eval" not in reader.spec.splits:
        raise ConfigError(f"cache {cfg.cache.dir} has no held-out eval sequences; rebuild it with data.eval_documents")
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    state = load_state(resume_from) if resume_from else None
    if state is not None:
        check_resumable(state, cfg, reader, resume_from)

    # -- tokenizer and data: the cache's own tokens, or its text through the student's tokenizer
    tokenizer, same_tokenizer = load_student_tokenizer(cfg, reader)
    check_kd_mode(cfg.kd.mode, same_tokenizer)
    need_hidden = cfg.kd.mode in ("union", "projected") or cfg.kd.feature_weight > 0
    if need_hidden and not reader.spec.store_hidden:
        raise ConfigError(f"kd.mode={cfg.kd.mode} / kd.feature_weight need the teacher hidden states, and cache "
                          f"{cfg.cache.dir} has none; rebuild it with cache.store_hidden=true cache.overwrite=true")
    if cfg.kd.mode == "union":
        if reader.head() is None:
            raise ConfigError("kd.mode=union needs the teacher head in the cache; run cache-teacher again with "
                              "cache.store_head=true (it adds the head to a complete cache)")
        if reader.spec.teacher.get("final_logit_softcapping"):
            raise ConfigError("kd.mode=union computes teacher logits as hidden . head, which a soft-capped teacher "
                              "does not use; choose kd.mode=topk_tail")
    access = data_access(reader, tokenizer, same_tokenizer, need_hidden, dist, show_progress)
    load, target_bytes, student_len = access.load, access.target_bytes, access.seq_len
    if state is None and dist.is_main:  # only once everything above is known to work
        prepare_run_dir(run_dir, cfg)
    dist.barrier()

    # -- model, extra modules, optimizer, schedules
    torch.manual_seed(cfg.run.seed)
    if state is not None:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(resume_from / "student", dtype=torch.float32)
    else:
        # Same tokenizer: the cached ids range over the teacher's head, which may exceed len(tokenizer).
        vocab = max(len(tokenizer), reader.spec.vocab_size) if same_tokenizer else len(tokenizer)
        model = build_student(cfg, vocab, student_len)
    model.to(device).train()
    feature_map = None
    if cfg.kd.feature_weight > 0:
        feature_map = torch.nn.Linear(model.config.hidden_size, reader.spec.hidden_dim, bias=False).to(device)
    router = None
    if cfg.kd.mode == "projected":
        r = cfg.router
        router = ProjectorRouter(reader.spec.hidden_dim, model.config.hidden_size, r.num_experts, r.noise_std).to(device)
    head = torch.from_numpy(reader.head()).to(device) if cfg.kd.mode == "union" else None
    extras = {"feature_map": feature_map, "router": router}
    named = list(model.named_parameters()) + [(f"{name}.{n}", p) for name, module in extras.items()
                                              if module is not None for n, p in module.named_parameters()]
    params = [p for _, p in named if p.requires_grad]
    optimizer = build_optimizer(named, t)
    scheduler = build_scheduler(optimizer, t)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
    # Chunks are scaled by hand (loss_scale below), so create the scale tensor the way scale() does.
    init_scaler = (lambda: scaler.scale(torch.ones((), device=device))) if scaler.is_enabled() else (lambda: None)
    init_scaler()
    ema = EMA(named, t.ema_decay) if t.ema_decay > 0 else None
    data = BatchStream(reader.split_indices("train"), t.batch_size, cfg.run.seed, load, rank=dist.rank,
                       world=dist.world)
    step, bad_in_row, skipped = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        init_scaler()
        if ema is not None:
            ema.load_state_dict(state["ema"])
        for name, module in extras.items():
            if module is not None:
                module.load_state_dict(state[name])
        data.load_state_dict(state["data"])
        step, skipped = state["step"], state["skipped_steps"]
        set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0])
        if dist.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)

    eval_ids = list(reader.split_indices("eval"))[: t.eval_sequences or None]
    metrics = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None
    bar = tqdm(total=t.steps, initial=step, desc=f"train {cfg.run.name}", unit="step",
               disable=not (show_progress and dist.is_main), mininterval=1.0)
    tokens_per_step = t.batch_size * t.grad_accum * dist.world * (reader.spec.seq_len - 1)
    last_eval = None
    stop_at = min(t.steps, step + t.stop_after) if t.stop_after else t.steps

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    while step < stop_at:
        t0 = time.perf_counter()
        kd_weight, temperature = kd_schedule(cfg.kd, step, t.steps)
        weights = Weights(ce=cfg.kd.ce_weight if cfg.kd.mode != "none" else 1.0, kd=kd_weight,
                          temperature=temperature, label_smoothing=t.label_smoothing, feature=cfg.kd.feature_weight,
                          router_k=topk_schedule(cfg.router.initial_top_k, cfg.router.final_top_k, step / max(1, t.steps - 1)),
                          projector=cfg.router.projector_weight, load_balance=cfg.router.load_balance_weight)
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        sample_ids: list[int] = []
        for _ in range(t.grad_accum):
            batch = data.next_batch()
            sample_ids += batch["sample_ids"].tolist()
            out = batch_objective(model, batch, cfg.kd, weights, head=head, feature_map=feature_map, router=router,
                                  chunk=t.loss_chunk_size, backward=True, autocast=autocast,
                                  loss_scale=scaler.get_scale() / t.grad_accum if scaler.is_enabled()
                                  else 1.0 / t.grad_accum)
            utilisation = out.pop("router_utilisation", None)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v / t.grad_accum
        if dist.enabled:  # data parallel: average gradients (and losses, for the log) over ranks
            has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
            torch.distributed.all_reduce(has_grad)
            for p, any_rank in zip(params, has_grad.tolist()):
                if not any_rank:
                    continue  # no rank used it (e.g. an unrouted expert): AdamW skips it, as in one process
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(dist.world)
            for k in ("loss", "ce", "kd"):
                v = torch.tensor([totals.get(k, 0.0)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(v)
                totals[k] = float(v) / dist.world
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        finite = math.isfinite(totals["loss"]) and grads_finite
        # fp16 overflow: a finite loss with inf scaled gradients is the GradScaler's business (it
        # skips the step and halves the scale), not a bad step, until the scale itself is absurd.
        overflow = scaler.is_enabled() and math.isfinite(totals["loss"]) and not grads_finite and scaler.get_scale() >= 1.0
        grad_norm = None
        if finite:
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(named)
            bad_in_row = 0
        elif overflow:
            scaler.step(optimizer)  # sees the infs and skips
            scaler.update()  # lowers the scale
            skipped += 1
        else:  # skip the update, count it; never clamp a loss to make it look finite
            skipped += 1
            bad_in_row += 1
            if scaler.is_enabled():
                scaler.update()  # lowers the scale
            if bad_in_row >= t.max_bad_steps:
                raise TrainingError(f"{bad_in_row} non-finite steps in a row (last at step {step}, loss "
                                    f"{totals['loss']}); sample ids of that step: {sample_ids}. Lower train.lr, "
                                    "check the cache (inspect) or use train.precision=float32")
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # after a skipped step torch warns that the optimizer did not step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        log({"step": step, "loss": totals["loss"], "ce": totals["ce"], "kd": totals["kd"], "lr": lr,
             "grad_norm": grad_norm, "skipped_steps": skipped, "kd_weight": kd_weight, "temperature": temperature,
             "tokens_per_s": round(tokens_per_step / elapsed, 1), **memory_mb(device),
             **({"router_k": weights.router_k, "router_utilisation": utilisation} if router is not None else {})})
        bar.set_postfix(loss=f"{totals['loss']:.3f}", tok_s=f"{tokens_per_step / elapsed:.0f}")
        bar.update(1)

        if step % t.eval_every == 0 or step == t.steps:
            if dist.is_main:
                eval_model = model_with_ema(model, ema)
                last_eval = {"step": step, "split": "eval",
                             **evaluate(eval_model, load, target_bytes, eval_ids, t.batch_size, t.loss_chunk_size,
                                       autocast)}
                log(last_eval)
                tqdm.write(f"step {step}: eval ppl {last_eval['ppl']:.2f} bpb {last_eval['bpb']:.3f} "
                           f"top1-agree {last_eval['teacher_top1_agree']:.3f}") if show_progress else None
            dist.barrier()
        if step % t.save_every == 0 or step == stop_at:
            if dist.is_main:
                save_checkpoint(run_dir, step, lambda path: save_student(model, tokenizer, path), {
                    "step": step, "skipped_steps": skipped,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
                    **{name: module.state_dict() if module is not None else None for name, module in extras.items()},
                    "data": data.state_dict(), "rng": gather_rng(dist),
                    "config_toml": to_toml(cfg), "cache_fingerprint": reader.fingerprint,
                    "student_config": model.config.to_dict(),
                }, t.keep_checkpoints)
            else:
                gather_rng(dist)
            dist.barrier()
    bar.close()
    if step < t.steps:
        if dist.is_main:
            metrics.close()
            print(f"stopped at step {step} of {t.steps} (train.stop_after); continue with: "
                  f"make resume CKPT={run_dir}/checkpoints/step-{step:08d} ARGS=train.stop_after=0")
        return {"run_dir": str(run_dir), "step": step, "skipped_steps": skipped, "eval": last_eval}
    result = {"run_dir": str(run_dir), "step": step, "skipped_steps": skipped, "eval": last_eval,
              "kd_mode": cfg.kd.mode, "cache": cfg.cache.dir, "wall_s": round(time.perf_counter() - t_start, 1),
              "resumed_from": str(resume_from) if resume_from else None,
              "student_parameters": sum(p.numel() for p in model.parameters()),
              "cross_tokenizer": access.coverage}
    if dist.is_main:
        final = run_dir / "final" / "student"
        shutil.rmtree(final, ignore_errors=True)
        save_student(model_with_ema(model, ema), tokenizer, final)
        metrics.close()
        (run_dir / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------- helpers


SAME_TOKENIZER_MODES = ("none", "topk_tail", "topk_renorm", "union")
CROSS_TOKENIZER_MODES = ("none", "mapped", "projected")


def check_kd_mode(mode: str, same_tokenizer: bool) -> None:
    if same_tokenizer and mode not in SAME_TOKENIZER_MODES:
        raise ConfigError(f"kd.mode={mode} is for a student with another tokenizer; this student shares the "
                          f"teacher's, so use one of {', '.join(SAME_TOKENIZER_MODES)}")
    if not same_tokenizer and mode not in CROSS_TOKENIZER_MODES:
        raise ConfigError(f"kd.mode={mode} needs the teacher's tokenizer, but student.tokenizer differs from it; "
                          f"use one of {', '.join(CROSS_TOKENIZER_MODES)}")


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.train.overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; resume it with "
                              f"`make resume CKPT={run_dir}/checkpoints/...`, pick another run.name, "
                              "or set train.overwrite=true")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))


def check_resumable(state: dict, cfg: Config, reader: CacheReader, ckpt: Path) -> None:
    if state["cache_fingerprint"] != reader.fingerprint:
        from pipeline.cache import fingerprint_diff
        diff = fingerprint_diff(state["cache_fingerprint"], reader.fingerprint)
        raise CheckpointError(f"checkpoint {ckpt} was trained on another cache ({'; '.join(diff)}); "
                              "resume with the cache it was trained on (cache.dir)")
    run_dir = ckpt.parent.parent
    if Path(cfg.run.runs_dir) / cfg.run.name != run_dir and (Path(cfg.run.runs_dir) / cfg.run.name).resolve() != run_dir.resolve():
        raise CheckpointError(f"checkpoint {ckpt} belongs to run directory {run_dir}, not "
                              f"{Path(cfg.run.runs_dir) / cfg.run.name}; do not move checkpoints between runs")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint's step (a crashed run got further than its
    last checkpoint); the resumed run writes them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def gather_rng(dist) -> list:
    """Every rank's RNG state, so each rank resumes its own stream."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, mine)
    return out


def model_with_ema(model, ema: EMA | None):
    if ema is None:
        return model
    copy_model = copy.deepcopy(model)
    ema.copy_to(copy_model)
    return copy_model


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
