"""Self-description of the cache's zarr arrays: the attributes each array and the group carry.

Every array's ``zarr.json`` holds ``attributes`` with ``description`` (meaning), ``dims`` (the
axes), ``units``, ``encoding`` and ``decode`` (the rule that turns the stored values into the
logical ones) and ``dtype_note``; the group holds the schema version and a pointer to the format
document (``docs/cache-format.md``). Written once, when the array is created (so they are covered
by the checksums of the array metadata). Nothing reads them back: they are for people and for
readers written without this project's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import CacheSpec

FORMAT_DOC = "docs/cache-format.md"
FORMAT_NAME = "kd-pipeline teacher cache"

_SQRT8_DECODE = (
    "per position: ranks = cumsum(topk_rank_gaps) (the first gap is absolute), ids = rank_to_id[ranks]; "
    "p_i = (c_i / M)^2 for code c_i >= 1, and (0.5 / M)^2 / 3 for code 0 (same for topk_tail_code -> T); "
    "renormalise: p_i /= (sum p + T), T /= (sum p + T); re-sort ids and p by descending p (stable); "
    "log-prob = log(p), float32. M = group attribute sqrt_levels")

_LOGP16_DECODE = (
    "per position: ranks = cumsum(topk_rank_gaps) (the first gap is absolute), ids = rank_to_id[ranks]; "
    "l_i = -c_i * S (float64) for every code c_i of topk_log_codes, the floor 65535 included, and "
    "l_T = -c_T * S for topk_log_tail_code; renormalise in log space: l_i -= lse, l_T -= lse with "
    "lse = logaddexp.reduce(l_0..l_K-1, l_T); re-sort ids and l by descending l (stable); log-prob = "
    "float32(l), log-tail = l_T. S = group attribute logp_step")


def group_attrs(spec: CacheSpec, schema_version: int) -> dict[str, Any]:
    out = {"format": FORMAT_NAME, "schema_version": schema_version, "format_doc": FORMAT_DOC,
           "description": "per-token teacher outputs, [N sequences, L positions, ...], sharded along N; "
                          "manifest.json beside this group says which shards are committed",
           "topk_encoding": spec.topk_encoding, "sqrt_levels": spec.sqrt_levels, "top_k": spec.top_k,
           "vocab_size": spec.vocab_size, "hidden_dim": spec.hidden_dim, "seq_len": spec.seq_len}
    if spec.topk_encoding == "logp16":
        out["logp_step"] = spec.logp_step
    return out


def array_attrs(name: str, spec: CacheSpec) -> dict[str, Any]:
    """The attributes of array ``name`` of a cache with ``spec``."""
    ids = "uint16 (vocab <= 65536) or uint32"
    raw = {"encoding": "raw", "decode": "none: the stored values are the values"}
    table: dict[str, dict[str, Any]] = {
        "input_ids": {"description": "the teacher's token ids of each packed sequence (documents joined by the "
                                     "end-of-sequence token)", "dims": ["sequence", "position"], "units": "token id",
                      "dtype_note": ids, **raw},
        "topk_rank_gaps": {"description": f"{spec.topk_encoding}: the top-k token ids as ranks in rank_to_id, sorted "
                                          "ascending, stored as the first rank then the differences",
                           "dims": ["sequence", "position", "k"], "units": "rank difference",
                           "encoding": spec.topk_encoding,
                           "decode": _LOGP16_DECODE if spec.topk_encoding == "logp16" else _SQRT8_DECODE,
                           "dtype_note": f"{ids}, like the ids"},
        "topk_log_codes": {"description": "logp16: round(-log p / S) of each top-k log-probability, S = logp_step, "
                                          "clipped to 0..65535, in the same (rank) order as topk_rank_gaps",
                           "dims": ["sequence", "position", "k"], "units": "code (-log p / logp_step nats)",
                           "encoding": "logp16", "decode": _LOGP16_DECODE,
                           "dtype_note": "uint16; 65535 = the floor (log p below -65534.5 S, or p = 0)"},
        "topk_log_tail_code": {"description": "logp16: round(-log T / S) of the tail mass T = 1 - sum of the top-k "
                                              "probabilities (stored explicitly; 65535 for T = 0)",
                               "dims": ["sequence", "position"], "units": "code (-log p / logp_step nats)",
                               "encoding": "logp16", "decode": _LOGP16_DECODE,
                               "dtype_note": "uint16 (sqrt8's topk_tail_code is a different, uint8 array)"},
        "topk_sqrt_codes": {"description": "sqrt8: round(sqrt(p) * M) of each top-k probability, in the same (rank) "
                                           "order as topk_rank_gaps", "dims": ["sequence", "position", "k"],
                            "units": "code (sqrt of probability * M)", "encoding": "sqrt8", "decode": _SQRT8_DECODE,
                            "dtype_note": "uint8, 0..M"},
        "topk_tail_code": {"description": "sqrt8: round(sqrt(T) * M) of the tail mass T = 1 - sum of the top-k "
                                          "probabilities (stored explicitly)", "dims": ["sequence", "position"],
                           "units": "code (sqrt of probability * M)", "encoding": "sqrt8", "decode": _SQRT8_DECODE,
                           "dtype_note": "uint8, 0..M"},
        "rank_to_id": {"description": "sqrt8, logp16: the per-cache rank table, rank -> token id (tokens most often in the "
                                      "teacher's top-k first); a permutation of 0..V-1", "dims": ["rank"],
                       "units": "token id", "dtype_note": "int64", **raw},
        "topk_ids": {"description": "the teacher's top-k token ids, by descending logit",
                     "dims": ["sequence", "position", "k"], "units": "token id", "dtype_note": ids, **raw},
        "topk_logprobs": {"description": "log-probabilities of topk_ids under the teacher's full-vocabulary softmax "
                                         "(logit = logprob + logz)", "dims": ["sequence", "position", "k"],
                          "units": "nats", "encoding": spec.topk_encoding if spec.topk_encoding != "sqrt8" else "raw",
                          "decode": "none; tail mass = 1 - sum(exp(logprob)) computed in float64",
                          "dtype_note": "float16 or float32 (cache.topk_encoding)"},
        "logz": {"description": "log-sum-exp of the teacher's logits over the whole vocabulary (fp32): "
                                "logit_i = logprob_i + logz", "dims": ["sequence", "position"], "units": "nats",
                 "dtype_note": "float32", **raw},
        "next_logprob": {"description": "log p(input_ids[t+1]) under the teacher at position t; 0 at the last "
                                        "position (no target there)", "dims": ["sequence", "position"],
                         "units": "nats", "dtype_note": "float32", **raw},
        "hidden": {"description": "the teacher's post-norm last hidden state (what the output head reads)",
                   "dims": ["sequence", "position", "hidden"], "units": "activation",
                   **({"encoding": "int8 per-token absmax", "decode": "hidden = float32(codes) * hidden_scale[..., None]",
                       "dtype_note": "int8 codes in -127..127"} if spec.hidden_dtype == "int8" else
                      {"encoding": "float16", "decode": "float32(hidden)", "dtype_note": "float16"})},
        "hidden_scale": {"description": "int8 hidden: the per-token scale, max|h| / 127",
                         "dims": ["sequence", "position"], "units": "activation per code", "encoding": "raw",
                         "decode": "hidden = float32(codes) * hidden_scale[..., None]", "dtype_note": "float32"},
        "head": {"description": "the teacher's output head W [V, D]: logit_j = hidden . W[j] (exact when the "
                                "manifest's teacher facts say no soft-capping)", "dims": ["token", "hidden"],
                 "units": "weight", "dtype_note": "float32", **raw},
        "draw_gaps": {"description": "sampled cache (RS-KD): the distinct token ids drawn from the teacher's full "
                                     "softmax at temperature 1 (cache.samples draws per position), ascending by rank, "
                                     "stored as the first rank then the differences; padding (count 0) last, gap 0",
                      "dims": ["sequence", "position", "sample"], "units": "rank difference",
                      "encoding": "gaps over ranks (rank_to_id with sqrt8 and logp16, else the ids themselves)",
                      "decode": "ranks = cumsum(draw_gaps); ids = rank_to_id[ranks] (sqrt8, logp16) or ranks; "
                                "ignore entries whose draw_counts is 0",
                      "dtype_note": f"{ids}, like the ids"},
        "loss_mask": {"description": "chat caches only: 1 where token t is a target (it lies in an assistant turn or a "
                                     "completion: its last character is in one), 0 elsewhere (prompts, template "
                                     "markers around them, the end-of-document token); the loss at position t, which "
                                     "predicts token t+1, counts when loss_mask[t+1] is 1",
                      "dims": ["sequence", "position"], "units": "flag", "dtype_note": "uint8, 0 or 1", **raw},
        "draw_counts": {"description": "sampled cache: how often each id of draw_gaps was drawn; the counts of a "
                                       "position sum to cache.samples, 0 marks padding; E[count / samples] = p",
                        "dims": ["sequence", "position", "sample"], "units": "draws", "dtype_note": "uint8", **raw},
    }
    return {**table[name], "format_doc": FORMAT_DOC}
