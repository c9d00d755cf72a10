"""The distillation loop and the distill CLI, end to end on tiny real-format data."""
import json
import subprocess
import sys

import pytest
import torch

from methods import list_methods
from orchestrator import distill as distill_cli
from orchestrator.cell import CellKey, CellRequest, run_cell


@pytest.fixture(scope="module")
def env(tiny_mnist):
    return tiny_mnist


def request(env, method, **kw):
    key = CellKey("mnist", "resnet8", "resnet8", method, 0, "smoke")
    return CellRequest(key, kw.pop("overrides", {}), env / "runs", str(env / "data"), teacher_dir=env / "teachers",
                       progress=False, **kw)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_a_cell(env, method):
    result = run_cell(request(env, method), log=lambda *_: None)
    h = result.history
    assert h.status == "finished" and len(h.accuracy) == 1
    assert all(torch.isfinite(torch.tensor(v)).all() for v in h.losses.values())
    assert "kd/loss" in h.losses and "synth/total" in h.losses
    assert h.images_synthesized[-1] == 2 * 8  # two rounds of synthesis batch 8
    for name in ("history.json", "config.json", "grid.png", "student.pt"):
        assert (result.cell_dir / name).exists()


def test_resume_continues_after_last_epoch(env):
    req = request(env, "dafl", overrides={"epochs": 2}, resume=False)

    def killed_after_first_epoch(epoch, metrics):
        raise KeyboardInterrupt  # as if the process died right after epoch 1's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run_cell(req, on_epoch=killed_after_first_epoch, log=lambda *_: None)
    state = torch.load(req.cell_dir / "state.pt", weights_only=True)
    assert len(state["history"]["accuracy"]) == 1
    epochs_seen = []
    req.resume = True
    rerun = run_cell(req, on_epoch=lambda e, m: epochs_seen.append(e), log=lambda *_: None)
    assert epochs_seen == [2]  # epoch 1 is not run again
    assert rerun.history.epochs_done == 2 and rerun.history.status == "finished"
    assert rerun.history.accuracy[0] == state["history"]["accuracy"][0]


def test_nan_stops_the_cell_with_a_status(env):
    # An absurd learning rate makes the student diverge: the cell ends "failed", no crash.
    result = run_cell(request(env, "dafl", overrides={"lr": 1e30}, resume=False), log=lambda *_: None)
    assert result.history.status.startswith("failed: non-finite loss")


def test_same_seed_same_result(env, tmp_path):
    a = run_cell(request(env, "cmi", resume=False), log=lambda *_: None)
    sa = torch.load(a.cell_dir / "student.pt", weights_only=True)["state_dict"]
    b = run_cell(request(env, "cmi", resume=False), log=lambda *_: None)
    sb = torch.load(b.cell_dir / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pool_export_and_seed(env, tmp_path):
    pool = tmp_path / "pool"
    run_cell(request(env, "deepinv", save_pool=pool, resume=False), log=lambda *_: None)
    assert (pool / "pool.safetensors").exists()
    result = run_cell(request(env, "deepinv", init_pool=pool, resume=False), log=lambda *_: None)
    assert result.history.status == "finished"


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "orchestrator.distill", *argv], capture_output=True, text=True)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "nosuch"], "dafl"),
    (["--set", "nosuch=1"], "nosuch"),
    (["--set", "lr=-0.1"], "lr"),
    (["--set", "g_steps=0"], "g_steps"),
    (["--set", "g_steps=abc"], "g_steps"),
    (["--budget", "huge"], "smoke"),
    (["--teacher", "resnet1000"], "known models"),
])
def test_bad_input_is_refused_before_anything_runs(argv, needle, tmp_path, capsys):
    """In-process; the subprocess test below shows the same path as a user runs it."""
    from orchestrator.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(distill_cli.main, [*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing started


def test_teacher_with_wrong_channels_refused(env, tmp_path):
    from models import create_model
    from orchestrator.checkpoints import save_classifier
    ckpt = save_classifier(tmp_path / "t.pt", create_model("resnet8", 10),
                           {"dataset": "mnist", "arch": "resnet8", "num_classes": 10, "channels": 3,
                            "image_size": 32, "accuracy": 1.0})
    proc = cli("--method", "dafl", "--dataset", "mnist", "--teacher", "resnet8", "--student", "resnet8",
               "--budget", "smoke", "--teacher-ckpt", str(ckpt), "--data-root", str(env / "data"),
               "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2 and "channels" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_prints_config_epochs_and_final_line(env, tmp_path):
    proc = cli("--method", "deepinv", "--dataset", "mnist", "--teacher", "resnet8", "--student", "resnet8",
               "--budget", "smoke", "--set", "g_steps=3", "--teacher-dir", str(env / "teachers"),
               "--data-root", str(env / "data"), "--out", str(tmp_path), "--no-progress", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    config_line = next(line for line in proc.stdout.splitlines() if line.startswith("config "))
    assert json.loads(config_line[len("config "):])["g_steps"] == 3
    assert "epoch 1/1" in proc.stdout and "teacher" in proc.stdout.splitlines()[-1]
    saved = json.loads(next(tmp_path.glob("*/config.json")).read_text())
    assert saved["config"]["g_steps"] == 3
