"""Cross-tokenizer view of a cache: the same cached text, seen through the student's tokenizer.

For every cached sequence the student re-tokenizes ``text``; student position j is aligned to
teacher position t when both tokens end at the same character (``align.py``). The teacher's
top-k ids reach the student vocabulary through the byte-identical vocab map. All of it is
computed once per (cache, student tokenizer) and stored beside the cache::

    CACHE/student-views/<tokenizer hash>/view.npz       ids [N, Ls] (-1 pad), aligned [N, Ls] (-1),
                                                         vmap [V_teacher] (-1: no twin)
                                                         loss_mask [N, Ls] (chat caches: student
                                                         tokens that are targets)
                                                         doc_ids [N, Ls] (document-masked caches:
                                                         each student token's document)
    CACHE/student-views/<tokenizer hash>/coverage.json  fraction of student positions aligned,
                                                         teacher top-k mass that maps, lengths

or, with ``cache.views_dir`` set (a read-only cache), under ``VIEWS_DIR/<cache id>/<tokenizer
hash>/``. A stored view that cannot be read or does not fit the cache is rebuilt.

Chat caches: a student token is a target when its last character is one the teacher's target
tokens cover (``loss_mask``): the same characters, whatever the student's tokens.

Document-masked caches (``document_mask``): a student token belongs to the document of the
teacher token that covers its last character, so the student's packed documents are the same
characters as the teacher's and its attention is kept inside them the same way.
"""

from __future__ import annotations

import errno
import io
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import CacheReader, atomic_write_bytes, atomic_write_json
from pipeline.errors import CacheError
from pipeline.fingerprint import tokenizer_hash

from . import align
from .data import DocIds, masked_chars


@dataclass
class StudentView:
    ids: np.ndarray      # [N, Ls] int64, -1 = padding
    aligned: np.ndarray  # [N, Ls] int64, teacher position or -1
    vmap: np.ndarray     # [V_teacher] int64, student id or -1
    first_end: np.ndarray  # [N] int64, char end of each sequence's first student token
    coverage: dict
    loss_mask: np.ndarray | None = None  # [N, Ls] bool, chat caches: student tokens that are targets
    doc_ids: np.ndarray | None = None  # [N, Ls] int64, document-masked caches: each token's document (-1 pad)

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]


def view_dir(reader: CacheReader, student_tok) -> Path:
    return reader.views_root() / tokenizer_hash(student_tok)


def load_or_build_view(reader: CacheReader, teacher_tok, student_tok, show_progress: bool = True) -> StudentView:
    """The stored view if there is one for this (cache, tokenizer), else build and store it."""
    folder = view_dir(reader, student_tok)
    view = _load_view(folder, reader)
    if view is not None:
        return view
    _require_writable(folder, reader)
    view = build_view(reader, teacher_tok, student_tok, show_progress)
    buf = io.BytesIO()
    extra = {} if view.loss_mask is None else {"loss_mask": view.loss_mask}
    if view.doc_ids is not None:
        extra["doc_ids"] = view.doc_ids
    np.savez_compressed(buf, ids=view.ids, aligned=view.aligned, vmap=view.vmap, first_end=view.first_end, **extra)
    atomic_write_bytes(folder / "view.npz", buf.getvalue())
    atomic_write_json(folder / "coverage.json", view.coverage)
    return view


def _load_view(folder: Path, reader: CacheReader) -> StudentView | None:
    """The stored view, or None if there is none or it is damaged or does not fit this cache."""
    if not (folder / "view.npz").is_file() or not (folder / "coverage.json").is_file():
        return None
    try:
        with np.load(folder / "view.npz") as z:
            view = StudentView(z["ids"], z["aligned"], z["vmap"], z["first_end"],
                               json.loads((folder / "coverage.json").read_text()),
                               z["loss_mask"] if reader.spec.has_loss_mask else None,
                               z["doc_ids"] if reader.spec.document_mask else None)
        n = len(reader)
        if (view.aligned.shape != view.ids.shape or view.first_end.shape != (view.ids.shape[0],)
                or view.vmap.shape != (reader.spec.vocab_size,) or not isinstance(view.coverage, dict)):
            raise ValueError("shapes do not fit the cache")
        if view.ids.shape[0] != n:
            print(f"student view {folder} covers {view.ids.shape[0]} sequences, the cache now {n} (it was extended); "
                  "rebuilding it", file=sys.stderr)
            return None
        return view
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"student view {folder} is unreadable ({e.__class__.__name__}); rebuilding it", file=sys.stderr)
        return None


def _require_writable(folder: Path, reader: CacheReader) -> None:
    """Fail before the (long) alignment pass, not after it, when the view cannot be stored."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = "the cache directory is read-only" if reader.views_dir is None else "cache.views_dir is not writable"
        raise CacheError(f"cannot store the student tokenizer's view in {folder} ({e.strerror}): {where}; "
                         "set cache.views_dir to a writable directory") from None


def build_view(reader: CacheReader, teacher_tok, student_tok, show_progress: bool = True) -> StudentView:
    rows_ids, rows_aligned, first_end, rows_mask, rows_docs = [], [], [], [], []
    teacher_docs = DocIds(reader) if reader.spec.document_mask else None
    for i in tqdm(range(len(reader)), desc="align student tokens", unit="seq", disable=not show_progress):
        text, teacher_ends = reader.text(i)
        ids, ends = align.student_tokens(student_tok, text)
        if reader.spec.has_loss_mask:
            rows_mask.append(student_mask(ends, masked_chars(reader, i, text, teacher_ends)))
        if teacher_docs is not None:
            rows_docs.append(student_docs(ends, teacher_ends, teacher_docs([i])[0]))
        rows_ids.append(ids)
        rows_aligned.append(align.align_positions(teacher_ends, ends))
        first_end.append(int(ends[0]) if len(ends) else 0)
    length = max(len(r) for r in rows_ids)
    ids = np.full((len(rows_ids), length), -1, np.int64)
    aligned = np.full((len(rows_ids), length), -1, np.int64)
    mask = np.zeros((len(rows_ids), length), bool) if rows_mask else None
    docs = np.full((len(rows_ids), length), -1, np.int64) if rows_docs else None
    for i, (r, a) in enumerate(zip(rows_ids, rows_aligned)):
        ids[i, :len(r)], aligned[i, :len(a)] = r, a
        if mask is not None:
            mask[i, :len(r)] = rows_mask[i]
        if docs is not None:
            docs[i, :len(r)] = rows_docs[i]
    vmap = align.vocab_map(teacher_tok, student_tok)
    if len(vmap) < reader.spec.vocab_size:  # a padded head (Qwen: 151936 rows, 151851 tokens): no twins
        vmap = np.concatenate([vmap, np.full(reader.spec.vocab_size - len(vmap), -1, vmap.dtype)])
    sample = reader.read_range(0, min(len(reader), 32), ("topk_ids", "topk_logprobs"))
    coverage = {
        "student_positions_aligned": align.alignment_coverage(rows_aligned),
        "teacher_topk_mass_mapped": align.mapped_mass(sample["topk_ids"].reshape(-1, reader.spec.top_k).astype(np.int64),
                                                      sample["topk_logprobs"].reshape(-1, reader.spec.top_k), vmap),
        "teacher_vocab_mapped": float((vmap >= 0).mean()),
        "student_tokens_per_teacher_token": float((ids >= 0).sum() / (len(reader) * reader.spec.seq_len)),
        "student_seq_len": int(length),
        "student_tokenizer_hash": tokenizer_hash(student_tok),
    }
    return StudentView(ids, aligned, vmap, np.asarray(first_end, np.int64), coverage, mask, docs)


def student_docs(ends: np.ndarray, teacher_ends: np.ndarray, teacher_docs: np.ndarray) -> np.ndarray:
    """Each student token's document: that of the teacher token covering its last character
    (``end - 1``; token t covers ``[teacher_ends[t-1], teacher_ends[t])``)."""
    t = np.searchsorted(teacher_ends, np.maximum(ends, 1) - 1, side="right")
    return teacher_docs[np.minimum(t, len(teacher_docs) - 1)]


def student_mask(ends: np.ndarray, chars: np.ndarray) -> np.ndarray:
    """A student token is a target when its last character (``end - 1``) is a target character."""
    out = np.zeros(len(ends), bool)
    ok = ends > 0
    out[ok] = chars[np.minimum(ends[ok], len(chars)) - 1]
    return out


def cross_batch(reader: CacheReader, view: StudentView, indices: np.ndarray,
                need_hidden: bool = False, need_samples: bool = False,
                need_chunks: bool = False) -> dict[str, torch.Tensor]:
    """A batch in student token space. Per student position j < Ls-1: the target (next student
    token) and its mask; the teacher's top-k at the aligned position, mapped to student ids, with
    a mask that drops unaligned positions, ids without a twin and repeated twins (``topk_mask``),
    and one that keeps repeats (``topk_twin``); ``kd_position`` (aligned and a target) and
    ``twin_ids`` (the student ids that are some teacher id's twin, one tensor per batch).
    ``need_samples``: the teacher's draws at the aligned position (`_draws`); ``need_chunks``:
    the aligned chunks of `_chunks`."""
    names = ("topk_ids", "topk_logprobs", "topk_log_tail") + (("hidden",) if need_hidden else ()) + (
        ("draw_ids", "draw_counts") if need_samples else ()) + (("next_logprob",) if need_chunks else ())
    teacher = reader.read_indices(indices, names)
    ids = view.ids[indices]
    aligned = view.aligned[indices][:, :-1]
    target_mask = ids[:, 1:] >= 0
    if view.loss_mask is not None:  # chat data: only the student's target tokens count
        target_mask &= view.loss_mask[indices][:, 1:]
    t = np.clip(aligned, 0, None)
    top_ids = np.take_along_axis(teacher["topk_ids"].astype(np.int64), t[..., None], 1)
    top_lp = np.take_along_axis(teacher["topk_logprobs"], t[..., None], 1)
    top_tail = np.take_along_axis(teacher["topk_log_tail"], t, 1)
    mapped = view.vmap[top_ids]
    kd_mask = (mapped >= 0) & (aligned >= 0)[..., None] & target_mask[..., None]
    kd_mask &= ~_repeats(mapped)
    batch = {
        "input_ids": torch.from_numpy(np.clip(ids, 0, None)),
        "target_mask": torch.from_numpy(target_mask),
        "topk_ids": torch.from_numpy(np.clip(mapped, 0, None)),
        "topk_logprobs": torch.from_numpy(top_lp.astype(np.float32)),
        "topk_log_tail": torch.from_numpy(top_tail.astype(np.float32)),
        "topk_mask": torch.from_numpy(kd_mask),
        "sample_ids": torch.from_numpy(np.asarray(indices, np.int64)),
        "topk_twin": torch.from_numpy((mapped >= 0) & ((aligned >= 0) & target_mask)[..., None]),
        "kd_position": torch.from_numpy((aligned >= 0) & target_mask),
        "aligned": torch.from_numpy(aligned),
        "twin_ids": torch.from_numpy(twin_ids(view.vmap)),
    }
    if need_samples:
        batch.update(_draws(teacher, t, view.vmap, top_ids))
    if need_chunks:
        batch.update(_chunks(view.aligned[indices], teacher["next_logprob"], target_mask))
    if view.doc_ids is not None:  # the student's own packed documents, kept apart as the teacher's were
        batch["doc_ids"] = torch.from_numpy(view.doc_ids[indices])
    if need_hidden:
        hidden = teacher["hidden"].astype(np.float32)
        batch["hidden"] = torch.from_numpy(np.take_along_axis(hidden, t[..., None], 1))
        batch["hidden_mask"] = torch.from_numpy((aligned >= 0) & target_mask)
    return batch


def _repeats(ids: np.ndarray) -> np.ndarray:
    """True where an id already occurred earlier in its row (last axis)."""
    order = np.argsort(ids, axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, -1)
    dup_sorted = np.zeros_like(sorted_ids, dtype=bool)
    dup_sorted[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    out = np.zeros_like(dup_sorted)
    np.put_along_axis(out, order, dup_sorted, -1)
    return out


def twin_ids(vmap: np.ndarray) -> np.ndarray:
    """The student ids that are some teacher id's twin (sorted, int64)."""
    return np.unique(vmap[vmap >= 0]).astype(np.int64)


def _draws(teacher: dict, t: np.ndarray, vmap: np.ndarray, top_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The teacher's cached draws at each student position's aligned teacher position ``t``
    [B, Ls-1]: their twins (``draw_ids``, 0 where none), counts, whether each drawn teacher id lies
    beyond the teacher's top-k there (``draw_outside``) and has a twin (``draw_twin``)."""
    ids = np.take_along_axis(teacher["draw_ids"].astype(np.int64), t[..., None], 1)
    counts = np.take_along_axis(teacher["draw_counts"].astype(np.int64), t[..., None], 1)
    outside = ~(ids[..., None] == top_ids[..., None, :]).any(-1)
    twins = vmap[ids]
    return {"draw_ids": torch.from_numpy(np.clip(twins, 0, None)), "draw_counts": torch.from_numpy(counts),
            "draw_outside": torch.from_numpy(outside), "draw_twin": torch.from_numpy(twins >= 0)}


def _chunks(aligned_full: np.ndarray, next_logprob: np.ndarray, target_mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Aligned chunks: between consecutive aligned student positions j0 < j1 (teacher t0 < t1) both
    models predict exactly the same characters from the same prefix. At student position j1 - 1 (the
    chunk's last target): ``chunk_len`` = j1 - j0 and ``teacher_chunk_logp`` = sum of the teacher's
    ``next_logprob`` over t0..t1-1; 0 elsewhere. A chunk with a position that is not a target (chat
    data) is left out."""
    b, width = target_mask.shape
    length = np.zeros((b, width), np.int64)
    chunk_lp = np.zeros((b, width), np.float32)
    for r in range(b):
        js = np.flatnonzero(aligned_full[r] >= 0)
        if len(js) < 2:
            continue
        ts = aligned_full[r, js]
        ct = np.concatenate([[0.0], np.cumsum(next_logprob[r].astype(np.float64))])
        ok_targets = np.concatenate([[0], np.cumsum(target_mask[r])])
        j0, j1, t0, t1 = js[:-1], js[1:], ts[:-1], ts[1:]
        keep = (t1 > t0) & (ok_targets[j1] - ok_targets[j0] == j1 - j0)
        length[r, j1[keep] - 1] = (j1 - j0)[keep]
        chunk_lp[r, j1[keep] - 1] = (ct[t1] - ct[t0])[keep]
    return {"chunk_len": torch.from_numpy(length), "teacher_chunk_logp": torch.from_numpy(chunk_lp)}
