"""A search's settings: SearchSettings, the YAML presets in `tune/` and the flags over them.

A preset's space keys are TrainConfig field names (`lr`, `aug_policy`, ...), so a trial config is
a TrainConfig dict; `resolve_settings` reads a preset, applies the command's overrides and checks
the result. Also here: the objective (METRIC, MODE), the names of the files a search keeps in its
directory, and `summarize_config`, the one-line form of a trial config the console and the
reports print.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycls.config import ConfigError, TrainConfig
from raycls.runs import SEARCH_SETTINGS, SEARCH_SUMMARY

PRESET_DIR = Path(__file__).resolve().parents[2] / "tune"  # editable presets in the checkout
SCHEDULERS = ("asha", "pbt", "random", "grid")
SEARCHERS = ("random", "optuna")
METRIC, MODE = "val_acc", "max"  # the search objective everywhere
SETTINGS_FILE = SEARCH_SETTINGS  # in the experiment dir: what --resume continues
SUMMARY_FILE = SEARCH_SUMMARY  # written last: the search ended (see search_finished)
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


# ----------------------------------------------------------------------------- one line per config

SHORT = {"lr": "lr", "weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls",
         "model_width": "width", "aug_policy": "aug", "aug_mixup_alpha": "mixup",
         "aug_cutmix_alpha": "cutmix", "optimizer": "opt", "momentum": "mom"}


def summarize_config(config: dict[str, Any], keys: list[str], width: int = 70) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    text = " ".join(f"{SHORT.get(k, k)}={fmt(config.get(k))}" for k in keys)
    return text if len(text) <= width else text[: width - 3] + "..."


def resume_command(settings: SearchSettings, prog: str) -> str:
    """The command that continues a search: its name and where it lives (the rest is saved)."""
    return f"{prog} --resume --name {settings.name} --storage-path {settings.storage_path}"
