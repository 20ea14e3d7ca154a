"""TrainConfig: the one typed, validated configuration of a training run.

Its dict form (`to_dict`) is what Ray Train's workers receive and what Ray Tune searches over
(search spaces use these exact field names). Every checkpoint and bundle stores it, so a model can
always be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class TrainConfig:
    # --- data ---
    dataset: str = "digits"  # registry name, or imagefolder:PATH / parquet:PATH
    data_dir: str = "data"  # where mnist / fashion-mnist / cifar10 files live
    image_size: int = 0  # 0 = the dataset's native size; imagefolder/parquet images are resized
    val_fraction: float = 0.1  # share of the training split held out for validation (seeded)
    seed: int = 0  # seeds the split, the model init and the augmentation RNG
    # memory: decode once, hold uint8 arrays in the object store (fast for small data);
    # stream: Ray Data decodes on the fly (any size); auto: stream imagefolder/parquet only
    data_mode: str = "auto"
    max_bad_images: int = 100  # undecodable files skipped (and named) before a run stops

    # --- model ---
    model: str = "resnet_small"  # see raycls.models.list_models()
    model_width: int = 16  # channels of the first stage (resnet_small only); stages double it
    pretrained: str = ""  # path to a torchvision weights file to start from (transfer learning)

    # --- optimisation ---
    num_epochs: int = 10
    batch_size: int = 128  # global batch, split evenly over workers
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adamw
    lr: float = 0.1  # peak learning rate, reached at the end of warm-up, per global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.0

    # --- augmentation (see raycls.augment) ---
    aug_policy: str = "default"  # policy string, e.g. "crop4-flip", "rand-n2-m9", "none"
    aug_mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixup; 0 = off
    aug_cutmix_alpha: float = 0.0  # Beta(alpha, alpha) cutmix; 0 = off
    aug_policy_file: str = ""  # a PBA schedule (JSON) exported by a search; overrides aug_policy
    # streaming only: the smallest share of an image's area a random training crop keeps
    # (RandomResizedCrop); 1 = the whole image, resized (no crop)
    aug_crop_scale: float = 0.35

    # --- distribution ---
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1

    # --- run control ---
    keep_checkpoints: int = 2  # best K checkpoints kept, by val_acc
    early_stop_patience: int = 0  # stop after N epochs without a val_acc gain; 0 = never
    max_failures: int = 2  # worker-group restarts Ray Train allows before giving up
    storage_path: str = "./runs"
    name: str = ""  # run name; empty = a fresh unique one
    resume_from: str = ""  # checkpoint directory to start from (set by Tune for PBT / retries)

    # --- tracking (see raycls.tracking) ---
    tensorboard: bool = True  # rank 0 writes TensorBoard event files into the run directory
    mlflow_uri: str = ""  # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else no MLflow
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. fault injection in tests

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}")

        need(self.num_epochs >= 1, "num_epochs", "must be at least 1")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.num_workers >= 1, "num_workers", "must be at least 1")
        need(
            self.batch_size >= self.num_workers,
            "batch_size",
            f"the global batch must be at least num_workers ({self.num_workers})",
        )
        need(self.cpus_per_worker >= 1, "cpus_per_worker", "must be at least 1")
        need(self.lr > 0, "lr", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(0 < self.val_fraction < 0.5, "val_fraction", "must be in (0, 0.5)")
        need(self.optimizer in ("sgd", "adamw"), "optimizer", "choose sgd or adamw")
        need(self.model_width >= 4, "model_width", "must be at least 4")
        need(self.image_size >= 0, "image_size", "must be >= 0 (0 = native size)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        need(self.early_stop_patience >= 0, "early_stop_patience", "must be >= 0")
        need(self.max_failures >= -1, "max_failures", "must be >= 0 (or -1 for unlimited)")
        need(self.data_mode in ("auto", "memory", "stream"), "data_mode",
             "choose auto, memory or stream")
        need(self.max_bad_images >= 0, "max_bad_images", "must be >= 0")
        need(0.05 <= self.aug_crop_scale <= 1, "aug_crop_scale", "must be in [0.05, 1]")
        need(self.aug_mixup_alpha >= 0, "aug_mixup_alpha", "must be >= 0")
        need(self.aug_cutmix_alpha >= 0, "aug_cutmix_alpha", "must be >= 0")

    @property
    def batch_size_per_worker(self) -> int:
        return self.batch_size // self.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently do nothing)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})
