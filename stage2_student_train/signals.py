"""SIGTERM and SIGINT (a Kaggle session ending, a spot instance reclaimed, Ctrl-C) stop training
at the next step boundary, with a checkpoint, instead of killing it mid-step."""

from __future__ import annotations

import signal
import threading

from pipeline.distributed import Dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While active, the first SIGTERM/SIGINT only records itself; a second one of the same kind
    acts at once (its default action), for a user who really wants out."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signum:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to stop at once)", flush=True)

    def requested(self, dist: Dist) -> bool:
        """True on every rank when any rank was signalled (one small collective under torchrun)."""
        if not dist.enabled:
            return self.signum is not None
        return dist.all_sum([1.0 if self.signum is not None else 0.0])[0] > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
