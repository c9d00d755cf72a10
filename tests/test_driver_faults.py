"""The bench driver stopped as users stop it, run from the command line on the default local
Ray: Ctrl-C (SIGINT to the terminal's process group), then `--resume`; that resume stopped
with SIGTERM (what a scheduler or `kill` sends), then `--resume`; that one killed with
SIGKILL, then `--resume` again. After each stop no Ray process is left running; each
resume continues the half-done cell after its last finished epoch; the MLflow runs of the
stopped drivers end KILLED, never RUNNING or FINISHED; the last resume finishes the cell with
every epoch recorded once. Its actors run at the driver's priority. The actor- and store-level
faults are in tests/test_store.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests import test_bench
from tests.test_cluster import wait_for

EPOCHS = 30  # enough that no stop comes after the last epoch, however fast the machine


def start(env, out: Path, log: Path, *extra) -> subprocess.Popen:
    # A session of its own, like a job in a terminal: the process group a Ctrl-C reaches.
    return subprocess.Popen([sys.executable, "-m", "orchestrator.bench",
                             *test_bench.argv(env, out, "--methods", "cmi", "--set", f"cmi.epochs={EPOCHS}", *extra)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def epochs_logged(log: Path) -> int:
    return sum(": acc " in line for line in log.read_text().splitlines())


def ray_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The driver's descendants (Ray's node and workers), the reaper excluded."""
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "orchestrator.runtime.reaper" not in " ".join(c.cmdline())]


def actor_thread_niceness(proc: subprocess.Popen) -> dict[str, set[int]]:
    """The nice value of every thread of the driver's synthesizer and trainer actors (a
    thread's own: setpriority on a PID reaches only its first thread)."""
    found = {}
    for p in ray_processes(proc):
        try:
            role = p.name().split(".")[0]  # ray::TrainerActor.kd_round -> ray::TrainerActor
            if role in ("ray::SynthesizerActor", "ray::TrainerActor"):
                for t in p.threads():
                    stat = Path(f"/proc/{p.pid}/task/{t.id}/stat").read_text().rsplit(")", 1)[1].split()
                    found.setdefault(role, set()).add(int(stat[16]))  # field 19 of proc(5): nice
        except (psutil.Error, OSError):
            pass  # a thread that ended between the listing and the read
    return found


def stop_and_check_nothing_is_left(proc: subprocess.Popen, sig: int, log: Path) -> int:
    ray = ray_processes(proc)
    assert any("raylet" in " ".join(p.cmdline()) for p in ray), "no local Ray node under the driver"
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # what Ctrl-C does: the whole foreground group
    else:
        os.kill(proc.pid, sig)  # `kill -9 PID`: the driver alone, nothing runs in it
    code = proc.wait(timeout=60)
    _, alive = psutil.wait_procs(ray, timeout=30)
    assert not alive, f"orphaned after {signal.Signals(sig).name}: {[p.cmdline()[:1] for p in alive]}\n" + log.read_text()[-2000:]
    return code


def test_ctrl_c_then_kill_9_then_resume_continues_and_leaves_nothing_behind(tiny_mnist, tmp_path):
    env, out = tiny_mnist, tmp_path / "out"
    cell = out / "cells" / f"mnist_resnet8-resnet8_cmi_s0_smoke_paper"

    # 1. Ctrl-C after the first epoch
    log1 = tmp_path / "1.log"
    proc = start(env, out, log1)
    wait_for(lambda: epochs_logged(log1) >= 1, 180, "epoch 1", proc)
    # The actors compute at the driver's priority, not Ray's default nice 15 for workers
    # (runtime/cluster.py: LOCAL_SYSTEM_CONFIG).
    driver = os.getpriority(os.PRIO_PROCESS, proc.pid)
    assert actor_thread_niceness(proc) == {"ray::SynthesizerActor": {driver}, "ray::TrainerActor": {driver}}
    code = stop_and_check_nothing_is_left(proc, signal.SIGINT, log1)
    assert code != 0 and "Traceback" not in log1.read_text(), log1.read_text()[-3000:]
    assert json.loads((cell / "history.json").read_text())["status"] == "interrupted"
    assert (cell / "state.pt").exists() and "--resume continues it" in log1.read_text()
    first_stop = epochs_logged(log1)

    # 2. resume; SIGTERM: the same orderly stop as Ctrl-C
    log2 = tmp_path / "2.log"
    proc = start(env, out, log2, "--resume")
    wait_for(lambda: epochs_logged(log2) >= 1, 180, "an epoch after the resume", proc)
    assert stop_and_check_nothing_is_left(proc, signal.SIGTERM, log2) == 143
    text2 = log2.read_text()
    assert f"continuing after epoch {first_stop}" in text2 and "terminated; finished work is kept" in text2, text2
    assert json.loads((cell / "history.json").read_text())["status"] == "interrupted"
    term_stop = first_stop + epochs_logged(log2)

    # 3. resume; SIGKILL the driver once it has finished an epoch of its own
    log2 = tmp_path / "2b.log"
    proc = start(env, out, log2, "--resume")
    wait_for(lambda: epochs_logged(log2) >= 1, 180, "an epoch after the resume", proc)
    stop_and_check_nothing_is_left(proc, signal.SIGKILL, log2)
    text2 = log2.read_text()
    assert f"continuing after epoch {term_stop}" in text2, text2[-3000:]
    second_stop = term_stop + epochs_logged(log2)
    assert second_stop < EPOCHS, "the cell finished before the kill: make it longer"

    # 4. resume to the end: a normal exit leaves nothing behind either
    log3 = tmp_path / "3.log"
    proc = start(env, out, log3, "--resume")
    wait_for(lambda: "continuing after epoch" in log3.read_text(), 180, "the last resume to start", proc)
    ray = ray_processes(proc)
    assert proc.wait(timeout=300) == 0, log3.read_text()[-3000:]
    assert not psutil.wait_procs(ray, timeout=30)[1], "orphaned after a normal exit"
    text3 = log3.read_text()
    assert "taking over the lock of a bench that is gone" in text3
    assert "marked 2 run(s) KILLED" in text3  # the killed driver's parent and cell runs (the others closed theirs)
    resumed_from = int(text3.split("continuing after epoch ")[1].split()[0])
    assert second_stop <= resumed_from < EPOCHS  # never from scratch, never before the kill
    history = json.loads((cell / "history.json").read_text())
    assert history["status"] == "finished" and len(history["accuracy"]) == EPOCHS  # each epoch once

    _, runs = test_bench.runs(out)
    status = lambda kind: sorted(r.info.status for r in runs if kind(r.data.tags))  # noqa: E731
    assert status(lambda t: t.get("kind") == "bench") == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    assert status(lambda t: "cell.method" in t) == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    assert not (out / ".lock").exists()
