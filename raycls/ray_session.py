"""Joining or starting Ray: the one place raycls calls `ray.init`, and the ports it hands out.

Train, the search, the benchmarks and the tests all start Ray the same way (a private local Ray
unless an address is named, token auth without Ray's warning, this Ray's own API server named for
its workers), so the way lives here, once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from typing import Any


@contextlib.contextmanager
def scoped_env(values: dict[str, str]):
    """Ray's environment switches for one call, unless the user set them; removed again after.

    Train and Tune read some settings only from the environment, when a `fit` starts (no option
    sets them), so they must be in this process's environment then; scoped, the rest of the
    process (a notebook, a test session, the next run) keeps the environment it had.
    """
    ours = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(ours)
    try:
        yield
    finally:
        for k in ours:
            os.environ.pop(k, None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing on `host` listens on now (the OS picks it; "" = every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or "local",
        help="Ray cluster to use: 'local' starts one on this machine, 'auto' joins the cluster "
        "this node belongs to (e.g. a `ray up` head), or HOST:PORT (default: $RAY_ADDRESS, "
        "else 'local')",
    )


def local_ray_options() -> dict[str, Any]:
    """Extra `ray.init(address="local")` options so the new Ray's workers find its own API server.

    Train V2 starts a PlacementGroupCleaner actor per run that polls the controller through Ray's
    State API. Without $RAY_ADDRESS that API looks the cluster up in /tmp/ray/ray_current_cluster,
    which an earlier `ray start` on the machine leaves pointing at a dead GCS: every poll then hangs
    10 s, and every run's teardown waited 12 s for the cleaner (seen here: 28 s runs for 0.4 s of
    training). Naming this cluster's dashboard port for the workers makes the poll answer at once
    (or fail at once when the dashboard is off, which the cleaner tolerates).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port, "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": url}}}


def init_ray(address: str | None = None, min_cpus: int = 0, log_to_driver: bool = True) -> None:
    """Join `address` (else $RAY_ADDRESS; "auto" = the cluster this node belongs to), else start
    a private local Ray: a bare `ray.init()` would silently join whatever cluster someone else
    started on this machine. A local Ray gets at least `min_cpus` logical CPUs: streaming runs
    need one for Ray Data's decode tasks beside the training workers, even on a 2-core laptop
    (where they then share the cores, as any data loader does)."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local" and "ray" not in sys.modules:
        # A new local Ray turns token auth on by default, by setting this same variable, and
        # warns that it did on every run; asking for it before Ray reads its config (at import)
        # is Ray's own switch for the same outcome, without the warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        extra = local_ray_options() if address == "local" else {}
        if address == "local" and min_cpus > (os.cpu_count() or 1):
            extra["num_cpus"] = min_cpus
        ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver, **extra)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
