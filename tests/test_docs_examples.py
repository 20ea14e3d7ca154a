"""The commands in README.md and docs/*.md are real: a changed flag breaks the build, not the user.

Every command line in a Markdown code block that names a raycls entry point (`raycls ...`,
`python tune/search.py`, `serve run raycls.deploy key=value`, `python serve/client.py`) is parsed
by that command's own parser. Blocks marked with a `<!-- doc-test -->` line right above their
opening fence are also executed, in a scratch folder holding a small `photos/` tree, `data/`
(CIFAR-10 from ../shared) and the repository's config folders: `raycls train` / `raycls search` /
`python tune/search.py` with `--dry-run` (every flag and input checked, nothing trained), the
other raycls commands as written. Lines with a placeholder (RUN_NAME, YOUR-BUCKET, ...) and other
tools (curl, kubectl, ray, aws, ...) are only parsed, or skipped.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md",
        REPO / "bench" / "README.md"]
MARK = "<!-- doc-test -->"
PLACEHOLDER = re.compile(r"(?<![\w$-])[A-Z][A-Z0-9]*(?:[_-][A-Z0-9]+)+(?![\w=])|\.\.\.")
FENCE = re.compile(r"^\s*```")


def code_blocks(path: Path) -> list[tuple[int, bool, list[str]]]:
    """(line number, marked, lines) of each fenced block that is not YAML/JSON/Python."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            lang = lines[i].strip().strip("`").strip()
            marked = i > 0 and lines[i - 1].strip() == MARK
            j = i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                j += 1
            if lang in ("", "bash", "sh", "console"):
                blocks.append((i + 1, marked, lines[i + 1 : j]))
            i = j
        i += 1
    return blocks


def commands(block: list[str]) -> list[list[str]]:
    """Shell words of each command: continuations joined, comments, prompts and env prefixes
    dropped, `&&` chains split."""
    joined, out = [], []
    for line in block:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line.strip().removeprefix("$ "))
    for line in joined:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", ";", "|", "&"):
                while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w.removeprefix(".venv/bin/"))
    return out


def entry_point(cmd: list[str]) -> tuple[str, list[str]] | None:
    """(which raycls entry point, its arguments), or None for another tool."""
    if "--" in cmd and cmd[0] == "ray":  # `ray job submit ... -- python tune/search.py ...`
        return entry_point(cmd[cmd.index("--") + 1 :]) if cmd[-1] != "--" else None
    if cmd[:1] == ["raycls"]:
        return "raycls", cmd[1:]
    if cmd[:3] == ["python", "-m", "raycls"]:
        return "raycls", cmd[3:]
    if cmd[:2] == ["python", "tune/search.py"]:
        return "search", cmd[2:]
    if cmd[:3] == ["serve", "run", "raycls.deploy"]:
        return "serve", cmd[3:]
    if cmd[:2] == ["python", "serve/client.py"]:
        return "client", cmd[2:]
    return None


def parse(kind: str, args: list[str]) -> None:
    """Parse with the command's own parser; AssertionError naming the problem otherwise."""
    if kind == "serve":
        from raycls.serving.args import ServeConfigError, parse_args

        try:
            parse_args(dict(a.split("=", 1) for a in args))
        except (ServeConfigError, ValueError) as e:
            raise AssertionError(str(e)) from None
        return
    if kind == "raycls":
        from raycls.cli import build_parser

        parser = build_parser(args)
    elif kind == "search":
        from raycls.search import add_arguments

        parser = argparse.ArgumentParser(prog="tune/search.py", allow_abbrev=False)
        add_arguments(parser)
    else:
        sys.path.insert(0, str(REPO / "serve"))
        try:
            import client
        finally:
            sys.path.pop(0)
        parser = client.build_parser()
    parser.exit_on_error = False
    try:
        parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as e:
        raise AssertionError(f"does not parse: {e}") from None


def documented() -> list[tuple[str, bool, list[str]]]:
    found = []
    for path in DOCS:
        for line, marked, block in code_blocks(path):
            for cmd in commands(block):
                found.append((f"{path.relative_to(REPO)}:{line}", marked, cmd))
    return found


def test_every_documented_command_parses(capsys):
    checked, problems = 0, []
    for where, _, cmd in documented():
        target = entry_point(cmd)
        if target is None:
            continue
        checked += 1
        try:
            parse(*target)
        except AssertionError as e:
            said = capsys.readouterr().err.strip().splitlines()  # argparse's own message
            problems.append(f"{where}: `{shlex.join(cmd)}`: {said[-1] if said else e}")
        capsys.readouterr()
    assert checked >= 40, f"only {checked} raycls commands found in the docs"
    assert not problems, "\n".join(problems)


DRY_RUN = {("raycls", "train"), ("raycls", "search"), ("search", None)}


def runnable(cmd: list[str]) -> list[str] | None:
    """The command to execute for a marked line, or None when it is only parsed."""
    target = entry_point(cmd)
    if target is None or any(PLACEHOLDER.search(w) for w in cmd) or target[0] == "serve":
        return None
    kind, args = target
    if (kind, args[0] if kind == "raycls" and args else None) in DRY_RUN:
        cmd = [*cmd, "--dry-run"]
    return [w.replace("../shared/", f"{SHARED}/") for w in cmd]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from tests.imagetree import make_tree

    root = tmp_path_factory.mktemp("docs")
    make_tree(root / "photos", per_class={"train": 3, "val": 1, "test": 1})
    for name in ("tune", "serve", "cluster"):
        (root / name).symlink_to(REPO / name)
    if (SHARED / "datasets" / "cifar10").is_dir():
        (root / "data").symlink_to(SHARED / "datasets" / "cifar10")
    return root


def run_block(scratch: Path, block: list[tuple[str, list[str]]]) -> tuple[int, list[str]]:
    """Run a block's lines in order; (commands run, failures)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": ""}
    ran, failures = 0, []
    for where, cmd in block:
        run = runnable(cmd)
        if run is None:
            continue
        if any("datasets" in w or w == "data" for w in run) and not SHARED.is_dir():
            continue  # the shared datasets are absent: parsed above, not run
        words = []
        for w in run:  # the shell's glob expansion (`cluster/kuberay/*.yaml`)
            words += sorted(glob.glob(w, root_dir=scratch)) if "*" in w else [w]
        p = subprocess.run(words, cwd=scratch, env=env, capture_output=True, text=True,
                           timeout=180)
        out = p.stdout + p.stderr
        if p.returncode != 0 or "Traceback" in out:
            failures.append(f"{where}: `{shlex.join(cmd)}` exited {p.returncode}:\n{out[-2000:]}")
        ran += 1
    return ran, failures


def test_marked_examples_run(scratch):
    from concurrent.futures import ThreadPoolExecutor

    blocks: dict[str, list[tuple[str, list[str]]]] = {}
    for where, is_marked, cmd in documented():
        if is_marked:
            blocks.setdefault(where, []).append((where, cmd))
    assert len(blocks) >= 5, f"only {len(blocks)} marked example blocks: {list(blocks)}"
    with ThreadPoolExecutor(3) as pool:  # blocks side by side, each block's lines in order
        results = list(pool.map(lambda b: run_block(scratch, b), blocks.values()))
    failures = [f for _, fs in results for f in fs]
    assert not failures, "\n\n".join(failures)
    ran = sum(n for n, _ in results)
    assert ran >= 12, f"only {ran} documented commands ran"
