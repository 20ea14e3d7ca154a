"""`raycls` command line: one subcommand per pipeline stage.

Each subcommand lives in the module that owns the stage; that module defines
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their command
runs, so `raycls predict` never imports torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("raycls.train", "train a classifier with Ray Train (data-parallel PyTorch)"),
    "search": ("raycls.search", "search hyperparameters and augmentation with Ray Tune"),
    "export": ("raycls.export", "export a checkpoint to a verified ONNX bundle"),
    "predict": ("raycls.predict", "classify image files with a bundle (onnxruntime, CPU)"),
    "evaluate": ("raycls.evaluate", "test-split accuracy and reports of a bundle"),
    "data": ("raycls.datatools", "convert image folders to sharded Parquet; inspect a dataset"),
    "validate": ("raycls.validate", "validate cluster, Serve and KubeRay configs offline"),
    "runs": ("raycls.runs", "list runs and searches: state, accuracy, the command to run next"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycls",
        description="Distributed image classification on Ray: train, search, export, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the module of the chosen command is imported (keeps `raycls predict` light).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        # no abbreviated flags: `--epoch` must not silently mean `--epochs` (nor break when a
        # later flag makes it ambiguous)
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
