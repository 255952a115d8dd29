"""The storage seam: where a cache's files live, a local directory or an fsspec URL.

    store = open_storage("caches/c")                 # LocalStorage
    store = open_storage("s3://bucket/caches/c")     # FsspecStorage (s3fs, gcsfs, hf://, memory://)

Every cache file is addressed by its path relative to the cache root (``"done/shard-00003.json"``).
The cache code above this module never touches ``os`` or ``Path`` for cache files, so one commit
protocol serves both kinds of storage:

- ``write_bytes`` is all-or-nothing. Locally: a temp file, ``fsync``, ``os.replace``. On an object
  store: one PUT, which the store makes visible whole or not at all. Nothing relies on rename,
  so a commit marker written last in one ``write_bytes`` commits its shard on either storage.
- ``zarr_store`` hands zarr v3 its own store over the same place (``LocalStore`` or
  ``FsspecStore``); zarr writes each shard file whole.

Credentials and endpoints come from the usual places of the fsspec backend (for S3: the AWS
environment variables or ``~/.aws``, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from ..atomic import atomic_write_bytes, file_crc32

BLOCK = 1 << 22


def is_url(location: str | Path) -> bool:
    """True for ``proto://...`` locations other than ``file://`` (those are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def open_storage(location: str | Path | Storage) -> Storage:
    if isinstance(location, Storage):
        return location
    text = str(location)
    if is_url(text):
        return FsspecStorage(text)
    return LocalStorage(Path(text[len("file://"):] if text.startswith("file://") else text))


def user_cache_dir() -> Path:
    """This tool's per-user local folder, for what must stay local when a cache is remote (locks,
    stage 1's plan, student views): ``$XDG_CACHE_HOME/kd-pipeline`` or ``~/.cache/kd-pipeline``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kd-pipeline"


class Storage(ABC):
    """A cache root. Paths are ``/``-separated and relative to it; ``""`` is the root itself."""

    url: str
    remote: bool

    def __str__(self) -> str:
        return self.url

    def display(self, rel: str = "") -> str:
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    @abstractmethod
    def exists(self, rel: str = "") -> bool: ...

    @abstractmethod
    def is_dir(self, rel: str = "") -> bool: ...

    @abstractmethod
    def size(self, rel: str) -> int | None:
        """The size of file ``rel``, None if it is not a file."""

    def is_file(self, rel: str) -> bool:
        return self.size(rel) is not None

    @abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders); empty if there is nothing."""

    @abstractmethod
    def files_under(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, recursively, as root-relative paths."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Raises ``FileNotFoundError`` (or another ``OSError``) if unreadable."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """All or nothing: readers see the old file or the new one, never part of it."""

    @abstractmethod
    def put_file(self, rel: str, local: Path) -> None:
        """Copy local file ``local`` to ``rel``, all or nothing, without reading it into memory."""

    @abstractmethod
    def put_dir(self, rel: str, local: Path) -> None:
        """Replace folder ``rel`` with a copy of local folder ``local``."""

    @abstractmethod
    def get_dir(self, rel: str, local: Path) -> None:
        """Copy folder ``rel`` into the (existing, empty) local folder ``local``."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Delete file ``rel``; nothing if it does not exist."""

    @abstractmethod
    def remove_tree(self, rel: str) -> None:
        """Delete folder ``rel`` and everything under it; nothing if it does not exist."""

    @abstractmethod
    def zarr_store(self, rel: str, *, read_only: bool):
        """A zarr v3 store over folder ``rel``."""

    @abstractmethod
    def crc32(self, rel: str) -> int: ...

    def bytes_under(self, rel: str = "") -> int:
        return sum(self.size(f) or 0 for f in self.files_under(rel))

    def read_arrow(self, rel: str) -> pa.Table:
        """An Arrow IPC file, read whole (``OSError`` / ``pa.ArrowInvalid`` if unreadable)."""
        return ipc.open_file(pa.BufferReader(self.read_bytes(rel))).read_all()

    # -- capabilities: what differs between a local disk and an object store, asked, not type-tested

    @property
    def location(self) -> str | Path:
        """What messages call the cache: its local directory, or its URL."""
        return self.url

    def local_path(self, rel: str = "") -> Path | None:
        """``rel`` as a path on this machine's file system, or None where the store has none (an
        object store). A store with one keeps beside the cache what must live with it (its lock,
        student views, the temporary tree of a replacement) and can swap folders in by rename."""
        return None

    @contextmanager
    def local_dir(self, rel: str) -> Iterator[Path]:
        """Folder ``rel`` as a local folder, for libraries that read only local paths: the folder
        itself where ``local_path`` has one, else a temporary copy deleted on exit."""
        local = Path(tempfile.mkdtemp(prefix="kd-store-"))
        try:
            self.get_dir(rel, local)
            yield local
        finally:
            shutil.rmtree(local, ignore_errors=True)


class LocalStorage(Storage):
    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    @property
    def location(self) -> Path:
        return self.root

    def local_path(self, rel: str = "") -> Path:
        return self.path(rel)

    @contextmanager
    def local_dir(self, rel: str) -> Iterator[Path]:
        yield self.path(rel)

    def exists(self, rel: str = "") -> bool:
        return self.path(rel).exists()

    def is_dir(self, rel: str = "") -> bool:
        return self.path(rel).is_dir()

    def size(self, rel: str) -> int | None:
        p = self.path(rel)
        return p.stat().st_size if p.is_file() else None

    def list(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def files_under(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        if not p.is_dir():
            return []
        return sorted(f.relative_to(self.root).as_posix() for f in p.rglob("*") if f.is_file())

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path(rel), data)

    def put_file(self, rel: str, local: Path) -> None:
        dst = self.path(rel)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        try:
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def put_dir(self, rel: str, local: Path) -> None:
        final = self.path(rel)
        tmp = final.with_name(f".{final.name}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def get_dir(self, rel: str, local: Path) -> None:
        shutil.copytree(self.path(rel), local, dirs_exist_ok=True)

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def zarr_store(self, rel: str, *, read_only: bool):
        from zarr.storage import LocalStore

        return LocalStore(str(self.path(rel)), read_only=read_only)

    def crc32(self, rel: str) -> int:
        return file_crc32(self.path(rel))


class FsspecStorage(Storage):
    """Any fsspec filesystem: ``s3://``, ``gs://``, ``hf://``, ``memory://``, ...

    Object stores have no directories and no rename: a "folder" is a key prefix, and every write
    is one PUT of a whole object. Listings are never cached (another process may have written)."""

    remote = True

    def __init__(self, url: str):
        import fsspec

        self.protocol, rest = url.split("://", 1)
        self.url = f"{self.protocol}://{rest.rstrip('/')}"
        self.fs, self.base = fsspec.core.url_to_fs(self.url)
        self.base = self.base.rstrip("/")

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _fresh(self) -> None:
        self.fs.invalidate_cache()

    def exists(self, rel: str = "") -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path(rel)))

    def is_dir(self, rel: str = "") -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path(rel)))

    def size(self, rel: str) -> int | None:
        self._fresh()
        try:
            info = self.fs.info(self.path(rel))
        except FileNotFoundError:  # other errors (permissions, network) are not "missing"
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list(self, rel: str = "") -> list[str]:
        self._fresh()
        here = self.path(rel).rstrip("/")
        try:
            entries = self.fs.ls(here, detail=False)
        except FileNotFoundError:
            return []
        # entry names relative to ``here``; a folder-marker key for ``here`` itself names nothing
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries if str(e).rstrip("/") != here}
        return sorted(n for n in names if n)

    def files_under(self, rel: str = "") -> list[str]:
        self._fresh()
        root = self.path(rel)
        try:
            found = self.fs.find(root)
        except FileNotFoundError:
            return []
        cut = len(self.base) + 1
        # keys ending in "/" are S3 console folder markers, not files
        return sorted(str(f)[cut:] for f in found if str(f).startswith(root.rstrip("/") + "/")
                      and not str(f).endswith("/"))

    def bytes_under(self, rel: str = "") -> int:
        self._fresh()
        try:
            found = self.fs.find(self.path(rel), detail=True)
        except FileNotFoundError:
            return 0
        return sum(int(info.get("size") or 0) for key, info in found.items()
                   if info.get("type") == "file" and not key.endswith("/"))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(rel), data)  # one PUT: the object appears whole or not at all

    def put_file(self, rel: str, local: Path) -> None:
        self.fs.put_file(str(local), self.path(rel))

    def put_dir(self, rel: str, local: Path) -> None:
        self.remove_tree(rel)
        for f in sorted(Path(local).rglob("*")):
            if f.is_file():
                self.put_file(f"{rel}/{f.relative_to(local).as_posix()}", f)

    def get_dir(self, rel: str, local: Path) -> None:
        for f in self.files_under(rel):
            dst = Path(local) / f[len(rel) + 1:]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.read_bytes(f))

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass
        self._fresh()

    def remove_tree(self, rel: str) -> None:
        for f in self.files_under(rel):
            self.remove(f)

    def zarr_store(self, rel: str, *, read_only: bool):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(f"{self.protocol}://{self.path(rel)}", read_only=read_only)

    def crc32(self, rel: str) -> int:
        crc = 0
        with self.fs.open(self.path(rel), "rb") as f:
            while block := f.read(BLOCK):
                crc = zlib.crc32(block, crc)
        return crc

