"""Guide sets (issue #15): real:K picks, distribution-matching condensation, the cache,
and every bad input as one message with exit code 2 and nothing written."""
import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.datasets import load_split
from orchestrator import condense as condense_cli
from orchestrator.cli import run_cli
from orchestrator.core.condensation import DMConfig, condense, draw_dsa, dm_loss, fixed_dm_loss, random_convnet
from orchestrator.core.errors import UsageError
from orchestrator.core.guides import condensed_guide, image_sha256, load_guide, save_condensed, select_real

# Small nets and few iterations: these tests check behaviour, not quality, in seconds.
FAST = DMConfig(iterations=8, batch_real=16, width=16)


def data_root(tiny_mnist):
    return tiny_mnist / "data"


def test_real_guide_takes_k_training_images_per_class_fixed_by_the_seed(tiny_mnist):
    train = load_split("mnist", "train", data_root(tiny_mnist))
    guide = load_guide("real:2", "mnist", data_root(tiny_mnist), seed=0)
    assert guide.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert guide.images.dtype == torch.float32 and 0 <= guide.images.min() and guide.images.max() <= 1
    for image, label in zip(guide.images, guide.labels):
        # every guide image is a training image of its own class (the test split is never read)
        same = (train.images.float() / 255 == image).flatten(1).all(1)
        assert same.any() and (train.labels[same] == label).all()
    for c in range(10):  # two different images per class, not one twice
        assert not torch.equal(guide.images[2 * c], guide.images[2 * c + 1])
    assert guide.identity == {"kind": "real", "k": 2, "seed": 0, "dataset": "mnist",
                              "sha256": image_sha256(guide.images), "source": str(train.source)}

    again = load_guide("real:2", "mnist", data_root(tiny_mnist), seed=0)
    other = load_guide("real:2", "mnist", data_root(tiny_mnist), seed=1)
    assert torch.equal(again.images, guide.images) and again.identity["sha256"] == guide.identity["sha256"]
    assert not torch.equal(other.images, guide.images) and other.identity["sha256"] != guide.identity["sha256"]
    assert torch.equal(select_real(train, 2, 0), select_real(train, 2, 0))


def test_dsa_is_siamese_and_the_dm_loss_is_zero_for_the_real_images_themselves():
    from benchmarks.datasets import get_dataset_spec

    spec, generator = get_dataset_spec("fashion-mnist"), torch.Generator().manual_seed(0)
    params = random_convnet(1, 8, 3, generator)
    x = torch.rand(6, 1, 32, 32)
    changed = 0
    for _ in range(30):  # enough draws to meet every DSA family
        augment = draw_dsa(spec, 32, generator)
        # one draw, one transformation: an image comes out the same alone or in a batch
        assert torch.allclose(augment(x)[:1], augment(x[:1]), atol=1e-6)
        changed += not torch.allclose(augment(x), x)
        assert dm_loss([x], [x.clone()], params, [augment]).item() == pytest.approx(0, abs=1e-8)
    assert changed > 20
    y = torch.rand(6, 1, 32, 32)
    assert dm_loss([y], [x], params).item() > 0


def test_condensation_moves_the_images_and_lowers_the_distribution_matching_loss(tiny_mnist):
    train = load_split("mnist", "train", data_root(tiny_mnist))
    init = select_real(train, 2, seed=0)
    result = condense(train, init, 2, seed=0, config=FAST, progress=False)
    start = train.images[init].float() / 255
    assert result.images.shape == start.shape and torch.equal(result.labels, train.labels[init])
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert (result.images - start).abs().mean() > 0.01  # the pixels moved
    before, after = fixed_dm_loss([start, result.images], result.labels, train, FAST)
    assert after < 0.9 * before, (before, after)  # 0.73 x here; a wrong sign or no step fails
    assert len(result.losses) == FAST.iterations
    again = condense(train, init, 2, seed=0, config=FAST, progress=False)
    assert torch.equal(again.images, result.images)  # a seed gives the same set


def test_the_cache_round_trips_bit_exactly_and_is_refused_for_another_dataset_k_or_seed(tmp_path):
    images = torch.rand(20, 1, 32, 32)  # arbitrary float bits: any rounding would show
    labels = torch.arange(10).repeat_interleave(2)
    path = save_condensed(tmp_path, "mnist", 2, 0, images, labels, {"note": "test"})
    record = json.loads(path.with_suffix(".json").read_text())
    assert path.with_suffix(".png").is_file() and record["dataset"] == "mnist" and record["note"] == "test"
    for where in (tmp_path, path):  # the cache folder or the file itself
        guide = condensed_guide("mnist", 2, 0, where)
        assert torch.equal(guide.images, images) and torch.equal(guide.labels, labels)
        assert guide.identity["sha256"] == image_sha256(images) == record["sha256"]
        assert guide.identity["source"] == str(path.resolve())

    with pytest.raises(UsageError, match="made for dataset mnist, K = 2, seed 0, not the asked dataset fashion-mnist"):
        condensed_guide("fashion-mnist", 2, 0, path)
    (tmp_path / "condensed-fashion-mnist-k2-seed0.safetensors").write_bytes(path.read_bytes())  # renamed copy
    with pytest.raises(UsageError, match="made for dataset mnist"):
        load_guide("condensed:2", "fashion-mnist", cache_dir=tmp_path)
    with pytest.raises(UsageError, match="K = 2.*not the asked dataset mnist, K = 3"):
        condensed_guide("mnist", 3, 0, path)
    with pytest.raises(UsageError, match="seed 0, not the asked dataset mnist, K = 2, seed 1"):
        condensed_guide("mnist", 2, 1, path)
    with pytest.raises(UsageError, match="python -m orchestrator.condense --dataset mnist --k 5"):
        condensed_guide("mnist", 5, 0, tmp_path)
    from safetensors.torch import save_file

    meta = {"kind": "condensed", "dataset": "mnist", "k": "2", "seed": "0", "sha256": image_sha256(images)}
    save_file({"images": images + 1e-3, "labels": labels}, str(path), metadata=meta)  # edited after the fact
    with pytest.raises(UsageError, match="do not match the SHA-256"):
        condensed_guide("mnist", 2, 0, path)


def test_condense_cli_writes_the_set_its_record_and_grid_and_load_guide_reads_it(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(condense_cli.main, ["--dataset", "mnist", "--k", "2", "--iterations", "3", "--width", "16",
                                    "--batch-real", "8", "--data-root", str(data_root(tiny_mnist)),
                                    "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 0
    path = out / "condensed-mnist-k2-seed0.safetensors"
    assert "done in" in capsys.readouterr().out and path.with_suffix(".png").is_file()
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["config"]["iterations"] == 3 and len(record["loss_per_class"]) == 3
    assert record["paper"] == {"iterations": 20000, "batch_real": 256}
    start = load_guide("real:2", "mnist", data_root(tiny_mnist), seed=0)
    assert record["init_sha256"] == start.identity["sha256"]  # started from the real:2 set of the same seed
    guide = load_guide("condensed:2", "mnist", cache_dir=out)
    assert torch.equal(guide.images, load_file(str(path))["images"]) and guide.identity["sha256"] == record["sha256"]
    assert not torch.equal(guide.images, start.images)


def exits_2(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("argv, needles", [
    (["--k", "0"], ["--k 0", "at least 1"]),
    (["--k", "-3"], ["--k -3", "at least 1"]),
    (["--k", "4"], ["K = 4", "class 3", "only 3 training images", "K <= 3"]),  # the fixture's smallest class
    (["--iterations", "0"], ["--iterations 0"]),
    (["--dataset", "nope"], ["unknown dataset 'nope'"]),
])
def test_condense_cli_bad_input_exits_2_and_writes_nothing(tiny_mnist, tmp_path, capsys, argv, needles):
    out = tmp_path / "cache"
    base = ["--dataset", "mnist", "--data-root", str(data_root(tiny_mnist)), "--out", str(out), "--no-progress"]
    exits_2(condense_cli.main, base + argv, capsys, *needles)
    assert not out.exists()


@pytest.mark.parametrize("spec, needles", [
    ("real", ["'real'", "expected KIND:K"]),
    ("real:", ["expected KIND:K"]),
    ("real:x", ["'real:x'", "whole number", "'x'"]),
    ("pixels:3", ["unknown guide kind 'pixels'", "real, condensed"]),
    ("real:0", ["K = 0", "at least 1"]),
    ("condensed:-1", ["K = -1", "at least 1"]),
    ("real:4", ["class 3", "only 3 training images"]),
    ("condensed:3", ["no condensed set", "python -m orchestrator.condense --dataset mnist --k 3 --seed 0"]),
])
def test_a_bad_guide_is_one_message_exit_2_and_nothing_written(tiny_mnist, tmp_path, capsys, spec, needles):
    cache = tmp_path / "cache"
    exits_2(lambda argv: load_guide(spec, "mnist", data_root(tiny_mnist), cache_dir=cache), [], capsys, *needles)
    assert not cache.exists()


def test_a_cached_set_made_for_another_dataset_exits_2(tmp_path, capsys):
    path = save_condensed(tmp_path, "mnist", 2, 0, torch.rand(20, 1, 32, 32), torch.arange(10).repeat_interleave(2), {})
    before = sorted(p.name for p in tmp_path.iterdir())
    exits_2(lambda argv: load_guide("condensed:2", "fashion-mnist", cache_dir=path), [], capsys,
            str(path), "made for dataset mnist", "fashion-mnist")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
