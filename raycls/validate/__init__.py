"""`raycls validate`: offline checks of the configs that launch raycls on a cluster.

`ray up` has no dry run and Serve silently drops misspelled keys, so a typo costs a cluster start
(minutes, money) or ships a Serve setting that never took effect. This module catches those
mistakes on a laptop, with no cloud credentials and no running Ray:

- Ray cluster YAML (`ray up`): Ray's own `prepare_config` + `validate_config` (the JSON schema and
  the `head_node_type` / `min_workers` rules), plus per-node-type `min_workers <= max_workers`,
  which Ray does not check.
- Serve config files (`serve deploy`): Serve's pydantic schemas, unknown keys at every level with
  a "did you mean", and autoscaling bounds. For raycls's own app, `args` go through
  `raycls.serving.parse_args`, the parser `serve run` / `serve deploy` use, so a value they refuse
  is refused here; absolute bundle and key paths must exist on this machine (relative ones
  resolve on the cluster and get a note; `--paths-on-cluster` skips the check); `args.num_gpus`
  must agree with the Classifier's `ray_actor_options` (which replace the builder's).
- KubeRay manifests (`RayCluster`, `RayJob`, `RayService`): the fields that matter (kinds, Ray
  version against the pin, worker group bounds, the RayJob entrypoint, the embedded Serve config,
  whose paths are the pods' and are not checked).
- A security lint on all of them: no public ingress to the dashboard/Jobs API (8265), GCS (6379)
  or Ray Client (10001), which each give code execution on the cluster, nor to Serve (8000),
  which gives the model (free classification, large bodies) to anyone; a raycls app on a
  non-local host needs API keys; token authentication on; no `:latest` images.

Every problem names the file, the key and the fix. Errors fail (exit 1); warnings and notes are
printed only. A folder argument is searched recursively for .yaml/.yml files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from raycls.validate.cluster import validate_cluster_config
from raycls.validate.common import REPO_ROOT, Problem, ray_version_pin
from raycls.validate.kuberay import validate_kuberay_manifest
from raycls.validate.serve import validate_serve_config

__all__ = ["Problem", "ray_version_pin", "shipped_configs", "validate_file",
           "validate_cluster_config", "validate_kuberay_manifest", "validate_serve_config"]

def config_kind(doc: Any) -> str:
    """"cluster", "serve", "kuberay" (any Kubernetes object) or "" when unrecognised."""
    if not isinstance(doc, dict):
        return ""
    if "apiVersion" in doc and "kind" in doc:
        return "kuberay"
    if "provider" in doc or "available_node_types" in doc or "head_node_type" in doc:
        return "cluster"
    if "applications" in doc or "import_path" in doc:
        return "serve"
    return ""


def validate_file(path: str | Path, check_paths: bool = True) -> list[Problem]:
    """Every problem found in one YAML file (several documents allowed for Kubernetes);
    `check_paths=False` leaves the Serve args' absolute paths unchecked (--paths-on-cluster)."""
    path = Path(path)
    file = str(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        return [Problem(file, "(file)", f"cannot read: {e.strerror}", "check the path")]
    except yaml.YAMLError as e:
        return [Problem(file, "(file)", f"not valid YAML: {e}", "fix the YAML syntax")]
    if not docs:
        return [Problem(file, "(file)", "empty file", "add the configuration")]
    problems = []
    for i, doc in enumerate(docs):
        where = file if len(docs) == 1 else f"{file}[doc {i}]"
        kind = config_kind(doc)
        if kind == "cluster":
            problems += validate_cluster_config(doc, where)
        elif kind == "serve":
            problems += validate_serve_config(doc, where, check_paths=check_paths)
        elif kind == "kuberay":
            problems += validate_kuberay_manifest(doc, where)
        else:
            problems.append(Problem(where, "(top level)", "not a Ray cluster, Serve or KubeRay "
                                    "config", "a cluster YAML has `provider`, a Serve config "
                                    "`applications`, a manifest `apiVersion` + `kind`"))
    return problems


def shipped_configs(root: Path = REPO_ROOT) -> list[Path]:
    """The project's own config files: what `raycls validate` checks with no arguments."""
    found = [root / "cluster" / "config.yaml", root / "cluster" / "local.yaml"]
    found += sorted((root / "cluster" / "kuberay").glob("*.yaml"))
    found += sorted((root / "serve").glob("*config*.yaml"))
    return [p for p in found if p.is_file()]


YAML_SUFFIXES = (".yaml", ".yml")


def configs_in(folder: Path) -> list[Path]:
    """Every .yaml/.yml file under `folder`, recursively, sorted; hidden folders and files
    (.git, .github, ...) are skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in YAML_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def is_config_file(path: Path) -> bool:
    """Whether any document of a YAML file looks like a cluster, Serve or Kubernetes config
    (files in a folder that are not, like CI workflows, are skipped rather than failed)."""
    try:
        return any(config_kind(d) for d in yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError):
        return True  # unreadable or broken YAML: validate_file reports it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check Ray cluster (`ray up`), Serve (`serve deploy`) and KubeRay configs offline: "
        "schemas, misspelled keys, raycls.deploy arguments (parsed exactly as `serve run` "
        "parses them), bundle paths, GPU counts and a security lint. Exit status: 0 when no "
        "file has errors (warnings and notes are printed only), 1 when one has, 2 when a path "
        "does not exist or a folder holds no config."
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="YAML files, or folders: every .yaml/.yml file under a folder, recursively "
             "(hidden folders skipped; files that are no Ray cluster, Serve or KubeRay config "
             "are listed as skipped). Default: this project's cluster/*.yaml, "
             "cluster/kuberay/*.yaml and serve/*config*.yaml",
    )  # fmt: skip
    parser.add_argument(
        "--paths-on-cluster", action="store_true",
        help="do not check the absolute bundle and key-file paths in Serve `args` on this "
             "machine (they exist only on the cluster the config is deployed to). (default: "
             "off: a missing absolute path is an error; relative paths are never checked, they "
             "resolve on the cluster, nor the paths of KubeRay's embedded Serve configs, which "
             "are in the pods)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    given = [Path(p) for p in args.paths]
    missing = [str(p) for p in given if not p.exists()]
    if missing:
        print(f"error: paths={', '.join(missing)}: no such file or folder; give YAML files or "
              "folders of them", file=sys.stderr)
        return 2
    paths: list[Path] = []
    for p in given or shipped_configs():
        if not p.is_dir():
            paths.append(p)
            continue
        found = configs_in(p)
        skipped = [f for f in found if not is_config_file(f)]
        for f in skipped:
            print(f"skipped: {f} (not a Ray cluster, Serve or KubeRay config)")
        if len(found) == len(skipped):
            print(f"error: paths={p}: no Ray cluster, Serve or KubeRay config "
                  f"({'/'.join(YAML_SUFFIXES)}) under this folder", file=sys.stderr)
            return 2
        paths += [f for f in found if f not in skipped]
    failed = False
    for path in paths:
        problems = validate_file(path, check_paths=not args.paths_on_cluster)
        for problem in problems:
            print(problem, file=sys.stderr)
        errors = [p for p in problems if p.level == "error"]
        failed |= bool(errors)
        print(f"{'FAIL' if errors else 'ok'}: {path}" + (f" ({len(errors)} errors)"
                                                         if errors else ""))
    return 1 if failed else 0
