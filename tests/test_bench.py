"""The bench's input checks and helpers. The bench end to end (a real Ray head node, the
real MLflow SQLite store, tiny real-format data, run as a user runs it) is in
tests/test_cluster.py, which shares one head node with the search's end-to-end test."""
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from methods import list_methods, make_config


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


@pytest.mark.parametrize("extra,needle", [
    (["--methods", "nosuch"], "unknown method"),
    (["--datasets", "imagenet"], "known datasets"),
    (["--pairs", "resnet8-resnet8"], "teacher:student"),
    (["--pairs", "resnet8:resnet1000"], "resnet1000"),
    (["--set", "nosuch=1"], "no method"),
    (["--methods", "dafl,,cmi"], "empty item"),
    (["--seeds", "0,-1"], "seeds must be >= 0"),
    (["--data-root", "/nonexistent/data"], "is not a folder"),
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
    assert not out.exists() and not ray.is_initialized()  # nothing written, not even an empty --out


def test_unwritable_out_as_a_user_runs_it(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = bench(env, blocker / "out", timeout=120)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one message


def test_runs_without_the_hash_tag_are_matched_by_their_logged_params():
    """Runs logged before the config-hash tag existed are reused only if their params match."""
    import dataclasses

    from methods import make_config
    from orchestrator.bench import same_config
    from orchestrator.tracking import flatten_params

    config = make_config("dafl", "smoke", {})
    logged = flatten_params(dataclasses.asdict(config))
    assert same_config({"tags": {}, "params": logged}, config)
    assert not same_config({"tags": {}, "params": logged}, make_config("dafl", "smoke", {"g_steps": 3}))
    assert not same_config({"tags": {}, "params": {}}, config)
    tagged = {"tags": {"cell.config_hash": "0" * 16}, "params": logged}
    assert not same_config(tagged, config)  # the tag, when present, decides


def test_one_bench_per_output_folder(tmp_path):
    """A second bench on the same --out refuses at once, naming the first; the lock of a
    bench that is gone is taken over with a message."""
    import json

    from orchestrator.cli import OutLock, UsageError

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".lock"
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "started": "earlier"}))
        with pytest.raises(UsageError, match=f"another bench \\(pid {sleeper.pid}"):
            with OutLock(tmp_path, "bench"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    said = []
    with OutLock(tmp_path, "bench", log=said.append):  # its owner is gone now
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over" in said[0] and not lock.exists()


def test_accuracy_against_synthesis_cost_summarises_finished_seeds(tmp_path):
    import pandas as pd

    from orchestrator.core.cell import CellKey
    from orchestrator.report import cost_points, long_rows, plot_cost

    rows = []
    for method, seconds, accs in (("cmi", 300.0, [70.0, 72.0, 74.0]), ("fast", 30.0, [71.0, 71.0, 80.0])):
        for seed, acc in enumerate(accs):
            key = CellKey("mnist", "resnet8", "resnet8", method, seed, "cpu")
            rows += long_rows(key, "finished", {"accuracy": acc, "synthesis_seconds": seconds + seed})
    failed = CellKey("mnist", "resnet8", "resnet8", "fast", 9, "cpu")
    rows += long_rows(failed, "failed", {"accuracy": 10.0, "synthesis_seconds": 1.0})  # never counted
    long = pd.DataFrame(rows)
    points = cost_points(long, "mnist")
    cmi, fast = points.loc[("CMI", "resnet8", "resnet8")], points.loc[("Fast", "resnet8", "resnet8")]
    assert (cmi.n, cmi.accuracy, cmi.accuracy_std, cmi.synthesis_s) == (3, 72.0, 2.0, 301.0)
    assert (fast.n, fast.accuracy, fast.synthesis_s_std) == (3, 74.0, 1.0)
    assert plot_cost(long, "mnist", tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_cost(long, "cifar10", tmp_path / "none.png") is None and cost_points(long, "cifar10").empty


@pytest.mark.parametrize("method", list_methods())
def test_the_bar_counts_every_synthesis_and_kd_step_of_a_cell_once(method):
    """steps_done, the bench bar's unit, walked through a `cpu` cell as the round loop reports
    it (warm-up epochs included): each round adds its synthesis steps at "kd" (or at the next
    round, in a warm-up epoch) and its KD steps at the next round; the total is the sum."""
    from orchestrator.core.loop import cell_steps, rounds_per_epoch, steps_done

    config = make_config(method, budget="cpu")
    rounds = rounds_per_epoch(config)
    seen = [0]
    for r in range(config.epochs * rounds):
        warm = r < config.warmup_epochs * rounds
        assert steps_done(config, r, "synthesis") == seen[-1]
        if not warm:
            assert steps_done(config, r, "kd") == seen[-1] + config.g_steps
        seen.append(seen[-1] + config.g_steps + (0 if warm else config.kd_steps))
    assert steps_done(config, config.epochs * rounds) == cell_steps(config) == seen[-1] > 0


def test_the_default_cells_steps():
    """make bench's three cells: 600, 1000 and 700 steps (100 DAFL rounds of 1 + 5, 10
    DeepInversion rounds of 50 + 50, 10 CMI rounds of 20 + 50), where rounds were 100, 10, 10."""
    from orchestrator.core.loop import cell_steps

    totals = {m: cell_steps(make_config(m, budget="cpu")) for m in ("dafl", "deepinv", "cmi")}
    assert totals == {"dafl": 600, "deepinv": 1000, "cmi": 700}
