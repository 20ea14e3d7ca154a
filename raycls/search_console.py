"""What a search shows (`raycls search`, `python tune/search.py`), and its Ctrl-C.

The console holds raycls's lines only, each starting with one of `LINE_PREFIXES`:

- `[raycls] `: the header (it names the search's `ray.log`), one line per trial event (started,
  each epoch's val_acc, stopped early, finished, errored, retried), the ranked table, the best
  trial, the export's gate results, and last, where the bundle is and how to serve it;
- `error: `: a failure, with the file to read (`error.txt` of a trial, the search's `ray.log`).

(`--json` adds the summary as one JSON line at the very end.) Ray's and Tune's own output is
settled at its source: Ray does not forward its processes' output (`log_to_driver=False`, the
same as `raycls train`), so the trials' Train workers and Ray's core_worker/raylet lines never
reach the console; Tune's legacy output path at `verbose=0` prints no banner, progress table or
TensorBoard hint (`RAY_AIR_NEW_OUTPUT=0`; the new one prints its banner even at verbosity 0);
Tune's snapshot-bottleneck warning is off (`TUNE_WARN_EXCESSIVE_...=0`: the experiment state is
local and small); Ray's driver-side records are kept (raycls.console.capture_driver_logs). All of
it is written into the search directory's `ray.log` at the end (raycls.console.collect_ray_logs);
`--verbose` shows Ray's output live instead.

Ctrl-C: the first one is Tune's own documented clean stop (it ends the trials and saves the
experiment state one last time); `CtrlC` sees that the search ended unfinished, and the command
then prints the exact `--resume` command and exits with 130. Tune hands SIGINT back after its
first one, so a second Ctrl-C reaches `CtrlC`'s handler, which exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from raycls.interrupt import EXIT_INTERRUPTED
from raycls.search.settings import METRIC, summarize_config

LINE_PREFIXES = ("[raycls] ", "error: ")

# Tune's switches, read when the Tuner runs (not at import); a user's own setting wins
TUNE_QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0 (no banner, no hint)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def say(text: str) -> None:
    print(f"[raycls] {text}", flush=True)


class TrialLines(Callback):
    """One console line per trial event, from the search driver (never from a worker)."""

    def __init__(self, keys: list[str], max_epochs: int) -> None:
        self.keys, self.max_epochs = keys, max_epochs
        self.best: dict[str, tuple[float, int]] = {}  # trial -> (val_acc, epoch)
        self.epoch: dict[str, int] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        if tid in self.epoch:  # a PBT exploit or a retry: the trial goes on from a checkpoint
            say(f"trial {tid} restarted after epoch {self.epoch[tid]}: "
                f"{summarize_config(trial.config, self.keys)}")
        else:
            say(f"trial {tid} started: {summarize_config(trial.config, self.keys)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if METRIC not in result:
            return
        tid, epoch, acc = trial.trial_id, int(result.get("epoch", 0)), float(result[METRIC])
        self.epoch[tid] = epoch
        if acc > self.best.get(tid, (-1.0, 0))[0]:
            self.best[tid] = (acc, epoch)
        say(f"trial {tid} epoch {epoch}/{self.max_epochs}: {METRIC} {acc:.4f} "
            f"(best {self.best[tid][0]:.4f})")

    def _best(self, tid: str) -> str:
        if tid not in self.best:
            return "no result"
        acc, epoch = self.best[tid]
        return f"best {METRIC} {acc:.4f} at epoch {epoch}"

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid, epochs = trial.trial_id, self.epoch.get(trial.trial_id, 0)
        if epochs >= self.max_epochs:
            say(f"trial {tid} finished: {self._best(tid)}")
        elif (trial.last_result or {}).get("should_stop"):  # the run's own patience rule
            say(f"trial {tid} stopped early after epoch {epochs} (no {METRIC} gain): "
                f"{self._best(tid)}")
        else:
            say(f"trial {tid} stopped early by the scheduler after epoch {epochs}: "
                f"{self._best(tid)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed; Tune retries it from its newest checkpoint "
            f"(details: {trial.path}/error.txt)")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} errored: {last_line(trial)} "
            f"(details: {trial.path}/error.txt)")


def last_line(trial: Any) -> str:
    error = str(trial.get_error() or "").strip()
    return error.splitlines()[-1][:200] if error else "see its error file"


class CtrlC(Callback):
    """Around `Tuner.fit()` (`with CtrlC() as ctrl_c:`): knows whether the search ended because
    of a Ctrl-C, and makes a second Ctrl-C end the process at once.

    Before Tune takes SIGINT over, a Ctrl-C raises KeyboardInterrupt as usual. Tune installs its
    handler before it sets up its callbacks (`setup` below), remembers the handler it replaced
    (this one) and puts it back after its first Ctrl-C: from then on this handler runs only for a
    second one."""

    def __init__(self) -> None:
        CURRENT[:] = [self]
        self.tune_has_sigint = False
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self.unfinished: list[str] = []
        self.previous: Any = None

    def __reduce__(self) -> tuple:
        # Tune saves run_config's callbacks with the search and loads them back on --resume:
        # the saved one becomes this session's instance (the one `with` and the command use)
        return current_ctrl_c, ()

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:  # Tune leaves its handler behind when the search finishes
            signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum: int, frame: Any) -> None:
        if self.tune_has_sigint:
            os._exit(EXIT_INTERRUPTED)  # the second Ctrl-C: Tune's clean stop is under way
        raise KeyboardInterrupt

    def setup(self, **info):
        self.tune_has_sigint = True

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials, **info):
        # Tune ends the loop early only when stopped (we use no Stopper): trials still waiting,
        # or started here and never completed, mean a Ctrl-C. Tune has saved them as unfinished,
        # so a resume runs them again from their newest checkpoints.
        self.unfinished = [
            t.trial_id for t in trials
            if t.status in (Trial.PENDING, Trial.PAUSED)
            or (t.trial_id in self.started and t.trial_id not in self.ended)
        ]

    @property
    def interrupted(self) -> bool:
        return bool(self.unfinished)


CURRENT: list[CtrlC] = []  # this process's search's CtrlC (one search per process)


def current_ctrl_c() -> CtrlC:
    return CURRENT[0] if CURRENT else CtrlC()
