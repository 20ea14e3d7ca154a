"""The application builder behind `serve run raycls.deploy key=value ...`.

`deploy(args)` validates every argument, resolves and loads every bundle once (so mistakes fail
before any replica starts), and returns one of two layouts:

- single (default on CPU): one `Ingress` deployment that reads, decodes and classifies in the same
  replica, one `@serve.batch` queue per model. A second deployment hop costs about half the
  requests/s on a small machine (ray-notes, "Serve speed"), so this is the default.
- split (`split=true`, and the default when `num_gpus > 0`): `Ingress` decodes on CPU and sends
  uint8 arrays to a `Classifier` deployment holding the models (CUDA when given a GPU), each with
  its own autoscaling.

Several models share the replicas (all resident, one batch queue each) rather than a deployment
per model: a per-model deployment needs a routing hop in front (`/v2/models/{name}` is not a
route prefix), and that hop is the split layout's cost (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import click  # a dependency of Ray's own CLIs
from ray import serve
from ray.serve.exceptions import RayServeException

from raycls.serving.args import (
    ServeArgs,
    ServeConfigError,
    parse_args,
    resolve_models,
    user_config_of,
)
from raycls.serving.ingress import Ingress
from raycls.serving.replica import Classifier


def _scaling(lo: int, hi: int, target: float) -> dict[str, Any]:
    if lo == hi:
        return {"num_replicas": lo}
    return {
        "autoscaling_config": {
            "min_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": target,
        }
    }


def build_app(args: ServeArgs, paths: dict[str, str], default: str) -> serve.Application:
    """The Serve application for validated, resolved arguments and models {name: path}.

    The models and batching knobs also go into `user_config`: a `serve deploy` that changes only
    a deployment's `user_config` (not the app's `args`, which Serve hashes into the code version
    and answers with new replicas) swaps them in place through `reconfigure`.
    """
    common = {
        "logging_config": {"enable_access_log": args.access_log},
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }
    user_config = user_config_of(args, paths, default)
    if not args.is_split:
        return Ingress.options(
            **common,
            **_scaling(args.min_replicas, args.max_replicas, args.target_ongoing_requests),
            ray_actor_options={"num_cpus": args.num_cpus},
            user_config=user_config,
        ).bind(args)
    classifier = Classifier.options(
        **common,
        **_scaling(
            args.classifier_min_replicas,
            args.classifier_max_replicas,
            args.target_ongoing_requests,
        ),
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config=user_config,
    ).bind(args)
    return Ingress.options(
        **common,
        **_scaling(args.min_replicas, args.max_replicas, args.target_ongoing_requests),
        ray_actor_options={"num_cpus": args.num_cpus},
    ).bind(args, classifier)


def deploy(args: dict[str, Any]) -> serve.Application:
    """Application builder behind `serve run raycls.deploy key=value ...` (see ServeArgs).

    A bad argument or bundle is one line `field=value: why and the fix`, wherever it surfaces:

    - `serve run IMPORT_PATH` (a click command) calls this before it starts or joins Ray and
      prints any other exception as a ~30-line traceback; a click exception instead is shown by
      click as `error: ...` on stderr with exit status 2.
    - `serve deploy`: Serve's controller builds the app in a Ray task and reports a
      RayServeException by its message alone in `serve status` (anything else as a traceback).
    - Python callers get a ServeConfigError (both types above are one).
    """
    try:
        resolved, paths, default = resolve_models(parse_args(args))
    except ServeConfigError as e:
        if _under_serve_run():
            raise CommandLineError(str(e)) from None
        raise BuildError(str(e)) from None
    return build_app(resolved, paths, default)


def _under_serve_run() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.command.name == "run"


class CommandLineError(click.ClickException, ServeConfigError):
    """A ServeConfigError as `serve run` shows it: one `error: ...` line, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=True)


class BuildError(ServeConfigError, RayServeException):
    """A ServeConfigError as Serve's controller reports it: the message, no traceback."""
