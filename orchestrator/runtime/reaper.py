"""Leaves no Ray process behind when the driver that started a local Ray ends, by any path.

`ray.init()` starts the node (GCS, raylet, agents, workers) as the driver's descendants. On a
clean exit `ray.shutdown()` stops them; on SIGKILL (or an OOM kill) nothing runs in the driver,
and Ray 2.60's dashboard and runtime-env agents outlive it for good, holding the terminal's
output open. So the driver starts this watcher in a session of its own (Ctrl-C in the terminal
does not reach it) with a pipe on its stdin. The watcher keeps a list of the driver's
descendants; the kernel closes the pipe however the driver ends, and the watcher then stops
every listed process still running (SIGTERM, then SIGKILL), checking each one's start time
so that a reused PID is never touched.

Only a Ray of the driver's own is watched: a cluster joined with --address outlives its
drivers by design.

    python -m orchestrator.runtime.reaper DRIVER_PID   (started by start_watcher, not by hand)
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

REFRESH_SECONDS = 1.0  # how often the list of descendants is refreshed while the driver lives
GRACE_SECONDS = 3.0    # time a process gets to end on SIGTERM before SIGKILL


def start_watcher() -> subprocess.Popen:
    """Starts the watcher of this process; keep the returned object referenced (its stdin
    is the pipe whose closing says the driver has ended)."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.runtime.reaper", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def descendants(pid: int) -> dict[int, float]:
    """{pid: start time} of every live descendant of `pid`, this watcher excluded."""
    import psutil

    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    me, listed = os.getpid(), {}
    for proc in found:
        try:
            if proc.pid != me:
                listed[proc.pid] = proc.create_time()
        except psutil.Error:
            pass
    return listed


def stop_all(listed: dict[int, float]) -> list[int]:
    """SIGTERM, then SIGKILL, every listed process that still runs; returns the PIDs stopped."""
    import psutil

    alive = []
    for pid, started in listed.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started:  # the same process, not a reused PID
                alive.append(proc)
        except psutil.Error:
            pass
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=GRACE_SECONDS)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=GRACE_SECONDS)
    return [proc.pid for proc in alive]


def watch(driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    listed: dict[int, float] = {}
    while True:
        listed.update(descendants(driver))
        ready, _, _ = select.select([sys.stdin], [], [], REFRESH_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the driver has ended
    # A clean exit has stopped Ray already; give a dying node a moment before forcing it.
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and any(_running(pid, t) for pid, t in listed.items()):
        time.sleep(0.2)
    stop_all(listed)


def _running(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    watch(int(sys.argv[1]))
