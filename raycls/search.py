"""`raycls search` / `python tune/search.py`: Ray Tune over TrainConfig, one TorchTrainer a trial.

Reads top to bottom:
1. the search settings and space: presets are YAML files in `tune/` whose space keys are
   TrainConfig field names (`lr`, `aug_policy`, ...), so a trial config is a TrainConfig dict;
2. `train_driver`, the Tune function trainable: it fits the same TorchTrainer `raycls train`
   builds and forwards every epoch's metrics *and checkpoint* to Tune, so ASHA can stop a trial
   and PBT can clone one (the trial hands `tune.get_checkpoint()` to the workers as `resume_from`);
3. schedulers (ASHA, PBT with PBA-style policy explore, FIFO for random/grid) and searchers;
4. `run_search`: `Tuner.fit` or `Tuner.restore` with one console line per trial event and
   Ctrl-C that keeps the search (raycls.search_console), then the reports (ranked
   CSV, val_acc plot, best config, the best trial's augmentation schedule) and the export of the
   best checkpoint through the parity gate to `models/<search name>/`;
5. the command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No Ray import at module level: `raycls search` imports this module to parse its flags, and a new
# local Ray must get its settings (RAY_AUTH_MODE: raycls.ray_session.init_ray) before the first Ray
# import. The classes that subclass Ray's callbacks live in raycls.tune_callbacks.
from raycls.config import ConfigError, TrainConfig
from raycls.console import capture_driver_logs, collect_ray_logs
from raycls.interrupt import EXIT_INTERRUPTED, Interrupted, second_interrupt_exits
from raycls.runs import SEARCH_SETTINGS, SEARCH_SUMMARY, mark_running

PRESET_DIR = Path(__file__).resolve().parent.parent / "tune"  # editable presets in the checkout
SCHEDULERS = ("asha", "pbt", "random", "grid")
SEARCHERS = ("random", "optuna")
METRIC, MODE = "val_acc", "max"  # the search objective everywhere
SETTINGS_FILE = SEARCH_SETTINGS  # in the experiment dir: what --resume continues
SUMMARY_FILE = SEARCH_SUMMARY  # written last: the search ended (see search_finished)
# A trial only waits on its Train run, so it takes no CPU (that would starve the Train workers
# on a 2-core machine). Tune refuses an empty request, so it asks for a sliver of the head node's
# marker resource: trial drivers run beside the search driver, the Train workers anywhere.
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}
# set per trial or by the search itself, never searched
RESERVED = {
    "name": "trial-stable, set by the search",
    "storage_path": "use --storage-path",
    "resume_from": "set from tune.get_checkpoint()",
    "num_epochs": "use --max-epochs (max_epochs in the preset)",
    "num_workers": "use --workers-per-trial",
    "cpus_per_worker": "use --cpus-per-trial",
    "use_gpu": "use --gpus-per-trial",
    "dataset": "use --dataset (dataset in the preset)",
    "data_dir": "use --data-dir (data_dir in the preset)",
    "mlflow_uri": "use --mlflow-uri",
}


class SearchError(RuntimeError):
    """The search cannot start or finish as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- settings


@dataclass
class SearchSettings:
    """Everything a search needs; saved in the experiment dir so --resume continues the same."""

    name: str = ""  # experiment name; empty = search-<dataset>-<time>
    storage_path: str = "./runs"
    preset: str = "default"
    dataset: str = "digits"
    data_dir: str = "data"
    scheduler: str = "asha"  # asha | pbt | random | grid
    searcher: str = "random"  # random | optuna (TPE; needs `pip install optuna`)
    num_samples: int = 4  # trials (PBT: population size; grid: repeats of the grid)
    max_epochs: int = 10  # epochs of a trial that is never stopped
    grace_period: int = 3  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    perturbation_interval: int = 2  # PBT: epochs between exploit/explore steps
    quantile_fraction: float = 0.25  # PBT: bottom share that clones the top share
    workers_per_trial: int = 1  # Ray Train workers (DDP ranks) per trial
    cpus_per_trial: int = 0  # 0 = one per worker
    gpus_per_trial: int = 0  # one GPU per worker when > 0 (sets use_gpu)
    max_concurrent_trials: int = 0  # 0 = derived from the cluster's CPUs/GPUs
    max_trial_failures: int = 1  # Tune retries of an errored trial, from its newest checkpoint
    models_dir: str = "models"
    export: bool = True
    seed: int = 0  # seeds the searcher and PBT's explore
    mlflow_uri: str = ""  # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else no MLflow
    base: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig fields of every trial
    space: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> distribution
    mutations: dict[str, list] = field(default_factory=dict)  # PBT: field -> values to resample

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r}: choose {SCHEDULERS}")
        need(self.searcher in SEARCHERS, f"searcher={self.searcher!r}: choose {SEARCHERS}")
        for key in ("num_samples", "max_epochs", "grace_period", "workers_per_trial"):
            need(getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be at least 1")
        need(self.reduction_factor >= 2, f"reduction_factor={self.reduction_factor}: must be >= 2")
        need(self.perturbation_interval >= 1, "perturbation_interval: must be at least 1")
        need(0 < self.quantile_fraction <= 0.5, "quantile_fraction: must be in (0, 0.5]")
        for key in ("cpus_per_trial", "gpus_per_trial", "max_concurrent_trials",
                    "max_trial_failures"):
            need(getattr(self, key) >= 0, f"{key}={getattr(self, key)}: must be >= 0")
        need(
            self.scheduler != "asha" or self.grace_period <= self.max_epochs,
            f"grace_period={self.grace_period} is more than max_epochs={self.max_epochs}",
        )
        need(
            self.scheduler != "pbt" or self.num_samples >= 2,
            "PBT needs a population: --num-samples of at least 2",
        )
        for where, keys in (("base", self.base), ("space", self.space),
                            ("mutations", self.mutations)):
            for key in keys:
                check_field(key, where)
        need(
            not (set(self.base) & set(self.space)),
            f"fields in both base and space: {sorted(set(self.base) & set(self.space))}",
        )


def check_field(key: str, where: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if key not in known:
        raise ConfigError(
            f"{where}: {key!r} is not a TrainConfig field; valid: {', '.join(sorted(known))}"
        )
    if key in RESERVED:
        raise ConfigError(f"{where}: {key!r} cannot be searched or fixed here ({RESERVED[key]})")


def find_preset(preset: str) -> Path:
    """A preset name (tune/NAME.yaml) or a path to a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"preset file {p} does not exist")
        return p
    candidate = PRESET_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        found = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(
            f"no preset {preset!r} in {PRESET_DIR}; available: {', '.join(found) or 'none'} "
            "(or pass a path to a YAML file)"
        )
    return candidate


def load_preset(preset: str) -> dict[str, Any]:
    import yaml

    path = find_preset(preset)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"preset {path}: the top level must be a mapping of settings")
    allowed = {f.name for f in dataclasses.fields(SearchSettings)} - {"name", "preset"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"preset {path}: unknown key(s) {unknown}; valid: {sorted(allowed)}")
    return doc


def resolve_settings(preset: str, overrides: dict[str, Any]) -> SearchSettings:
    """Preset values, then command-line overrides (those not None)."""
    doc = load_preset(preset)
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = SearchSettings(**{**doc, **given, "preset": preset})
    if settings.scheduler == "grid" and "num_samples" not in given | doc:
        settings.num_samples = 1  # a grid is searched once unless asked for repeats
    if "grace_period" not in given | doc:
        settings.grace_period = min(settings.grace_period, settings.max_epochs)
    settings.validate()
    return settings


# ----------------------------------------------------------------------------- the space

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


def build_space(settings: SearchSettings, cfg: TrainConfig) -> dict[str, Any]:
    """TrainConfig dict with the searched fields replaced by Tune distributions.

    YAML forms: a scalar (fixed), a list (choice), or {choice|grid: [...]},
    {uniform|loguniform: [low, high]}, {randint: [low, high)}, {quniform: [low, high, q]}.
    Every bound and choice is checked through TrainConfig's validation before any trial runs."""
    from ray import tune

    space: dict[str, Any] = cfg.to_dict()
    for key, spec in settings.space.items():
        if isinstance(spec, list):
            spec = {"choice": spec}
        if not isinstance(spec, dict):
            cfg.replace(**{key: spec})
            space[key] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"space: {key}: {spec!r} is not one distribution; use one of {DISTRIBUTIONS}, "
                "e.g. {loguniform: [0.01, 0.3]} or {choice: [64, 128]}"
            )
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space: {key}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("choice", "grid"):
            values = args
        else:
            want = 3 if kind == "quniform" else 2
            if len(args) != want or not all(isinstance(a, int | float) for a in args):
                raise ConfigError(f"space: {key}: {kind} needs {want} numbers, got {args!r}")
            if args[0] >= args[1] or (kind == "loguniform" and args[0] <= 0):
                raise ConfigError(f"space: {key}: {kind} needs 0 < low < high, got {args!r}")
            values = [args[0], args[1] - 1] if kind == "randint" else args[:2]
        for v in values:  # a bad bound fails here, naming the field, not in every trial
            try:
                cfg.replace(**{key: v})
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"space: {key}: value {v!r} is invalid: {e}") from None
        if settings.scheduler == "grid" and kind not in ("choice", "grid"):
            raise ConfigError(
                f"space: {key}: the grid scheduler needs finite values; write {key} as a list"
            )
        if kind == "grid" or (settings.scheduler == "grid" and kind == "choice"):
            space[key] = tune.grid_search(values)
        elif kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "quniform":
            space[key] = tune.quniform(*args)
        else:
            space[key] = getattr(tune, kind)(*args)
    return space


def check_policies(settings: SearchSettings, info: dict[str, Any]) -> None:
    """Every augmentation policy the search may use must build for this dataset (a flip on
    digits, a crop larger than the image): fail now, not in every trial."""
    from raycls.augment import build_augment
    from raycls.train import NO_FLIP_DATASETS

    policies = [settings.base.get("aug_policy", TrainConfig().aug_policy)]
    spec = settings.space.get("aug_policy")
    if isinstance(spec, dict):
        spec = next(iter(spec.values()))
    policies += spec if isinstance(spec, list) else [spec] if isinstance(spec, str) else []
    policies += settings.mutations.get("aug_policy", [])
    for policy in policies:
        try:
            build_augment(policy, channels=info["channels"], image_size=info["image_size"],
                          allow_flip=info["name"] not in NO_FLIP_DATASETS)
        except ValueError as e:
            raise ConfigError(f"aug_policy {policy!r} does not suit {info['name']}: {e}") from None


# ----------------------------------------------------------------------------- the trainable


def train_run_name(trial_id: str, checkpoint_path: str) -> str:
    """Trial-stable Train run name: a retried trial that starts from the same Tune checkpoint
    resumes the same Train run; a trial restored from another checkpoint (a PBT exploit, a resume
    from a newer epoch) gets its own run, so Train never restores its old state over it."""
    if not checkpoint_path:
        return f"train-{trial_id}"
    return f"train-{trial_id}-from-{hashlib.sha1(checkpoint_path.encode()).hexdigest()[:8]}"


def train_driver(config: dict[str, Any], data: Any, train_storage: str,
                 track: dict[str, Any] | None = None) -> None:
    """One Tune trial: fit a TorchTrainer on the trial's TrainConfig, forwarding every epoch.
    `track`: tracking.start_search's answer (TensorBoard and MLflow for the trial)."""
    from ray import tune
    from ray.util.queue import Queue

    from raycls import tracking
    from raycls.train import build_trainer
    from raycls.tune_callbacks import ForwardToTune

    trial_id = tune.get_context().get_trial_id()
    resume_from, checkpoint = "", tune.get_checkpoint()  # ray: PBT exploit or a restored trial
    if checkpoint is not None:
        # workers read it directly: local or shared (NFS) storage; otherwise a local copy, which
        # only workers on this node can read
        is_local = checkpoint.filesystem is None or checkpoint.filesystem.type_name == "local"
        resume_from = checkpoint.path if is_local else checkpoint.to_directory()
    cfg = TrainConfig.from_dict(config).replace(
        name=train_run_name(trial_id, resume_from), storage_path=train_storage,
        resume_from=resume_from,
    )
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
    board, logging_callbacks = tracking.for_trial(track, trial_id, cfg)
    # the trackers first: Tune may end the trial as soon as ForwardToTune hands over its last epoch
    trainer = build_trainer(cfg, data, callbacks=[*logging_callbacks, ForwardToTune(reports, acks)],
                            board_dir=board)
    outcome: dict[str, Any] = {}

    def fit() -> None:  # Train's fit blocks, so it runs beside the loop that reports to Tune
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e
        finally:
            reports.put(None)

    threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True).start()
    # When Tune stops this trial (ASHA, PBT pause, the last epoch), the actor is ended and the
    # Train controller dies with it; ReleaseOrphans in the search driver frees its workers.
    while (item := reports.get()) is not None:
        error = item["metrics"].get("data_error") or item["metrics"].get("config_error")
        if error:  # deterministic: retrying the trial cannot help
            acks.put(True)
            raise RuntimeError(error)
        ckpt = item["checkpoint"]
        tune.report(  # ray: persists a copy of the Train checkpoint into the trial dir
            item["metrics"],
            checkpoint=tune.Checkpoint(ckpt.path, ckpt.filesystem) if ckpt else None,
        )
        acks.put(True)
    if "error" in outcome:
        raise RuntimeError(f"Train run {cfg.name} failed: {outcome['error']}") from None


# ----------------------------------------------------------------------------- schedulers


class PolicyExplorer:
    """PBT explore for the augmentation policy (Ho et al. 2019's perturbation), seeded."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        from raycls.augment import explore_policy

        config["aug_policy"] = explore_policy(config["aug_policy"], self.rng)
        return config


def build_scheduler(settings: SearchSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if settings.scheduler == "asha":
        return ASHAScheduler(  # time unit: epochs (one report per epoch)
            time_attr="training_iteration", max_t=settings.max_epochs,
            grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
        )
    if settings.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=settings.perturbation_interval,
            quantile_fraction=settings.quantile_fraction,
            hyperparam_mutations=dict(settings.mutations),
            custom_explore_fn=PolicyExplorer(settings.seed),
        )
    return FIFOScheduler()


def build_searcher(settings: SearchSettings):
    if settings.searcher == "random":
        return None  # Tune's default: random sampling (and grid expansion)
    if settings.scheduler in ("pbt", "grid"):
        raise ConfigError(
            f"--searcher optuna does not combine with --scheduler {settings.scheduler}"
        )
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("--searcher optuna needs optuna: pip install optuna") from None
    try:
        return OptunaSearch(seed=settings.seed)
    except (AssertionError, ImportError, RuntimeError) as e:
        raise ConfigError(f"--searcher optuna: {e} (pip install optuna)") from None


STREAM_DATA_CPUS = 1  # at least this many CPUs (and a quarter of them) stay free for Ray Data


def derive_concurrency(settings: SearchSettings, resources: dict[str, float],
                       streaming: bool = False) -> int:
    """Trials that fit the cluster at once: Train drivers beyond that would sit waiting for
    workers (Tune cannot see the Train workers' resources, the trial itself asks for none).
    Streaming trials leave CPUs for Ray Data's decode tasks, which run outside every trial's
    placement group: trials that take every CPU would starve them and hang (ray#54305)."""
    if settings.max_concurrent_trials:
        return settings.max_concurrent_trials
    cpus_per_trial = settings.cpus_per_trial or settings.workers_per_trial
    cpus = resources.get("CPU", 1)
    if streaming:
        cpus -= max(STREAM_DATA_CPUS, cpus // 4)
    n = int(cpus // cpus_per_trial)
    if settings.gpus_per_trial:
        n = min(n, int(resources.get("GPU", 0) // settings.gpus_per_trial))
    if n < 1:
        raise SearchError(
            f"one trial needs {cpus_per_trial} CPU(s) and {settings.gpus_per_trial} GPU(s); the "
            f"cluster has {resources.get('CPU', 0):g} CPU(s) and {resources.get('GPU', 0):g} "
            "GPU(s): lower --workers-per-trial/--cpus-per-trial/--gpus-per-trial"
        )
    return n


def trial_config(settings: SearchSettings) -> TrainConfig:
    """The fixed part of every trial's TrainConfig."""
    workers = settings.gpus_per_trial or settings.workers_per_trial
    cpus = settings.cpus_per_trial or workers
    base = dict(settings.base)
    try:
        cfg = TrainConfig.from_dict({
            **base, "dataset": settings.dataset, "data_dir": settings.data_dir,
            "num_epochs": settings.max_epochs, "num_workers": workers,
            "cpus_per_worker": max(1, cpus // workers), "use_gpu": settings.gpus_per_trial > 0,
            "mlflow_uri": settings.mlflow_uri,
        })
    except TypeError as e:
        raise ConfigError(f"base: {e}") from None
    if settings.scheduler == "pbt" and cfg.keep_checkpoints < 3:
        cfg = cfg.replace(keep_checkpoints=3)  # PBT may clone a checkpoint an epoch old
    return cfg


# fields whose searched choices name something a typo breaks (a registry entry, a policy, a file)
PREFLIGHT_FIELDS = ("model", "dataset", "aug_policy", "aug_policy_file", "pretrained")


def check_search(settings: SearchSettings) -> None:
    """The trials' inputs, before Ray starts: the base config (raycls.preflight) and every
    choice of a searched registry name, policy or file (a bad one would fail its trials late)."""
    from raycls.preflight import check_config

    cfg = trial_config(settings)
    check_config(cfg)
    for key, spec in settings.space.items():
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("choice", "grid"):
            spec = next(iter(spec.values()))
        if key in PREFLIGHT_FIELDS:
            for value in spec if isinstance(spec, list) else [spec]:
                check_config(cfg.replace(**{key: value}))


# ----------------------------------------------------------------------------- progress

SHORT = {"lr": "lr", "weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls",
         "model_width": "width", "aug_policy": "aug", "aug_mixup_alpha": "mixup",
         "aug_cutmix_alpha": "cutmix", "optimizer": "opt", "momentum": "mom"}


def summarize_config(config: dict[str, Any], keys: list[str], width: int = 70) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    text = " ".join(f"{SHORT.get(k, k)}={fmt(config.get(k))}" for k in keys)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- the search


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
    from raycls.train import stream_cpus

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
    from raycls.search_console import CtrlC, TrialLines, quiet_tune
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
    quiet_tune()
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
    try:
        with ctrl_c:
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


def resume_command(settings: SearchSettings, prog: str) -> str:
    """What `prepare(resume=True)` takes: the name and where it lives (the rest is saved)."""
    return f"{prog} --resume --name {settings.name} --storage-path {settings.storage_path}"


# ----------------------------------------------------------------------------- reports


def trial_rows(grid: Any, keys: list[str], max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial, best first (val_acc, then lower val_loss); errored trials last."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        has = df is not None and METRIC in df.columns and df[METRIC].notna().any()
        trial_id = Path(result.path).name.removeprefix("trial-")
        row: dict[str, Any] = {"trial_id": trial_id, "result": result, "val_acc": None,
                               "val_loss": None, "best_epoch": None, "epochs": 0, "curve": []}
        if has:
            df = df[df[METRIC].notna()]
            best = df.sort_values([METRIC, "val_loss"], ascending=[False, True]).iloc[0]
            row.update(val_acc=float(best[METRIC]), val_loss=float(best["val_loss"]),
                       best_epoch=int(best["epoch"]), epochs=int(df["epoch"].max()),
                       curve=list(zip(df["epoch"].astype(int), df[METRIC].astype(float),
                                      strict=True)))
        if result.error is not None:
            row["status"] = "ERROR"
        elif row["epochs"] >= max_epochs:
            row["status"] = "done"
        else:
            row["status"] = "stopped early" if has else "no result"
        row["final_aug_policy"] = (result.metrics or {}).get("aug_policy", "")
        row["config"] = {k: (result.config or {}).get(k) for k in keys}
        rows.append(row)
    rows.sort(key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0), r["val_loss"] or 0))
    return rows


def write_csv(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial_id", "status", "val_acc", "val_loss", "best_epoch", "epochs",
                    *keys, "final_aug_policy", "error"])
        for i, r in enumerate(rows, 1):
            err = str(r["result"].error).splitlines()[0][:200] if r["result"].error else ""
            w.writerow([i, r["trial_id"], r["status"], r["val_acc"], r["val_loss"],
                        r["best_epoch"], r["epochs"], *[r["config"][k] for k in keys],
                        r["final_aug_policy"], err])


def plot_trials(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        if r["curve"]:
            epochs, accs = zip(*r["curve"], strict=True)
            ax.plot(epochs, accs, marker=".", lw=2.5 if i == 0 else 1,
                    label=f"{r['trial_id']} ({r['val_acc']:.4f})" + (" best" if i == 0 else ""))
    ax.set_xlabel("epoch"), ax.set_ylabel("val_acc"), ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def schedule_from_history(history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """[(start_epoch (0-based), policy), ...]: the policies a trial trained with, epoch by epoch,
    including the epochs it inherited through PBT clones (the checkpoint carries that history)."""
    schedule: list[tuple[int, str]] = []
    for h in sorted(history, key=lambda h: h["epoch"]):
        if not schedule or schedule[-1][1] != h["aug_policy"]:
            schedule.append((int(h["epoch"]) - 1, h["aug_policy"]))
    return schedule


def train_command(config: dict[str, Any], policy_file: Path | None) -> str:
    """The `raycls train` line that retrains the best config (non-default fields only)."""
    defaults = TrainConfig().to_dict()
    skip = {"name", "storage_path", "resume_from", "extra", "aug_policy_file"}
    parts = ["raycls train"]
    for k, v in config.items():
        if k in skip or v == defaults.get(k) or (policy_file and k == "aug_policy"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            parts.append(f"{flag} {json.dumps(v) if isinstance(v, str) and ' ' in v else v}")
    if policy_file:
        parts.append(f"--policy-file {policy_file}")
    return " ".join(parts)


def best_checkpoint(result: Any) -> Any:
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
    if not kept:
        return result.checkpoint
    return max(kept, key=lambda cm: (cm[1][METRIC], -cm[1].get("val_loss", 0.0)))[0]


def report(settings: SearchSettings, exp: Path, grid: Any, data: tuple[Any, Any],
           keys: list[str], elapsed: float) -> dict[str, Any]:
    """The ranked table, results.csv, the plot, the best trial's files and its export.
    `data` is prepare_data's (RunData, Dataset or None), for the best trial's test accuracy."""
    from raycls import tracking
    from raycls.augment import save_policy_schedule
    from raycls.ingest import test_batches
    from raycls.models import read_checkpoint_meta
    from raycls.train import test_accuracy

    rows = trial_rows(grid, keys, settings.max_epochs)
    header = ["rank", "trial", "status", "val_acc", "best_epoch", "epochs", "config"]
    body = [[i, r["trial_id"], r["status"], "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}",
             r["best_epoch"] or "-", r["epochs"], summarize_config(r["config"], keys, 90)]
            for i, r in enumerate(rows, 1)]
    table = format_table(body, header).splitlines()
    print("\n".join([f"[raycls] search {settings.name}: results ({elapsed:.0f} s)",
                     *(f"[raycls]   {line.rstrip()}" for line in table)]), flush=True)
    write_csv(rows, keys, exp / "results.csv")
    plot_trials(rows, exp / "val_acc.png", f"{settings.name}: val_acc per trial")
    errors = [
        {"trial_id": r["trial_id"], "config": summarize_config(r["config"], keys, 200),
         "error": str(r["result"].error), "error_file": str(Path(r["result"].path) / "error.txt")}
        for r in rows if r["result"].error is not None
    ]
    summary: dict[str, Any] = {
        "name": settings.name, "experiment": str(exp), "elapsed_s": elapsed,
        "results_csv": str(exp / "results.csv"), "plot": str(exp / "val_acc.png"),
        "num_trials": len(rows), "errors": errors, "best": None, "bundle": None,
    }
    winners = [r for r in rows if r["val_acc"] is not None and r["result"].checkpoint]
    if winners:
        best = winners[0]
        result = best["result"]
        ckpt = best_checkpoint(result)
        config = dict(result.config)
        # the full story (epochs inherited from PBT clones included) is in the newest checkpoint
        history = read_checkpoint_meta(result.checkpoint.path)["history"]
        schedule_path = exp / "best_policy_schedule.json"
        schedule = schedule_from_history(history)
        save_policy_schedule(str(schedule_path), schedule)
        test_acc = test_accuracy(ckpt.path, test_batches(*data))[0]
        best_config = {**config, "aug_policy_file": str(schedule_path) if len(schedule) > 1 else ""}
        (exp / "best_config.json").write_text(json.dumps(best_config, indent=2))
        summary["best"] = {
            "trial_id": best["trial_id"], "val_acc": best["val_acc"], "epoch": best["best_epoch"],
            "test_acc": test_acc, "checkpoint": ckpt.path, "config": str(exp / "best_config.json"),
            "policy_schedule": str(schedule_path), "schedule": schedule,
            "train_command": train_command(config, schedule_path if len(schedule) > 1 else None),
        }
        print(
            f"[raycls] best trial {best['trial_id']}: val_acc {best['val_acc']:.4f} at epoch "
            f"{best['best_epoch']}, "
            + (f"test_acc {test_acc:.4f}" if test_acc is not None else "no test split") + "\n"
            f"[raycls] best config: {exp / 'best_config.json'}\n"
            f"[raycls] augmentation schedule: {schedule_path} "
            f"({len(schedule)} phase(s): {'; '.join(f'{e}: {p}' for e, p in schedule)})\n"
            f"[raycls] retrain it: {summary['best']['train_command']}",
            flush=True,
        )
    if errors:
        print(f"error: {len(errors)} of {len(rows)} trial(s) failed:", file=sys.stderr)
        for e in errors:
            first = e["error"].strip().splitlines()[-1] if e["error"].strip() else "?"
            print(f"error:   trial {e['trial_id']} ({e['config']}): {first}\n"
                  f"error:     details: {e['error_file']}", file=sys.stderr)
        print("error: fix the cause, then continue with: "
              f"{resume_command(settings, 'python tune/search.py')}", file=sys.stderr)
    elif summary["best"] is None:
        print("error: no trial produced a checkpoint; nothing to export", file=sys.stderr)
    elif settings.export:
        summary["bundle"] = export_best(settings, summary["best"]["checkpoint"])
    tracking.finish_search(settings, exp, rows, summary)  # MLflow artifacts; where to look
    (exp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if summary.get("bundle"):  # the last lines: what to do next
        out = summary["bundle"]
        print(f"[raycls] bundle: {out}\n[raycls] serve it: serve run raycls.deploy model={out}",
              flush=True)
    return summary


def export_best(settings: SearchSettings, checkpoint: str) -> str:
    from raycls.export import export_bundle  # caps its own torch threads for the gate

    out = Path(settings.models_dir) / settings.name
    export_bundle(checkpoint, out, data_dir=settings.data_dir, overwrite=False,
                  log=lambda m: print(f"[raycls] export: {m}", flush=True))
    return str(out)


# ----------------------------------------------------------------------------- the command

FLAGS: list[tuple[str, type, str]] = [
    ("dataset", str, "digits | mnist | fashion-mnist | cifar10 | imagefolder:PATH | parquet:PATH"),
    ("data_dir", str, "where the dataset files live"),
    ("scheduler", str, f"one of {', '.join(SCHEDULERS)}"),
    ("searcher", str, "random, or optuna (TPE; needs `pip install optuna`)"),
    ("num_samples", int, "trials (PBT: population size)"),
    ("max_epochs", int, "epochs of a trial that is never stopped"),
    ("grace_period", int, "ASHA: epochs before a trial may be stopped"),
    ("perturbation_interval", int, "PBT: epochs between exploit/explore steps"),
    ("workers_per_trial", int, "Ray Train workers per trial"),
    ("cpus_per_trial", int, "CPUs per trial (0 = one per worker)"),
    ("gpus_per_trial", int, "GPUs per trial, one per worker (0 = CPU)"),
    ("max_concurrent_trials", int, "trials at once (0 = as many as the cluster fits)"),
    ("max_trial_failures", int, "Tune retries of an errored trial, from its newest checkpoint"),
    ("models_dir", str, "where the winner's bundle is written (models/<name>)"),
    ("seed", int, "seeds the searcher and PBT's explore"),
    ("mlflow_uri", str, "also log to MLflow at this tracking URI, trials nested under the "
     "search's run (needs `pip install 'raycls[mlflow]'`); default $MLFLOW_TRACKING_URI"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchSettings()
    parser.add_argument("--preset", default="default",
                        help=f"search-space preset: a name in {PRESET_DIR} or a YAML path "
                             "(default: 'default')")
    for name, typ, help_text in FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                            help=f"{help_text} (default: the preset's, else "
                                 f"{getattr(defaults, name)!r})")
    parser.add_argument("--storage-path", default=None,
                        help=f"where searches are written (default: {defaults.storage_path!r})")
    parser.add_argument("--name", default=None,
                        help="search name (default: search-<dataset>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search --name (default: the newest unfinished one), "
                             "re-running only unfinished and errored trials")
    parser.add_argument("--no-export", dest="export", action="store_false", default=None,
                        help="do not export the best checkpoint (default: export)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: host:port or 'auto' (default: $RAY_ADDRESS, "
                             "else a new local Ray on this machine)")
    parser.add_argument("--json", action="store_true", help="print the summary as the last line")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Tune's own output live (default: off: raycls's lines "
                        "only; Ray's go to ray.log in the search directory)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the preset, the flags and every searched choice, print the "
                        "search that would start, and exit without starting Ray")


def main(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name, _, _ in FLAGS}
    overrides.update(storage_path=args.storage_path, name=args.name, export=args.export)
    try:
        settings = resolve_settings(args.preset, overrides)
        if not args.resume:  # a resumed search keeps the settings it started with
            check_search(settings)
    except (ConfigError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"[raycls] dry run: the flags are valid; the search would run {settings.num_samples}"
              f" trial(s) ({settings.scheduler}) of up to {settings.max_epochs} epochs on "
              f"{settings.dataset}, searching {', '.join(settings.space) or 'nothing'} "
              "(nothing was started)")
        return 0
    from raycls.bundle import BundleError
    from raycls.data import DataError
    from raycls.export import ExportError

    try:
        summary = run_search(settings, resume=args.resume, address=args.address, console=True,
                             verbose=args.verbose, prog=getattr(args, "prog", "raycls search"))
    except (Interrupted, KeyboardInterrupt) as e:  # the latter: before the search started
        from raycls.ray_session import shutdown_ray

        shutdown_ray()  # for a local Ray, every Ray process of the search
        print(f"[raycls] {e or 'interrupted before the search started'}", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    except (SearchError, ConfigError, DataError, ExportError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, default=str))
    return 1 if summary["errors"] or summary["best"] is None else 0


def cli(argv: list[str] | None = None) -> int:
    """`python tune/search.py [flags]`: the same as `raycls search [flags]`."""
    parser = argparse.ArgumentParser(
        prog="tune/search.py",
        description="Search hyperparameters and augmentation with Ray Tune, export the winner.",
    )
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.prog = "python tune/search.py"  # the resume command names the entry point used
    return main(args)
