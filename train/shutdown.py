"""Graceful shutdown: SIGTERM/SIGINT become a stop flag the train loop polls.

A preempted or interrupted run then saves a checkpoint and exits cleanly. In multi-process runs the
decision to stop must be agreed on by all processes: use :meth:`GracefulShutdown.should_stop` (a
collective), not the process-local :attr:`GracefulShutdown.requested`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

__all__ = ["GracefulShutdown"]

log = logging.getLogger(__name__)


class GracefulShutdown:
    """Context manager turning SIGTERM/SIGINT into a stop request the train loop polls.

    Inside the context the signals set :attr:`requested` (and :attr:`signal_name`, the first signal
    received) instead of killing the process; the loop then saves a checkpoint and exits. A second
    SIGINT while a stop is pending raises KeyboardInterrupt (force quit). On exit the previous
    handlers are restored. Signal handlers can only be installed from the main thread; elsewhere
    the context installs nothing (:attr:`installed` is False) and only :meth:`request` sets the flag.

    Example::

        with GracefulShutdown() as stop:
            for step in ...:
                ...
                if stop.should_stop():
                    ckpt.save(step, ...); break
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = False
        self.signal_name: str | None = None
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def request(self, reason: str = "request") -> None:
        """Ask for a stop without a signal (``signal_name`` is set to ``reason`` if none came yet)."""
        if not self.requested:
            self.signal_name = reason
        self.requested = True

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while a stop ({self.signal_name}) was pending")
        if not self.requested:
            log.warning(
                "%s received: stopping after the current step (send SIGINT again to force quit)",
                name,
            )
        self.request(name)

    def should_stop(self) -> bool:
        """Whether any process has a stop request; a collective in multi-process runs.

        Every process must call it at the same steps (it all-gathers the flags), so that all of
        them save the final checkpoint together. With one process it is just :attr:`requested`.
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def __enter__(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulShutdown: not in the main thread, signal handlers not installed")
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # getsignal gives None for a handler not installed from Python: fall back on the default.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = False
