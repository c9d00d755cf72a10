"""orchestrator.tune end to end: a real local Ray (2 CPUs), a real MLflow SQLite store,
a tiny MNIST in idx format and a resnet8 teacher trained once for the module.

Trials run deepinv on the smoke budget with 2-3 epochs (so ASHA and per-epoch
checkpoints have something to do) over a two-field space.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from methods import get_method, list_methods, make_config
from orchestrator import tune
from orchestrator.bench import method_overrides
from orchestrator.cli import run_cli
from tests.ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]
# lr 1e30 makes the student's weights explode in the first KD step, so the next loss is
# NaN: that trial must end ERRORED while the others finish. With --seed 2 Optuna draws
# lr = 1e30, 0.05, 0.05, 0.05 for the four trials (checked; the seed fixes the draws).
SPACE = {"lr_g": {"type": "loguniform", "low": 0.01, "high": 0.5},
         "lr": {"type": "choice", "values": [0.05, 1e30]}}
NAN_SEED = 2


@pytest.fixture(scope="module")
def env(tiny_mnist):
    root = tiny_mnist
    (root / "space.json").write_text(json.dumps(SPACE))
    (root / "small.yaml").write_text("lr_g:\n  type: loguniform\n  low: 1e-2\n  high: 5e-1\n")
    return root


def argv(env, out, *extra, space="space.json", samples=4):
    return ["--method", "deepinv", "--dataset", "mnist", "--pair", "resnet8:resnet8", "--budget", "smoke",
            "--set", "epochs=2", "--space", str(env / space), "--num-samples", str(samples),
            "--data-root", str(env / "data"), "--teacher-dir", str(env / "teachers"), "--out", str(out), *extra]


def runs(out: Path) -> tuple:
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dfkd-tune")
    every = client.search_runs([exp.experiment_id])
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def record(out: Path) -> dict:
    (path,) = (out / "searches").glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smoke(env):
    """One 4-trial search, in this process on a Ray started here (tune.main reuses it)."""
    import ray

    out = env / "smoke"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not another user's
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = tune.main(argv(env, out, "--seed", str(NAN_SEED), "--max-concurrent", "2", "--max-failures", "0",
                                  "--grace-period", "2"))  # ASHA stops none: every finished trial has 2 epochs
    finally:
        ray.shutdown()
    return out, code, stdout.getvalue()


def test_smoke_search_tracks_trials_and_hands_a_preset_to_the_bench(smoke):
    out, code, text = smoke
    assert code == 0, text
    client, parents, children = runs(out)
    (parent,) = parents
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.data.tags["cell.method"] == "deepinv" and c.data.tags["trial_id"] for c in children)
    assert all({"lr", "lr_g", "epochs"} <= set(c.data.params) for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    for c in finished:  # one val accuracy per epoch
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_accuracy")] == [1, 2]
    p = parent.data
    assert parent.info.status == "FINISHED"
    assert p.params["method"] == "deepinv" and p.params["num_samples"] == "4" and json.loads(p.params["space"])
    assert {"best.lr", "best.lr_g", "best.epochs"} <= set(p.params) and p.params["best.lr"] == "0.05"
    assert {"best_val_accuracy", "best_test_accuracy"} <= set(p.metrics)

    preset_path = out / "preset_deepinv_mnist.json"
    preset = json.loads(preset_path.read_text())
    assert preset["source"] == "orchestrator.tune" and preset["pair"] == "resnet8:resnet8"
    assert set(preset["config"]) == {"lr", "lr_g", "epochs"}
    assert preset["val_accuracy"] == p.metrics["best_val_accuracy"]
    assert preset["test_accuracy"] == p.metrics["best_test_accuracy"]
    overrides = method_overrides(["deepinv"], {}, [str(preset_path)])
    assert overrides["deepinv"] == preset["config"]
    assert make_config("deepinv", "smoke", overrides["deepinv"]).lr_g == preset["config"]["lr_g"]
    for piece in ("val_acc", "test accuracy", str(preset_path), "mlflow ui --backend-store-uri"):
        assert piece in text


def test_a_diverging_trial_is_errored_and_the_search_goes_on(smoke):
    out, code, _ = smoke
    trials = record(out)["trials"]
    errored = [t for t in trials.values() if t["status"] == "ERRORED"]
    assert len(errored) == 1 and errored[0]["config"]["lr"] == 1e30
    assert "non-finite" in errored[0]["error"] and "failures" not in errored[0]  # --max-failures 0
    assert sum(t["status"] == "FINISHED" for t in trials.values()) == 3
    _, _, children = runs(out)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and "non-finite" in failed[0].data.tags["status"]


@pytest.mark.parametrize("case, extra, space", [
    ("unknown method", ["--method", "nope"], None),
    ("unknown field", [], {"nope": {"type": "uniform", "low": 0, "high": 1}}),
    ("empty range", [], {"lr_g": {"type": "uniform", "low": 0.5, "high": 0.5}}),
    ("float bounds for int", [], {"g_steps": {"type": "int", "low": 1.5, "high": 4}}),
    ("uniform for an int field", [], {"g_steps": {"type": "uniform", "low": 1, "high": 4}}),
    ("loguniform at 0", [], {"tv": {"type": "loguniform", "low": 0, "high": 1}}),
    ("unknown type", [], {"lr_g": {"type": "normal", "low": 0, "high": 1}}),
    ("step that misses high", [], {"g_steps": {"type": "int", "low": 1, "high": 6, "step": 2}}),
    ("bound the config refuses", [], {"lr": {"type": "uniform", "low": -1, "high": 1}}),
    ("choice the config refuses", [], {"kd_criterion": {"type": "choice", "values": ["kl", "mse"]}}),
    ("searched and fixed", ["--set", "lr_g=0.1"], {"lr_g": {"type": "uniform", "low": 0.01, "high": 0.5}}),
    ("no samples", ["--num-samples", "0"], None),
    ("no concurrency", ["--max-concurrent", "0"], None),
    ("unreadable space", ["--space", "/nonexistent/space.json"], None),
    ("unreachable cluster", ["--address", "127.0.0.1:9"], None),
    ("nothing to resume", ["--resume"], None),
])
def test_bad_input_exits_2_with_one_line(env, tmp_path, capsys, case, extra, space):
    import ray

    if space is not None:
        (tmp_path / "bad.json").write_text(json.dumps(space))
        extra = ["--space", str(tmp_path / "bad.json"), *extra]
    with pytest.raises(SystemExit) as exc:
        run_cli(tune.main, argv(env, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not ray.is_initialized()


def test_yaml_space_reads_numbers_without_a_dot(env):
    from orchestrator.search_space import check_space, load_space
    space = check_space("deepinv", load_space(env / "small.yaml"), "smoke")
    assert space == {"lr_g": {"type": "loguniform", "low": 0.01, "high": 0.5}}


@pytest.mark.parametrize("method", list_methods())
def test_every_method_space_is_valid_and_converts(method):
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.search_space import check_space, to_tune
    for budget in ("smoke", "cpu", "paper"):
        space = check_space(method, get_method(method).search_space(), budget)
    optuna_space = OptunaSearch.convert_search_space(to_tune(space))
    assert set(optuna_space) == set(space)
    for name, d in space.items():  # Optuna's ranges are the plain space's, both ends included
        if d["type"] != "choice":
            assert (optuna_space[name].low, optuna_space[name].high) == (d["low"], d["high"])


def test_int_ranges_keep_both_ends_and_step():
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.search_space import check_space, to_tune
    space = check_space("cmi", {"g_steps": {"type": "int", "low": 1, "high": 5},
                                "synthesis_batch_size": {"type": "int", "low": 64, "high": 256, "step": 64}})
    d = OptunaSearch.convert_search_space(to_tune(space))
    assert (d["g_steps"].low, d["g_steps"].high, d["g_steps"].step) == (1, 5, 1)
    assert (d["synthesis_batch_size"].low, d["synthesis_batch_size"].high, d["synthesis_batch_size"].step) == \
        (64, 256, 64)


def _subprocess(args, log: Path, **env_vars) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.tune", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
    """Ends what this test started: the process group of its own subprocess."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(env):
    """Ctrl-C once the first trial has finished and the second has checkpointed epoch 1
    (of 3); --resume must leave the first alone and continue the second from epoch 2."""
    out = env / "resume"
    args = argv(env, out, "--space", str(env / "small.yaml"), "--name", "resumable", "--max-concurrent", "1",
                "--set", "epochs=3", "--grace-period", "3", samples=2)  # ASHA must not end trial 2 early

    def first_done_second_started():
        with contextlib.suppress(OSError, ValueError):
            trials = json.loads((out / "searches" / "resumable.json").read_text())["trials"]
            done = [k for k, t in trials.items() if t.get("status") == "FINISHED"]
            running = [k for k, t in trials.items() if t.get("status") == "RUNNING" and t.get("epochs")]
            return done[0] if done and running else None

    proc = _subprocess(args, env / "resume1.log")
    try:
        first = _wait_for(first_done_second_started, 240, "the first trial to finish", proc)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops the other trial
        assert proc.wait(timeout=120) == 130, (env / "resume1.log").read_text()
    finally:
        _end(proc)
    (result_file,) = (out / "ray_results" / "resumable").glob(f"trial_{first}_*/result.json")
    before = result_file.read_text(), result_file.stat().st_mtime_ns
    assert "continue it with --resume" in (env / "resume1.log").read_text()

    stdout = io.StringIO()  # the resumed run in this process: it starts (and stops) a Ray of its own
    with contextlib.redirect_stdout(stdout):
        code = tune.main([*args, "--resume"])
    assert code == 0, stdout.getvalue()
    assert "continuing the search" in stdout.getvalue()
    trials = record(out)["trials"]
    assert len(trials) == 2 and all(t["status"] == "FINISHED" for t in trials.values())
    assert trials[first]["starts"] == 1  # never started again
    assert (result_file.read_text(), result_file.stat().st_mtime_ns) == before
    (second,) = set(trials) - {first}
    assert trials[second]["starts"] == 2  # interrupted, then continued
    (other,) = (out / "ray_results" / "resumable").glob(f"trial_{second}_*/result.json")
    results = [json.loads(line) for line in other.read_text().splitlines()]
    epochs = [r["epoch"] for r in results]
    assert epochs == [1, 2, 3] or epochs == [1, 3]  # from its checkpoint: no epoch reported twice
    assert all(r["training_iteration"] == r["epoch"] for r in results)  # ASHA's clock survives the restore
    _, parents, children = runs(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert (out / "preset_deepinv_mnist.json").exists()


def test_search_on_a_cluster_joined_with_address(env, tmp_path):
    """Last in the module: a head node of our own, joined with --address, then stopped.

    Head and driver run without Ray's token auth: ~/.ray/auth_token is shared with
    every other Ray on this machine, and a token another cluster rewrote there would
    lock our driver out."""
    import ray

    assert not ray.is_initialized()
    with ray_head(tmp_path / "head.log") as address:
        out = tmp_path / "out"
        driver = _subprocess(argv(env, out, "--space", str(env / "small.yaml"), "--address", address,
                                  "--cpus-per-trial", "1", "--gpus-per-trial", "0", samples=2),
                             tmp_path / "driver.log", RAY_AUTH_MODE="disabled")
        try:
            code = driver.wait(timeout=300)
        finally:
            _end(driver)
        text = (tmp_path / "driver.log").read_text()
        assert code == 0, text
        assert "Connecting to existing Ray cluster" in text
        _, parents, children = runs(out)
        assert len(parents) == 1 and len(children) == 2
        assert all(c.info.status == "FINISHED" for c in children)
        assert json.loads((out / "preset_deepinv_mnist.json").read_text())["method"] == "deepinv"

