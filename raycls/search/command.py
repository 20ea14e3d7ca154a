"""The command: `raycls search` and `python tune/search.py` (flags, exit codes, errors)."""

from __future__ import annotations

import argparse
import json
import sys

from raycls.config import ConfigError
from raycls.interrupt import EXIT_INTERRUPTED, Interrupted
from raycls.ray_session import add_address_argument
from raycls.search.run import run_search
from raycls.search.settings import (
    PRESET_DIR,
    SCHEDULERS,
    SearchError,
    SearchSettings,
    resolve_settings,
)
from raycls.search.space import check_search

FLAGS: list[tuple[str, type, str]] = [
    ("dataset", str, "digits | mnist | fashion-mnist | cifar10 | imagefolder:PATH | parquet:PATH"),
    ("data_dir", str, "where the dataset files live"),
    ("scheduler", str, f"one of {', '.join(SCHEDULERS)}"),
    ("searcher", str, "random, or optuna (TPE; needs `pip install optuna`)"),
    ("num_samples", int, "trials (PBT: population size)"),
    ("max_epochs", int, "epochs of a trial that is never stopped"),
    ("grace_period", int, "ASHA: epochs before a trial may be stopped"),
    ("perturbation_interval", int, "PBT: epochs between exploit/explore steps"),
    ("workers_per_trial", int, "Ray Train workers per trial"),
    ("cpus_per_trial", int, "CPUs per trial (0 = one per worker)"),
    ("gpus_per_trial", int, "GPUs per trial, one per worker (0 = CPU)"),
    ("max_concurrent_trials", int, "trials at once (0 = as many as the cluster fits)"),
    ("max_trial_failures", int, "Tune retries of an errored trial, from its newest checkpoint"),
    ("models_dir", str, "where the winner's bundle is written (models/<name>)"),
    ("seed", int, "seeds the searcher and PBT's explore"),
    ("mlflow_uri", str, "also log to MLflow at this tracking URI, trials nested under the "
     "search's run (needs `pip install 'raycls[mlflow]'`); default $MLFLOW_TRACKING_URI"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchSettings()
    parser.add_argument("--preset", default="default",
                        help=f"search-space preset: a name in {PRESET_DIR} or a YAML path "
                             "(default: 'default')")
    for name, typ, help_text in FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                            help=f"{help_text} (default: the preset's, else "
                                 f"{getattr(defaults, name)!r})")
    parser.add_argument("--storage-path", default=None,
                        help=f"where searches are written (default: {defaults.storage_path!r})")
    parser.add_argument("--name", default=None,
                        help="search name (default: search-<dataset>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search --name (default: the newest unfinished one), "
                             "re-running only unfinished and errored trials")
    parser.add_argument("--no-export", dest="export", action="store_false", default=None,
                        help="do not export the best checkpoint (default: export)")
    add_address_argument(parser)  # the same --address as raycls train
    parser.add_argument("--json", action="store_true", help="print the summary as the last line")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Tune's own output live (default: off: raycls's lines "
                        "only; Ray's go to ray.log in the search directory)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the preset, the flags and every searched choice, print the "
                        "search that would start, and exit without starting Ray")


def main(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name, _, _ in FLAGS}
    overrides.update(storage_path=args.storage_path, name=args.name, export=args.export)
    try:
        settings = resolve_settings(args.preset, overrides)
        if not args.resume:  # a resumed search keeps the settings it started with
            check_search(settings)
    except (ConfigError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"[raycls] dry run: the flags are valid; the search would run {settings.num_samples}"
              f" trial(s) ({settings.scheduler}) of up to {settings.max_epochs} epochs on "
              f"{settings.dataset}, searching {', '.join(settings.space) or 'nothing'} "
              "(nothing was started)")
        return 0
    from raycls.bundle import BundleError
    from raycls.data import DataError
    from raycls.export import ExportError

    try:
        summary = run_search(settings, resume=args.resume, address=args.address, console=True,
                             verbose=args.verbose, prog=getattr(args, "prog", "raycls search"))
    except (Interrupted, KeyboardInterrupt) as e:  # the latter: before the search started
        from raycls.ray_session import shutdown_ray

        shutdown_ray()  # for a local Ray, every Ray process of the search
        print(f"[raycls] {e or 'interrupted before the search started'}", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    except (SearchError, ConfigError, DataError, ExportError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, default=str))
    return 1 if summary["errors"] or summary["best"] is None else 0


def cli(argv: list[str] | None = None) -> int:
    """`python tune/search.py [flags]`: the same as `raycls search [flags]`."""
    parser = argparse.ArgumentParser(
        prog="tune/search.py",
        description="Search hyperparameters and augmentation with Ray Tune, export the winner.",
    )
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.prog = "python tune/search.py"  # the resume command names the entry point used
    return main(args)
