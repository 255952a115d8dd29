"""Advisory lock files: one writer per directory (a cache, a run), with a message naming the holder.

    from pipeline.locks import acquire_lock

    with acquire_lock(path, "cache /data/c") as held:   # held: LockInfo of this process
        ...                                              # LockHeld raised if another process holds it

The lock is an ``fcntl.flock`` on ``path``, so the kernel releases it when its holder dies for
any reason (SIGKILL included): a lock file left behind by a dead process holds no lock and the
next ``acquire_lock`` takes it over. The file holds the holder's pid, hostname and start time,
only to name it in the message. It is removed on release. Locks are per open file, so a second
``acquire_lock`` on the same path is refused even inside the same process. Not meant for network
filesystems without working ``flock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import LockHeld


@dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    since: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, since {when}"


def read_lock_info(path: str | Path) -> LockInfo | None:
    """Who wrote the lock file at ``path`` (None if absent or unreadable). Says nothing about
    whether that process still holds the lock."""
    try:
        obj = json.loads(Path(path).read_text())
        return LockInfo(int(obj["pid"]), str(obj["host"]), float(obj["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def acquire_lock(path: str | Path, what: str) -> Iterator[LockInfo]:
    """Hold an exclusive lock on ``path`` (created, with its parent, if missing) for the ``with``
    block; raise ``LockHeld`` at once, naming ``what`` and the holder, if another process (or
    another ``acquire_lock`` in this one) holds it. Never waits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(path, what)
    me = LockInfo(os.getpid(), socket.gethostname(), time.time())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": me.pid, "host": me.host, "since": me.since}) + "\n").encode(), 0)
        yield me
    finally:
        # Unlink while still holding the lock: a process that opened the old file retries
        # (see _lock_fd), so nobody ever "holds" an unlinked file.
        try:
            if _same_file(fd, path):
                path.unlink()
        except OSError:
            pass
        os.close(fd)


def _lock_fd(path: Path, what: str) -> int:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_lock_info(path)
            who = holder.describe() if holder else "another process"
            raise LockHeld(f"{what} is in use by {who} (lock file {path}); wait for it to finish or stop it, "
                           "then rerun") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder released and removed the file between our open and flock: retry
    raise LockHeld(f"cannot take the lock {path} for {what}: it keeps being replaced; rerun")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
