"""`raycls runs`: the runs and searches under a storage path, their state, and what to do next.

Reads only what `raycls train` and `raycls search` write (no torch, no Ray, so it answers at
once):

- a training run `<storage>/<name>/`: `raycls_config.json` (written first: a readable copy of the
  config), `checkpoint_*/meta.json` (one per kept epoch, each with the config it trained with),
  `error.json` (a run that stopped on an error), `result.json` (written last: the run finished);
- a search `<storage>/<name>/`: `raycls_search.json` (its settings), `trial-*/checkpoint_*/
  meta.json` (the trials' epochs), `summary.json` (written last: the search finished);
- both: `driver.pid`, the marker written here by `mark_running` while the driver lives. A folder
  without a finished/failed file is *running* while that pid is alive (and is the same process:
  its start time is recorded too, so a reused pid does not count), else *interrupted*.

One job in about 400 lines: reading a folder, its table row and its `show` view are one record
(state, epochs, accuracy, next step) read and printed; split, each field would live in two files.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

# `raycls train` and `raycls search` both default to ./runs (TrainConfig.storage_path and
# SearchSettings.storage_path; tests/test_runs.py checks they still agree). The file names below
# are the ones train.py and search.py write: they take them from here.
DEFAULT_STORAGE = "./runs"
PID_FILE = "driver.pid"
TRAIN_CONFIG = "raycls_config.json"
TRAIN_RESULT = "result.json"
TRAIN_ERROR = "error.json"  # raycls.run_error.RUN_ERROR_FILE
SEARCH_SETTINGS = "raycls_search.json"  # raycls.search.SETTINGS_FILE
SEARCH_SUMMARY = "summary.json"  # raycls.search.SUMMARY_FILE
MODELS_DIR = "models"  # `raycls export`'s default output is models/<run name>


class RunsError(RuntimeError):
    """The storage path or a run name is wrong; the message says what to use instead."""


# ----------------------------------------------------------------------------- running marker


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in () may hold spaces
    except (OSError, IndexError):
        return ""


def mark_running(folder: Path) -> None:
    """Write `folder/driver.pid` for this process and remove it when the process exits.

    Called by the train and search drivers once their folder exists. A driver killed outright
    leaves the file behind, which is why readers also check that the pid is alive."""
    path = Path(folder) / PID_FILE
    me = {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname()}
    path.write_text(json.dumps(me))

    def remove() -> None:
        try:  # only our own marker: a later driver (a resume) may have replaced it
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass

    atexit.register(remove)


def driver_alive(folder: Path) -> dict[str, Any] | None:
    """The marker of a live driver of this folder, else None."""
    try:
        marker = json.loads((folder / PID_FILE).read_text())
        pid = int(marker["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if marker.get("host") and marker["host"] != socket.gethostname():
        return marker  # another machine's driver (shared storage): it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    if marker.get("start") and _start_time(pid) not in ("", marker["start"]):
        return None  # the pid was reused by a later process
    return marker


# ----------------------------------------------------------------------------- reading folders


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_train_result(folder: Path) -> dict[str, Any] | None:
    """A finished `raycls train` run's result.json in `folder`: a dict naming its best
    checkpoint. None when there is none, it is unreadable, or it is another program's (a search
    trial's folder holds Tune's result.json, one JSON line per epoch)."""
    result = _json(folder / TRAIN_RESULT)
    return result if isinstance(result, dict) and "checkpoint" in result else None


def _metas(folder: Path, pattern: str) -> list[dict[str, Any]]:
    """The checkpoints' meta.json (only complete checkpoints have one), oldest epoch first."""
    out = []
    for p in folder.glob(pattern):
        meta = _json(p)
        if isinstance(meta, dict) and isinstance(meta.get("epoch"), int):
            out.append({**meta, "_dir": str(p.parent)})
    return sorted(out, key=lambda m: m["epoch"])


def _mtime(paths: list[Path]) -> float:
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    return max(times) if times else 0.0


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _bundle_for(name: str) -> Path | None:
    bundle = Path(MODELS_DIR) / name
    return bundle if (bundle / "bundle.json").is_file() else None


def read_train_run(folder: Path, storage: str) -> dict[str, Any]:
    name = folder.name
    result = _json(folder / TRAIN_RESULT)
    error = _json(folder / TRAIN_ERROR)
    metas = _metas(folder, "checkpoint_*/meta.json")
    # the config the run trains with is its newest checkpoint's (what --resume takes); the
    # folder's raycls_config.json is a readable copy, the only one before the first checkpoint
    config = (metas[-1].get("config") if metas else None) or _json(folder / TRAIN_CONFIG) or {}
    marker = driver_alive(folder)
    resume = f"raycls train --resume {name} --storage-path {storage}"  # as train.py prints it
    entry: dict[str, Any] = {
        "name": name, "kind": "train", "path": str(folder),
        "epochs_planned": config.get("num_epochs"),
        "checkpoints": [m["_dir"] for m in metas],
        "history": metas[-1].get("history", []) if metas else [],
        "config": config, "error": None, "bundle": None, "test_acc": None,
        "checkpoint": None, "pid": marker["pid"] if marker else None,
    }
    if isinstance(result, dict):
        bundle = _bundle_for(name)
        entry.update(state="finished", epochs_done=result.get("epochs"),
                     val_acc=result.get("val_acc"), test_acc=result.get("test_acc"),
                     checkpoint=result.get("checkpoint"), history=result.get("history", []),
                     config=result.get("config", config),
                     bundle=str(bundle) if bundle else None)
        # export's default output is models/<name>; once it is there, serve it
        entry["next"] = (f"serve run raycls.deploy model={bundle}" if bundle
                         else f"raycls export {folder}")
    else:
        # the best kept checkpoint so far: what `raycls export` of it would take
        best = max(metas, key=lambda m: (m.get("metrics") or {}).get("val_acc", 0.0), default={})
        entry.update(epochs_done=metas[-1]["epoch"] + 1 if metas else 0,
                     val_acc=max((m.get("best_val_acc", 0.0) for m in metas), default=None),
                     checkpoint=best.get("_dir"))
        # an error written after the live driver started is its own (it is about to exit, or a
        # program that called run_training goes on); an older one is from the attempt before
        if isinstance(error, dict) and error and (not marker or _mtime([folder / TRAIN_ERROR])
                                                  >= _mtime([folder / PID_FILE])):
            entry.update(state="failed", error=next(iter(error.values())), next=resume,
                         pid=None)
        elif marker:
            entry.update(state="running", next=None)
        else:
            entry.update(state="interrupted", next=resume)
    entry["updated"] = _mtime([folder, folder / TRAIN_RESULT, folder / TRAIN_ERROR]
                              + [Path(m["_dir"]) / "meta.json" for m in metas])
    return entry


def read_search(folder: Path, storage: str) -> dict[str, Any]:
    name = folder.name
    settings = _json(folder / SEARCH_SETTINGS) or {}
    summary = _json(folder / SEARCH_SUMMARY)
    marker = driver_alive(folder)
    trials = []
    for trial in sorted(folder.glob("trial-*")):
        metas = _metas(trial, "checkpoint_*/meta.json")
        trials.append({
            "trial": trial.name.removeprefix("trial-"), "path": str(trial),
            "epochs": metas[-1]["epoch"] + 1 if metas else 0,
            "val_acc": max((m.get("best_val_acc", 0.0) for m in metas), default=None),
        })
    samples, max_epochs = settings.get("num_samples"), settings.get("max_epochs")
    resume = f"raycls search --resume --name {name} --storage-path {storage}"
    entry: dict[str, Any] = {
        "name": name, "kind": "search", "path": str(folder), "trials": trials,
        "trials_planned": samples, "settings": settings,
        "epochs_done": sum(t["epochs"] for t in trials),
        # an upper bound: ASHA and early stopping end trials sooner
        "epochs_planned": samples * max_epochs if samples and max_epochs else None,
        "val_acc": max((t["val_acc"] for t in trials if t["val_acc"] is not None), default=None),
        "test_acc": None, "checkpoint": None, "bundle": None, "error": None,
        "pid": marker["pid"] if marker else None,
    }
    if isinstance(summary, dict):
        best = summary.get("best") or {}
        entry.update(val_acc=best.get("val_acc", entry["val_acc"]), test_acc=best.get("test_acc"),
                     checkpoint=best.get("checkpoint"), bundle=summary.get("bundle"),
                     summary=str(folder / SEARCH_SUMMARY))
        if summary.get("errors") or not best:
            errors = summary.get("errors") or []
            entry.update(state="failed", next=resume,
                         error=f"{len(errors)} trial(s) failed" if errors
                         else "no trial produced a checkpoint")
        else:
            entry["state"] = "finished"
            bundle = entry["bundle"]
            out = Path(settings.get("models_dir", MODELS_DIR)) / name
            entry["next"] = (f"serve run raycls.deploy model={bundle}"  # as search.py prints it
                             if bundle and Path(bundle, "bundle.json").is_file()
                             else f"raycls export {best['checkpoint']} --output {out}")
    elif marker:
        entry.update(state="running", next=None)
    else:
        entry.update(state="interrupted", next=resume)
    entry["updated"] = _mtime([folder, folder / SEARCH_SUMMARY]
                              + [Path(t["path"]) for t in trials])
    return entry


def storage_dir(storage: str) -> Path:
    if "://" in storage:
        raise RunsError(f"--storage-path {storage}: only local (or mounted NFS) paths can be "
                        "listed; mount the bucket and pass its local path")
    path = Path(storage).expanduser()
    if not path.is_dir():
        raise RunsError(f"--storage-path {storage}: no such folder ({path.resolve()}); pass the "
                        "--storage-path the runs were started with (default: "
                        f"{DEFAULT_STORAGE})")
    return path


def list_runs(storage: str) -> list[dict[str, Any]]:
    """Every run and search directly under `storage`, newest activity first."""
    root = storage_dir(storage).resolve()  # absolute paths in the commands it prints
    shown = storage if os.path.isabs(storage) else os.path.abspath(storage)
    entries = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        if (folder / SEARCH_SETTINGS).is_file():
            entries.append(read_search(folder, shown))
        elif (folder / TRAIN_CONFIG).is_file() or any(folder.glob("checkpoint_*/meta.json")):
            entries.append(read_train_run(folder, shown))
    now = time.time()
    for e in entries:
        e["age_s"] = now - e["updated"] if e["updated"] else None
    return sorted(entries, key=lambda e: -e["updated"])


# ----------------------------------------------------------------------------- printing


def _acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _epochs(e: dict[str, Any]) -> str:
    planned = e.get("epochs_planned")
    return f"{e.get('epochs_done') or 0}/{planned if planned else '?'}"


def _reason(e: dict[str, Any]) -> str:
    """One line of an error: a worker's traceback ends with the exception's own line."""
    lines = [line.strip() for line in str(e["error"]).splitlines() if line.strip()]
    return lines[-1] if lines else "?"


def _next(e: dict[str, Any]) -> str:
    if e["state"] == "running":
        return f"(running, pid {e['pid']})"
    return e["next"] or "-"


def print_table(entries: list[dict[str, Any]]) -> None:
    header = ["name", "kind", "state", "epochs", "val_acc", "test_acc", "age", "next"]
    rows = [[e["name"], e["kind"], e["state"], _epochs(e), _acc(e["val_acc"]),
             _acc(e["test_acc"]), format_age(e["age_s"]) if e["age_s"] is not None else "-",
             _next(e)] for e in entries]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    for e in entries:
        if e["error"]:
            print(f"{e['name']}: {e['state']}: {_reason(e)}")


def print_show(e: dict[str, Any]) -> None:
    print(f"{e['kind']} {e['name']}: {e['state']}, epochs {_epochs(e)}, best val_acc "
          f"{_acc(e['val_acc'])}, test_acc {_acc(e['test_acc'])}")
    if e["error"]:
        where = " (in full: error.json there)" if e["kind"] == "train" else ""
        print(f"error: {_reason(e)}{where}")
    if e["kind"] == "train":
        c = e["config"]
        keys = ["dataset", "model", "num_workers", "num_epochs", "batch_size", "optimizer", "lr",
                "aug_policy", "seed"]
        print("config: " + ", ".join(f"{k}={c[k]}" for k in keys if k in c))
        if e["history"]:
            print("epoch  train_loss  val_loss  val_acc  images/s  seconds")
            for h in e["history"]:
                print(f"{h.get('epoch', '?'):>5}  {h.get('train_loss', 0):>10.4f}  "
                      f"{h.get('val_loss', 0):>8.4f}  {h.get('val_acc', 0):>7.4f}  "
                      f"{h.get('images_per_s', 0):>8.0f}  {h.get('epoch_time_s', 0):>7.1f}")
    else:
        s = e["settings"]
        print(f"settings: scheduler={s.get('scheduler')}, searcher={s.get('searcher')}, "
              f"num_samples={s.get('num_samples')}, max_epochs={s.get('max_epochs')}, "
              f"searching {', '.join(s.get('space', {})) or 'nothing'}")
        if e["trials"]:
            print("trial  epochs  val_acc")
            for t in e["trials"]:
                print(f"{t['trial']}  {t['epochs']:>6}  {_acc(t['val_acc'])}")
    print(f"best checkpoint: {e['checkpoint'] or '-'}")
    print(f"bundle: {e['bundle'] or '-'}")
    print(f"files: {e['path']}")
    files = (["result.json", "curves.png", "ray.log", "error.json", "raycls_config.json"]
             if e["kind"] == "train" else
             ["summary.json", "results.csv", "val_acc.png", "best_config.json", SEARCH_SETTINGS])
    for f in files:
        if (Path(e["path"]) / f).exists():
            print(f"  {f}")
    for ck in e.get("checkpoints", []):
        print(f"  {Path(ck).name}/")
    if e["state"] == "running":
        print(f"running: driver pid {e['pid']}")
    elif e["next"]:
        print(f"next: {e['next']}")


def _public(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k != "updated"}


# ----------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the training runs and searches under a storage path: state (running, "
        "interrupted, finished, failed), epochs, best val and test accuracy, age, and the "
        "command to resume, export or serve each. `raycls runs show NAME` prints one of them."
    )
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list",
                        help="list (default) or show NAME")
    parser.add_argument("run", nargs="?", metavar="NAME", help="with show: the run or search")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE,
                        help="where the runs were written: --storage-path of raycls train and "
                             f"raycls search (default: {DEFAULT_STORAGE!r})")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output: a JSON list (list) or object (show)")


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "show" and not args.run:
            raise RunsError("show needs a name: `raycls runs show NAME` (`raycls runs` lists them)")
        if args.action == "list" and args.run:
            raise RunsError(f"unexpected {args.run!r}; did you mean `raycls runs show {args.run}`?")
        entries = list_runs(args.storage_path)
        if args.action == "show":
            found = [e for e in entries if e["name"] == args.run]
            if not found:
                known = ", ".join(sorted(e["name"] for e in entries)) or "none"
                raise RunsError(f"no run or search {args.run!r} in {args.storage_path} "
                                f"(known: {known})")
    except RunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        output(args, found[0] if args.action == "show" else None, entries)
    except BrokenPipeError:  # `raycls runs | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def output(args: argparse.Namespace, one: dict[str, Any] | None,
           entries: list[dict[str, Any]]) -> None:
    if one is not None:
        if args.json:
            print(json.dumps(_public(one), indent=2, default=str))
        else:
            print_show(one)
        return
    if args.json:
        print(json.dumps([_public(e) for e in entries], indent=2, default=str))
    elif not entries:
        print(f"no runs or searches in {args.storage_path} yet (`raycls train` writes them there)")
    else:
        print_table(entries)
