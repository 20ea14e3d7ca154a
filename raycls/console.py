"""What `raycls train` shows: raycls's own lines and live progress inside an epoch; Ray quiet.

The workers do not print. Rank 0 sends its lines (an epoch's summary, a warning) and, every
second or so, how far its epoch has got, through a small Ray queue (`Channel`) to the driver;
the driver (`Console`) writes them: a tqdm bar on a terminal, or a plain line every
`PLAIN_EVERY_S` when stdout is not one (CI logs, `ray job submit`), and only once an epoch has
run `PROGRESS_AFTER_S` (short epochs get their summary line alone). One view for the run, never
one per worker. Ray's own output is not forwarded (`ray.init(log_to_driver=False)`, Train's
`LoggingConfig("WARNING")`) but collected into the run's `ray.log` at the end; `--verbose` shows
it live instead.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# Settings (environment): progress shows once an epoch has run this long, as a plain line this
# often when stdout is no terminal; rank 0 sends it this often (a queue put, ~1 ms)
PROGRESS_AFTER_S = float(os.environ.get("RAYCLS_PROGRESS_AFTER_S", "10"))
PLAIN_EVERY_S = float(os.environ.get("RAYCLS_PROGRESS_EVERY_S", "30"))
SEND_EVERY_S = float(os.environ.get("RAYCLS_PROGRESS_SEND_S", "1"))


class Channel:
    """Rank 0's side: lines and progress into the driver's queue (no-op without a queue)."""

    def __init__(self, queue: Any, rank: int):
        self.queue, self.rank = queue, rank
        self.last_sent = 0.0

    def line(self, text: str) -> None:
        if self.rank != 0:
            return
        if self.queue is None:  # no driver console (a Tune trial): Ray forwards stdout
            sys.__stdout__.write(f"[raycls] {text}\n")
            sys.__stdout__.flush()
            return
        self.queue.put(("line", text))

    def progress(self, epoch: int, epochs: int, step: int, steps: int, images: int,
                 started: float) -> None:
        now = time.monotonic()
        if self.rank != 0 or self.queue is None or now - self.last_sent < SEND_EVERY_S:
            return
        self.last_sent = now
        try:  # never block a training step on the console: a full queue skips an update
            self.queue.put_nowait(("progress", (epoch, epochs, step, steps, images,
                                                now - started)))
        except Exception:  # noqa: BLE001 - ray.util.queue.Full
            pass


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}"  # ", " + ours


class Console:
    """The driver's side: drains the queue between waits and renders what it holds."""

    def __init__(self, queue: Any, stream=None):
        self.queue = queue
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.bar = None
        self.bar_epoch = None
        self.last_plain = 0.0

    def drain(self) -> None:
        while True:
            try:
                kind, payload = self.queue.get_nowait()
            except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue is gone
                return
            if kind == "line":
                self.close_bar()
                print(f"[raycls] {payload}", file=self.stream, flush=True)
            else:
                self.show_progress(*payload)

    def show_progress(self, epoch: int, epochs: int, step: int, steps: int, images: int,
                      elapsed: float) -> None:
        if elapsed < PROGRESS_AFTER_S:
            return
        rate = images / max(elapsed, 1e-9)
        eta = (steps - step) * elapsed / max(step, 1)
        if self.tty:
            from tqdm import tqdm

            if self.bar is None or self.bar_epoch != epoch:
                self.close_bar()
                # a terminal that reports no size (0x0) would hide the bar: assume 100x24
                size = shutil.get_terminal_size((100, 24))
                self.bar = tqdm(total=steps, desc=f"[raycls] epoch {epoch}/{epochs}",
                                unit="step", file=self.stream, leave=False, ncols=size.columns,
                                nrows=size.lines, bar_format=BAR_FORMAT)
                self.bar_epoch = epoch
            self.bar.n = step  # rank 0's count (tqdm's own clock sees only our updates)
            self.bar.set_postfix_str(f"{rate:.0f} images/s, eta {format_eta(eta)}", refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            print(f"[raycls] epoch {epoch}/{epochs}: step {step}/{steps}, {rate:.0f} images/s, "
                  f"eta {format_eta(eta)}", file=self.stream, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def open_channel() -> Any:
    """The queue rank 0 writes to; an actor on no CPU, so it never waits for a free core."""
    from ray.util.queue import Queue

    return Queue(maxsize=1000, actor_options={"num_cpus": 0})


DRIVER_LOGS = logging.handlers.BufferingHandler(capacity=10_000)
DRIVER_LOGS.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def capture_driver_logs() -> None:
    """Keep the `ray` loggers' records of this process (Ray's driver-side INFO/WARNING, e.g. the
    token-auth notice of every new local Ray) for the run's ray.log instead of the console."""
    ray_logger = logging.getLogger("ray")
    # Ray puts its own stderr handler on the "ray" logger at import; this one takes its place
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.addHandler(DRIVER_LOGS)
    ray_logger.propagate = False


def collect_ray_logs(run_dir: Path) -> Path | None:
    """Write Ray's driver-side records and this job's worker logs (Train controller, workers,
    Ray Data) into `run_dir/ray.log`, since they are not shown on the console. Ray's session
    folder under /tmp is gone after a reboot; the run folder is not."""
    import ray

    logs = ray_logs_dir()
    if not run_dir.is_dir():
        return None
    out = run_dir / "ray.log"
    with open(out, "w") as f:
        for record in DRIVER_LOGS.buffer:
            f.write(DRIVER_LOGS.format(record) + "\n")
        job = ray.get_runtime_context().get_job_id()
        for path in sorted(Path(logs).glob(f"worker-*-{job}-*.*")) if logs else []:
            text = path.read_text(errors="replace")
            if text.strip():
                f.write(f"===== {path.name}\n{text}\n")
    return out


def ray_logs_dir() -> str | None:
    """Ray's log folder for this session (None for a client of a remote cluster)."""
    from raycls.raycompat import session_logs_dir

    return session_logs_dir()
