"""A trainer notices when the cache it trains from is replaced or removed under it.

A cache is read lazily, shard by shard, for the whole run: an overwrite (``cache.overwrite=true``)
or a deletion while a student trains would otherwise feed the last steps and the final eval from
other data, and the model card would name the old cache. ``check_cache_unchanged`` runs at each
eval and before the export: the manifest must still be this build's (its ``cache_id``, written at
creation and kept by extensions) and must still hold the fingerprint the run began with (an
extension keeps it in its history); otherwise the run stops with a one-line error.
"""

from __future__ import annotations

from pipeline.cache.spec import read_manifest, spec_from_manifest
from pipeline.errors import CacheError


class CacheReplaced(CacheError):
    """The cache a run trains from was replaced or removed while it ran."""


def check_cache_unchanged(setup) -> None:
    """Raise ``CacheReplaced`` when ``setup.reader``'s cache is no longer the one the run opened."""
    reader, cfg = setup.reader, setup.cfg
    where = (f"the run stops here; its checkpoints (under {setup.run_dir}/checkpoints) hold the old cache's "
             "training: restore that cache and resume, or start a new run on the new one")
    try:
        manifest = read_manifest(reader.store)
        spec = spec_from_manifest(manifest, reader.store)
    except CacheError as e:
        raise CacheReplaced(f"cache {cfg.cache.dir} was removed or damaged while this run trained from it ({e}); "
                            f"{where}") from None
    same_build = manifest.get("cache_id") == reader.manifest.get("cache_id")
    if not same_build or spec.train_sequences_of(setup.cache_fingerprint) is None:
        raise CacheReplaced(f"cache {cfg.cache.dir} was replaced while this run trained from it (another build now "
                            f"has its name); {where}")
