"""What every `raycls validate` check shares: the problem record, the ports that must not face
the internet, the Ray version pin, key-typo suggestions."""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PUBLIC_CIDRS = ("0.0.0.0/0", "::/0")
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Problem:
    file: str
    key: str  # dotted path inside the file, e.g. available_node_types.gpu_worker.min_workers
    message: str
    fix: str
    level: str = "error"  # "error" fails validation; "warning" is printed only

    def __str__(self) -> str:
        return f"{self.level}: {self.file}: {self.key}: {self.message} (fix: {self.fix})"


@dataclass(frozen=True)
class Port:
    """A port that must never face 0.0.0.0/0, and precisely what reaching it gives."""

    name: str
    exposure: str  # what anyone who reaches the port can do
    fix: str


# The first three give code execution on the cluster; Serve's port gives the model, not the
# cluster (it runs no submitted code), but an open model is still free compute and a DoS target.
SENSITIVE_PORTS = {
    8265: Port("dashboard/Jobs API", "can submit jobs, i.e. run any code on the cluster, and "
               "read its logs", "remove the rule and use `ray dashboard cluster/config.yaml` "
               "(SSH tunnel), or restrict CidrIp to your own network"),
    6379: Port("GCS", "can join or drive the cluster, i.e. run code on it", "remove the rule: "
               "only the cluster's own nodes talk to the GCS (keep it inside the VPC)"),
    10001: Port("Ray Client", "can connect a driver (`ray.init(\"ray://...\")`), i.e. run code "
                "on the cluster", "remove the rule and tunnel over SSH, or restrict CidrIp to "
                "your own network"),
    8000: Port("Serve HTTP", "can call the model: classify images, read its metadata and send "
               "large request bodies that cost CPU and memory (without API keys, nothing stops "
               "them); it does not give code execution on the cluster",
               "restrict CidrIp to the clients' network or put an authenticated gateway (TLS) "
               "in front, and set args.api_key_file"),
}


def ray_version_pin() -> str:
    """The `major.minor` Ray version this project pins (pyproject.toml), e.g. "2.60"."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        m = re.search(r"ray\[[^\]]*\]==(\d+\.\d+)", pyproject.read_text())
        if m:
            return m.group(1)
    import ray  # fallback for an installed wheel without the source tree

    return ".".join(ray.__version__.split(".")[:2])


def suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(known))}"


def typo_keys(
    mapping: dict, known: typing.Iterable[str], file: str, prefix: str
) -> list[Problem]:
    """Unknown keys that look like misspellings of known ones (for open-ended schemas, where an
    unknown key may be legitimate, only near-misses are reported)."""
    known = set(known)
    problems = []
    for key in mapping:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            problems.append(
                Problem(file, join_key(prefix, key), "unknown key", f"did you mean {close[0]!r}?")
            )
    return problems


def join_key(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def image_problems(image: str, file: str, key: str, pin: str) -> list[Problem]:
    """No `:latest` or untagged images (they drift away from the pinned Ray version)."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if digest:
        return []
    if not tag or tag == "latest" or tag.startswith("latest-"):
        return [
            Problem(
                file, key, f"image {image!r} is unpinned ({tag or 'no tag'})",
                f"use a versioned tag, e.g. rayproject/ray:{pin}.0-py311-gpu",
            )
        ]
    if name.startswith("rayproject/ray") and not tag.startswith(pin + "."):
        return [
            Problem(
                file, key, f"image {image!r} is not Ray {pin} (the pyproject.toml pin)",
                f"use rayproject/ray:{pin}.0-py311[-gpu]",
            )
        ]
    return []
