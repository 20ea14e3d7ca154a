"""A command under a pseudo-terminal, as a shell runs a foreground job: read what it prints,
send the terminal's Ctrl-C (SIGINT to its whole process group), and see who is left."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def read_until(fd: int, text: str, timeout: float) -> str:
    out, deadline = b"", time.monotonic() + timeout
    while text.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            said = out.decode(errors="replace")
            raise AssertionError(f"no {text!r} within {timeout:.0f}s:\n{said}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return out.decode(errors="replace")


def drain(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


def ctrl_c_under_pty(cmd: list[str], env: dict[str, str], wait_for: str, *, timeout: float = 240,
                     ready: Callable[[int], str] | None = None) -> tuple[int, int, str, float]:
    """Run `cmd` on a new terminal, SIGINT its group once `wait_for` shows (and `ready(fd)`,
    given the terminal to keep reading, returns); returns (pid, exit status, output, seconds
    from the signal to the exit)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)  # its own group, as a shell's foreground job
    os.close(slave)
    try:
        seen = read_until(master, wait_for, timeout=timeout)
        if ready is not None:
            seen += ready(master)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
        seen += drain(master)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    return proc.pid, rc, seen, stopped_in
