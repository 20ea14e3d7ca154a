"""The Tune function trainable: one trial is one TorchTrainer, the same `raycls train` builds.

`train_driver` fits the trial's Train run and forwards every epoch's metrics *and checkpoint*
to Tune, so ASHA can stop a trial and PBT can clone one (the trial hands `tune.get_checkpoint()`
to the workers as `resume_from`); `train_run_name` keeps a retried trial in the same Train run.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from raycls.config import TrainConfig

# A trial only waits on its Train run, so it takes no CPU (that would starve the Train workers
# on a 2-core machine). Tune refuses an empty request, so it asks for a sliver of the head node's
# marker resource: trial drivers run beside the search driver, the Train workers anywhere.
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}


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
    from raycls.trainer import build_trainer
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
