"""orchestrator.tune end to end: a real local Ray (2 CPUs), a real MLflow SQLite store,
a tiny MNIST in idx format and a resnet8 teacher trained once for the module.

Trials run deepinv on the smoke budget with 2 epochs (so ASHA and per-epoch checkpoints
have something to do) over a two-field space. The interrupted-and-resumed search and the
search on a head node joined with --address are in tests/test_cluster.py.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from methods import get_method, list_methods, make_config
from orchestrator import tune
from orchestrator.cli import method_overrides
from orchestrator.cli import run_cli

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


def test_a_restored_trial_keeps_its_own_state_when_it_is_newer(tmp_path):
    """Tune's recorded checkpoint can lag the trial's own state by an epoch (Ctrl-C between
    the two); the newer state must win, or that epoch runs and is reported twice."""
    import dataclasses

    from orchestrator.core.loop import History, epochs_done, save_state

    def state_with(epochs: int, path: Path) -> Path:
        history = History(accuracy=[50.0] * epochs)
        save_state(path, {"histories": [dataclasses.asdict(history)], "marker": epochs})
        return path

    import torch

    tune_ckpt, own = state_with(1, tmp_path / "ckpt" / "state.pt"), state_with(2, tmp_path / "cell" / "state.pt")
    assert not tune.restore_state(tune_ckpt, own)
    assert torch.load(own, weights_only=True)["marker"] == 2
    state_with(3, tune_ckpt)  # Tune's is newer (e.g. the trial moved to another node): it wins
    assert tune.restore_state(tune_ckpt, own) and torch.load(own, weights_only=True)["marker"] == 3
    missing = tmp_path / "fresh" / "state.pt"
    missing.parent.mkdir()
    assert tune.restore_state(tune_ckpt, missing) and epochs_done(missing) == 3


def test_a_resumed_search_keeps_its_settings_and_refuses_conflicting_flags():
    """`tune --resume` runs with the budget and every setting the search started with; a
    flag given again with another value is refused, never applied (or ignored) silently."""
    from orchestrator.cli import UsageError
    from orchestrator.core.cell import CellKey

    started = {"key": {"dataset": "mnist", "teacher": "resnet8", "student": "resnet8", "method": "deepinv",
                       "seed": 0, "budget": "smoke", "mode": "paper"},
               "fixed": {"epochs": "3"}, "max_t": 3}
    plain = tune.parse_args(["--method", "deepinv", "--resume"])
    kept = tune.saved_settings(plain, started, {})
    assert kept["key"] == CellKey("mnist", "resnet8", "resnet8", "deepinv", 0, "smoke") and kept["max_t"] == 3
    for flags, needle in ((["--budget", "cpu"], "--budget cpu"), (["--seed", "3"], "--seed 3"),
                          (["--method", "cmi"], "--method cmi")):  # cmi is the default: typed all the same
        args = tune.parse_args(["--resume", *flags])
        with pytest.raises(UsageError, match=needle):
            tune.saved_settings(args, started, {})
    with pytest.raises(UsageError, match="--set"):
        tune.saved_settings(plain, started, {"epochs": "5"})
    assert tune.saved_settings(plain, started, {"epochs": "3"})["fixed"] == {"epochs": "3"}


def test_yaml_presets_and_space_errors_with_line_and_column(tmp_path):
    from orchestrator.cli import UsageError, method_overrides
    from orchestrator.search_space import load_space

    preset = tmp_path / "preset.yaml"
    preset.write_text("method: cmi\nconfig:\n  lr_g: 0.002\n  cr: 0.5\n")
    assert method_overrides(["cmi"], {}, [str(preset)])["cmi"] == {"lr_g": 0.002, "cr": 0.5}
    broken = tmp_path / "space.yaml"
    broken.write_text("lr_g:\n  type: loguniform\n  low: [1e-4\n  high: 1e-2\n")
    with pytest.raises(UsageError, match=r"line \d+, column \d+"):
        load_space(broken)
    preset.write_text("method: cmi\nconfig: {lr_g: 0.002\n")
    with pytest.raises(UsageError, match=r"--preset .*line \d+, column \d+"):
        method_overrides(["cmi"], {}, [str(preset)])


def test_asha_grace_period_reaches_past_every_warm_up_a_trial_can_have(env, tmp_path):
    # Warm-up epochs only synthesize: a trial scores chance until its first KD epoch, so a
    # grace period inside the warm-up stops every trial that warms up.
    assert tune.grace_period(1, 0, None, 10) == 1
    assert tune.grace_period(1, 2, None, 10) == 3  # fixed warm-up (--set or the budget)
    assert tune.grace_period(1, 0, {"type": "choice", "values": [0, 1, 2]}, 10) == 3  # searched warm-up
    assert tune.grace_period(4, 0, {"type": "int", "low": 0, "high": 2}, 10) == 4  # asked for more: kept
    assert tune.grace_period(1, 20, None, 10) == 10  # never past the horizon
    space = tmp_path / "warm.json"
    space.write_text(json.dumps({"warmup_epochs": {"type": "choice", "values": [0, 1]}}))
    p = tune.plan(tune.parse_args(["--method", "fast", "--dataset", "mnist", "--pair", "resnet8:resnet8",
                                   "--budget", "smoke", "--set", "epochs=3", "--space", str(space),
                                   "--data-root", str(env / "data"), "--out", str(tmp_path / "out")]))
    assert p["grace"] == 2 and p["max_t"] == 3
