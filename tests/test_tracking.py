"""orchestrator.tracking against a real SQLite MLflow store (nothing mocked).

One store is built per module (creating MLflow's tables costs seconds); the tests then
read it back with a plain MlflowClient.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.tracking import (
    CELL_FIELDS,
    Tracker,
    TrackingError,
    cell_key,
    check_tracking_uri,
    flatten_params,
    resolve_tracking_uri,
    sanitize_key,
)

EXPERIMENT = "dfkd-test"


def _cell(method: str, seed: int = 0) -> dict:
    return dict(dataset="fashion-mnist", teacher="wrn16_2", student="wrn16_1", method=method,
                seed=seed, budget="smoke", mode="paper")


def _config(n: int = 150) -> dict:
    # Nested like a real effective config, 150 leaves in all (more than one log_batch).
    cfg = {f"p{i:03d}": i * 0.5 for i in range(n - 4)}
    cfg["method"] = {"name": "cmi", "loss": {"adv": 0.5, "bn": 10.0}}
    cfg["long"] = "x" * 10_000
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    cwd = root / "cwd"
    cwd.mkdir()
    grid = root / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # anything written relative to the CWD would land here
        uri = resolve_tracking_uri(None, root / "out")
        check_tracking_uri(uri)
        tracker = Tracker(uri, EXPERIMENT, root / "artifacts")
        parent = tracker.start_parent("bench", params={"methods": ["dafl", "cmi"]},
                                      tags={"kind": "bench"})
        children = {}
        for method, status in (("dafl", "FINISHED"), ("cmi", "FINISHED"), ("zskt", "FAILED")):
            run = tracker.start_child(parent, f"fmnist/{method}", tags={f"cell.{k}": str(v) for k, v in _cell(method).items()},
                                      params=_config())
            for epoch in (1, 2, 3):
                tracker.log_metrics(run, {"acc": 0.1 * epoch, "loss/kd": 1.0 / epoch,
                                          "loss:adv": epoch}, step=epoch)
            children[method] = run
            tracker.finish(run, status, tags={"status.reason": "ok" if status == "FINISHED"
                                              else "NaN in loss"})
        dafl = children["dafl"]
        tracker.log_artifact(dafl, grid, "images")
        table = root / "table.md"
        table.write_text("| a |\n|---|\n| 1 |\n")
        tracker.log_artifact(dafl, table)
        tracker.log_table(dafl, pd.DataFrame({"method": ["dafl"], "acc": [0.3]}), "table.json")
        tracker.finish(parent)
    return dict(root=root, cwd=cwd, uri=uri, tracker=tracker, parent=parent, children=children)


def test_default_uri_is_absolute_sqlite_in_out_dir(store):
    assert store["uri"] == "sqlite:///" + str((store["root"] / "out" / "mlflow.db").resolve())
    assert (store["root"] / "out" / "mlflow.db").is_file()


def test_children_are_nested_under_parent_with_cell_tags(store):
    client = store["tracker"].client
    for method, run_id in store["children"].items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == store["parent"]
        assert run.data.tags["cell.method"] == method
        assert run.data.tags["cell.seed"] == "0"
        assert run.info.run_name == f"fmnist/{method}"
    assert client.get_run(store["parent"]).info.status == "FINISHED"
    assert client.get_run(store["children"]["zskt"]).info.status == "FAILED"


def test_metric_history_has_one_point_per_epoch(store):
    client = store["tracker"].client
    run_id = store["children"]["cmi"]
    history = client.get_metric_history(run_id, "acc")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert len(client.get_metric_history(run_id, "loss/kd")) == 3
    assert "loss_adv" in client.get_run(run_id).data.metrics  # ':' sanitized


def test_full_config_is_logged_in_batches(store):
    params = store["tracker"].client.get_run(store["children"]["dafl"]).data.params
    assert len(params) == 150  # > 100: needs two log_batch calls
    assert params["p010"] == "5.0"
    assert params["method.loss.adv"] == "0.5"
    assert len(params["long"]) == 6000 and params["long"].endswith("...")


def test_finished_cells_returns_finished_children_only(store):
    cells = store["tracker"].finished_cells()
    assert set(cells) == {cell_key(_cell("dafl")), cell_key(_cell("cmi"))}
    key = ("fashion-mnist", "wrn16_2", "wrn16_1", "dafl", "0", "smoke", "paper")
    assert cells[key]["run_id"] == store["children"]["dafl"]
    assert cells[key]["metrics"]["acc"] == pytest.approx(0.3)  # the latest epoch
    assert cells[key]["tags"]["status.reason"] == "ok"
    assert len(CELL_FIELDS) == len(key)


def test_finished_cells_pages_through_results(store):
    tracker = Tracker(store["uri"], EXPERIMENT)  # a second tracker on the same store
    tracker.page_size = 1  # force one run per page
    assert set(tracker.finished_cells()) == set(store["tracker"].finished_cells())


def test_artifacts_land_under_artifact_root_not_cwd(store):
    assert list(store["cwd"].iterdir()) == []
    tracker, dafl = store["tracker"], store["children"]["dafl"]
    expected = (store["root"] / "artifacts" / EXPERIMENT).resolve().as_uri()
    assert tracker.artifact_location == expected
    run_dir = store["root"] / "artifacts" / EXPERIMENT / dafl / "artifacts"
    assert (run_dir / "images" / "grid.png").read_bytes() == b"\x89PNG fake"
    assert (run_dir / "table.md").read_text().startswith("| a |")
    table = pd.read_json(run_dir / "table.json", orient="split")
    assert table["acc"].tolist() == pytest.approx([0.3])
    names = {f.path for f in tracker.client.list_artifacts(dafl)}
    assert names == {"images", "table.md", "table.json"}


def test_nan_metrics_are_logged_and_threads_share_a_tracker(store):
    tracker = store["tracker"]
    run_id = tracker.start_child(store["parent"], "threads", tags={"kind": "threads"})
    threads = [threading.Thread(target=tracker.log_metrics,
                                args=(run_id, {f"t{i}": float(i), "nan": math.nan}, i))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tracker.finish(run_id, "KILLED")
    metrics = tracker.client.get_run(run_id).data.metrics
    assert {f"t{i}" for i in range(4)} <= set(metrics)
    assert math.isnan(metrics["nan"])
    # KILLED and untagged runs are not cells to skip on --resume.
    assert len(tracker.finished_cells()) == 2


def test_ui_command_names_the_db(store):
    db = str((store["root"] / "out" / "mlflow.db").resolve())
    cmd = store["tracker"].ui_command()
    assert cmd.startswith("mlflow ui --backend-store-uri sqlite:///")
    assert db in cmd and "127.0.0.1" in cmd


def test_unreachable_server_fails_fast_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"cannot reach MLflow tracking server at "
                                            r"http://127.0.0.1:9: .*mlflow server"):
        check_tracking_uri("http://127.0.0.1:9", timeout=2)
    assert time.monotonic() - start < 10


def test_resolve_tracking_uri_forms(tmp_path):
    db = str((tmp_path / "x.db").resolve())
    assert resolve_tracking_uri(str(tmp_path / "x.db"), tmp_path) == "sqlite:///" + db
    assert resolve_tracking_uri("sqlite:///" + db, Path("elsewhere")) == "sqlite:///" + db
    assert resolve_tracking_uri(str(tmp_path), Path("o")) == "sqlite:///" + str(
        (tmp_path / "mlflow.db").resolve())
    assert resolve_tracking_uri("http://127.0.0.1:5000/", tmp_path) == "http://127.0.0.1:5000"
    for bad in ("file:///tmp/mlruns", "s3://bucket/x", str(tmp_path / "nope" / "runs")):
        with pytest.raises(TrackingError):
            resolve_tracking_uri(bad, tmp_path)


def test_check_sqlite_folder_must_be_writable(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/new/sub/mlflow.db")  # creatable: fine
    (tmp_path / "afile").write_text("")
    with pytest.raises(TrackingError, match="not writable"):
        check_tracking_uri(f"sqlite:///{tmp_path}/afile/mlflow.db")


def test_names_and_params_are_sanitized():
    assert sanitize_key("loss:kd") == "loss_kd"
    assert sanitize_key("/a//./../b") == "a/__/b"
    assert sanitize_key("") == "_"
    flat = flatten_params({"a": {"b": [1, 2], "c": None, "d": {}}, "e f": Path("/x")})
    assert flat == {"a.b": "[1, 2]", "a.c": "None", "a.d": "{}", "e f": "/x"}


def test_limits_match_mlflow():
    from mlflow.utils import validation

    import orchestrator.tracking as tracking
    for name in ("MAX_PARAMS_TAGS_PER_BATCH", "MAX_METRICS_PER_BATCH", "MAX_PARAM_VAL_LENGTH",
                 "MAX_TAG_VAL_LENGTH", "MAX_ENTITY_KEY_LENGTH"):
        assert getattr(tracking, name) == getattr(validation, name), name
