"""Every use of Ray's private APIs, in one place, checked against the Ray version it was made for.

Ray 2.60 has no public call for these; each entry names what it needs and why. An entry refuses
to run on another Ray (and turns a missing private name into the same error) with
`RayCompatError` naming both versions, so an upgrade fails loudly here instead of quietly
skipping a clean-up or a warning somewhere else. Everything with a public API uses that instead
(`ray.util.get_node_ip_address`, `ray.util.placement_group.remove_placement_group`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WRITTEN_FOR = "2.60"  # the `major.minor` of Ray these entries were checked against


class RayCompatError(RuntimeError):
    """A private Ray API this module uses is missing or the installed Ray is not WRITTEN_FOR."""


def check(entry: str) -> None:
    """Refuse to run `entry` on a Ray this module was not checked against."""
    import ray

    if ray.__version__.split(".")[:2] != WRITTEN_FOR.split("."):
        raise RayCompatError(
            f"{entry} uses a private API of Ray {WRITTEN_FOR}, but Ray {ray.__version__} is "
            f"installed: install ray=={WRITTEN_FOR}.* (what pyproject.toml pins), or port "
            "raycls/raycompat.py to the new Ray"
        )


def _missing(entry: str, e: Exception) -> RayCompatError:
    import ray

    return RayCompatError(f"{entry}: Ray {ray.__version__} lacks a private name it needs ({e}); "
                          "port raycls/raycompat.py")


# ------------------------------------------------------------------- the autoscaler's YAML checks


def autoscaler_util() -> Any:
    """`ray.autoscaler._private.util`: `prepare_config` (merges Ray's defaults.yaml, as `ray up`
    does) and `fill_node_type_min_max_workers`. `ray up` exposes no offline validator."""
    check("autoscaler_util")
    try:
        from ray.autoscaler._private import util
    except ImportError as e:
        raise _missing("autoscaler_util", e) from e
    return util


def cluster_schema() -> dict[str, Any]:
    """The JSON schema `ray up` validates against (`ray/autoscaler/ray-schema.json`), which Ray
    ships as a data file without an accessor."""
    check("cluster_schema")
    path = Path(autoscaler_util().__file__).parents[1] / "ray-schema.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise _missing("cluster_schema", e) from e


# ----------------------------------------------------------------------- placement groups


@dataclass(frozen=True)
class PlacementGroupRecord:
    id_hex: str
    removed: bool
    detached: bool
    creator_actor_dead: bool
    creator_is_driver: bool  # made by a driver, not an actor: "dead" creator from birth
    creator_job_hex: str


def placement_groups() -> list[PlacementGroupRecord]:
    """The GCS placement-group table with each group's creator, which the public
    `ray.util.placement_group_table()` leaves out (it is how an orphaned group is recognised)."""
    check("placement_groups")
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table = state._connect_and_get_accessor().get_placement_group_table()
        removed = gcs_pb2.PlacementGroupTableData.REMOVED
        records = []
        for raw in table:
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            records.append(PlacementGroupRecord(
                id_hex=pg.placement_group_id.hex(), removed=pg.state == removed,
                detached=pg.is_detached, creator_actor_dead=pg.creator_actor_dead,
                creator_is_driver=ray.ActorID(pg.creator_actor_id).is_nil(),
                creator_job_hex=ray.JobID(pg.creator_job_id).hex(),
            ))  # fmt: skip
    except (ImportError, AttributeError) as e:
        raise _missing("placement_groups", e) from e
    return records


# ----------------------------------------------------------------------------- the session


def session_logs_dir() -> str | None:
    """This process's Ray session log folder (`/tmp/ray/session_*/logs`), or None when this
    process started no local Ray node (a client of a remote cluster)."""
    check("session_logs_dir")
    try:
        from ray._private import worker
    except ImportError as e:
        raise _missing("session_logs_dir", e) from e
    node = getattr(worker, "_global_node", None)
    return str(Path(node.get_session_dir_path()) / "logs") if node is not None else None


def alive_actors() -> list[dict[str, Any]]:
    """The GCS actor table of the cluster this driver joined (ActorClassName, Pid, ...).
    `ray.util.state.list_actors` would need the dashboard and, without an address, picks the
    newest cluster on the host, which may be someone else's."""
    check("alive_actors")
    try:
        from ray._private.state import actors
    except ImportError as e:
        raise _missing("alive_actors", e) from e
    return list(actors(actor_state_name="ALIVE").values())


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Free resources per node id; the public `ray.available_resources()` only sums them."""
    check("available_resources_per_node")
    try:
        from ray._private.state import available_resources_per_node as per_node
    except ImportError as e:
        raise _missing("available_resources_per_node", e) from e
    return per_node()


# ------------------------------------------------------------------------------------ Serve


def serve_http_host(timeout_s: float = 5) -> str:
    """The host Serve's proxies bind, from the controller (`serve.status()` does not say)."""
    check("serve_http_host")
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    except ImportError as e:
        raise _missing("serve_http_host", e) from e
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_http_config.remote(), timeout=timeout_s).host


def serve_deploy(config: dict[str, Any]) -> None:
    """Validate and submit a whole Serve config file's content without blocking, as
    `serve deploy` does but in this driver (the CLI goes through the dashboard's REST API)."""
    check("serve_deploy")
    from ray.serve.schema import ServeDeploySchema

    try:
        from ray.serve._private import api as serve_api
    except ImportError as e:
        raise _missing("serve_deploy", e) from e
    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema, _blocking=False)
