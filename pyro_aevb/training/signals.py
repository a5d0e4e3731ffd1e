"""Clean stops: SIGINT (Ctrl-C) and SIGTERM let the step finish, then the run checkpoints and exits."""

from __future__ import annotations

import signal
import threading

from .distributed import any_rank


class StopSignals:
    """SIGINT/SIGTERM set ``received`` (the signal's name); the loop finishes its step, checkpoints and stops.

    A second signal stops at once (``KeyboardInterrupt``). Outside the main thread, where Python cannot
    install handlers, this does nothing.
    """

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Has a stop signal come, to this process or (under torchrun) to any rank? Every rank stops together."""
        return any_rank(self.received is not None, device)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
