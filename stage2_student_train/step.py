"""One optimizer step: the function the training loop and the benchmark both call."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from pipeline.config import Config
from pipeline.distributed import Dist
from pipeline.errors import PipelineError

from . import kd_modes, parallel
from .objective import GateStats, Weights, batch_objective, valid_targets
from .optim import kd_schedule
from .router import step_load_balance, topk_schedule
from .state import TrainState


class TrainingError(PipelineError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class StepResult:
    loss: float
    ce: float
    kd: float
    grad_norm: float | None
    finite: bool
    sample_ids: list[int]
    lr: float
    router_utilisation: list[float] | None = None


def step_weights(cfg: Config, step: int) -> Weights:
    """The loss weights at optimizer step ``step`` (KD weight, temperature and router k follow
    their schedules)."""
    t = cfg.train
    kd_weight, temperature = kd_schedule(cfg.kd, step, t.steps)
    return Weights(ce=cfg.kd.ce_weight if kd_modes.get(cfg.kd.mode).distills else 1.0, kd=kd_weight, temperature=temperature,
                   label_smoothing=t.label_smoothing, feature=cfg.kd.feature_weight,
                   router_k=topk_schedule(cfg.router.initial_top_k, cfg.router.final_top_k, step / max(1, t.steps - 1)),
                   projector=cfg.router.projector_weight, load_balance=cfg.router.load_balance_weight)


def train_step(state: TrainState, batches: list[dict], cfg: Config, w: Weights, *, dist: Dist, kind: str,
               autocast=None, head: torch.Tensor | None = None) -> StepResult:
    """Forward/backward over the step's micro-batches (gradients reduced once, in the last),
    then unscale, one grad-norm (clipping), the finite check and the update. A non-finite loss
    or gradient skips the update and is counted; never clamped to look finite."""
    state.optimizer.zero_grad(set_to_none=True)
    # Every term is averaged over the valid targets of the whole step, on all ranks.
    denominator = max(1, int(dist.all_sum([float(sum(valid_targets(b) for b in batches))])[0]))
    loss_scale = (state.scaler.get_scale() if state.scaler.is_enabled() else 1.0) * dist.world
    router = state.parts.router if "router" in kd_modes.get(cfg.kd.mode).modules else None
    gate = GateStats() if router is not None else None
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    utilisation = None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        finish = (lambda: w.load_balance * _global_load_balance(router, gate, dist)) if gate is not None and last else None
        with parallel.gradient_sync(state.net, kind, sync=last):
            out = batch_objective(state.parts, batch, cfg.kd, w, head=head, chunk=cfg.train.loss_chunk_size,
                                  backward=True, loss_scale=loss_scale, denominator=denominator, autocast=autocast,
                                  net=state.net, gate=gate, finish=finish)
        for k in sums:
            sums[k] += out[k] * out["positions"]
    totals = dict(zip(sums, dist.all_sum(list(sums.values()))))
    if gate is not None and gate.counts is not None:
        counts = dist.all_sum(gate.counts.tolist())
        utilisation = [round(c / max(1.0, sum(counts)), 4) for c in counts]
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.optimizer)
    loss = totals["loss"] / denominator
    norm = parallel.grad_norm(state.params, cfg.train.grad_clip)
    finite = math.isfinite(loss) and math.isfinite(norm)
    # fp16 overflow: a finite loss with inf scaled gradients is the GradScaler's business (it
    # skips the step and halves the scale), not a bad step, until the scale itself is absurd.
    overflow = state.scaler.is_enabled() and math.isfinite(loss) and not finite and state.scaler.get_scale() >= 1.0
    sample_ids = [i for b in batches for i in b["sample_ids"].tolist()]
    if finite or overflow:
        state.scaler.step(state.optimizer)  # with infs recorded by unscale_ it skips the update
        state.scaler.update()
    if finite:
        if state.ema is not None:
            state.ema.update(state.named)
        state.bad_in_row = 0
    else:
        state.skipped += 1
        if not overflow:
            state.bad_in_row += 1
            if state.scaler.is_enabled():
                state.scaler.update()  # lowers the scale
            if state.bad_in_row >= cfg.train.max_bad_steps:
                raise TrainingError(f"{state.bad_in_row} non-finite steps in a row (last at step {state.step}, loss "
                                    f"{loss}); sample ids of that step: {sample_ids}. Lower train.lr, "
                                    "check the cache (inspect) or use train.precision=float32")
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step used
    with warnings.catch_warnings():  # after a skipped step torch warns that the optimizer did not step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        state.scheduler.step()
    state.step += 1
    return StepResult(loss, totals["ce"] / denominator, totals["kd"] / denominator, norm if finite else None, finite,
                      sample_ids, lr, utilisation)


def _global_load_balance(router, gate: GateStats, dist: Dist) -> torch.Tensor:
    """The step's load-balance term on this rank, with the routing counts of every rank."""
    device = router.gate.weight.device
    counts = gate.counts if gate.counts is not None else torch.zeros(router.num_experts, device=device)
    counts = torch.tensor(dist.all_sum(counts.tolist()), device=device)
    positions = int(dist.all_sum([float(gate.positions)])[0])
    return step_load_balance(router, gate.inputs, counts, positions, dist.world)
