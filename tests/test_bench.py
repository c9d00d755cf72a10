"""The bench end to end: real local Ray, real MLflow SQLite store, real (tiny) data.

The bench is run as users run it, `python -m orchestrator.bench ...` in a subprocess."""
import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.ray_head import HEAD_ENV, ray_head


@pytest.fixture(scope="module")
def env(tiny_mnist):
    return tiny_mnist


def argv(env, out, *extra):
    return ["--datasets", "mnist", "--pairs", "resnet8:resnet8", "--budget", "smoke",
            "--data-root", str(env / "data"), "--teacher-dir", str(env / "teachers"),
            "--out", str(out), "--device", "cpu", *extra]


def bench(env, out, *extra, timeout=420, extra_env=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.bench", *argv(env, out, *extra)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})})


def runs(out):
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("dfkd-bench")
    return client, client.search_runs([exp.experiment_id])


def test_smoke_bench_tables_match_mlflow_and_resume_starts_nothing(env, tmp_path, capsys):
    out = tmp_path / "out"
    proc = bench(env, out, "--methods", "dafl,cmi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    client, all_runs = runs(out)
    parents = [r for r in all_runs if r.data.tags.get("kind") == "bench"]
    children = [r for r in all_runs if "cell.method" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["cell.method"] for c in children} == {"dafl", "cmi"}
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"cell.dataset", "cell.teacher", "cell.student", "cell.seed", "cell.budget", "cell.mode"} <= set(c.data.tags)
        assert c.info.status == "FINISHED" and c.data.params["g_steps"] == "2"
        history = client.get_metric_history(c.info.run_id, "accuracy")
        assert [m.step for m in history] == [1]
        # the table's numbers are the logged metrics
        long = pd.read_csv(out / "results.csv")
        row = long[(long.method == c.data.tags["cell.method"]) & (long.metric == "accuracy")]
        assert row.value.iloc[0] == pytest.approx(history[-1].value)
        table = (out / "table_mnist.md").read_text()
        assert f"{history[-1].value:.2f}" in table
    for name in ("results.csv", "table_mnist.md", "table_mnist.tex", "accuracy_mnist.png"):
        assert (out / name).exists()
    assert len(list((out / "cells").glob("*/grid.png"))) == 2

    assert "Started a local Ray instance" in proc.stderr
    again = bench(env, out, "--methods", "dafl,cmi", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 cells to run (2 finished earlier)" in again.stderr + again.stdout
    assert "Started a local Ray instance" not in again.stderr  # nothing to run: tables from MLflow alone
    _, after = runs(out)
    assert len([r for r in after if "cell.method" in r.data.tags]) == 2  # no new cell run
    assert "DAFL" in again.stdout and "CMI" in again.stdout
    assert (out / "table_mnist.md").read_text() == table  # the same numbers, rebuilt from MLflow

    # A finished cell is reused only under the same effective config (--dry-run: the plan only).
    from orchestrator import bench as bench_cli
    from orchestrator.cli import run_cli

    for extra, plan in ((["--methods", "dafl,cmi"], "0 cells to run (2 finished earlier)"),
                        (["--methods", "dafl", "--set", "g_steps=3"], "1 cells to run (0 finished earlier)")):
        with pytest.raises(SystemExit) as exc:
            run_cli(bench_cli.main, argv(env, out, *extra, "--resume", "--dry-run"))
        printed = capsys.readouterr().out
        assert exc.value.code == 0 and plan in printed, printed
    assert "run    mnist" in printed and "dafl" in printed
    _, final = runs(out)
    assert len(final) == len(after)  # a dry run opens no run


@pytest.mark.parametrize("extra,needle", [
    (["--methods", "nosuch"], "unknown method"),
    (["--datasets", "imagenet"], "known datasets"),
    (["--pairs", "resnet8-resnet8"], "teacher:student"),
    (["--pairs", "resnet8:resnet1000"], "resnet1000"),
    (["--set", "nosuch=1"], "no method"),
    (["--address", "127.0.0.1:9"], "no Ray cluster"),
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow"),
])
def test_bad_input_exits_2_before_starting(env, tmp_path, capsys, extra, needle):
    """In-process (what the subprocess test below shows for one case holds for all)."""
    import ray

    from orchestrator import bench as bench_cli
    from orchestrator.cli import run_cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_cli(bench_cli.main, argv(env, out, *extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert needle in err and "Traceback" not in err
    assert not (out / "mlflow.db").exists() and not ray.is_initialized()


def test_unwritable_out_as_a_user_runs_it(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = bench(env, blocker / "out", timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one message


def test_cluster_head_via_address_and_a_nan_cell_fails_alone(env, tmp_path):
    with ray_head(tmp_path / "head.log") as address:
        out = tmp_path / "out"
        # dafl with an absurd learning rate diverges to NaN; deepinv must still finish.
        proc = bench(env, out, "--methods", "dafl,deepinv", "--set", "dafl.lr=1e30", "--address", address,
                     extra_env=HEAD_ENV)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one cell failed
    assert "Connecting to existing Ray cluster" in proc.stderr
    _, all_runs = runs(out)
    status = {r.data.tags["cell.method"]: r.info.status for r in all_runs if "cell.method" in r.data.tags}
    assert status == {"dafl": "FAILED", "deepinv": "FINISHED"}
    table = (out / "table_mnist.md").read_text()
    assert "failed" in table.split("DAFL")[1].splitlines()[0]
    assert "1 failed" in proc.stdout


def test_runs_without_the_hash_tag_are_matched_by_their_logged_params():
    """Runs logged before the config-hash tag existed are reused only if their params match."""
    import dataclasses

    from methods import make_config
    from orchestrator.bench import same_config
    from orchestrator.tracking import flatten_params

    logged = flatten_params(dataclasses.asdict(make_config("dafl", "smoke", {})))
    assert same_config({"tags": {}, "params": logged}, "dafl", "smoke", {})
    assert not same_config({"tags": {}, "params": logged}, "dafl", "smoke", {"g_steps": 3})
    assert not same_config({"tags": {}, "params": {}}, "dafl", "smoke", {})
    tagged = {"tags": {"cell.config_hash": "0" * 16}, "params": logged}
    assert not same_config(tagged, "dafl", "smoke", {})  # the tag, when present, decides
