"""NetGraft, the few-shot network-grafting baseline (issue #15): hybrids are wired right, a
grafting stage trains only its unit and adapters, the result is a plain student, the CLI
writes the long results format and resumes, and bad input is one line and exit code 2."""
import csv
import json

import pytest
import torch

from benchmarks.datasets import get_dataset_spec, load_split
from models import create_model
from orchestrator import netgraft
from orchestrator.cli import run_cli
from orchestrator.core.checkpoints import load_classifier, save_classifier
from orchestrator.core.grafting import BUDGETS, Graft, StageRecord, stage_plan, train_stage
from orchestrator.core.guides import load_guide
from orchestrator.core.cell import image_spec
from orchestrator.core.training import evaluate
from orchestrator.report import LONG_COLUMNS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MNIST in its idx format and an untrained wrn16_2 'teacher' checkpoint:
    `root/data/mnist`, `root/teachers/mnist-wrn16_2.pt`. Behaviour, not accuracy, is tested."""
    from tests.test_datasets import make_mnist_like

    root = tmp_path_factory.mktemp("netgraft")
    make_mnist_like(root / "data" / "mnist", n=64)
    spec = get_dataset_spec("mnist")
    torch.manual_seed(0)
    teacher = create_model("wrn16_2", 10, in_channels=1, image_size=32)
    save_classifier(root / "teachers" / "mnist-wrn16_2.pt", teacher, {
        "dataset": "mnist", "arch": "wrn16_2", "num_classes": 10, "channels": 1, "image_size": 32,
        "mean": list(spec.mean), "std": list(spec.std), "accuracy": 10.0})
    return root


def frozen_teacher(seed=0):
    torch.manual_seed(seed)
    teacher = create_model("wrn16_2", 10, in_channels=1, image_size=32).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong wiring cannot hide behind identity BNs
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return teacher


def set_identity(conv):
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
        conv.bias.zero_()


def test_a_hybrid_of_the_teachers_own_stages_with_identity_adapters_is_the_teacher():
    teacher = frozen_teacher()
    twin = create_model("wrn16_2", 10, in_channels=1, image_size=32)
    twin.load_state_dict(teacher.state_dict())
    graft = Graft(teacher, twin).eval()
    for conv in (*graft.s2t, *graft.t2s):
        set_identity(conv)
    x = torch.randn(4, 1, 32, 32)
    want = teacher(x)
    feats, logits = graft.teacher_features(x)
    assert torch.allclose(logits, want, atol=1e-5)
    for span in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        assert torch.allclose(graft(x, *span), want, atol=1e-5), span
        assert torch.allclose(graft(x, *span, feats), want, atol=1e-5), span

    # a thinner student: every hybrid has the teacher's output shape; a tied t2s undoes its
    # s2t exactly, so the whole-student hybrid is the plain student itself
    torch.manual_seed(1)
    graft = Graft(teacher, create_model("wrn16_1", 10, in_channels=1, image_size=32)).eval()
    assert torch.equal(graft.student.conv1.weight, teacher.conv1.weight)  # the shared stem
    assert [c.weight.shape[:2] for c in graft.s2t] == [(32, 16), (64, 32)]
    assert [c.weight.shape[:2] for c in graft.t2s] == [(16, 32), (32, 64)]
    for span in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)]:
        assert graft(x, *span).shape == want.shape
    assert torch.allclose(graft(x, 0, 2), graft.student(x), atol=1e-6)
    for i, width in enumerate((16, 32)):
        with torch.no_grad():
            graft.s2t[i].bias.normal_()
        graft.tie(i)
        h = torch.randn(3, width, 8, 8)
        assert torch.allclose(graft.t2s[i](graft.s2t[i](h)), h, atol=1e-4)


def test_a_grafting_stage_trains_only_its_unit_and_adapters_and_leaves_the_teacher_unchanged():
    teacher = frozen_teacher()
    torch.manual_seed(0)
    graft = Graft(teacher, create_model("wrn16_1", 10, in_channels=1, image_size=32))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    mine_before = {k: v.clone() for k, v in graft.state_dict().items()}
    record, groups = stage_plan(graft, BUDGETS["smoke"])[1]  # block grafting of the second stage
    assert record.name == "block 2" and record.span == (1, 1)
    groups = groups()
    allowed = {id(p) for g in groups for p in g["params"]}
    names = {n for n, p in graft.named_parameters() if id(p) in allowed}
    assert names == ({n for n, _ in graft.named_parameters() if n.startswith("student.stages.1.")}
                     | {"s2t.1.weight", "s2t.1.bias"})
    tied = {k: v.clone() for k, v in graft.state_dict().items() if k.startswith("t2s.0.")}  # set by groups()
    assert torch.allclose(graft.t2s[0](graft.s2t[0](torch.ones(1, 16, 2, 2))), torch.ones(1, 16, 2, 2), atol=1e-4)

    # one backward: gradients reach exactly the unit and its two adapters, never the teacher
    spec = image_spec("mnist")
    x = spec.normalize(torch.rand(6, 1, 32, 32))
    feats, target = graft.teacher_features(x)
    from orchestrator.core.grafting import graft_loss

    graft_loss(graft(x, 1, 1, feats), target).backward()
    got = {n for n, p in graft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == names
    assert all(p.grad is None for p in teacher.parameters())
    graft.zero_grad(set_to_none=True)

    train_stage(graft, torch.rand(8, 1, 32, 32), spec, StageRecord("block 2", (1, 1), 1), groups, batch_size=4)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())  # BN statistics too
    changed = {k for k, v in graft.state_dict().items() if not torch.equal(v, mine_before[k])}
    assert changed and all(k.startswith(("student.stages.1.", "t2s.0.", "s2t.1.")) for k in changed), changed
    assert {"s2t.1.weight", "student.stages.1.0.conv1.weight"} <= changed
    assert all(torch.equal(v, graft.state_dict()[k]) for k, v in tied.items())  # the tied adapter did not train


def run(tiny, out, *extra, seeds="0"):
    return ["--dataset", "mnist", "--guide", "real:2", "--seeds", seeds, "--budget", "smoke", "--out", str(out),
            "--teacher-dir", str(tiny / "teachers"), "--data-root", str(tiny / "data"), "--device", "cpu",
            "--teacher", "wrn16_2", "--student", "wrn16_1", *extra]


def test_the_cli_writes_a_plain_student_long_results_and_a_run_and_resume_skips_a_finished_seed(tiny, tmp_path,
                                                                                                capsys):
    out = tmp_path / "out"
    assert netgraft.main(run(tiny, out)) == 0
    cell = out / "mnist_wrn16_2-wrn16_1_netgraft_real2_s0_smoke"
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == LONG_COLUMNS
    values = {r["metric"]: float(r["value"]) for r in rows}
    assert {"accuracy", "wall_seconds"} <= set(values)
    assert all((r["row"], r["method"], r["seed"], r["budget"], r["mode"], r["status"], r["teacher"], r["student"])
               == ("NetGraft", "netgraft", "0", "smoke", "real:2", "finished", "wrn16_2", "wrn16_1") for r in rows)

    # the student is a plain wrn16_1 checkpoint, and its recorded accuracy is what `evaluate` gives
    student, meta = load_classifier(cell / "student.pt", dataset="mnist", num_classes=10, channels=1)
    assert meta["arch"] == "wrn16_1" and meta["method"] == "netgraft" and meta["guide"] == "real:2"
    plain = create_model("wrn16_1", 10, in_channels=1, image_size=32)
    assert set(student.state_dict()) == set(plain.state_dict())
    assert type(student) is type(plain)
    test = load_split("mnist", "test", tiny / "data")
    assert evaluate(student, test) == pytest.approx(values["accuracy"])

    history = json.loads((cell / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["block 1", "block 2", "block 3", "connect 1-2", "connect 1-3"]
    assert all(len(s["loss"]) == s["epochs"] and s["iterations"] > 0 for s in history["stages"])
    assert history["guide"] == load_guide("real:2", "mnist", str(tiny / "data")).identity

    from orchestrator.tracking import Tracker, resolve_tracking_uri

    runs = Tracker(resolve_tracking_uri(None, out), "dfkd-netgraft").finished_cells()
    (key, done), = runs.items()
    assert key[:7] == ("mnist", "wrn16_2", "wrn16_1", "netgraft", "0", "smoke", "real:2")
    assert done["params"]["guide.kind"] == "real" and done["params"]["guide.k"] == "2"
    assert done["params"]["guide.sha256"] == history["guide"]["sha256"]
    assert done["metrics"]["accuracy"] == pytest.approx(values["accuracy"])

    capsys.readouterr()
    stamp = (cell / "student.pt").stat().st_mtime_ns
    assert netgraft.main(run(tiny, out, "--resume")) == 0
    assert "[seed 0] finished earlier" in capsys.readouterr().out
    assert (cell / "student.pt").stat().st_mtime_ns == stamp
    with open(out / "results.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows


@pytest.mark.parametrize("change, needles", [
    ({"--dataset": "nope"}, ["nope"]),
    ({"--guide": "real:0"}, ["at least 1"]),
    ({"--guide": "fancy:3"}, ["unknown guide kind"]),
    ({"--guide": "real"}, ["expected KIND:K"]),
    ({"--seeds": "0,x"}, ["--seeds", "integers"]),
    ({"--seeds": "-1"}, ["--seeds", ">= 0"]),
    ({"--budget": "huge"}, ["unknown budget"]),
    ({"--student": "resnet8"}, ["WideResNet"]),
    ({"--student": "wrn40_2", "--teacher": "wrn16_1"}, ["wider"]),
    ({"--out": "FILE/out"}, ["--out", "not writable"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, capsys, change, needles):
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = tmp_path / "out"
    argv = run(tiny, out)
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = str(tmp_path / value) if flag == "--out" else value
    with pytest.raises(SystemExit) as exit_info:
        run_cli(netgraft.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written
