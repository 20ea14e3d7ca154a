"""Ctrl-C that keeps the work: the first one stops a run cleanly, a second one at once.

Ray Train's `fit()` installs its own SIGINT handler when it runs in the main thread; that handler
aborts the controller, and the command then ends ~17 s later with exit status 1 and Ray's last
words. `fit_interruptibly` runs `fit()` in a helper thread instead (as Ray Tune does), so the
signal reaches raycls: the main thread gets the KeyboardInterrupt, every checkpoint Train has
persisted stays on disk (each is complete before Train registers it), and the command shuts its
Ray down, prints the `--resume` command and exits with 130. Ray's own processes block SIGINT, so
a terminal's Ctrl-C (sent to the whole process group) reaches only the driver.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class Interrupted(KeyboardInterrupt):
    """The user stopped a run; the message says what was kept and how to continue."""


def fit_interruptibly(trainer: Any, idle: Any = None) -> Any:
    """`trainer.fit()`, with Ctrl-C raised in the calling thread as KeyboardInterrupt;
    `idle()` runs between waits (the console drains its queue there)."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="raycls-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a short wait: the signal handler runs between waits
        if idle is not None:
            idle()
    if idle is not None:
        idle()
    if "error" in box:
        raise box["error"]
    return box["result"]


def second_interrupt_exits() -> None:
    """From now on a further Ctrl-C ends the process at once (the clean stop is under way)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
