"""A background thread that compresses and writes finished shards while the teacher runs on.

The queue is bounded, so a slow disk eventually pauses the teacher instead of filling memory;
``stall_s`` counts how long the teacher waited (0 when the writer keeps up). An error in the
thread is raised in the caller at the next ``submit`` or at exit; shards already committed stay.
"""

from __future__ import annotations

import queue
import threading
import time

from pipeline.cache import CacheWriter


class BackgroundWriter:
    def __init__(self, writer: CacheWriter, max_pending: int):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.stall_s = 0.0
        self.thread = threading.Thread(target=self._work, name="cache-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:  # after a failure keep draining so the producer never blocks
                try:
                    self.writer.write_shard(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, *item) -> None:
        self._raise()
        t = time.perf_counter()
        self.queue.put(item)
        self.stall_s += time.perf_counter() - t

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.queue.put(None)
        self.thread.join()
        if exc_type is None:
            self._raise()
