"""The method registry is the one list of methods: a method added outside methods/ (one
module, its registration) runs through `distill`, shows in `--help` and, in
tests/test_cluster.py, through a bench cell with no edit anywhere else; the README's method
table is the registry's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_ENV = {"DFKD_METHOD_MODULES": "tests.throwaway_method", "PYTHONPATH": str(ROOT)}


def run(*argv, env=None):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})


def test_readme_method_table_is_the_registry():
    from methods.__main__ import method_table

    readme = (ROOT / "README.md").read_text()
    assert method_table() in readme, "README's method table is stale: paste `python -m methods` into it"


def test_a_method_from_outside_methods_runs_through_distill(tiny_mnist, tmp_path):
    env = tiny_mnist
    helped = run("orchestrator.bench", "--help", env=PLUGIN_ENV)
    assert "throwaway" in helped.stdout
    proc = run("orchestrator.distill", "--method", "throwaway", "--dataset", "mnist", "--teacher", "resnet8",
               "--student", "resnet8", "--budget", "smoke", "--teacher-dir", str(env / "teachers"), "--data-root",
               str(env / "data"), "--out", str(tmp_path), "--no-progress", "--device", "cpu", env=PLUGIN_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads(next(tmp_path.glob("*_throwaway_*/history.json")).read_text())
    assert history["status"] == "finished" and "synth/oh" in history["losses"] and "kd/loss" in history["losses"]


@pytest.mark.parametrize("value", ["tests.no_such_module", "os.path.nope"])
def test_a_method_module_that_cannot_be_imported_is_one_message(value, tmp_path):
    proc = run("orchestrator.distill", "--budget", "smoke", "--out", str(tmp_path), env={"DFKD_METHOD_MODULES": value})
    assert proc.returncode == 2 and "DFKD_METHOD_MODULES" in proc.stderr and "Traceback" not in proc.stderr
