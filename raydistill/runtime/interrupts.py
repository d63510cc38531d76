"""Ctrl-C (SIGINT) and SIGTERM during a run: KeyboardInterrupt (``Terminated`` for SIGTERM), remembered so that one
Python drops is raised again at the next call boundary. No Ray."""
from __future__ import annotations

import contextlib
import signal
import threading

from raydistill.errors import Terminated

_INTERRUPTED: list[int] = []                 # the signals received during the run, in order
_FIRST: list[int] = []                       # the first signal of the last run (kept after it ends)


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_interrupt(signum, frame):
    _INTERRUPTED.append(signum)
    if not _FIRST:
        _FIRST.append(signum)
    raise _interruption(signum)


def terminated(interrupt: BaseException) -> bool:
    """Whether a KeyboardInterrupt stands for SIGTERM: a Terminated, or a plain one that came out of a Ray call (Ray
    turns what a signal handler raised during its call into a plain KeyboardInterrupt) after SIGTERM was received."""
    return isinstance(interrupt, Terminated) or _FIRST[:1] == [signal.SIGTERM]


@contextlib.contextmanager
def interrupts_kept():
    """SIGINT and SIGTERM raise KeyboardInterrupt (Terminated) and are remembered, because Python drops an exception
    raised while it runs a callback (an import lock's, a weakref's): the loop raises it again at the next call
    boundary (``check_interrupted``). Only in the main thread, where signal handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()
    _FIRST.clear()
    previous = {sig: signal.signal(sig, _on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _INTERRUPTED.clear()


def interrupts_kept_again() -> None:
    """Inside ``interrupts_kept``: its handlers again, after something replaced them (``ray.init`` installs a SIGTERM
    handler of its own that ends the process without a word)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _on_interrupt:
        signal.signal(signal.SIGTERM, _on_interrupt)


def check_interrupted() -> None:
    if _INTERRUPTED:
        raise _interruption(_INTERRUPTED[0])
