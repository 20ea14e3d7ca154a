"""Each private-Ray entry of raycls.raycompat against the installed Ray 2.60 (a real local
cluster), and the clear error every entry gives on a Ray it was not written for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raycls import raycompat

ENTRIES = ["autoscaler_util", "cluster_schema", "placement_groups", "session_logs_dir",
           "alive_actors", "available_resources_per_node", "serve_http_host"]


@pytest.mark.parametrize("entry", ENTRIES + ["serve_deploy"])
def test_another_ray_version_gets_a_clear_error(entry, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.99.1")
    args = ({},) if entry == "serve_deploy" else ()
    with pytest.raises(raycompat.RayCompatError) as e:
        getattr(raycompat, entry)(*args)
    assert "Ray 2.99.1 is installed" in str(e.value) and "ray==2.60.*" in str(e.value)
    assert entry in str(e.value)


def test_cluster_schema_and_prepare_config():
    schema = raycompat.cluster_schema()
    assert {"cluster_name", "provider", "available_node_types"} <= set(schema["properties"])
    util = raycompat.autoscaler_util()
    cfg = {"cluster_name": "t", "provider": {"type": "aws", "region": "us-west-2"},
           "auth": {"ssh_user": "ubuntu"}}
    prepared = util.prepare_config(cfg)
    assert "available_node_types" in prepared and "head_node_type" in prepared


@pytest.mark.ray
def test_session_entries_on_a_real_cluster(ray_session):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    logs = raycompat.session_logs_dir()
    assert logs and Path(logs).parent.name.startswith("session_"), logs
    assert any(Path(logs).glob("gcs_server*")), sorted(p.name for p in Path(logs).iterdir())

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    try:
        mine = [r for r in raycompat.placement_groups() if r.id_hex == pg.id.hex()]
        assert len(mine) == 1 and not mine[0].removed and not mine[0].detached
        assert mine[0].creator_is_driver  # this driver made it, not an actor
        assert mine[0].creator_job_hex == ray.get_runtime_context().get_job_id()
    finally:
        remove_placement_group(pg)

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    probe = Probe.remote()
    pid = ray.get(probe.pid.remote())
    try:
        actors = raycompat.alive_actors()
        mine = [a for a in actors if a["ActorClassName"].endswith("Probe")]
        assert [int(a["Pid"]) for a in mine] == [pid], actors
    finally:
        ray.kill(probe)

    free = raycompat.available_resources_per_node()
    assert set(free) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
