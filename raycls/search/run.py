"""Running a search: its directory (new or resumed), `Tuner.fit` or `Tuner.restore`, Ctrl-C.

`run_search` starts Ray (before anything imports it: see raycls.search), then
`search_and_report` builds the space, scheduler and trainable, runs Tune with one console line
per trial event and a Ctrl-C that keeps the search (raycls.search_console), and hands the
results to raycls.search.reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from raycls.config import TrainConfig
from raycls.console import capture_driver_logs, collect_ray_logs
from raycls.interrupt import Interrupted, second_interrupt_exits
from raycls.ray_session import scoped_env
from raycls.runs import mark_running
from raycls.search.reports import report
from raycls.search.schedulers import build_scheduler, build_searcher
from raycls.search.settings import (
    METRIC,
    MODE,
    SETTINGS_FILE,
    SUMMARY_FILE,
    SearchError,
    SearchSettings,
    resume_command,
)
from raycls.search.space import build_space, check_policies, derive_concurrency, trial_config
from raycls.search.trainable import TRIAL_RESOURCES, train_driver


def new_search_name(dataset: str) -> str:
    return f"search-{dataset.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(settings: SearchSettings, resume: bool) -> tuple[SearchSettings, Path]:
    """Absolute storage, a name, the experiment dir; on resume, the saved settings."""
    storage = settings.storage_path
    if "://" in storage:
        raise SearchError(
            f"--storage-path {storage}: this command writes its reports locally; use a local or "
            "NFS path (mount the bucket) for now"
        )
    storage = os.path.abspath(storage)
    if resume:
        name = settings.name or newest_unfinished(Path(storage))
        exp = Path(storage) / name
        saved = exp / SETTINGS_FILE
        if not saved.is_file():
            raise SearchError(f"--resume {name}: no search at {exp} (no {SETTINGS_FILE})")
        if search_finished(exp):
            raise SearchError(
                f"--resume {name}: the search already finished ({exp}/{SUMMARY_FILE})"
            )
        # a summary of failed trials is replaced by the resumed search's own
        (exp / SUMMARY_FILE).unlink(missing_ok=True)
        previous = SearchSettings(**json.loads(saved.read_text()))
        # the search's own settings, not today's flags: trials must stay comparable
        return dataclasses.replace(previous, storage_path=storage, name=name), exp
    name = settings.name or new_search_name(settings.dataset)
    exp = Path(storage) / name
    if exp.exists():
        raise SearchError(
            f"search {name!r} already exists in {storage}; continue it with --resume --name {name}"
            " or choose another --name"
        )
    bundle = Path(settings.models_dir) / name
    if settings.export and bundle.exists():
        raise SearchError(f"bundle {bundle} already exists; choose another --name")
    return dataclasses.replace(settings, storage_path=storage, name=name), exp


def search_finished(exp: Path) -> bool:
    """Finished means done with it: a summary without failed trials. One with failed trials is
    continued by --resume (Tune retries the errored trials), as the error message says."""
    try:
        summary = json.loads((exp / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return not (isinstance(summary, dict) and summary.get("errors"))


def newest_unfinished(storage: Path) -> str:
    found = sorted(
        (p.parent for p in storage.glob(f"*/{SETTINGS_FILE}") if not search_finished(p.parent)),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise SearchError(f"--resume: no unfinished search in {storage}; name one with --name")
    print(f"[raycls] resuming the newest unfinished search: {found[-1].name}", flush=True)
    return found[-1].name


def run_search(
    settings: SearchSettings, resume: bool = False, address: str | None = None,
    console: bool = False, verbose: bool = False, prog: str = "raycls search",
) -> dict[str, Any]:
    """Run (or resume) a search, write its reports, export the winner. Returns the summary;
    `summary["errors"]` lists failed trials (the command then exits 1). `console`: the command's
    quiet console (raycls.search_console): Ray's output is kept for the search's ray.log, shown
    live with `verbose`. A Ctrl-C raises Interrupted, whose message is the `prog --resume` line."""
    from raycls.ingest import prepare_data
    from raycls.ray_session import init_ray
    from raycls.trainer import stream_cpus

    settings, exp = prepare(settings, resume)
    settings.validate()
    cfg = trial_config(settings)
    # Ray starts before anything imports it (build_space does): see the note at the imports
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        # a search runs ~10 Python processes per running trial (trial, queues, Train controller
        # and workers), most on no CPU; the raylet warns past 4x this, which defaults to the CPUs
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency",
                              str(max(8, os.cpu_count() or 1)))
    init_ray(address, min_cpus=stream_cpus(cfg), log_to_driver=verbose or not console)
    if console and not verbose:  # after ray.init, which sets up the "ray" logger afresh
        capture_driver_logs()
    try:
        return search_and_report(settings, exp, cfg, resume, console, prog, prepare_data)
    finally:
        if console and exp.is_dir():
            collect_ray_logs(exp)


def search_and_report(settings: SearchSettings, exp: Path, cfg: TrainConfig, resume: bool,
                      console: bool, prog: str, prepare_data: Any) -> dict[str, Any]:
    import ray
    from ray import tune

    from raycls import tracking
    from raycls.search_console import TUNE_QUIET_ENV, CtrlC, TrialLines
    from raycls.tune_callbacks import ReleaseOrphans

    space = build_space(settings, cfg)
    scheduler, searcher = build_scheduler(settings), build_searcher(settings)
    data, ds = prepare_data(cfg)  # ray: memory: one copy in the object store for all trials
    check_policies(settings, data.info)
    concurrency = derive_concurrency(settings, ray.cluster_resources(),
                                     streaming=data.mode == "stream")
    exp.mkdir(parents=True, exist_ok=True)
    (exp / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(settings), indent=2))
    mark_running(exp)  # driver.pid while this driver lives: `raycls runs` shows "running"
    track = tracking.start_search(settings, exp)  # TensorBoard dirs; MLflow's parent run

    trainable = tune.with_resources(
        tune.with_parameters(train_driver, data=data, train_storage=str(exp / "train-runs"),
                             track=track),
        TRIAL_RESOURCES,
    )
    keys = sorted(set(settings.space) | set(settings.mutations) | {"aug_policy"})
    print(
        f"[raycls] search {settings.name}: {settings.scheduler} over {', '.join(keys)}; "
        f"{settings.num_samples} trial(s) x <= {settings.max_epochs} epochs, "
        f"{concurrency} at a time, {cfg.num_workers} worker(s) each, on {data.header()} "
        f"-> {exp}" + (" (Ray's own logs: ray.log there)" if console else ""),
        flush=True,
    )
    ctrl_c = CtrlC()
    callbacks = [TrialLines(keys, settings.max_epochs), ReleaseOrphans(), ctrl_c]
    t0 = time.perf_counter()
    if resume:
        if not tune.Tuner.can_restore(str(exp)):
            raise SearchError(f"--resume: {exp} holds no restorable Tune state (did it start?)")
        # ray: re-runs unfinished and errored trials only; finished ones keep their results
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, scheduler=scheduler, search_alg=searcher,
                num_samples=settings.num_samples, max_concurrent_trials=concurrency,
                trial_dirname_creator=lambda t: f"trial-{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=settings.storage_path,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=3, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
                ),
                # an errored trial restarts from its newest Tune checkpoint (train_driver passes
                # it to the workers as resume_from); Train's own retries come first
                failure_config=tune.FailureConfig(max_failures=settings.max_trial_failures),
                callbacks=[*callbacks, *tracking.tune_loggers()],
                verbose=0,  # TrialLines replaces Tune's progress output
            ),
        )
    # Tune's switches for this fit only: its output off (TrialLines replaces it); for a new search,
    # no automatic loggers beside tune_loggers (a restored one keeps the callbacks it started with)
    env = {**TUNE_QUIET_ENV, **({} if resume else tracking.TUNE_LOGGER_ENV)}
    try:
        with scoped_env(env), ctrl_c:
            grid = tuner.fit()  # ray: does NOT raise when trials fail; errors are checked below
    except KeyboardInterrupt:  # before Tune took Ctrl-C over
        interrupted(settings, exp, prog, started=resume or tune.Tuner.can_restore(str(exp)))
    if ctrl_c.interrupted:
        interrupted(settings, exp, prog, started=True)
    elapsed = time.perf_counter() - t0
    return report(settings, exp, grid, (data, ds), keys, elapsed)


def interrupted(settings: SearchSettings, exp: Path, prog: str, started: bool) -> None:
    """Raise Interrupted saying what was kept and the exact command that continues the search."""
    second_interrupt_exits()
    if not started:  # only the settings file: a --resume could not continue it, so it goes
        shutil.rmtree(exp, ignore_errors=True)
        raise Interrupted("interrupted before the search started; nothing was kept") from None
    raise Interrupted(
        f"interrupted; the search's state and the trials' checkpoints are kept in {exp}. "
        f"Continue it with `{resume_command(settings, prog)}`") from None
