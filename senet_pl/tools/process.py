"""A child process with a time limit that is really kept: the benchmark's cases and the campaign's parts.

The child runs in a process group of its own, so that at the limit (or when the caller is stopped) it is
ended together with whatever it started (a DataLoader worker, a CLI run by a test): SIGTERM first, so that a
run can save what it has, then SIGKILL after a grace period.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Finished:
    """What a child process did: its exit status (None if it was ended at the limit), output and wall time."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def child_env() -> dict[str, str]:
    """The environment for a child that must import this checkout of senet_pl, installed or not."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO), "PYTHONUNBUFFERED": "1"}


def _end(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds if it is still there."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(command: list[str], timeout: float | None = None, cwd: str | Path | None = None,
                grace: float = 5.0) -> Finished:
    """Run ``command`` (``python`` as its first word means this Python) with this checkout importable; at
    ``timeout`` seconds, or when this process is stopped, end it and its children."""
    if command[0] == "python":
        command = [sys.executable, *command[1:]]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _end(proc, grace)
        out, err = proc.communicate()
        timed_out = True
    except BaseException:  # SIGTERM or Ctrl-C of this process: the child goes too
        _end(proc, grace)
        raise
    code = None if timed_out else proc.returncode
    return Finished(code, out, err, time.perf_counter() - started, timed_out)
