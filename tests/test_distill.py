"""The distillation loop and the distill CLI, end to end on tiny real-format data."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from methods import get_method, list_methods
from methods.spec import ImageSpec
from orchestrator import distill as distill_cli
from orchestrator.core.cell import CellKey, CellSpec, run_in_process

SPEC8 = ImageSpec(10, 1, 8, (0.5,), (0.5,))  # 8x8 one-channel images for Trainer-level tests


@pytest.fixture(scope="module")
def env(tiny_mnist):
    return tiny_mnist


def spec(env, method, overrides=None):
    # A method that cannot run without a guide set gets a small one (the tiny MNIST has >= 3 per class).
    key = CellKey("mnist", "resnet8", "resnet8", method, 0, "smoke",
                  guide="real:2" if get_method(method).requires_guide else "")
    return CellSpec.build(key, overrides or {}, env / "teachers" / "mnist-resnet8.pt", str(env / "data"))


def run_cell(env, method, overrides=None, **kw):
    s = spec(env, method, overrides)
    return run_in_process(s, env / "runs" / s.key.slug, log=lambda *_: None, **kw)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_a_cell(env, method):
    result = run_cell(env, method)
    h = result.history
    assert h.status == "finished" and len(h.accuracy) == 1
    assert all(torch.isfinite(torch.tensor(v)).all() for v in h.losses.values())
    assert "kd/loss" in h.losses and "synth/total" in h.losses
    # two rounds of synthesis batch 8 (KD on a guide set synthesizes none)
    assert h.images_synthesized[-1] == (0 if get_method(method).requires_guide else 2 * 8)
    for name in ("history.json", "config.json", "grid.png", "student.pt"):
        assert (result.cell_dir / name).exists()


def test_resume_continues_after_last_epoch_with_the_same_history(env):
    whole = run_cell(env, "cmi", {"epochs": 3}, resume=False)

    def killed_after_first_epoch(epoch, metrics):
        raise KeyboardInterrupt  # as if the process died right after epoch 1's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run_cell(env, "cmi", {"epochs": 3}, resume=False, on_epoch=killed_after_first_epoch)
    state = torch.load(whole.cell_dir / "state.pt", weights_only=True)
    assert len(state["histories"][0]["accuracy"]) == 1
    epochs_seen = []
    rerun = run_cell(env, "cmi", {"epochs": 3}, on_epoch=lambda e, m: epochs_seen.append(e))
    assert epochs_seen == [2, 3]  # epoch 1 is not run again
    assert rerun.history.status == "finished"
    # Random states are part of the checkpoint: the continued cell is the uninterrupted one.
    assert rerun.history.accuracy == whole.history.accuracy
    assert rerun.history.losses == whole.history.losses


def test_crd_runs_in_a_cell_and_resumes_with_the_same_history(env):
    """kd_criterion=kl+crd: the heads and the teacher-embedding queue are in the trainer's
    checkpoint, so a cell killed after epoch 1 continues as the uninterrupted one."""
    overrides = {"epochs": 3, "kd_criterion": "kl+crd"}
    whole = run_cell(env, "dafl", overrides, resume=False)
    assert whole.history.status == "finished"
    crd = whole.history.losses["kd/crd"]
    assert len(crd) == 3 and all(math.isfinite(v) and v > 0 for v in crd)
    trainer_state = torch.load(whole.cell_dir / "state.pt", weights_only=True)["strategy"]["trainers"][0]
    queue = trainer_state["objective"]["queue"]
    assert queue["size"] == 3 * 2 * 8  # 3 epochs of 2 KD steps of 8 teacher embeddings, under its capacity
    assert set(trainer_state["objective"]["heads"]) == {"student_head.linear.weight", "student_head.linear.bias",
                                                       "teacher_head.linear.weight", "teacher_head.linear.bias"}

    def killed_after_first_epoch(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cell(env, "dafl", overrides, resume=False, on_epoch=killed_after_first_epoch)
    rerun = run_cell(env, "dafl", overrides)
    assert rerun.history.accuracy == whole.history.accuracy
    assert rerun.history.losses == whole.history.losses
    resumed_state = torch.load(rerun.cell_dir / "state.pt", weights_only=True)["strategy"]["trainers"][0]
    assert torch.equal(resumed_state["objective"]["queue"]["buffer"], queue["buffer"])
    # Without "+crd" the trainer's checkpoint is what it always was.
    plain = run_cell(env, "dafl", {"epochs": 1}, resume=False)
    assert "objective" not in torch.load(plain.cell_dir / "state.pt", weights_only=True)["strategy"]["trainers"][0]
    assert "kd/crd" not in plain.history.losses


@pytest.mark.parametrize("value, needle", [("kl+nce", "kd_criterion must be one of kl, l1, kl+crd, l1+crd"),
                                           ("crd", "kd_criterion must be one of")])
def test_a_bad_kd_criterion_is_refused_with_one_line(value, needle, tmp_path, capsys):
    from orchestrator.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(distill_cli.main, ["--set", f"kd_criterion={value}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1


def test_warmup_epochs_only_synthesize(env):
    """A method's warm-up epochs (Fast-DFKD, NAYER) run synthesis but no KD step."""
    from orchestrator.core.cell import make_student

    initial = make_student(spec(env, "dafl")).state_dict()
    after_epoch = {}

    def read_student(epoch, metrics):  # the checkpoint is written before on_epoch
        state = torch.load(env / "runs" / spec(env, "dafl").key.slug / "state.pt", weights_only=True)
        after_epoch[epoch] = state["strategy"]["trainers"][0]["student"]

    h = run_cell(env, "dafl", {"epochs": 2, "warmup_epochs": 1}, resume=False, on_epoch=read_student).history
    assert h.status == "finished" and h.epochs_done == 2
    assert math.isnan(h.losses["kd/loss"][0]) and not math.isnan(h.losses["kd/loss"][1])
    assert not math.isnan(h.losses["synth/total"][0]) and h.images_synthesized == [16, 32]
    assert h.kd_seconds[0] == 0.0 and h.kd_seconds[1] > 0
    assert all(torch.equal(initial[k], after_epoch[1][k]) for k in initial)  # no KD step in warm-up
    assert not all(torch.equal(initial[k], after_epoch[2][k]) for k in initial)


def test_nan_stops_the_cell_with_a_status(env):
    # An absurd learning rate makes the student diverge: the cell ends "failed", no crash.
    result = run_cell(env, "dafl", {"lr": 1e30}, resume=False)
    assert result.history.status.startswith("failed: non-finite kd/loss in KD (epoch 1")


def test_same_seed_same_result(env, tmp_path):
    a = run_cell(env, "cmi", resume=False)
    sa = torch.load(a.cell_dir / "student.pt", weights_only=True)["state_dict"]
    b = run_cell(env, "cmi", resume=False)
    sb = torch.load(b.cell_dir / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bank_export_and_seed(env, tmp_path):
    bank = tmp_path / "bank"
    run_cell(env, "deepinv", resume=False, save_bank_to=bank)
    assert (bank / "bank.safetensors").exists()
    result = run_cell(env, "deepinv", resume=False, init_bank=bank)
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
    from orchestrator.core.checkpoints import save_classifier
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
    assert f"evaluating on the test split: 64 images from {env / 'data' / 'mnist'}" in proc.stdout + proc.stderr
    saved = json.loads(next(tmp_path.glob("*/config.json")).read_text())
    assert saved["config"]["g_steps"] == 3


def test_a_damaged_resume_state_is_refused_by_name(env, tmp_path, capsys):
    """A state.pt truncated by a full disk: one message naming it and the cure, exit 2."""
    s = spec(env, "dafl")
    run_in_process(s, tmp_path / s.key.slug, log=lambda *_: None)
    state = tmp_path / s.key.slug / "state.pt"
    state.write_bytes(state.read_bytes()[:2000])
    argv = ["--method", "dafl", "--dataset", "mnist", "--teacher", "resnet8", "--student", "resnet8",
            "--budget", "smoke", "--teacher-dir", str(env / "teachers"), "--data-root", str(env / "data"),
            "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    from orchestrator.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(distill_cli.main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"cannot read the resume state {state}" in err and "--fresh" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        run_cli(distill_cli.main, [*argv, "--fresh"])
    assert exc.value.code == 0


def test_the_curve_scores_a_fixed_subset_and_the_last_epoch_the_whole_split(monkeypatch):
    """Epochs before the last are scored on the same CURVE_IMAGES images; the last epoch (the
    number every table reports) on the whole split, also when the cell was resumed."""
    from types import SimpleNamespace

    from benchmarks.datasets import ImageSet, get_dataset_spec
    from models import create_model
    from orchestrator.core import loop

    n = loop.CURVE_IMAGES + 500
    data = ImageSet(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8), torch.arange(n) % 10,
                    get_dataset_spec("mnist"), "memory")
    scored = []
    monkeypatch.setattr(loop, "evaluate", lambda model, split, device: scored.append(split) or 0.0)
    make = lambda: loop.Trainer(create_model("resnet8", num_classes=10, in_channels=1),  # noqa: E731
                                create_model("resnet8", num_classes=10, in_channels=1),
                                SimpleNamespace(lr=0.1, epochs=3, kd_criterion="kl", T=1.0, kd_steps=1,
                                                batch_size=4, guide_mix=0.0), data, SPEC8)
    trainer = make()
    trainer.end_epoch()
    trainer.kd_steps(lambda b: torch.rand(b, 1, 8, 8))  # a changed student is scored again
    trainer.end_epoch()
    resumed = make()  # a cell resumed after epoch 2 knows its last epoch from the scheduler state
    resumed.load_state_dict(trainer.state_dict())
    resumed.end_epoch()
    assert [len(s) for s in scored] == [loop.CURVE_IMAGES, loop.CURVE_IMAGES, n]
    assert torch.equal(scored[0].images, scored[1].images)  # the same images every epoch
    assert torch.equal(scored[0].images, make().curve_set.images)  # and in every cell


def test_an_unchanged_student_is_not_scored_again(monkeypatch):
    """A warm-up epoch takes no KD step: its student is the one scored at the epoch before, so
    the same number is reported without a pass over the images; a step, a resumed state or
    the last epoch's whole split is scored anew."""
    from types import SimpleNamespace

    from benchmarks.datasets import ImageSet, get_dataset_spec
    from models import create_model
    from orchestrator.core import loop

    n = loop.CURVE_IMAGES + 500
    data = ImageSet(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8), torch.arange(n) % 10,
                    get_dataset_spec("mnist"), "memory")
    scored = []
    monkeypatch.setattr(loop, "evaluate", lambda model, split, device: scored.append(len(split)) or float(len(scored)))
    trainer = loop.Trainer(create_model("resnet8", num_classes=10, in_channels=1),
                           create_model("resnet8", num_classes=10, in_channels=1),
                           SimpleNamespace(lr=0.1, epochs=5, kd_criterion="kl", T=1.0, kd_steps=1, batch_size=4,
                                           guide_mix=0.0), data, SPEC8)
    warm = [trainer.end_epoch(), trainer.end_epoch()]  # two warm-up epochs: one pass
    trainer.kd_steps(lambda b: torch.rand(b, 1, 8, 8))
    after_kd = trainer.end_epoch()
    trainer.load_state_dict(trainer.state_dict())
    resumed = trainer.end_epoch()
    last = trainer.end_epoch()  # no step since, but the whole split
    assert warm == [1.0, 1.0] and after_kd == 2.0 and resumed == 3.0 and last == 4.0
    assert scored == [loop.CURVE_IMAGES, loop.CURVE_IMAGES, loop.CURVE_IMAGES, n]


def test_kd_targets_come_from_the_folded_teacher_with_the_plain_teachers_step():
    """The KD step reads its targets from the teacher's BN-folded copy (fewer BatchNorms,
    models/fold.py), and one step moves the student as a step on the plain teacher's
    targets does, to float rounding."""
    from types import SimpleNamespace

    import torch.nn as nn

    from benchmarks.datasets import ImageSet, get_dataset_spec
    from methods.losses import kd_loss
    from models import create_model
    from orchestrator.core import loop

    torch.manual_seed(0)
    teacher = create_model("wrn16_1", num_classes=10, in_channels=1)
    for m in teacher.modules():  # statistics a fold that ignored them would get wrong
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    reference = copy.deepcopy(student)
    data = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), get_dataset_spec("mnist"), "memory")
    cfg = SimpleNamespace(lr=0.1, epochs=1, kd_criterion="kl", T=4.0, kd_steps=1, batch_size=16, guide_mix=0.0)
    trainer = loop.Trainer(teacher, student, cfg, data, SPEC8)
    count = lambda net: sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # noqa: E731
    assert count(trainer.kd_teacher) < count(teacher)
    images = torch.rand(16, 1, 8, 8)
    trainer.kd_steps(lambda b: images)
    # The same step by hand, on the plain eval-mode teacher.
    x = SPEC8.normalize(images)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    with torch.no_grad():
        target = teacher.eval()(x)
    kd_loss("kl", reference.train()(x), target, 4.0).backward()
    opt.step()
    for ours, theirs in zip(trainer.student.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
