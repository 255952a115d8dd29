"""The storage capabilities the cache code asks instead of type-testing the store (store.py):
what differs between a local directory and an object store, checked on both."""

from __future__ import annotations

import uuid

from pipeline.cache.files import lock_path
from pipeline.cache.store import open_storage, user_cache_dir


def test_a_local_store_is_its_directory(tmp_path):
    store = open_storage(tmp_path / "c")
    (tmp_path / "c" / "tokenizer").mkdir(parents=True)
    store.write_bytes("tokenizer/a.json", b"{}")
    assert store.location == tmp_path / "c"
    assert store.local_path() == tmp_path / "c" and store.local_path("views") == tmp_path / "c" / "views"
    with store.local_dir("tokenizer") as folder:
        assert folder == tmp_path / "c" / "tokenizer"  # no copy
    assert (tmp_path / "c" / "tokenizer" / "a.json").read_bytes() == b"{}"
    assert lock_path(store).parent == tmp_path  # beside the cache: it outlives a replacement


def test_an_object_store_has_no_local_path_and_lends_a_temporary_copy():
    url = f"memory://caps-{uuid.uuid4().hex}/c"
    store = open_storage(url)
    store.write_bytes("tokenizer/a.json", b"{}")
    store.write_bytes("tokenizer/sub/b.txt", b"x")
    assert store.location == url and store.local_path() is None
    with store.local_dir("tokenizer") as folder:
        assert (folder / "a.json").read_bytes() == b"{}" and (folder / "sub" / "b.txt").read_bytes() == b"x"
    assert not folder.exists()  # the copy is gone
    assert store.files_under("tokenizer") == ["tokenizer/a.json", "tokenizer/sub/b.txt"]  # the store is untouched
    assert lock_path(store).parent == user_cache_dir() / "locks"
