"""A real Ray head node of the test's own, started with `ray start --head` on 127.0.0.1.

`ray start --block` in a new session keeps the head's processes in one process group,
so the test stops exactly what it started (`ray stop` would stop every Ray on the
machine). Token auth is off for head and driver: ~/.ray/auth_token is shared with any
other Ray on this machine, and a token another cluster rewrote there would lock us out.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 2, timeout: float = 120):
    """Yields the head's address (127.0.0.1:port); stops the head afterwards."""
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats", "--block"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **HEAD_ENV},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Ray head node did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
