"""The teacher cache: one package, one job per module, along the data flow.

    spec.py       what a cache is (CacheSpec: shapes, encodings, shards, splits; names; manifest)
    store.py      where it lives: a local directory or an fsspec URL (s3://, gs://, hf://, memory://)
    files.py      its files: checksum records, commit markers, what may be replaced, the lock
    codecs.py     logical <-> stored arrays: top-k (sqrt8, logp16, float16/32), hidden (float16, int8),
                  sampled tokens; the one interface the writer and reader use
    logit_codec.py, logp_codec.py   the sqrt8 and logp16 encodings themselves (and the samples' gaps)
    writer.py     CacheWriter: create or reopen, commit shard by shard
    reader.py     CacheReader: batched reads of any range, decoded and verified
    tokenizer.py  the teacher's tokenizer inside the cache (self-contained caches)
    summary.py    what ``inspect`` reports; verify.py: ``inspect --verify``
    attrs.py      the self-description every zarr array carries

The layout of a cache on disk (schema version ``SCHEMA_VERSION``), every array, field and
decoding rule: ``docs/cache-format.md`` (the one place it is written out).
"""

from ..atomic import atomic_write_bytes, atomic_write_json, file_crc32, file_record
from .codecs import quantize_hidden_int8
from .files import ARRAYS, DONE, MANIFEST, META, VIEWS, check_finite, lock_path
from .reader import CacheReader, Sequence
from .spec import DERIVED, LOGICAL, SCHEMA_VERSION, CacheSpec, fingerprint_diff, id_dtype
from .store import Storage, is_url, open_storage
from .writer import CacheWriter

__all__ = ["ARRAYS", "DERIVED", "DONE", "LOGICAL", "MANIFEST", "META", "SCHEMA_VERSION", "VIEWS", "CacheReader",
           "CacheSpec", "CacheWriter", "Sequence", "Storage", "atomic_write_bytes", "atomic_write_json",
           "check_finite", "file_crc32", "file_record", "fingerprint_diff", "id_dtype", "is_url", "lock_path",
           "open_storage", "quantize_hidden_int8"]
