"""Stage 1, top to bottom: dataset -> plan -> teacher pass -> cache, committed shard by shard.

The plan is streamed to a plan folder first (``plan.py``, ``plan_store.py``: memory flat in
corpus size); the teacher pass reads each shard's rows from it when it runs that shard.

    python -m pipeline cache-teacher --config configs/default.toml key=value ...
    torchrun --nproc_per_node=2 -m pipeline cache-teacher ...   # shards split between ranks

A rerun with the same config skips committed shards (a crash loses at most the shards in
flight); a rerun with other inputs is refused unless ``cache.overwrite=true``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import CacheReader, CacheSpec, CacheWriter, check_finite
from pipeline.cache.codecs import hidden_codec
from pipeline.cache.files import lock_path
from pipeline.cache.store import open_storage
from pipeline.cache.writer import check_overwrite
from pipeline.config import Config, load_config
from pipeline.device import set_up_device
from pipeline.distributed import Dist, init_distributed
from pipeline.errors import TeacherError
from pipeline.fingerprint import tokenizer_hash
from pipeline.locks import acquire_lock
from pipeline.paths import require_directory_path
from pipeline.cache.tokenizer import store_tokenizer

from .background import BackgroundWriter
from .chat import chat_template_hash
from .extend import open_cache, plan_rows
from .plan import ensure_plan, plan_folder, uses_document_mask
from .plan_store import Plan, Rows, remove_plan
from .sampling import teacher_outputs
from .teacher import TeacherPass, TeacherSource, load_model, load_model_config, load_tokenizer, resolve_teacher

HEAD_TOLERANCE = 1e-3


def main(args: argparse.Namespace) -> int:
    cache_teacher(load_config(args.config, args.overrides))
    return 0


def cache_teacher(cfg: Config, show_progress: bool = True) -> dict:
    """Build (or finish) the cache of ``cfg`` and return its ``inspect`` info."""
    dist = init_distributed()
    try:
        with contextlib.ExitStack() as stack:
            return _cache_teacher(cfg, show_progress, dist, stack)
    finally:
        dist.close()


def _cache_teacher(cfg: Config, show_progress: bool, dist: Dist, stack: contextlib.ExitStack) -> dict:
    """The recipe on every rank: device, lock, plan, cache, this rank's shards, then rank 0 finishes."""
    t0 = time.perf_counter()
    precision = set_up_device(cfg.teacher.device, cfg.teacher.dtype, dist, cfg.teacher.num_threads)
    say = print if dist.is_main else (lambda *a, **k: None)
    progress = show_progress and dist.is_main

    source = resolve_teacher(cfg.teacher)
    tokenizer = _joining_tokenizer(source)
    _lock_cache(cfg, dist, stack)
    plan = _shared_plan(cfg, tokenizer, dist, progress)
    say(_plan_line(plan))
    spec = make_spec(cfg, source, tokenizer, plan, precision.name)
    teacher = LazyTeacher(cfg, source, spec, plan, precision.device, precision.dtype)
    writer = _shared_writer(cfg, spec, plan, teacher, tokenizer, dist, progress)
    spec = writer.spec  # an extended cache's layout (train in segments), not the plan's
    pending = writer.pending_shards()
    dist.barrier()  # every rank has read the same pending list before anyone commits

    if not pending and writer.manifest.get("complete"):
        return _already_complete(cfg, spec, writer, teacher, plan, dist, say)
    _say_what_remains(cfg, spec, writer, pending, say)
    stats = _run_my_shards(cfg, spec, teacher, plan, writer, pending, progress, dist)
    wall = time.perf_counter() - t0
    return dist.run_on_main(lambda: _finish(cfg, writer, plan, precision.name, stats, wall)) or {}


def _joining_tokenizer(source: TeacherSource):
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise TeacherError(f"the tokenizer of {source.name!r} has no end-of-sequence token to join documents")
    return tokenizer


def _lock_cache(cfg: Config, dist: Dist, stack: contextlib.ExitStack) -> None:
    """One writer per cache directory: rank 0 holds the lock for the whole run (the other ranks of
    a torchrun job write their own shards under it), planning included. A refusal is raised on
    every rank."""
    store = open_storage(cfg.cache.dir)
    if not store.remote:  # a parent that is a file: one line before the lock or plan are made
        require_directory_path(store.root, "cache.dir")
    dist.run_on_main(lambda: stack.enter_context(acquire_lock(lock_path(store), f"cache {store}")))
    if cfg.cache.overwrite:  # a refusal comes before the plan reads the source or makes its folder
        dist.run_on_main(lambda: check_overwrite(store))


def _shared_plan(cfg: Config, tokenizer, dist: Dist, progress: bool) -> Plan:
    """The plan is streamed to disk by rank 0 (or reused from a previous run of the same inputs);
    every rank then reads only the rows of the shards it runs."""
    plan = dist.run_on_main(lambda: ensure_plan(cfg, tokenizer, show_progress=progress))
    dist.barrier()
    if plan is None:
        plan = Plan(plan_folder(cfg))
    return plan


def _plan_line(plan: Plan) -> str:
    return (f"plan {plan.folder}: {plan.num_sequences} sequences of {plan.seq_len} tokens "
            f"({', '.join(f'{k} {b - a}' for k, (a, b) in plan.splits.items())}) from {plan.info['documents']} documents"
            f"{' (reused)' if plan.reused else ''}")


def _rank_table(teacher: LazyTeacher, plan: Plan, cfg: Config, vocab_size: int) -> np.ndarray:
    teacher()  # load outside the pilot's timing
    t_pilot = time.perf_counter()
    table = pilot_rank_table(teacher, plan, cfg, vocab_size)
    teacher.facts["pilot_s"] = round(time.perf_counter() - t_pilot, 2)
    return table


def _create_or_reopen(cfg: Config, spec: CacheSpec, plan: Plan, teacher: LazyTeacher, tokenizer,
                      progress: bool) -> CacheWriter:
    writer = open_cache(cfg, spec, plan, functools.partial(_rank_table, teacher, plan, cfg, spec.vocab_size),
                        show_progress=progress)
    store_tokenizer(writer, tokenizer)  # the cache carries the teacher's tokenizer (added to older caches)
    if not writer.has_documents() or "extending" in writer.manifest:  # an extension's plan read more documents
        writer.write_documents_file(plan.folder / "documents.arrow")
    return writer


def _shared_writer(cfg: Config, spec: CacheSpec, plan: Plan, teacher: LazyTeacher, tokenizer, dist: Dist,
                   progress: bool) -> CacheWriter:
    """Rank 0 creates (or reopens) the cache; the other ranks then reopen what it made."""
    writer = dist.run_on_main(lambda: _create_or_reopen(cfg, spec, plan, teacher, tokenizer, progress))
    dist.barrier()
    if writer is None:
        writer = CacheWriter.open(cfg.cache.dir, spec, create=False)
    return writer


def _already_complete(cfg: Config, spec: CacheSpec, writer: CacheWriter, teacher: LazyTeacher, plan: Plan,
                      dist: Dist, say) -> dict:
    """Nothing left to run: add the head if it is asked for, drop the plan, report the cache."""
    if cfg.cache.store_head and not writer.has_head():
        dist.run_on_main(lambda: writer.write_head(teacher().head.weight.detach().float().cpu().numpy()))
        say(f"cache {cfg.cache.dir}: teacher head added")
    say(f"cache {cfg.cache.dir} is complete and matches this config: stage 1 skipped "
        f"({spec.num_sequences} sequences, {spec.num_sequences * spec.seq_len} tokens)")
    dist.run_on_main(lambda: remove_plan(plan.folder))
    return CacheReader(cfg.cache.dir, verify=False).info()


def _say_what_remains(cfg: Config, spec: CacheSpec, writer: CacheWriter, pending: list[int], say) -> None:
    if "extending" in writer.manifest:
        first = writer.manifest["extending"]["from_sequences"]
        say(f"extending cache {cfg.cache.dir}: {spec.num_sequences - first} train sequences after its {first}; "
            f"{len(pending)} shards to write")
    elif pending and len(pending) < spec.num_shards:
        say(f"resuming cache {cfg.cache.dir}: {spec.num_shards - len(pending)} of {spec.num_shards} "
            "shards already committed")


def _run_my_shards(cfg: Config, spec: CacheSpec, teacher: LazyTeacher, plan: Plan, writer: CacheWriter,
                   pending: list[int], progress: bool, dist: Dist) -> dict:
    """This rank's share of the pending shards; a failure on any rank fails them all."""
    mine = [s for s in pending if s % dist.world == dist.rank]
    ok, stats = False, {}
    try:
        stats = run_teacher(cfg, spec, teacher, plan, writer, mine, progress, dist)
        ok = True
    finally:
        all_ok = dist.all_ok(ok)
    if not all_ok:
        raise TeacherError("another rank failed while caching; committed shards are kept, rerun to finish")
    return stats


def _finish(cfg: Config, writer: CacheWriter, plan: Plan, precision: str, stats: dict, wall: float) -> dict:
    """Rank 0, after every rank committed its shards: the manifest's summary, then the report."""
    extra = {"stage1_wall_s": round(wall, 2), "precision": precision, **stats}
    writer.finalize(extra)
    remove_plan(plan.folder)  # everything it held is in the cache now (meta/, input_ids)
    info = CacheReader(cfg.cache.dir, verify=False).info()
    print_summary(info, wall)
    return info


def make_spec(cfg: Config, source: TeacherSource, tokenizer, plan: Plan, precision: str) -> CacheSpec:
    model_cfg = load_model_config(source)
    text_cfg = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    vocab = int(text_cfg.vocab_size)
    if cfg.cache.top_k > vocab:
        raise TeacherError(f"cache.top_k={cfg.cache.top_k} exceeds the teacher's vocabulary ({vocab}); lower it")
    fingerprint = {
        "teacher": source.name,
        "teacher_hash": source.content_hash(model_cfg),
        "teacher_dtype": precision,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset": cfg.data.source,
        "dataset_hash": plan.dataset_hash,  # over every document read, streamed (plan.DatasetHash)
        "seq_len": cfg.data.seq_len,
        "max_train_tokens": cfg.data.max_train_tokens,
        "max_eval_tokens": cfg.data.max_eval_tokens,
        "doc_separator": cfg.data.doc_separator,
        "top_k": cfg.cache.top_k,
        "topk_encoding": cfg.cache.topk_encoding,
        "hidden_dtype": cfg.cache.hidden_dtype if cfg.cache.store_hidden else "none",
    }
    if cfg.cache.samples:  # only then: caches without samples keep their fingerprint
        fingerprint.update(samples=cfg.cache.samples, sample_seed=cfg.run.seed)
    if plan.info.get("loss_mask"):  # chat data: the cache stores which tokens are targets
        fingerprint.update(loss_mask="assistant", chat_template=chat_template_hash(tokenizer))
    if uses_document_mask(cfg, plan):  # only then: caches without the mask keep their fingerprint
        fingerprint["document_mask"] = True
    return CacheSpec(
        num_sequences=plan.num_sequences, seq_len=cfg.data.seq_len, top_k=cfg.cache.top_k, vocab_size=vocab,
        hidden_dim=int(text_cfg.hidden_size), splits=plan.splits, fingerprint=fingerprint,
        hidden_dtype=cfg.cache.hidden_dtype, topk_encoding=cfg.cache.topk_encoding, store_hidden=cfg.cache.store_hidden,
        shard_sequences=cfg.cache.shard_sequences, chunk_sequences=cfg.cache.chunk_sequences,
        zstd_level=cfg.cache.zstd_level, samples=cfg.cache.samples,
        teacher={"name": source.name, "path": source.path, "gguf_file": source.gguf_file,
                 "eos_token_id": tokenizer.eos_token_id, "model_type": getattr(text_cfg, "model_type", None),
                 "final_logit_softcapping": getattr(text_cfg, "final_logit_softcapping", None)},
    )


class LazyTeacher:
    """Loads the teacher on first use (a rerun with nothing left to do never loads it) and
    checks once that its logits are its head applied to its last hidden state."""

    def __init__(self, cfg: Config, source: TeacherSource, spec: CacheSpec, plan: Plan, device, dtype):
        self.cfg, self.source, self.spec, self.plan, self.device, self.dtype = cfg, source, spec, plan, device, dtype
        self.teacher: TeacherPass | None = None
        self.facts: dict = {}
        self.pilot_outputs: dict[tuple[int, int], dict] = {}
        """Outputs of the sqrt8 pilot by (first, end) sequence: the shard pass reuses them."""

    def __call__(self) -> TeacherPass:
        if self.teacher is None:
            t_load = time.perf_counter()
            model = load_model(self.source, self.dtype, self.device)
            teacher = TeacherPass(model, self.spec.top_k, self.cfg.teacher.logits_chunk)
            head_diff = teacher.check_head(torch.from_numpy(self.plan.rows_of(0, 1).input_ids))
            if not math.isfinite(head_diff):
                raise TeacherError("the teacher produced NaN/Inf on the first sequence (head check); "
                                   "rerun with teacher.dtype=float32 or check the model's weights")
            if not head_diff <= HEAD_TOLERANCE * (1 if self.dtype == torch.float32 else 50):
                raise TeacherError(f"this teacher's logits are not its head applied to its last hidden state "
                                   f"(max difference {head_diff:.3g}); such models are not supported")
            self.facts = {"teacher_load_s": round(time.perf_counter() - t_load, 2), "head_check_max_diff": head_diff}
            if self.spec.document_mask:  # a family that ignores the mask is refused before any work
                self.facts["document_mask_check_max_diff"] = teacher.check_document_mask(
                    HEAD_TOLERANCE * (1 if self.dtype == torch.float32 else 50))
            self.teacher = teacher
        return self.teacher


def pilot_rank_table(lazy: LazyTeacher, plan: Plan, cfg: Config, vocab: int) -> np.ndarray:
    """sqrt8's rank table: tokens by how often they are in the teacher's top-k on the first
    ``pilot_sequences`` sequences, then by frequency in the text, then by id. Deterministic, so
    a rerun after a crash at creation rebuilds the same table. The pilot runs the first shard's
    batches exactly as the shard pass would, which then reuses them instead of recomputing."""
    pilot = range(min(cfg.cache.pilot_sequences, plan.num_sequences))
    topk_counts = np.zeros(vocab, np.int64)
    for b in range(0, len(pilot), cfg.teacher.batch_size):
        rows = pilot[b:b + cfg.teacher.batch_size]
        planned = plan.rows_of(rows[0], rows[-1] + 1)
        out = teach(lazy(), planned.input_ids, rows, cfg, planned.doc_matrix() if lazy.spec.document_mask else None)
        lazy.pilot_outputs[(rows[0], rows[-1] + 1)] = out
        topk_counts += np.bincount(out["topk_ids"].ravel(), minlength=vocab)
    text_counts = plan.text_counts(vocab)  # counted while planning, shard by shard
    return np.lexsort((np.arange(vocab), -text_counts, -topk_counts))


def run_teacher(cfg: Config, spec: CacheSpec, lazy: LazyTeacher, plan: Plan, writer: CacheWriter,
                shards: list[int], progress: bool, dist: Dist) -> dict:
    """Run the teacher over ``shards`` and hand each finished shard to the background writer."""
    needs_head = cfg.cache.store_head and dist.is_main and not writer.has_head()
    if not shards and not needs_head:
        return {}
    teacher = lazy()
    if needs_head:
        writer.write_head(teacher.head.weight.detach().float().cpu().numpy())

    total = sum(stop - start for start, stop in map(writer.rows_to_write, shards)) * spec.seq_len
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"teacher ({len(shards)} shards)",
               disable=not progress, smoothing=0.1, mininterval=1.0)
    t_run = time.perf_counter()
    with BackgroundWriter(writer, cfg.cache.writer_queue) as background:
        for shard in shards:
            background.submit(*teach_shard(shard, cfg, spec, lazy, teacher, plan, writer, bar))
    bar.close()
    run_s = time.perf_counter() - t_run
    pass_s = run_s + lazy.facts.get("pilot_s", 0.0)
    return {**lazy.facts, "stage1_pass_s": round(pass_s, 3),
            "teacher_tokens_per_s": round(total / pass_s, 1) if pass_s > 0 and total else None,
            "writer_stall_s": round(background.stall_s, 3)}


def teach_shard(shard: int, cfg: Config, spec: CacheSpec, lazy: LazyTeacher, teacher: TeacherPass, plan: Plan,
                writer: CacheWriter, bar) -> tuple:
    """One shard's outputs, checked and coded for the writer: what ``BackgroundWriter.submit``
    takes. (A function of its own so the shard's raw fp32 outputs are freed once the coded ones
    are queued, instead of living on beside the next shard's.)"""
    start, stop = writer.rows_to_write(shard)  # a growing last shard keeps its old rows
    planned = plan_rows(spec, plan, start, stop)  # this shard's plan, read from disk now
    parts = []
    docs = planned.doc_matrix() if spec.document_mask else None
    for b in range(start, stop, cfg.teacher.batch_size):
        rows = range(b, min(b + cfg.teacher.batch_size, stop))
        out = lazy.pilot_outputs.pop((rows[0], rows[-1] + 1), None)
        if out is None:
            part = slice(rows[0] - start, rows[-1] + 1 - start)
            out = teach(teacher, planned.input_ids[part], rows, cfg, None if docs is None else docs[part])
        parts.append(out)
        bar.update(len(rows) * spec.seq_len)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    del parts
    if spec.has_loss_mask:
        arrays["loss_mask"] = planned.loss_mask
    check_finite(shard, start, stop, arrays)  # before int8/sqrt8 coding could hide a NaN
    stats = shard_stats(arrays, planned, start, stop, spec)
    return shard, to_storage(arrays, spec), shard_meta(planned), stats


def teach(teacher: TeacherPass, input_ids: np.ndarray, rows: range, cfg: Config,
          doc_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The teacher's outputs for sequences ``rows`` (ids ``input_ids``), + sampled tokens when
    cache.samples > 0 (seeded by each sequence's index, so independent of batching). With
    ``doc_ids`` (a cache with ``document_mask``) each packed document is attended to alone."""
    with teacher.documents(doc_ids):
        return teacher_outputs(teacher, torch.from_numpy(input_ids), rows, cfg.cache.samples, cfg.run.seed)


def to_storage(arrays: dict[str, np.ndarray], spec: CacheSpec) -> dict[str, np.ndarray]:
    """The arrays handed to the writer: hidden only if stored, and already in its stored coding
    (``pipeline/cache/codecs.py``: float16, or int8 codes + scale), so a shard waiting in the
    writer's queue holds 2 or 1 bytes per hidden value instead of 4."""
    out = dict(arrays)
    hidden = out.pop("hidden")
    if spec.store_hidden:
        out.update(hidden_codec(spec).encode(hidden))
    return out


def shard_stats(arrays: dict[str, np.ndarray], planned: Rows, start: int, stop: int, spec: CacheSpec) -> dict:
    """Sums (not means) so shards combine exactly: top-k mass and the teacher's own NLL per split."""
    stats = {"positions": float(arrays["topk_logprobs"][..., 0].size),
             "topk_mass_sum": float(np.exp(arrays["topk_logprobs"].astype(np.float64)).sum())}
    if "draw_counts" in arrays:
        stats["sample_unique_sum"] = float((arrays["draw_counts"] > 0).sum())
    first_ends = planned.char_end.flatten().to_numpy()[::spec.seq_len]
    for row, (i, text) in enumerate(zip(range(start, stop), planned.text.to_pylist())):
        split = spec.split_of(i)
        stats[f"{split}_nll_sum"] = stats.get(f"{split}_nll_sum", 0.0) - float(arrays["next_logprob"][row, :-1].sum())
        stats[f"{split}_targets"] = stats.get(f"{split}_targets", 0.0) + spec.seq_len - 1
        target_bytes = len(text[int(first_ends[row]):].encode("utf-8"))
        stats[f"{split}_target_bytes"] = stats.get(f"{split}_target_bytes", 0.0) + target_bytes
        if planned.loss_mask is not None:  # chat data: the teacher over the targets a student counts
            keep = planned.loss_mask[row, 1:] > 0
            ends = np.asarray(planned.char_end[row].as_py())
            stats[f"{split}_masked_nll_sum"] = (stats.get(f"{split}_masked_nll_sum", 0.0)
                                                - float(arrays["next_logprob"][row, :-1][keep].sum()))
            stats[f"{split}_masked_targets"] = stats.get(f"{split}_masked_targets", 0.0) + float(keep.sum())
            stats[f"{split}_masked_target_bytes"] = stats.get(f"{split}_masked_target_bytes", 0.0) + sum(
                len(text[a:b].encode("utf-8")) for a, b, k in zip(ends[:-1], ends[1:], keep) if k)
    return stats


def shard_meta(planned: Rows) -> dict:
    """The shard's Arrow metadata columns, straight from its plan rows."""
    return {"text": planned.text, "char_end": planned.char_end, "doc_id": planned.doc_id}


def print_summary(info: dict, wall: float) -> None:
    def fmt(v, spec=".4g"):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("cache", info["path"]),
        ("complete", str(info["complete"])),
        ("sequences", f"{info['sequences']} ({', '.join(f'{k} {v}' for k, v in info['splits'].items())})"),
        ("tokens", f"{info['tokens']} (seq_len {info['seq_len']})"),
        ("bytes on disk", f"{info['bytes_on_disk'] / 2**20:.1f} MiB"),
        ("bytes / token", f"{fmt(info['bytes_per_token'], '.1f')} "
                          f"(top-k ids + values + logZ: {fmt(info['logit_bytes_per_token'], '.1f')})"),
        ("top-k mass mean", f"{fmt(info['topk_mass_mean'], '.3f')} (k={info['top_k']})"),
        ("top-k encoding", f"{info['topk_encoding']}, mean KL to exact top-k+tail "
                           f"{fmt(info['topk_encoding_kl_mean'], '.2e')} nats"),
        ("KD floor", "n/a" if not info.get("kd_floor") else
         ", ".join(f"tau {t}: {v:.1e}" for t, v in info["kd_floor"].items()) + " nats (what a student equal "
         "to the teacher pays, topk_tail)"),
        ("teacher eval ppl", f"{fmt(info['teacher_eval_ppl'], '.2f')}  bpb {fmt(info['teacher_eval_bpb'], '.3f')}"),
        ("teacher tokens/s", fmt(info.get("teacher_tokens_per_s"), ".1f")),
        ("wall time", f"{wall:.1f} s"),
    ]
    print("\n".join(f"{k:<17} {v}" for k, v in rows))

