"""`raycls validate`: the shipped configs pass, and each broken variant of them is rejected with a
message naming the file, the key and the problem. Broken configs are made by editing the shipped
ones, so the tests follow the real files. Offline: no cloud, no running Ray."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from raycls.validate import Problem, ray_version_pin, shipped_configs, validate_file

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster" / "config.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
SERVE_FILE = REPO / "serve" / "config.yaml"

SERVE_CONFIG = {  # a small Serve config of our own, independent of serve/config.yaml
    "applications": [
        {
            "name": "app",
            "import_path": "mymodule:app",
            "deployments": [
                {
                    "name": "Model",
                    "max_ongoing_requests": 16,
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
                }
            ],
        }
    ]
}


def broken(tmp_path: Path, source: Path | dict, edit: Callable[[dict], None]) -> list[Problem]:
    """Validate `source` (a shipped file or a dict) after `edit` changed it; return its errors."""
    doc = yaml.safe_load(source.read_text()) if isinstance(source, Path) else copy.deepcopy(source)
    edit(doc)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(doc))
    return [p for p in validate_file(path) if p.level == "error"]


def assert_rejected(problems: list[Problem], key: str, *words: str) -> None:
    text = "\n".join(map(str, problems))
    assert problems, "the broken config was accepted"
    hits = [p for p in problems if key in p.key]
    assert hits, f"no problem names key {key!r}:\n{text}"
    for word in words:
        assert any(word in str(p) for p in hits), f"{word!r} missing from:\n{text}"
    assert all("broken.yaml" in str(p) for p in problems), "every message names the file"


# --------------------------------------------------------------------------- shipped configs

def test_every_shipped_config_validates_clean():
    files = shipped_configs()
    names = {p.name for p in files}
    assert {"config.yaml", "local.yaml", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml"} <= (
        names
    )
    for path in files:
        problems = [p for p in validate_file(path) if p.level != "note"]
        assert problems == [], "\n".join(map(str, problems))  # no errors, no warnings


def test_shipped_serve_config_validates_when_present():
    path = REPO / "serve" / "config.yaml"
    assert [p for p in validate_file(path) if p.level != "note"] == []


def test_cluster_config_has_the_required_shape():
    cfg = yaml.safe_load(CLUSTER.read_text())
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # trials land on workers
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand head
    gpu = [n for n in nodes.values() if n["resources"].get("GPU") == 1]
    assert gpu and all(n["min_workers"] == 0 for n in gpu)
    assert any(n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for n in gpu)
    assert cfg["idle_timeout_minutes"] > 0
    pin = ray_version_pin()
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{pin}.")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        for env in ("RAY_AUTH_MODE=token", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
                    "RAY_SERVE_ENABLE_HA_PROXY=1"):
            assert env in start, f"{key} lacks {env}"
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert any("pip install" in c and "~/raycls" in c for c in cfg["setup_commands"])


def test_rayservice_mirrors_serve_config_settings():
    """The RayService serves with serve/config.yaml's settings; only GPU count and paths differ."""
    path = REPO / "serve" / "config.yaml"
    serve_app = yaml.safe_load(path.read_text())["applications"][0]
    service = yaml.safe_load(RAYSERVICE.read_text())
    k8s_app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    cluster_only = {"model", "models_root", "num_gpus"}
    for key, value in serve_app["args"].items():
        if key not in cluster_only:
            assert k8s_app["args"].get(key) == value, f"args.{key} differs"
    k8s_deps = {d["name"]: d for d in k8s_app["deployments"]}
    for dep in serve_app["deployments"]:
        ours = copy.deepcopy(k8s_deps[dep["name"]])
        theirs = copy.deepcopy(dep)
        for d in (ours, theirs):
            d.get("ray_actor_options", {}).pop("num_gpus", None)
        assert ours == theirs, f"deployment {dep['name']} differs from serve/config.yaml"


# --------------------------------------------------------------------------- cluster YAML

def test_cluster_typo_top_level_key(tmp_path):
    def edit(c):
        c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")

    assert_rejected(broken(tmp_path, CLUSTER, edit), "idle_timeout_minute", "unknown key",
                    "idle_timeout_minutes")


def test_cluster_typo_in_node_type(tmp_path):
    def edit(c):
        c["available_node_types"]["gpu_worker"]["min_worker"] = 0

    assert_rejected(broken(tmp_path, CLUSTER, edit), "gpu_worker.min_worker", "min_workers")


def test_cluster_typo_in_provider(tmp_path):
    def edit(c):
        c["provider"]["regoin"] = c["provider"].pop("region")

    assert_rejected(broken(tmp_path, CLUSTER, edit), "provider.regoin", "region")


def test_cluster_bad_head_node_type(tmp_path):
    def edit(c):
        c["head_node_type"] = "ray.head.gpu"

    assert_rejected(broken(tmp_path, CLUSTER, edit), "head_node_type", "ray.head.gpu",
                    "gpu_worker")


def test_cluster_min_workers_above_max_workers(tmp_path):
    def edit(c):
        c["available_node_types"]["gpu_worker"].update(min_workers=5, max_workers=2)

    assert_rejected(broken(tmp_path, CLUSTER, edit), "gpu_worker.min_workers",
                    "min_workers (5) is above max_workers (2)")


def test_cluster_sum_of_min_workers_above_global_max(tmp_path):
    """Caught by Ray's own validate_config (not re-implemented here)."""
    def edit(c):
        c["max_workers"] = 1
        c["available_node_types"]["gpu_worker"]["min_workers"] = 2

    assert_rejected(broken(tmp_path, CLUSTER, edit), "", "max_workers")


@pytest.mark.parametrize(
    "rule",
    [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "tcp",
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},  # a range that covers 8265
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},  # everything, IPv6
    ],
)
def test_cluster_public_dashboard_ingress(tmp_path, rule):
    def edit(c):
        c["provider"]["security_group"]["IpPermissions"] = [rule]

    assert_rejected(broken(tmp_path, CLUSTER, edit), "IpPermissions[0]", "8265", "internet",
                    "run any code")


def test_cluster_public_serve_port_says_what_it_exposes(tmp_path):
    """Port 8000 gives the model, not the cluster: the message says so (and 8265's does not)."""
    def edit(c):
        c["provider"]["security_group"]["IpPermissions"] = [
            {"FromPort": 8000, "ToPort": 8000, "IpProtocol": "tcp",
             "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ]

    problems = broken(tmp_path, CLUSTER, edit)
    assert_rejected(problems, "IpPermissions[0]", "8000 (Serve HTTP)", "call the model",
                    "does not give code execution", "api_key_file")
    assert not any("run any code" in str(p) or "run code" in p.message for p in problems)


def test_cluster_private_ingress_is_fine(tmp_path):
    def edit(c):
        c["provider"]["security_group"]["IpPermissions"] = [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
             "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
        ]

    assert broken(tmp_path, CLUSTER, edit) == []


def test_cluster_without_token_auth(tmp_path):
    def edit(c):
        c["worker_start_ray_commands"] = [
            s.replace("RAY_AUTH_MODE=token ", "") for s in c["worker_start_ray_commands"]
        ]

    assert_rejected(broken(tmp_path, CLUSTER, edit), "worker_start_ray_commands",
                    "token authentication")


@pytest.mark.parametrize("image", ["rayproject/ray:latest", "rayproject/ray",
                                   "rayproject/ray:2.43.0-py311-gpu"])
def test_cluster_unpinned_or_wrong_image(tmp_path, image):
    def edit(c):
        c["docker"]["image"] = image

    assert_rejected(broken(tmp_path, CLUSTER, edit), "docker.image", image)


def test_cluster_wrong_pip_pin(tmp_path):
    def edit(c):
        c["setup_commands"].append("pip install 'ray[default]==2.43.0'")

    assert_rejected(broken(tmp_path, CLUSTER, edit), "setup_commands", "2.43.0")


def test_cluster_public_dashboard_host_is_a_warning(tmp_path):
    doc = yaml.safe_load(CLUSTER.read_text())
    doc["head_start_ray_commands"] = [
        s.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
        for s in doc["head_start_ray_commands"]
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    problems = validate_file(path)
    assert [p.level for p in problems] == ["warning"]
    assert "dashboard" in problems[0].message


# --------------------------------------------------------------------------- Serve configs

def test_own_serve_fixture_is_valid(tmp_path):
    assert broken(tmp_path, SERVE_CONFIG, lambda c: None) == []


def test_serve_min_replicas_above_max_replicas(tmp_path):
    def edit(c):
        c["applications"][0]["deployments"][0]["autoscaling_config"] = {
            "min_replicas": 5, "max_replicas": 2}

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit),
                    "applications[0].deployments[0].autoscaling_config.min_replicas",
                    "min_replicas (5) is above max_replicas (2)")


def test_serve_misspelled_deployment_option(tmp_path):
    def edit(c):
        dep = c["applications"][0]["deployments"][0]
        dep["max_ongoing_request"] = dep.pop("max_ongoing_requests")

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit),
                    "deployments[0].max_ongoing_request", "max_ongoing_requests", "ignore")


@pytest.mark.parametrize(
    ("edit_path", "bad", "good"),
    [
        ((), "http_option", "http_options"),
        (("applications", 0), "import_paht", "import_path"),
        (("applications", 0, "deployments", 0, "autoscaling_config"), "target_ongoing_request",
         "target_ongoing_requests"),
        (("applications", 0, "deployments", 0), "ray_actor_option", "ray_actor_options"),
    ],
)
def test_serve_typos_at_every_level(tmp_path, edit_path, bad, good):
    def edit(c):
        node = c
        for part in edit_path:
            node = node[part]
        node[bad] = {} if bad.endswith(("option", "options")) else 1
        if bad == "import_paht":
            node[bad] = node.pop("import_path")

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit), bad, good)


def test_serve_schema_errors_are_reported(tmp_path):
    def edit(c):
        c["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit), "max_ongoing_requests")


def test_serve_raycls_args_typo(tmp_path):
    def edit(c):
        c["applications"][0]["import_path"] = "raycls.deploy"
        c["applications"][0]["args"] = {"max_batch_sise": 8}
        c["applications"][0]["deployments"][0]["name"] = "Ingress"

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit), "args.max_batch_sise",
                    "max_batch_size")


def test_serve_raycls_unknown_deployment(tmp_path):
    def edit(c):
        c["applications"][0]["import_path"] = "raycls.deploy"

    assert_rejected(broken(tmp_path, SERVE_CONFIG, edit), "deployments[0].name", "Model",
                    "Ingress")


def raycls_args(**changes) -> Callable[[dict], None]:
    """An edit of serve/config.yaml's raycls app: `args` updated with `changes`."""
    def edit(c):
        c["applications"][0]["args"].update(changes)

    return edit


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"max_batch_size": "lots"}, "args.max_batch_size", ("lots", "whole number")),
        ({"top_k": 0}, "args.top_k", ("top_k", "at least 1")),
        ({"split": "maybe"}, "args.split", ("maybe", "true or false")),
        ({"model": "/nope"}, "args.model", ("/nope", "no such bundle directory")),
        ({"api_key_file": "/nope/keys"}, "args.api_key_file", ("no such key file",)),
    ],
)
def test_serve_raycls_args_use_the_serve_run_parser(tmp_path, changes, key, words):
    assert_rejected(broken(tmp_path, SERVE_FILE, raycls_args(**changes)), key, *words)


def test_serve_raycls_args_every_bad_value_is_listed(tmp_path):
    problems = broken(tmp_path, SERVE_FILE, raycls_args(max_batch_size="lots", top_k=0))
    assert {p.key.rsplit(".", 1)[-1] for p in problems} == {"max_batch_size", "top_k"}


def test_serve_model_that_is_no_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_rejected(broken(tmp_path, SERVE_FILE, raycls_args(model=str(tmp_path / "empty"))),
                    "args.model", "not a usable bundle", "bundle.json")


def test_serve_relative_paths_are_a_note_and_cluster_paths_can_be_skipped(tmp_path):
    path = tmp_path / "c.yaml"
    doc = yaml.safe_load(SERVE_FILE.read_text())
    raycls_args(model="/on/the/cluster/only")(doc)
    path.write_text(yaml.safe_dump(doc))
    assert [p for p in validate_file(path, check_paths=False) if p.level != "note"] == []
    raycls_args(model="models/digits")(doc)
    path.write_text(yaml.safe_dump(doc))
    (note,) = validate_file(path)
    assert note.level == "note" and note.key.endswith("args.model")
    assert "relative" in note.message and "resolves on the cluster" in note.message


@pytest.mark.parametrize("http", [{"host": "0.0.0.0", "port": 8000}, {"port": 8000}])
def test_serve_public_host_without_api_keys_is_a_warning(tmp_path, http):
    path = tmp_path / "c.yaml"
    doc = yaml.safe_load(SERVE_FILE.read_text())
    doc["http_options"] = http
    path.write_text(yaml.safe_dump(doc))
    warnings = [p for p in validate_file(path) if p.level == "warning"]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].message
    assert "api_key_file" in warnings[0].fix
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    raycls_args(api_key_file=str(keys))(doc)
    path.write_text(yaml.safe_dump(doc))
    assert [p for p in validate_file(path) if p.level != "note"] == []


def test_serve_num_gpus_disagreement_is_a_warning(tmp_path):
    path = tmp_path / "c.yaml"
    doc = yaml.safe_load(SERVE_FILE.read_text())
    raycls_args(num_gpus=1)(doc)  # the Classifier's ray_actor_options still say num_gpus: 0
    path.write_text(yaml.safe_dump(doc))
    (warning,) = [p for p in validate_file(path) if p.level != "note"]
    assert warning.level == "warning" and warning.key.endswith("ray_actor_options.num_gpus")
    assert "args.num_gpus=1" in warning.message and "0 GPUs" in warning.message


# --------------------------------------------------------------------------- KubeRay manifests

def test_kuberay_ray_version_must_match_pin(tmp_path):
    def edit(m):
        m["spec"]["rayVersion"] = "2.43.0"

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "spec.rayVersion", "2.43.0",
                    ray_version_pin())


def test_kuberay_worker_min_above_max(tmp_path):
    def edit(m):
        m["spec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=1)

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "workerGroupSpecs[0].minReplicas",
                    "above maxReplicas")


def test_kuberay_typo_in_worker_group(tmp_path):
    def edit(m):
        group = m["spec"]["workerGroupSpecs"][0]
        group["maxReplica"] = group.pop("maxReplicas")

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "workerGroupSpecs[0].maxReplica",
                    "maxReplicas")


def test_kuberay_latest_image(tmp_path):
    def edit(m):
        m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = (
            "rayproject/ray:latest")

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "containers[0].image", "latest")


def test_kuberay_public_head_service(tmp_path):
    def edit(m):
        m["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "serviceType", "8265")


def test_kuberay_without_token_auth(tmp_path):
    def edit(m):
        del m["spec"]["authOptions"]

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "containers[0]", "token")


def test_kuberay_numeric_ray_start_param(tmp_path):
    def edit(m):
        m["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "rayStartParams.num-cpus", "string")


def test_kuberay_autoscaling_off_with_a_range(tmp_path):
    def edit(m):
        m["spec"]["enableInTreeAutoscaling"] = False

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "enableInTreeAutoscaling",
                    "never scales")


def test_kuberay_old_api_version(tmp_path):
    def edit(m):
        m["apiVersion"] = "ray.io/v1alpha1"

    assert_rejected(broken(tmp_path, RAYCLUSTER, edit), "apiVersion", "ray.io/v1")


def test_rayjob_entrypoint_required(tmp_path):
    def edit(m):
        m["spec"]["entrypoint"] = ""

    assert_rejected(broken(tmp_path, RAYJOB, edit), "spec.entrypoint", "missing")


def test_rayjob_runs_the_search_on_shared_storage():
    spec = yaml.safe_load(RAYJOB.read_text())["spec"]
    assert "python tune/search.py" in spec["entrypoint"]
    assert "--storage-path s3://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_embedded_serve_config_is_checked(tmp_path):
    def edit(m):
        serve = yaml.safe_load(m["spec"]["serveConfigV2"])
        serve["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = 9
        m["spec"]["serveConfigV2"] = yaml.safe_dump(serve)

    assert_rejected(broken(tmp_path, RAYSERVICE, edit),
                    "spec.serveConfigV2.applications[0].deployments[0]", "above max_replicas")


def test_public_loadbalancer_service_manifest(tmp_path):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
           "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    assert_rejected(broken(tmp_path, svc, lambda m: None), "spec.ports[0]", "8265")


# --------------------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycls", "validate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_validates_shipped_configs():
    out = run_cli()
    assert out.returncode == 0, out.stderr
    assert "ok: " in out.stdout and "config.yaml" in out.stdout


def test_cli_reports_broken_file_with_exit_1(tmp_path):
    doc = yaml.safe_load(CLUSTER.read_text())
    doc["head_node_type"] = "nope"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = run_cli(str(path))
    assert out.returncode == 1
    assert f"{path}: head_node_type" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_missing_file_and_garbage(tmp_path):
    out = run_cli(str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and out.stderr.startswith("error: paths=")
    assert "no such file or folder" in out.stderr
    junk = tmp_path / "junk.yaml"
    junk.write_text("a: [1, 2\n")
    out = run_cli(str(junk))
    assert out.returncode == 1 and "not valid YAML" in out.stderr
    assert "Traceback" not in out.stderr


def test_dockerfile_uses_the_pinned_ray_image():
    """The KubeRay image is built FROM the same Ray version the manifests and pyproject pin."""
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray_version_pin()}."), base


def test_cli_refuses_the_bad_serve_args_offline(tmp_path):
    """The issue's config: every value `serve run` refuses is refused here, in seconds, named."""
    doc = yaml.safe_load(SERVE_FILE.read_text())
    raycls_args(max_batch_size="lots", top_k=0, split="maybe", model="/nope", num_gpus=1)(doc)
    doc["http_options"]["host"] = "0.0.0.0"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = run_cli(str(path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    for field in ("max_batch_size", "top_k", "split", "model"):
        assert f"error: {path}: applications[0].args.{field}: " in out.stderr, field
    assert "warning: " in out.stderr and "0.0.0.0" in out.stderr and "num_gpus" in out.stderr


def test_cli_validates_a_folder_recursively(tmp_path):
    folder = tmp_path / "configs"
    (folder / "serve").mkdir(parents=True)
    (folder / ".github").mkdir()
    (folder / ".github" / "ci.yaml").write_text("on: push\n")  # hidden: never read
    (folder / "notes.yml").write_text("just: data\n")  # not a config: skipped, named
    good = yaml.safe_load(SERVE_FILE.read_text())
    raycls_args(model="models/digits")(good)
    (folder / "serve" / "ok.yaml").write_text(yaml.safe_dump(good))
    out = run_cli(str(folder))
    assert out.returncode == 0, out.stderr
    assert f"ok: {folder / 'serve' / 'ok.yaml'}" in out.stdout
    assert f"skipped: {folder / 'notes.yml'}" in out.stdout and "ci.yaml" not in out.stdout
    raycls_args(top_k=0)(good)
    (folder / "serve" / "bad.yml").write_text(yaml.safe_dump(good))
    out = run_cli(str(folder))
    assert out.returncode == 1 and "bad.yml: applications[0].args.top_k" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli(str(empty))
    assert out.returncode == 2 and out.stderr.startswith(f"error: paths={empty}: ")
