"""The models a replica serves: one onnxruntime session and one `@serve.batch` queue per model.

`ModelHolder` loads and checks one bundle and swaps it in place. `ModelSlot` puts a batch queue in
front of it: every request for that model, from `/v1` or `/v2`, waits in the same queue, so a V2
batch and `/v1` images run in one onnxruntime call. `ModelSet` is the named set a replica holds,
changed model by model on `reconfigure` (new bundles load beside the old ones; a model that did
not change keeps its session and queue, so requests to it never notice). Batches return logits;
the protocols turn them into top-k answers or V2 tensors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from raycls import bundle as bundle_lib


class ModelHolder:
    """The bundle of one model, swappable while requests run (no Ray in here)."""

    def __init__(self, providers: list[str] | None = None, threads: int = 0):
        self.providers = providers
        self.threads = threads  # onnxruntime intra-op threads; 0 = onnxruntime's default
        self.bundle: bundle_lib.Bundle | None = None

    def session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            # onnxruntime's default is one thread per core, spinning between runs: in a replica
            # that shares its CPUs with the HTTP loop (and other replicas), the spinning threads
            # take the cores the event loop needs. Size the pool to the replica's CPUs instead.
            so.intra_op_num_threads = self.threads
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def load(self, path: str, int8: bool = False) -> bundle_lib.Bundle:
        # Built beside the current one; assigning it is the swap (in-flight batches keep the old
        # Bundle object they already hold).
        new = bundle_lib.load_bundle(
            path, int8=int8, providers=self.providers, session_options=self.session_options()
        )
        self.check(new)
        self.bundle = new
        return new

    def check(self, bundle: bundle_lib.Bundle | None = None) -> None:
        """Run one blank image through the session; raise if it fails or returns garbage."""
        b = bundle or self.bundle
        if b is None:
            raise RuntimeError("no model loaded")
        logits = b.logits(np.zeros((1, b.channels, b.height, b.width), np.uint8))
        if logits.shape != (1, len(b.classes)) or not np.isfinite(logits).all():
            raise RuntimeError(f"model {b.name} returned bad logits {logits.shape}")

    @staticmethod
    def spec(b: bundle_lib.Bundle) -> dict[str, Any]:
        """What an ingress needs to decode for this bundle, plus its public metadata."""
        meta = {k: v for k, v in b.meta.items() if k != "config"}
        return {
            "name": b.name,
            "shape": (b.channels, b.height, b.width),
            "num_classes": len(b.classes),
            "classes": b.classes,
            # the bundle's resize rule ("bilinear" = stretch, the legacy name; or "center-crop"),
            # what the decoder must do so served pixels equal training's
            "resize": b.resize,
            "meta": meta,
            "model_file": b.model_file,
        }


def top_k_predictions(
    logits: np.ndarray, classes: list[str], top_k: int
) -> list[list[dict[str, Any]]]:
    """Per image: top-k [{"label", "index", "probability"}], as `Bundle.predict` computes them."""
    probs = bundle_lib.softmax(logits)
    k = min(top_k, probs.shape[1])
    # stable sort on -p: equal probabilities keep label order, so answers are deterministic
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": classes[i], "index": int(i), "probability": float(p[i])} for i in row]
        for row, p in zip(order, probs, strict=True)
    ]


def predict_groups(
    b: bundle_lib.Bundle, groups: list[np.ndarray], top_ks: list[int]
) -> list[list[list[dict]]]:
    """One onnxruntime call for several requests' images (each (n_i, C, H, W)), split back."""
    preds = b.predict(np.concatenate(groups), top_k=max(top_ks))
    out, start = [], 0
    for g, k in zip(groups, top_ks, strict=True):
        out.append([p[:k] for p in preds[start : start + len(g)]])
        start += len(g)
    return out


def run_groups(b: bundle_lib.Bundle, groups: list[np.ndarray]) -> list[np.ndarray]:
    """One onnxruntime call for several requests' images, logits split back per request."""
    logits = b.logits(np.concatenate(groups))
    return np.split(logits, np.cumsum([len(g) for g in groups])[:-1])


class ModelSlot:
    """One named model: its holder and its own batch queue (shared by /v1 and /v2 requests)."""

    def __init__(
        self,
        name: str,
        holder: ModelHolder,
        pool: ThreadPoolExecutor,
        on_batch: Callable[[str, int], None],
    ):
        self.name, self.holder, self.pool, self.on_batch = name, holder, pool, on_batch
        self.path, self.int8 = "", False

        # @serve.batch keeps one queue per decorated function (not per instance), so each
        # slot decorates its own closure: one queue per model.
        async def run(items: list[np.ndarray]) -> list[tuple[str, np.ndarray] | None]:
            return await self._run_batch(items)

        self.infer = serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)(run)

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _run_batch(self, items: list[np.ndarray]) -> list[tuple[str, np.ndarray] | None]:
        b = self.holder.bundle
        shape = (b.channels, b.height, b.width)
        ok = [i for i, a in enumerate(items) if a.shape[1:] == shape]
        results: list[tuple[str, np.ndarray] | None] = [None] * len(items)  # None: wrong shape
        if ok:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self.pool, run_groups, b, [items[i] for i in ok])
            for i, logits in zip(ok, out, strict=True):
                results[i] = (b.name, logits)
            self.on_batch(b.name, sum(len(items[i]) for i in ok))
        return results


class ModelSet:
    """The named models of one replica and the default one; changed model by model."""

    def __init__(
        self, make_holder: Callable[[], ModelHolder], on_batch: Callable[[str, int], None]
    ):
        self.make_holder, self.on_batch = make_holder, on_batch
        self.slots: dict[str, ModelSlot] = {}
        self.default = ""
        # one inference thread for all models: the event loop keeps reading and decoding requests
        # meanwhile (which is what lets the next batch fill), and models do not fight for cores
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="raycls-infer")
        self._lock = asyncio.Lock()
        self._specs: dict[str, tuple[Any, dict[str, Any]]] = {}

    async def apply(
        self, paths: dict[str, str], default: str, int8: bool, max_batch: int, wait_s: float
    ) -> None:
        """Load what is new or changed (beside the old), then switch the default, then drop
        what is gone; a model whose path and file did not change keeps serving untouched."""
        async with self._lock:
            for name, path in paths.items():
                slot = self.slots.get(name)
                if slot is None or slot.path != path or slot.int8 != int8:
                    fresh = slot or ModelSlot(name, self.make_holder(), self.pool, self.on_batch)
                    if slot is not None:  # replacing: load into a new holder, swap on success
                        holder = self.make_holder()
                        await asyncio.to_thread(holder.load, path, int8)
                        slot.holder = holder
                    else:
                        await asyncio.to_thread(fresh.holder.load, path, int8)
                    fresh.path, fresh.int8 = path, int8
                    self.slots[name] = fresh
                self.slots[name].set_batching(max_batch, wait_s)
            self.default = default
            for name in [n for n in self.slots if n not in paths]:
                del self.slots[name]  # in-flight batches keep the bundle they hold

    def spec(self, name: str, top_k: int) -> dict[str, Any] | None:
        """The decode spec of model `name` (cached per bundle object), None if not served."""
        slot = self.slots.get(name)
        if slot is None or slot.holder.bundle is None:
            return None
        b = slot.holder.bundle
        cached = self._specs.get(name)
        if cached is None or cached[0] is not b or cached[1]["top_k"] != top_k:
            cached = (b, {**ModelHolder.spec(b), "top_k": top_k})
            self._specs[name] = cached
        return cached[1]

    def check(self) -> None:
        if not self.slots:
            raise RuntimeError("no model loaded")
        for slot in list(self.slots.values()):
            slot.holder.check()
