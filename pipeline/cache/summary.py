"""What ``inspect`` says about a cache: sizes on disk and the statistics the shards committed.

Functions of a ``CacheReader`` (its methods delegate here), kept apart from the format itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

from .codecs import FIDELITY_TEMPERATURES, fidelity_key

if TYPE_CHECKING:
    from .reader import CacheReader


def summary_stats(markers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the committed shards' statistics (sums, so shards combine exactly)."""
    tot: dict[str, float] = {}
    for marker in markers:
        for k, v in marker["stats"].items():
            tot[k] = tot.get(k, 0.0) + v
    positions = tot.get("positions", 0.0)
    eval_targets = tot.get("eval_targets", 0.0)
    return {
        "topk_mass_mean": tot.get("topk_mass_sum", 0.0) / positions if positions else None,
        "topk_encoding_kl_mean": tot["topk_encoding_kl_sum"] / positions
        if positions and "topk_encoding_kl_sum" in tot else None,
        "teacher_eval_ppl": math.exp(tot["eval_nll_sum"] / eval_targets) if eval_targets else None,
        "teacher_eval_bpb": (tot["eval_nll_sum"] / math.log(2) / tot["eval_target_bytes"]
                             if tot.get("eval_target_bytes") else None),
        "teacher_train_ppl": (math.exp(tot["train_nll_sum"] / tot["train_targets"])
                              if tot.get("train_targets") else None),
        "samples_unique_mean": tot["sample_unique_sum"] / positions if positions and "sample_unique_sum" in tot else None,
        "kd_floor": kd_floor_means(tot),
        **({"teacher_eval_ppl_targets": math.exp(tot["eval_masked_nll_sum"] / tot["eval_masked_targets"]),
            "teacher_eval_bpb_targets": tot["eval_masked_nll_sum"] / math.log(2) / tot["eval_masked_target_bytes"]}
           if tot.get("eval_masked_targets") and tot.get("eval_masked_target_bytes") else {}),
    }


def kd_floor_means(tot: dict[str, float]) -> dict[str, float] | None:
    """temperature (as text) -> mean KD floor per position measured (``codecs.fidelity_sums``;
    an extended older cache measured only its new rows); None for a cache that never recorded it."""
    measured = tot.get("kd_floor_positions", 0.0)  # shards written before the floor existed have none
    if not measured or fidelity_key(1.0) not in tot:
        return None
    return {f"{t:g}": tot[fidelity_key(t)] / measured for t in FIDELITY_TEMPERATURES if fidelity_key(t) in tot}


def kd_floor_at(floor: dict[str, float] | None, tau: float) -> tuple[float, float] | None:
    """(temperature measured, mean KD floor) for a run at ``tau``: the recorded temperature
    nearest to it (equal when tau is one of ``FIDELITY_TEMPERATURES``), or None if none is."""
    if not floor:
        return None
    nearest = min(floor, key=lambda t: abs(float(t) - tau))
    return float(nearest), floor[nearest]


def logit_bytes_per_token(per_array: dict[str, float]) -> float:
    """Bytes per token of what top-k KD needs: ids + values (+ tail) + logZ."""
    return round(sum(v for k, v in per_array.items() if k.startswith("topk_") or k == "logz"), 2)


def info(reader: CacheReader, schema_version: int) -> dict[str, Any]:
    """The fields of ``inspect --json``."""
    spec = reader.spec
    tokens = spec.num_sequences * spec.seq_len
    size = reader.bytes_on_disk()
    head = reader.head_bytes()
    stats = reader.summary_stats()
    return {
        "path": str(reader.root),
        "schema_version": schema_version,
        "complete": reader.complete and bool(reader.manifest.get("complete")),
        "shards": spec.num_shards,
        "shards_committed": len(reader._markers),
        "sequences": spec.num_sequences,
        "splits": spec.split_sizes(),
        "extensions": len(spec.generations),
        "tokens": tokens,
        "seq_len": spec.seq_len,
        "top_k": spec.top_k,
        "vocab_size": spec.vocab_size,
        "hidden_dim": spec.hidden_dim,
        "hidden_dtype": spec.hidden_dtype if spec.store_hidden else None,
        "topk_encoding": spec.topk_encoding,
        "has_head": reader.has_head,
        "teacher": spec.fingerprint.get("teacher"),
        "teacher_facts": spec.teacher,
        "fingerprint": spec.fingerprint,
        "bytes_on_disk": size,
        "head_bytes": head,
        "bytes_per_token": (size - head) / tokens if tokens else None,
        "array_bytes_per_token": reader.array_bytes_per_token(),
        "logit_bytes_per_token": reader.logit_bytes_per_token(),
        "samples": spec.samples,
        "samples_bytes_per_token": round(sum(v for k, v in reader.array_bytes_per_token().items()
                                            if k.startswith("draw_")), 2) if spec.samples else None,
        **stats,
        **{k: v for k, v in reader.manifest.get("summary", {}).items() if k not in stats},
    }
