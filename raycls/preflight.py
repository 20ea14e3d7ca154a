"""Checks a training run's inputs before Ray starts or any data loads.

`check_config(cfg)` answers in about a second what would otherwise fail a minute later inside
every worker (and be retried by `--max-failures`): names against the registries (model,
dataset), paths that must exist (a local dataset, mnist's files in `--data-dir`, `--pretrained`,
`--resume-from`, `--aug-policy-file`), policy strings against the dataset's image size, and
that MLflow is installed when `--mlflow-uri` (or $MLFLOW_TRACKING_URI) asks for it. Each
problem is a `ConfigError` reading `field=value: why; the fix`, which the commands print as
`error: ...` with exit status 2. `raycls train` and `raycls search` both call it; what can only be
known from the data (an imagefolder's classes, unreadable files) is still checked when it loads.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import os
from pathlib import Path

from raycls.config import ConfigError, TrainConfig

DEFAULT_ENCODED_SIZE = 32  # --image-size 0 for imagefolder/parquet (raycls.stream's default)


def bad(field: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"{field}={value}: {why}")


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def check_model(cfg: TrainConfig) -> None:
    from raycls.models import list_models

    names = list_models()
    if cfg.model not in names:
        raise bad("model", cfg.model, "unknown model" + closest(cfg.model, names) + "; choose "
                  "resnet_small or a torchvision classification model (resnet18, "
                  "mobilenet_v3_small, efficientnet_b0, ...: `python -c \"import torchvision; "
                  "print(torchvision.models.list_models(module=torchvision.models))\"`)")
    if cfg.pretrained:
        if cfg.model == "resnet_small":
            raise bad("pretrained", cfg.pretrained, "applies to torchvision models only, not "
                      "resnet_small; pick e.g. --model resnet18 or drop --pretrained")
        if not Path(cfg.pretrained).is_file():
            raise bad("pretrained", cfg.pretrained, "no such file; pass a torchvision weights "
                      "file (.pth) that is on this machine")


def dataset_shape(cfg: TrainConfig) -> tuple[str, int]:
    """(dataset name, image size the run trains at), checking that the dataset can be found."""
    from raycls.data import BUILTIN_SHAPES, DATASETS, IDX_FILES

    name = cfg.dataset
    kind, sep, path = name.partition(":")
    if sep and kind in ("imagefolder", "parquet"):
        if not path:
            raise bad("dataset", name, f"name a path after the colon, e.g. {kind}:/data/photos")
        if "://" not in path:  # object storage is checked when it is listed
            if kind == "imagefolder" and not Path(path).is_dir():
                raise bad("dataset", name, "no such folder; point it at a folder of class "
                          "folders (or with train/, val/, test/ folders of class folders)")
            if kind == "parquet" and not (Path(path).exists() or glob.glob(path)):
                raise bad("dataset", name, "no such file, folder or glob match; name a .parquet "
                          "file, a folder of them, a glob or an s3:// / gs:// URI")
        return kind, cfg.image_size or DEFAULT_ENCODED_SIZE
    if name not in BUILTIN_SHAPES:
        raise bad("dataset", name, "unknown dataset" + closest(name, list(BUILTIN_SHAPES))
                  + f"; choose {', '.join(DATASETS)}")
    if name == "cifar10":  # found, or downloaded now: before Ray starts, with its progress line
        from raycls.data import DataError, find_cifar10

        try:
            find_cifar10(cfg.data_dir)
        except DataError as e:
            raise bad("data_dir", cfg.data_dir, str(e)) from None
    if name in ("mnist", "fashion-mnist"):
        d = Path(cfg.data_dir)
        missing = [f for f in IDX_FILES.values() if not (d / f).is_file()]
        if missing:
            raise bad("data_dir", cfg.data_dir, f"{name} needs the four official gzipped IDX "
                      f"files there, and {', '.join(missing)} are missing; pass --data-dir")
    return name, cfg.image_size or BUILTIN_SHAPES[name].image_size


def check_policies(cfg: TrainConfig, dataset: str, image_size: int) -> None:
    from raycls.augment import load_policy_schedule, parse_policy

    from_file: list[str] = []
    if cfg.aug_policy_file:
        if not Path(cfg.aug_policy_file).is_file():
            raise bad("aug_policy_file", cfg.aug_policy_file, "no such file; pass the "
                      "pba_schedule.json a search exported (`raycls search --scheduler pbt`)")
        try:
            from_file = [p for _, p in load_policy_schedule(cfg.aug_policy_file)]
        except ValueError as e:
            raise bad("aug_policy_file", cfg.aug_policy_file, str(e)) from None
    # the train worker's rule (raycls.worker.NO_FLIP_DATASETS): digits are not mirror-symmetric
    allow_flip = dataset not in ("digits", "mnist")
    field = "aug_policy"
    for policy in [cfg.aug_policy, *from_file]:
        try:
            parse_policy(policy, image_size=image_size, allow_flip=allow_flip)
        except ValueError as e:
            raise bad(field, policy, str(e).removeprefix(f"augmentation policy {policy!r}: ")
                      ) from None
        field = "aug_policy_file"


def check_checkpoint(cfg: TrainConfig) -> None:
    if not cfg.resume_from:
        return
    from raycls.checkpoints import CheckpointError, verify_checkpoint

    if "://" in cfg.resume_from:
        return
    try:
        verify_checkpoint(cfg.resume_from)
    except (CheckpointError, OSError) as e:
        raise bad("resume_from", cfg.resume_from,
                  str(e).removeprefix(f"{cfg.resume_from}: ")) from None


def check_tracking(cfg: TrainConfig) -> None:
    """MLflow is an optional extra: asked for (--mlflow-uri or $MLFLOW_TRACKING_URI) and absent
    is said now, without importing it (raycls.tracking imports it when a run starts)."""
    uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and importlib.util.find_spec("mlflow") is None:
        field = "mlflow_uri" if cfg.mlflow_uri else "MLFLOW_TRACKING_URI"
        raise bad(field, uri, "MLflow is not installed; pip install 'raycls[mlflow]'"
                  + ("" if cfg.mlflow_uri else " (or unset MLFLOW_TRACKING_URI)"))


def check_config(cfg: TrainConfig) -> None:
    """Every input of a run that can be checked without Ray or the data; raises ConfigError."""
    dataset, image_size = dataset_shape(cfg)
    check_policies(cfg, dataset, image_size)
    check_model(cfg)
    check_checkpoint(cfg)
    check_tracking(cfg)
