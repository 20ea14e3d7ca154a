"""The Ray-side callbacks of a search: they subclass Ray's callback classes, so this module imports
Ray, and raycls.search.run imports it only once Ray is started (see raycls.search's docstring: a
new local Ray must get its settings, e.g. `RAY_AUTH_MODE`, before Ray is first imported).

`ForwardToTune` runs in each trial's Train controller; `ReleaseOrphans` in the search driver.
"""

from __future__ import annotations

import time
from typing import Any

from ray.train import UserCallback
from ray.tune import Callback


class ForwardToTune(UserCallback):
    """Ray Train callback (runs in the Train controller): hands each report's metrics and
    checkpoint to the Tune trial, then waits until the trial has persisted that checkpoint.
    Ray's own TuneReportCallback forwards only metrics (and the checkpoint's path), which gives
    Tune no checkpoint to restore or for PBT to clone; and the wait matters because Train
    deletes an older checkpoint as soon as a newer one arrives."""

    ACK_TIMEOUT_S = 600.0

    def __init__(self, reports: Any, acks: Any):
        self.reports, self.acks = reports, acks

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.reports.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint})
        try:
            self.acks.get(timeout=self.ACK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the trial is gone (stopped); its actors go with it
            pass


class ReleaseOrphans(Callback):
    """Frees the Train workers of trials Tune has ended.

    Tune ends a trial by ending its actor (ASHA stop, PBT pause, even after the last epoch), and
    the Train controller that actor owned dies with it, leaving its workers' placement group
    reserved: the job (this driver) is still alive, so Ray keeps it. Ray Train's own
    PlacementGroupCleaner should remove it, but it asks the State API, which needs the dashboard
    and guesses the cluster's address (it picked another user's cluster on a shared machine).
    Without this, after the first trials end every next Train run waits for CPUs forever."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s, self.last = every_s, 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            release_orphaned_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_orphaned_placement_groups()

    on_trial_error = on_trial_complete


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from raycls.raycompat import placement_groups

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg in placement_groups():
        if (pg.removed or pg.detached or not pg.creator_actor_dead
                or pg.creator_is_driver  # made by a driver: "dead" from birth
                or pg.creator_job_hex != job):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg.id_hex)))
            removed += 1
        except Exception:  # noqa: BLE001 - removed meanwhile (e.g. by Ray's own cleaner)
            pass
    return removed
