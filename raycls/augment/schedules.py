"""PBA schedules: which policy applies from which epoch, their JSON files, and the PBT
explore step that perturbs a policy (Ho et al. 2019)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from raycls.augment.ops import LEVELS, PBA_OPS
from raycls.augment.policies import PBAPolicy, Policy, RandAugment, canonical_policy, parse_policy

SCHEDULE_FORMAT = "raycls-aug-schedule"


def _check_schedule(schedule: object, where: str) -> list[tuple[int, str]]:
    if not isinstance(schedule, list) or not schedule:
        raise ValueError(f"{where}: a schedule is a non-empty list of [start_epoch, policy]")
    out: list[tuple[int, str]] = []
    for entry in schedule:
        ok = isinstance(entry, list | tuple) and len(entry) == 2
        if not ok or not isinstance(entry[0], int) or not isinstance(entry[1], str):
            raise ValueError(f"{where}: entry {entry!r} is not [start_epoch (int), policy (str)]")
        if out and entry[0] <= out[-1][0]:
            raise ValueError(
                f"{where}: start epochs must strictly increase, got {entry[0]} after {out[-1][0]}"
            )
        # "default" stays symbolic: it resolves per dataset when the worker builds it
        is_default = entry[1].strip().lower() == "default"
        policy = "default" if is_default else canonical_policy(entry[1])
        out.append((entry[0], policy))
    if out[0][0] != 0:
        raise ValueError(f"{where}: the first entry must start at epoch 0, got {out[0][0]}")
    return out


def save_policy_schedule(path: str, schedule: list[tuple[int, str]]) -> None:
    """Write a schedule [(start_epoch, policy), ...] as JSON (the format a search exports)."""
    checked = _check_schedule([list(e) for e in schedule], "save_policy_schedule")
    doc = {"format": SCHEDULE_FORMAT, "version": 1, "schedule": [list(e) for e in checked]}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_policy_schedule(path: str) -> list[tuple[int, str]]:
    """Read a schedule file: {"format": ..., "schedule": [[epoch, policy], ...]} or a bare list."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"policy schedule {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"policy schedule {path}: not valid JSON ({e})") from None
    schedule = doc.get("schedule") if isinstance(doc, dict) else doc
    return _check_schedule(schedule, f"policy schedule {path}")


def policy_for_epoch(schedule: list[tuple[int, str]], epoch: int) -> str:
    """The policy in force at `epoch`: the last entry whose start is <= epoch."""
    if not schedule:
        raise ValueError("empty policy schedule")
    current = schedule[0][1]
    for start, policy in schedule:
        if start <= epoch:
            current = policy
    return current


def _perturb(value: int, high: int, rng: random.Random, low: int = 0) -> int:
    # PBA's explore (Ho et al. 2019): resample uniformly with probability 0.2, else move up or
    # down by 0-3 steps, clipped to the range
    if rng.random() < 0.2:
        return rng.randint(low, high)
    step = rng.choice((0, 1, 2, 3)) * (1 if rng.random() < 0.5 else -1)
    return min(max(value + step, low), high)


def explore_policy(policy: str, rng: random.Random) -> str:
    """PBT explore step. PBA policies: every op's probability (in tenths) and level moved as PBA
    does. RandAugment: num_ops and magnitude (steps of 3 on 0-30). Other policies have nothing
    to search and come back unchanged (canonicalised); crop/flip/cutout are kept."""
    if policy.strip().lower() == "default":
        return "default"
    spec = parse_policy(policy)
    core = spec.core
    if isinstance(core, PBAPolicy):
        table = core.table()
        params = []
        for name in PBA_OPS:
            p, level = table[name]
            tenths = _perturb(round(p * 10), 10, rng)
            params.append((name, tenths / 10, _perturb(level, LEVELS, rng)))
        core = PBAPolicy(tuple(e for e in params if (e[1], e[2]) != (0.0, 0)))
    elif isinstance(core, RandAugment):
        n = _perturb(core.num_ops, 4, rng, low=1)
        core = RandAugment(n, 3 * _perturb(round(core.magnitude / 3), 10, rng))
    return str(Policy(crop=spec.crop, flip=spec.flip, core=core, cutout=spec.cutout))
