"""The bench and the search end to end on a real cluster: one `ray start --head` node of
this module's own (tests/ray_head.py) on 127.0.0.1, joined with --address by drivers run as
users run them, a real MLflow SQLite store and tiny real-format data. One head serves both
tests: a head costs seconds to start and stop, and these are the suite's longest tests.
The default local Ray is exercised in-process by tests/test_tune.py and tests/test_store.py.

Head and drivers run without Ray's token auth: ~/.ray/auth_token is shared with every other
Ray on this machine, and a token another cluster rewrote there would lock our drivers out."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import tune
from tests import test_bench, test_tune
from tests.ray_head import HEAD_ENV, ROOT, ray_head
from tests.test_registry import PLUGIN_ENV


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("ray_head") / "head.log") as address:
        yield address


def tune_driver(args, log: Path, **env_vars) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.tune", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    """Ends what this test started: the process group of its own subprocess."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def table_row(table: str, method: str) -> list[str]:
    """The cells of `method`'s first row (the accuracy table), without the alignment."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {method} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_bench_tables_match_mlflow_a_nan_cell_fails_alone_and_resume_starts_nothing(
        tiny_mnist, head, tmp_path, capsys):
    env, out = tiny_mnist, tmp_path / "out"
    # dafl with an absurd learning rate diverges to NaN; cmi must still finish. A method
    # registered outside methods/ (tests/throwaway_method.py) runs as a cell like any other.
    proc = test_bench.bench(env, out, "--methods", "dafl,cmi,throwaway", "--set", "dafl.lr=1e30",
                            "--address", head, extra_env={**HEAD_ENV, **PLUGIN_ENV})
    assert proc.returncode == 1, proc.stderr[-3000:]  # one cell failed
    assert "Connecting to existing Ray cluster" in proc.stderr
    assert f"data: mnist from {env / 'data' / 'mnist'}" in proc.stdout + proc.stderr  # every split's one folder
    assert "1 failed" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    # The bar counts steps over every cell (a smoke cell: 2 rounds of 2 synthesis steps and 1
    # KD step), not rounds or cells: it moves within a cell, and its total is all three cells'.
    assert re.search(r"steps: +\d+%.*\| [0-9]+/18 ", proc.stderr), proc.stderr[-2000:]
    client, all_runs = test_bench.runs(out)
    parents = [r for r in all_runs if r.data.tags.get("kind") == "bench"]
    children = [r for r in all_runs if "cell.method" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    status = {c.data.tags["cell.method"]: c.info.status for c in children}
    assert status == {"dafl": "FAILED", "cmi": "FINISHED", "throwaway": "FINISHED"}
    table = (out / "table_mnist.md").read_text()
    assert "failed" in table_row(table, "DAFL")[1]
    long = pd.read_csv(out / "results.csv")
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"cell.dataset", "cell.teacher", "cell.student", "cell.seed", "cell.budget", "cell.mode"} <= set(c.data.tags)
        if c.info.status != "FINISHED":
            continue
        assert c.data.params["g_steps"] == "2"
        history = client.get_metric_history(c.info.run_id, "accuracy")
        assert [m.step for m in history] == [1]
        # the table's numbers are the logged metrics
        row = long[(long.method == c.data.tags["cell.method"]) & (long.metric == "accuracy")]
        assert row.value.iloc[0] == pytest.approx(history[-1].value)
        assert f"{history[-1].value:.2f}" in table
    for name in ("results.csv", "table_mnist.md", "table_mnist.tex", "accuracy_mnist.png",
                 "accuracy_vs_synthesis_mnist.png"):
        assert (out / name).exists()
    assert {p.parent.name.split("_")[2] for p in (out / "cells").glob("*/grid.png")} >= {"cmi", "throwaway"}
    assert table_row(table, "Throwaway")[1] not in ("", "failed")
    for cell in (out / "cells").glob("*_cmi_*"):  # the stream's state and its store snapshot
        assert (cell / "state.pt").exists() and (cell / "store" / "store.safetensors").exists()

    # Resume (no --address) of the finished cell: reused, so no Ray starts at all.
    again = test_bench.bench(env, out, "--methods", "cmi", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 cells to run (1 finished earlier)" in again.stderr + again.stdout
    assert "Ray instance" not in again.stderr and "Ray cluster" not in again.stderr
    _, after = test_bench.runs(out)
    assert len([r for r in after if "cell.method" in r.data.tags]) == 3  # no new cell run
    rebuilt = (out / "table_mnist.md").read_text()
    assert table_row(rebuilt, "CMI") == table_row(table, "CMI")  # the same numbers, rebuilt from MLflow

    # The failed cell runs again; a finished one is reused only under the same effective
    # config (--dry-run prints the plan and starts nothing).
    from orchestrator import bench as bench_cli
    from orchestrator.cli import run_cli

    for extra, plan in ((["--methods", "dafl,cmi"], "1 cells to run (1 finished earlier)"),
                        (["--methods", "cmi", "--set", "g_steps=3"], "1 cells to run (0 finished earlier)")):
        with pytest.raises(SystemExit) as exc:
            bench_cli_argv = test_bench.argv(env, out, *extra, "--resume", "--dry-run")
            run_cli(bench_cli.main, bench_cli_argv)
        printed = capsys.readouterr().out
        assert exc.value.code == 0 and plan in printed, printed
    assert "run    mnist_resnet8-resnet8_cmi" in printed
    _, final = test_bench.runs(out)
    assert len(final) == len(after)  # a dry run opens no run

    # A finished cell whose files were damaged since is not reused: it runs again, with a
    # warning naming the file (its hash was recorded when it finished).
    (history,) = (out / "cells").glob("*_cmi_*/history.json")
    history.write_text(history.read_text()[:50])
    with pytest.raises(SystemExit) as exc:
        run_cli(bench_cli.main, test_bench.argv(env, out, "--methods", "cmi", "--resume", "--dry-run"))
    captured = capsys.readouterr()
    assert exc.value.code == 0 and "1 cells to run (0 finished earlier)" in captured.out
    assert f"{history} is not the file it wrote" in captured.out + captured.err


def test_an_interrupted_search_on_the_head_resumes_without_rerunning_finished_trials(
        tiny_mnist, head, tmp_path, monkeypatch):
    """Ctrl-C once the first trial has finished and the second has checkpointed epoch 1
    (of 3); --resume must leave the first alone and continue the second from epoch 2.
    Both runs join the head with --address."""
    space = tmp_path / "small.yaml"
    space.write_text("lr_g:\n  type: loguniform\n  low: 1e-2\n  high: 5e-1\n")
    out = tmp_path / "resume"
    args = test_tune.argv(tiny_mnist, out, "--space", str(space), "--name", "resumable", "--max-concurrent", "1",
                          "--set", "epochs=3", "--grace-period", "3",  # ASHA must not end trial 2 early
                          "--address", head, "--cpus-per-trial", "1", "--gpus-per-trial", "0", samples=2)

    def first_done_second_started():
        with contextlib.suppress(OSError, ValueError):
            trials = json.loads((out / "searches" / "resumable.json").read_text())["trials"]
            done = [k for k, t in trials.items() if t.get("status") == "FINISHED"]
            running = [k for k, t in trials.items() if t.get("status") == "RUNNING" and t.get("epochs")]
            return done[0] if done and running else None

    proc = tune_driver(args, tmp_path / "resume1.log", **HEAD_ENV)
    try:
        first = wait_for(first_done_second_started, 240, "the first trial to finish", proc)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops the other trial
        assert proc.wait(timeout=120) == 130, (tmp_path / "resume1.log").read_text()
    finally:
        end(proc)
    log = (tmp_path / "resume1.log").read_text()
    assert "Connecting to existing Ray cluster" in log and "continue it with --resume" in log
    (result_file,) = (out / "ray_results" / "resumable").glob(f"trial_{first}_*/result.json")
    before = result_file.read_text()

    for name, value in HEAD_ENV.items():  # the resumed run, in this process, joins the same head
        monkeypatch.setenv(name, value)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = tune.main([*args, "--resume"])
    assert code == 0, stdout.getvalue()
    assert "continuing the search" in stdout.getvalue()
    trials = test_tune.record(out)["trials"]
    assert len(trials) == 2 and all(t["status"] == "FINISHED" for t in trials.values())
    assert trials[first]["starts"] == 1  # never started again
    # Unchanged results (each line carries its timestamp). Not the mtime: joined to a cluster,
    # Tune copies trial folders to the storage path again on restore, with the same bytes.
    assert result_file.read_text() == before
    (second,) = set(trials) - {first}
    assert trials[second]["starts"] == 2  # interrupted, then continued
    (other,) = (out / "ray_results" / "resumable").glob(f"trial_{second}_*/result.json")
    results = [json.loads(line) for line in other.read_text().splitlines()]
    epochs = [r["epoch"] for r in results]
    # From its newest state, whether Tune recorded that checkpoint or not: no epoch run or
    # reported twice. (Tune's own report count can run one behind here, when Ctrl-C fell
    # between the state write and Tune's checkpoint; ASHA therefore counts epochs, and the
    # trial keeps its own state when it is newer than Tune's, see orchestrator/tune.py.)
    if epochs == [1, 2, 3, 3]:
        # Ctrl-C fell after Tune's logger wrote epoch 3 and before Tune saved the trial's state
        # (seen once in many runs): the trial, finding its own state finished, reports it again
        # so that Tune learns it ended. Re-reported, not re-run: the same timings to the bit.
        assert {k: results[2][k] for k in ("val_accuracy", "synthesis_seconds", "kd_seconds")} == \
            {k: results[3][k] for k in ("val_accuracy", "synthesis_seconds", "kd_seconds")}
    else:
        assert epochs == [1, 2, 3] or epochs == [1, 3]
    _, parents, children = test_tune.runs(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert json.loads((out / "preset_deepinv_mnist.json").read_text())["method"] == "deepinv"
