"""The search's schedulers (ASHA, PBT with the PBA explore step, FIFO) and searchers."""

from __future__ import annotations

import random
from typing import Any

from raycls.config import ConfigError
from raycls.search.settings import SearchSettings


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
