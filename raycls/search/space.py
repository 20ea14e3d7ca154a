"""The search space and the checks a search passes before any trial runs.

`build_space` turns the preset's space into Tune distributions over a TrainConfig dict;
`trial_config` is the fixed part of every trial; `check_policies` and `check_search` fail bad
choices now (naming the field) rather than in every trial; `derive_concurrency` says how many
trials fit the cluster at once.
"""

from __future__ import annotations

from typing import Any

from raycls.config import ConfigError, TrainConfig
from raycls.search.settings import SearchError, SearchSettings

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
    from raycls.worker import NO_FLIP_DATASETS

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

