"""Ray Serve deployments: raycls's `/v1` API and the Open Inference Protocol (`/v2`) in front of
verified ONNX bundles, several models on one endpoint, optional API keys. Nothing imports torch.

Modules, in the order a request meets them:

- `args`: the typed `serve run raycls.deploy key=value` arguments and the set of models to serve
- `auth`: bearer API keys (ASGI middleware, outermost)
- `v2codec` (pure: bytes <-> arrays) and `v2`: the `/v2` routes
- `http` (errors, body limits, the FastAPI app) and `v1`: the `/v1` routes and their fast path
- `ingress`: the `Ingress` deployment, where both APIs decode and call a model's batch queue
- `models` (one session and batch queue per model) and `replica` (hot swap, `Classifier`)
- `app`: the application builder, `deploy`
"""

from ray import serve

from raycls.serving.app import build_app, deploy
from raycls.serving.args import (
    USER_CONFIG_KEYS,
    ServeArgs,
    ServeConfigError,
    parse_args,
    resolve_model,
    resolve_models,
    user_config_of,
)
from raycls.serving.ingress import Ingress
from raycls.serving.models import ModelHolder, ModelSet, ModelSlot, predict_groups
from raycls.serving.replica import Classifier
from raycls.serving.v1 import ClassifyFastPath

__all__ = [
    "USER_CONFIG_KEYS", "Classifier", "ClassifyFastPath", "Ingress", "ModelHolder", "ModelSet",
    "ModelSlot", "ServeArgs", "ServeConfigError", "build_app", "deploy", "parse_args",
    "predict_groups", "resolve_model", "resolve_models", "serve", "user_config_of",
]  # fmt: skip
