"""The model-holding side of a replica: `reconfigure` (hot swap), health check, batched inference.

Mixed into `Ingress` in the single layout and into the `Classifier` deployment in the split one,
so both answer the same calls: `model_specs()` (what to decode for each model, and the default)
and `infer(name, images)` (uint8 (n, C, H, W) -> that model's logits through its batch queue).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import numpy as np
from ray import serve

from raycls.serving.args import (
    USER_CONFIG_KEYS,
    ServeArgs,
    ServeConfigError,
    model_set,
    parse_args,
    pick_default,
)
from raycls.serving.models import ModelHolder, ModelSet


def _providers(num_gpus: float) -> list[str] | None:
    """CUDA first when Ray gave this replica a GPU and onnxruntime has the provider."""
    import onnxruntime as ort  # imported by bundle already; here for the provider list only
    import ray

    if num_gpus > 0 and ray.get_gpu_ids():
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


class ModelReplica:
    """Holds the models, batches requests into onnxruntime calls, swaps models on reconfigure."""

    def _init_models(self, args: ServeArgs) -> None:
        from ray.serve.metrics import Counter, Histogram

        providers = _providers(args.num_gpus)
        threads = args.onnx_threads or max(1, round(args.num_cpus))
        self._model_args = args
        self._m_images = Counter(
            "raycls_images_classified", description="Images classified.", tag_keys=("model",)
        )
        self._m_batch = Histogram(
            "raycls_batch_images",
            description="Images per onnxruntime call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )

        def on_batch(model: str, n: int) -> None:
            self._m_images.inc(n, tags={"model": model})
            self._m_batch.observe(n, tags={"model": model})

        self.models = ModelSet(lambda: ModelHolder(providers, threads=threads), on_batch)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot swap: load and check new bundles in a thread while the old ones keep serving.

        `model: PATH` serves that one bundle instead of the whole set; `models:` a folder or a
        mapping {name: path}; missing keys fall back to the deployment's arguments.
        """
        uc = dict(user_config or {})
        unknown = sorted(set(uc) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ServeConfigError(
                f"user_config keys {unknown} are not reconfigurable; use {list(USER_CONFIG_KEYS)}"
            )
        scalars = {k: uc[k] for k in ("int8", "top_k", "max_batch_size", "batch_wait_timeout_s")
                   if k in uc}  # fmt: skip
        args = parse_args({**asdict(self._model_args), **scalars})
        if uc.get("model"):
            paths = model_set(model=str(uc["model"]))
        elif uc.get("models"):
            paths = model_set(models=uc["models"])
        else:
            paths = model_set(args.model, args.models, args.models_root)
        wanted = str(uc.get("default_model") or args.default_model or "")
        default = pick_default(paths, wanted if wanted in paths else "")
        await self.models.apply(
            paths, default, args.int8, args.max_batch_size, args.batch_wait_timeout_s
        )
        self._model_args = args

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises (a broken or missing session)."""
        if getattr(self, "models", None) is not None:
            await asyncio.to_thread(self.models.check)

    def model_specs(self) -> dict[str, Any]:
        """{"default": name, "models": {name: decode spec}} of every model served here."""
        top_k = self._model_args.top_k
        specs = {n: self.models.spec(n, top_k) for n in list(self.models.slots)}
        return {"default": self.models.default, "models": {n: s for n, s in specs.items() if s}}

    def batching(self) -> dict[str, Any]:
        a = self._model_args
        return {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s}

    async def infer(self, name: str, images: np.ndarray) -> tuple[str, np.ndarray] | None:
        """uint8 (n, C, H, W) -> (bundle name that ran, float32 logits (n, K)) through model
        `name`'s batch queue; None when the model is gone or a swap changed its input shape.
        The name comes from the batch, not from before it: a swap between reading the spec and
        running the batch must not label B's answer as A's."""
        slot = self.models.slots.get(name)
        if slot is None:
            return None
        return await slot.infer(images)


@serve.deployment(name="Classifier")
class Classifier(ModelReplica):
    """Batched onnxruntime inference on uint8 arrays (split layout; CUDA when given a GPU)."""

    def __init__(self, args: ServeArgs):
        self.args = args
        self._init_models(args)
