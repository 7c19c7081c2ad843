"""Ctrl+C during a sweep's trials: a graceful stop of Ray Tune at the first press, an exit at the second."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

INTERRUPTED_EXIT = 130
"""Exit status after Ctrl+C (128 + SIGINT), as shells report it."""


class Interruption:
    """Ctrl+C during a sweep: the first press stops Ray Tune gracefully, a second one exits at once.

    Ray Tune's own SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``): it stays installed
    after ``fit()`` and would swallow a Ctrl+C during the final evaluation. The first press raises
    SIGUSR1, Ray Tune's other graceful-stop signal, and remembers it. From then on until the process ends,
    a second press calls ``os._exit(130)`` from a watcher thread woken by :func:`signal.set_wakeup_fd`,
    so it takes effect even while the main thread is inside a C call (a Python handler waits for the main
    thread to return to the interpreter, and Ray's shutdown can hold it for seconds).
    Outside :meth:`during_fit` and before a first press, Ctrl+C raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._presses = 0

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:
            os._exit(INTERRUPTED_EXIT)
        self.pressed = True
        print("Ctrl+C: stopping the trials after their current step (again to exit at once)", flush=True)
        signal.raise_signal(signal.SIGUSR1)

    def _watch(self, wakeup: int) -> None:
        """Count SIGINTs as the C-level handler writes them to ``wakeup``; exit at the second."""
        while signals := os.read(wakeup, 64):  # b"" once the writing end is closed
            for signum in signals:
                if signum == signal.SIGINT:
                    self._presses += 1
                    if self._presses >= 2:
                        os._exit(INTERRUPTED_EXIT)
        os.close(wakeup)

    @contextmanager
    def during_fit(self) -> Iterator[None]:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
        wakeup, written = os.pipe()
        os.set_blocking(written, False)
        previous_wakeup = signal.set_wakeup_fd(written, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch, args=(wakeup,), name="second-ctrl-c", daemon=True).start()
        try:
            yield
        finally:
            signal.signal(signal.SIGUSR1, previous[signal.SIGUSR1])
            if not self.pressed:  # after a first press, a second one exits at once until the process ends
                signal.signal(signal.SIGINT, previous[signal.SIGINT])
                signal.set_wakeup_fd(previous_wakeup)
                os.close(written)  # the watcher's read returns b"" and it ends
