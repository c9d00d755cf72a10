"""The runs written by orchestrator.tracking show up in MLflow's real web UI.

Builds a SQLite store with a parent and two child runs, serves it with `mlflow server`
on 127.0.0.1, opens the experiment in headless Debian Chromium via playwright and finds
the child runs. The screenshot goes to tmp_path/mlflow_ui.png, and to docs/mlflow_ui.png
when DFKD_SAVE_SCREENSHOT is set:

    DFKD_SAVE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_mlflow_ui.py -q
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking import Tracker, check_tracking_uri, resolve_tracking_uri

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "mlflow_ui.png"
PARENT = "bench-fashion-mnist-smoke"
CHILDREN = {"dafl": "fashion-mnist/dafl/wrn16_2-wrn16_1/s0",
            "cmi": "fashion-mnist/cmi/wrn16_2-wrn16_1/s0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout}s:\n{log.read_text()[-2000:]}")


def _populate(tracker: Tracker) -> tuple[str, dict[str, str]]:
    parent = tracker.start_parent(PARENT, params={"methods": "dafl,cmi"}, tags={"kind": "bench"})
    children = {}
    for method, name in CHILDREN.items():
        cell = dict(dataset="fashion-mnist", teacher="wrn16_2", student="wrn16_1",
                    method=method, seed=0, budget="smoke", mode="paper")
        run = tracker.start_child(parent, name, tags={f"cell.{k}": str(v) for k, v in cell.items()}, params={"lr": 0.1})
        for epoch in (1, 2, 3):
            tracker.log_metrics(run, {"acc": 0.2 * epoch, "loss/kd": 1.0 / epoch}, step=epoch)
        tracker.finish(run)
        children[method] = run
    tracker.finish(parent)
    return parent, children


def test_child_runs_are_listed_in_mlflow_ui(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package `chromium`)")
    from playwright.sync_api import sync_playwright

    # The store's tables exist before the server starts (so the two never race to create
    # them); the runs are written while the server boots, as a bench would.
    uri = resolve_tracking_uri(None, tmp_path / "out")
    tracker = Tracker(uri, "dfkd-ui", tmp_path / "artifacts")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", tracker.uri,
             "--default-artifact-root", str(tmp_path / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True)  # its own process group: the finally ends its workers too
    shot = tmp_path / "mlflow_ui.png"
    try:
        parent_id, children = _populate(tracker)
        exp_id = tracker.experiment_id
        with sync_playwright() as pw:
            # Chromium starts while the server is still importing.
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                _wait_healthy(base, proc, log)
                check_tracking_uri(base)
                # The same store through the server, as `--tracking-uri http://...` sees it.
                remote = Tracker(base, "dfkd-ui", None)
                assert remote.experiment_id == exp_id
                assert {c["run_id"] for c in remote.finished_cells().values()} == set(
                    children.values())
                assert remote.ui_command() == f"open {base}/{remote.ui_path()}"

                page = browser.new_page(viewport={"width": 1600, "height": 900})
                page.set_default_timeout(20_000)
                page.goto(f"{base}/{remote.ui_path()}")  # #/experiments/<id>/runs?...
                try:
                    page.get_by_text(PARENT, exact=True).first.wait_for()
                except Exception:
                    page.screenshot(path=str(shot))  # shows what the UI showed instead
                    raise
                # Cosmetic, for the screenshot: fold away the assistant side panel.
                close = page.get_by_role("button", name="Close")
                if close.count() == 1:
                    close.click()
                # Child runs are collapsed under their parent: expand it.
                missing = list(CHILDREN.values())
                expander = page.locator('button[data-component-id*="runnamecellrenderer"]')
                if expander.count():
                    expander.first.click()
                    try:
                        page.get_by_text(missing[0], exact=True).first.wait_for(timeout=10_000)
                    except Exception:
                        pass
                missing = [n for n in missing if not page.get_by_text(n, exact=True).count()]
                page.screenshot(path=str(shot))
                # A UI that will not expand: each child's own page must name it instead.
                for method, name in CHILDREN.items():
                    if name in missing:
                        page.goto(f"{base}/#/experiments/{exp_id}/runs/{children[method]}")
                        page.get_by_text(name, exact=True).first.wait_for()
                        missing.remove(name)
                assert not missing
            finally:
                browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("DFKD_SAVE_SCREENSHOT"):
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, DOCS_SCREENSHOT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
