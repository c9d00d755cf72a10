"""The teachers CLI: trains, caches with metadata, reuses, and refuses bad checkpoints."""
import subprocess
import sys

import pytest
import torch

from orchestrator import teachers
from orchestrator.core.checkpoints import load_classifier
from orchestrator.cli import UsageError
from tests.test_datasets import make_mnist_like


def run(argv):
    with pytest.raises(SystemExit) as exit_info:
        teachers.run_cli(teachers.main, argv)
    return exit_info.value.code


@pytest.fixture
def tiny_mnist(tmp_path):
    make_mnist_like(tmp_path / "data" / "mnist", n=64)
    return tmp_path / "data"


def test_trains_caches_and_reuses(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "ckpt"
    argv = ["--dataset", "mnist", "--arch", "resnet8", "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--out", str(out), "--data-root", str(tiny_mnist)]
    assert run(argv) == 0
    path = out / "mnist-resnet8.pt"
    model, meta = load_classifier(path, dataset="mnist", num_classes=10, channels=1)
    assert meta["arch"] == "resnet8" and meta["image_size"] == 32 and meta["recipe"]["epochs"] == 1
    assert meta["mean"] == [0.1307] and 0.0 <= meta["accuracy"] <= 100.0
    first = capsys.readouterr().out
    assert "training resnet8" in first and "test accuracy" in first
    stamp = path.stat().st_mtime_ns
    assert run(argv) == 0
    assert "reusing" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp


def test_wrong_dataset_or_channels_refused(tiny_mnist, tmp_path):
    from models import create_model
    from orchestrator.core.checkpoints import save_classifier

    path = save_classifier(tmp_path / "c.pt", create_model("resnet8", 10, in_channels=1),
                           {"dataset": "mnist", "arch": "resnet8", "num_classes": 10, "channels": 1,
                            "image_size": 32, "accuracy": 50.0})
    with pytest.raises(UsageError, match="dataset='mnist'"):
        load_classifier(path, dataset="cifar10")
    with pytest.raises(UsageError, match="channels=1"):
        load_classifier(path, channels=3)
    with pytest.raises(UsageError, match="num_classes=10"):
        load_classifier(path, num_classes=100)


def test_corrupt_checkpoint_is_one_message_exit_2(tiny_mnist, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mnist-resnet8.pt").write_bytes(b"\x00garbage")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.teachers", "--dataset", "mnist", "--arch", "resnet8",
                           "--out", str(out), "--data-root", str(tiny_mnist), "--device", "cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cannot read checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pickled_object_checkpoint_refused(tmp_path):
    # weights_only=True: a checkpoint holding arbitrary objects is refused, never executed.
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": {"x": object()}}, path)
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_classifier(path)


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "imagenet"], "known datasets"),
    (["--arch", "resnet1000"], "known models"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--device", "tpu"], "--device"),
    (["--sizes", "16,x"], "--sizes"),
    (["--sizes", "4"], "--sizes"),
    (["--warmup", "1.5"], "--warmup"),
])
def test_bad_input_exit_2(argv, needle, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_data_names_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert run(["--dataset", "cifar100", "--arch", "resnet8", "--data-root", str(tmp_path / "empty"),
                "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not found; looked in" in err and "empty" in err
    assert run(["--dataset", "cifar100", "--arch", "resnet8", "--data-root", str(tmp_path / "none"),
                "--out", str(tmp_path)]) == 2
    assert "none is not a folder" in capsys.readouterr().err


def test_progressive_resizing_trains_small_first_and_ends_at_full_size(tiny_mnist, tmp_path, capsys):
    from orchestrator.core.training import Recipe

    recipe = Recipe(epochs=3, sizes=(16, 24, 28))
    assert [recipe.size_at(e) for e in range(3)] == [16, 24, None]  # the last epoch is always native
    assert Recipe(epochs=1, sizes=(16,)).size_at(0) is None
    argv = ["--dataset", "mnist", "--arch", "resnet8", "--epochs", "2", "--batch-size", "32", "--sizes", "16",
            "--device", "cpu", "--out", str(tmp_path / "ckpt"), "--data-root", str(tiny_mnist)]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2 (16px)" in out and "epoch 2/2 (32px)" in out
    _, meta = load_classifier(tmp_path / "ckpt" / "mnist-resnet8.pt", dataset="mnist", num_classes=10, channels=1)
    assert list(meta["recipe"]["sizes"]) == [16]


def test_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    import math

    import torch

    from orchestrator.core.training import Recipe

    recipe, total = Recipe(lr=0.2, warmup=0.1), 100
    factors = [recipe.rate_factor(step, total) for step in range(total)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # warm-up ends at the peak
    assert factors[10] == 1.0 and factors[55] == pytest.approx(0.5) and factors[-1] < 0.001
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    # without warm-up it is exactly torch's CosineAnnealingLR over the same steps
    plain = Recipe(lr=0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for step in range(total):
        assert 0.1 * plain.rate_factor(step, total) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert math.isclose(plain.rate_factor(0, total), 1.0)


def test_train_step_benchmark_prints_rates_and_refuses_bad_input(capsys):
    """The figure behind the teacher recipe's batch size (orchestrator.perf.train_step)."""
    from orchestrator.perf import train_step

    argv = ["--arch", "resnet8", "--sides", "8", "16", "--batch-sizes", "4", "2", "--seconds", "0.01", "--threads", "1"]
    assert train_step.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "images/s" in line and "px" in line]
    assert len(rows) == 4 and "(1.00x batch 4)" in rows[0] and "16 px  batch    2" in rows[3]
    assert train_step.main(["--arch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert train_step.main(["--batch-sizes", "0"]) == 2


def test_the_shipped_teacher_is_installed_into_an_empty_cache(tmp_path):
    """The default bench starts distilling at once: the Fashion-MNIST teacher ships with
    the project and lands in the cache after its SHA-256 checks out."""
    from orchestrator.core.classifiers import SHIPPED_DIR, find_checkpoint, sha256, shipped_teachers

    entry = shipped_teachers()["fashion-mnist-wrn16_2.pt"]
    said = []
    path = find_checkpoint(tmp_path, "fashion-mnist", "wrn16_2", log=said.append)
    assert path == tmp_path / "fashion-mnist-wrn16_2.pt" and sha256(path) == entry["sha256"]
    assert "shipped teacher" in said[0] and f"{entry['accuracy']:.2f}%" in said[0]
    _, meta = load_classifier(path, dataset="fashion-mnist")
    assert meta["accuracy"] == entry["accuracy"] and meta["arch"] == "wrn16_2"
    assert find_checkpoint(tmp_path, "mnist", "wrn16_2") is None  # nothing shipped: it must train
    assert (SHIPPED_DIR / "manifest.json").exists()


def test_a_shipped_teacher_that_does_not_match_its_hash_is_refused(tmp_path, monkeypatch):
    import json

    from orchestrator.core import classifiers
    from orchestrator.cli import UsageError

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "fashion-mnist-wrn16_2.pt").write_bytes(b"not the teacher")
    (shipped / "manifest.json").write_text(json.dumps({"fashion-mnist-wrn16_2.pt": {"sha256": "0" * 64,
                                                                                   "accuracy": 92.0}}))
    monkeypatch.setattr(classifiers, "SHIPPED_DIR", shipped)
    with pytest.raises(UsageError, match="does not match its SHA-256"):
        classifiers.find_checkpoint(tmp_path / "cache", "fashion-mnist", "wrn16_2")
    assert not (tmp_path / "cache" / "fashion-mnist-wrn16_2.pt").exists()


def test_recipe_and_checkpoint_errors_name_what_is_wrong(tmp_path, capsys):
    from models import create_model
    from orchestrator.core.checkpoints import save_classifier

    assert run(["--dataset", "mnist", "--arch", "resnet8", "--lr", "-1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid --lr -1.0: it must be > 0" in err and "Recipe(" not in err
    wrong = create_model("resnet20", 10, in_channels=1, image_size=32)
    path = save_classifier(tmp_path / "t.pt", wrong, {"dataset": "mnist", "arch": "resnet8", "num_classes": 10,
                                                        "channels": 1, "image_size": 32, "accuracy": 1.0})
    with pytest.raises(UsageError, match=r"unexpected stages\.0\.1\.bn1\.bias") as exc:
        load_classifier(path, dataset="mnist")
    assert "does not match arch resnet8" in str(exc.value)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(UsageError, match="zip archive") as exc:
        load_classifier(path, dataset="mnist")
    assert "orchestrator.teachers" in str(exc.value)
