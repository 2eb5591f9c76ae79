"""SIGINT and SIGTERM always end ``mmcl``, leaving a study ``mmcl resume`` continues.

The first signal stops the study gracefully: outside a Tune run it raises
``KeyboardInterrupt`` (nothing of an unfinished stage is marked done); inside one it asks
Tune to stop through SIGUSR1, the stop signal Tune always listens to, so Tune snapshots
the experiment one last time and returns. A second signal ends the process at once.

Why not leave SIGINT to Tune: after a SIGINT, ``Tuner.fit`` returns a grid whose cut-off
trials are marked TERMINATED, indistinguishable from a stage that finished (measured with
Ray 2.60), so the driver would record an interrupted stage as done. The flag kept here is
how the driver knows, and Tune's own SIGINT handler is switched off
(``TUNE_DISABLE_SIGINT_HANDLER``) so that every signal reaches this module first. SIGTERM
is what ``ray job stop``, Kubernetes and schedulers send; Tune ignores it.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

EXIT_INTERRUPTED = 3

_state = {"signals": 0, "in_tune": False, "installed": False}


def _handler(signum: int, frame) -> None:
    _state["signals"] += 1
    name = signal.Signals(signum).name
    if _state["signals"] > 1:
        print(f"\n{name} again: stopping now; continue with `mmcl resume <results dir>`", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)
    # Tune registers its SIGUSR1 handler when its run starts; before that (or after it)
    # there is no loop to stop, and raising is the graceful way out.
    if _state["in_tune"] and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        print(f"\n{name}: stopping the stage (its state is saved; send again to stop at once)", file=sys.stderr,
              flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGUSR1)
        return
    raise KeyboardInterrupt(name)


def install() -> None:
    """Handle SIGINT and SIGTERM in this (main-thread) process from now on."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    _state["installed"] = True


def interrupted() -> bool:
    """Whether a stop signal arrived since :func:`install`."""
    return _state["signals"] > 0


@contextmanager
def tune_run() -> Iterator[None]:
    """Mark a Tune run: a first signal inside asks Tune to stop instead of raising.
    The handlers are installed again on entry (``ray.init`` may have replaced them)."""
    if not _state["installed"]:  # a library caller (a test, a notebook) keeps its own handlers
        yield
        return
    install()
    # A handler left by an earlier stage's Tune run would stop a run that is over.
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    _state["in_tune"] = True
    try:
        yield
    finally:
        _state["in_tune"] = False
