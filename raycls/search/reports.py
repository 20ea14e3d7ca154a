"""What a finished search leaves: the ranked table, results.csv, the val_acc plot, the best
trial's config and augmentation schedule, the line that retrains it, and the winner's bundle.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from raycls.checkpoints import rank_key  # the one order: val_acc, then lower val_loss
from raycls.config import TrainConfig
from raycls.search.settings import (
    METRIC,
    SUMMARY_FILE,
    SearchSettings,
    resume_command,
    summarize_config,
)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


UNRANKED = (float("-inf"), float("-inf"))  # a trial that never reported val_acc ranks last


def trial_rows(grid: Any, keys: list[str], max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial, best first (rank_key); trials without a val_acc last.

    Not ResultGrid.get_dataframe: it leaves out the trials that never reported (an errored one
    is a row of the report too) and has none of the columns below but the config."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe  # ray: every epoch the trial reported
        has = df is not None and METRIC in df.columns and df[METRIC].notna().any()
        # from the folder: result.metrics holds the trial id only once the trial reported
        trial_id = Path(result.path).name.removeprefix("trial-")
        row: dict[str, Any] = {"trial_id": trial_id, "result": result, "val_acc": None,
                               "val_loss": None, "best_epoch": None, "epochs": 0, "curve": []}
        if has:
            df = df[df[METRIC].notna()]
            best = max(df.to_dict("records"), key=rank_key)
            row.update(val_acc=float(best[METRIC]), val_loss=float(best["val_loss"]),
                       best_epoch=int(best["epoch"]), epochs=int(df["epoch"].max()),
                       curve=list(zip(df["epoch"].astype(int), df[METRIC].astype(float),
                                      strict=True)))
        if result.error is not None:
            row["status"] = "ERROR"
        elif row["epochs"] >= max_epochs:
            row["status"] = "done"
        else:
            row["status"] = "stopped early" if has else "no result"
        row["final_aug_policy"] = (result.metrics or {}).get("aug_policy", "")
        row["config"] = {k: (result.config or {}).get(k) for k in keys}
        rows.append(row)
    # reverse keeps the order of equal keys (the trials that never reported stay in grid order)
    rows.sort(key=lambda r: UNRANKED if r["val_acc"] is None else rank_key(r), reverse=True)
    return rows


def write_csv(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial_id", "status", "val_acc", "val_loss", "best_epoch", "epochs",
                    *keys, "final_aug_policy", "error"])
        for i, r in enumerate(rows, 1):
            err = str(r["result"].error).splitlines()[0][:200] if r["result"].error else ""
            w.writerow([i, r["trial_id"], r["status"], r["val_acc"], r["val_loss"],
                        r["best_epoch"], r["epochs"], *[r["config"][k] for k in keys],
                        r["final_aug_policy"], err])


def plot_trials(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        if r["curve"]:
            epochs, accs = zip(*r["curve"], strict=True)
            ax.plot(epochs, accs, marker=".", lw=2.5 if i == 0 else 1,
                    label=f"{r['trial_id']} ({r['val_acc']:.4f})" + (" best" if i == 0 else ""))
    ax.set_xlabel("epoch"), ax.set_ylabel("val_acc"), ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def schedule_from_history(history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """[(start_epoch (0-based), policy), ...]: the policies a trial trained with, epoch by epoch,
    including the epochs it inherited through PBT clones (the checkpoint carries that history)."""
    schedule: list[tuple[int, str]] = []
    for h in sorted(history, key=lambda h: h["epoch"]):
        if not schedule or schedule[-1][1] != h["aug_policy"]:
            schedule.append((int(h["epoch"]) - 1, h["aug_policy"]))
    return schedule


def train_command(config: dict[str, Any], policy_file: Path | None) -> str:
    """The `raycls train` line that retrains the best config (non-default fields only)."""
    defaults = TrainConfig().to_dict()
    skip = {"name", "storage_path", "resume_from", "extra", "aug_policy_file"}
    parts = ["raycls train"]
    for k, v in config.items():
        if k in skip or v == defaults.get(k) or (policy_file and k == "aug_policy"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}")
        else:
            parts.append(f"{flag} {json.dumps(v) if isinstance(v, str) and ' ' in v else v}")
    if policy_file:
        parts.append(f"--policy-file {policy_file}")
    return " ".join(parts)


def best_checkpoint(result: Any) -> Any:
    """The trial's best kept checkpoint by rank_key (not Result.get_best_checkpoint: ties),
    else its newest one."""
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
    if not kept:
        return result.checkpoint
    return max(kept, key=lambda cm: rank_key(cm[1]))[0]


def report(settings: SearchSettings, exp: Path, grid: Any, data: tuple[Any, Any],
           keys: list[str], elapsed: float) -> dict[str, Any]:
    """The ranked table, results.csv, the plot, the best trial's files and its export.
    `data` is prepare_data's (RunData, Dataset or None), for the best trial's test accuracy."""
    from raycls import tracking
    from raycls.augment import save_policy_schedule
    from raycls.checkpoints import read_checkpoint_meta
    from raycls.ingest import test_batches
    from raycls.trainer import test_accuracy

    rows = trial_rows(grid, keys, settings.max_epochs)
    header = ["rank", "trial", "status", "val_acc", "best_epoch", "epochs", "config"]
    body = [[i, r["trial_id"], r["status"], "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}",
             r["best_epoch"] or "-", r["epochs"], summarize_config(r["config"], keys, 90)]
            for i, r in enumerate(rows, 1)]
    table = format_table(body, header).splitlines()
    print("\n".join([f"[raycls] search {settings.name}: results ({elapsed:.0f} s)",
                     *(f"[raycls]   {line.rstrip()}" for line in table)]), flush=True)
    write_csv(rows, keys, exp / "results.csv")
    plot_trials(rows, exp / "val_acc.png", f"{settings.name}: val_acc per trial")
    errors = [
        {"trial_id": r["trial_id"], "config": summarize_config(r["config"], keys, 200),
         "error": str(r["result"].error), "error_file": str(Path(r["result"].path) / "error.txt")}
        for r in rows if r["result"].error is not None
    ]
    summary: dict[str, Any] = {
        "name": settings.name, "experiment": str(exp), "elapsed_s": elapsed,
        "results_csv": str(exp / "results.csv"), "plot": str(exp / "val_acc.png"),
        "num_trials": len(rows), "errors": errors, "best": None, "bundle": None,
    }
    # the first ranked row with a checkpoint (ResultGrid.get_best_result may pick one without)
    winners = [r for r in rows if r["val_acc"] is not None and r["result"].checkpoint]
    if winners:
        best = winners[0]
        result = best["result"]
        ckpt = best_checkpoint(result)
        config = dict(result.config)
        # the full story (epochs inherited from PBT clones included) is in the newest checkpoint
        history = read_checkpoint_meta(result.checkpoint.path)["history"]
        schedule_path = exp / "best_policy_schedule.json"
        schedule = schedule_from_history(history)
        save_policy_schedule(str(schedule_path), schedule)
        test_acc = test_accuracy(ckpt.path, test_batches(*data))[0]
        best_config = {**config, "aug_policy_file": str(schedule_path) if len(schedule) > 1 else ""}
        (exp / "best_config.json").write_text(json.dumps(best_config, indent=2))
        summary["best"] = {
            "trial_id": best["trial_id"], "val_acc": best["val_acc"], "epoch": best["best_epoch"],
            "test_acc": test_acc, "checkpoint": ckpt.path, "config": str(exp / "best_config.json"),
            "policy_schedule": str(schedule_path), "schedule": schedule,
            "train_command": train_command(config, schedule_path if len(schedule) > 1 else None),
        }
        print(
            f"[raycls] best trial {best['trial_id']}: val_acc {best['val_acc']:.4f} at epoch "
            f"{best['best_epoch']}, "
            + (f"test_acc {test_acc:.4f}" if test_acc is not None else "no test split") + "\n"
            f"[raycls] best config: {exp / 'best_config.json'}\n"
            f"[raycls] augmentation schedule: {schedule_path} "
            f"({len(schedule)} phase(s): {'; '.join(f'{e}: {p}' for e, p in schedule)})\n"
            f"[raycls] retrain it: {summary['best']['train_command']}",
            flush=True,
        )
    if errors:
        print(f"error: {len(errors)} of {len(rows)} trial(s) failed:", file=sys.stderr)
        for e in errors:
            first = e["error"].strip().splitlines()[-1] if e["error"].strip() else "?"
            print(f"error:   trial {e['trial_id']} ({e['config']}): {first}\n"
                  f"error:     details: {e['error_file']}", file=sys.stderr)
        print("error: fix the cause, then continue with: "
              f"{resume_command(settings, 'python tune/search.py')}", file=sys.stderr)
    elif summary["best"] is None:
        print("error: no trial produced a checkpoint; nothing to export", file=sys.stderr)
    elif settings.export:
        summary["bundle"] = export_best(settings, summary["best"]["checkpoint"],
                                        summary["best"]["test_acc"])
    tracking.finish_search(settings, exp, rows, summary)  # MLflow artifacts; where to look
    (exp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if summary.get("bundle"):  # the last lines: what to do next
        out = summary["bundle"]
        print(f"[raycls] bundle: {out}\n[raycls] serve it: serve run raycls.deploy model={out}",
              flush=True)
    return summary


def export_best(settings: SearchSettings, checkpoint: str, test_acc: float | None) -> str:
    from raycls.export import export_bundle  # caps its own torch threads for the gate

    out = Path(settings.models_dir) / settings.name
    export_bundle(checkpoint, out, data_dir=settings.data_dir, overwrite=False,
                  test_acc=test_acc,  # measured on this checkpoint by report
                  log=lambda m: print(f"[raycls] export: {m}", flush=True))
    return str(out)
