"""Each dataset's real on-disk format, written small, read back by the real loader."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from benchmarks.datasets import (DatasetError, get_dataset_spec, list_datasets, load_split,
                                 train_augment)


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def make_mnist_like(folder, n=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz)
    return folder


def make_cifar(folder, hundred=False, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"
    for name in names:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: rng.integers(0, 100 if hundred else 10, n).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return folder


def make_tiny(folder, wnids=("n01443537", "n01629819"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{wnid}_{i}.JPEG")
            name = f"val_{c}_{i}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_mnist_like_idx_files_load_padded_to_32(tmp_path, name, gz):
    make_mnist_like(tmp_path / name, gz=gz)
    data = load_split(name, "train", tmp_path)
    assert data.images.shape == (12, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.images[:, :, :2].sum() == 0 and data.images[:, :, :, -2:].sum() == 0  # zero padding
    assert data.labels.dtype == torch.int64 and len(load_split(name, "test", tmp_path)) == 12


def test_idx_content_is_read_exactly(tmp_path):
    make_mnist_like(tmp_path / "mnist", gz=False, seed=3)
    raw = (tmp_path / "mnist" / "train-images-idx3-ubyte").read_bytes()[16:]
    expected = np.frombuffer(raw, np.uint8).reshape(12, 28, 28)
    data = load_split("mnist", "train", tmp_path)
    assert np.array_equal(data.images[:, 0, 2:30, 2:30].numpy(), expected)


@pytest.mark.parametrize("name,hundred,classes", [("cifar10", False, 10), ("cifar100", True, 100)])
def test_cifar_python_batches(tmp_path, name, hundred, classes):
    folder = make_cifar(tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py"), hundred)
    train = load_split(name, "train", tmp_path)
    assert train.images.shape == ((6 if hundred else 30), 3, 32, 32)
    with open(folder / ("test" if hundred else "test_batch"), "rb") as fh:
        entry = pickle.load(fh)
    test = load_split(name, "test", folder)  # the folder itself works as --data-root too
    assert np.array_equal(test.images.reshape(6, -1).numpy(), entry["data"])
    assert test.spec.num_classes == classes


def test_tiny_imagenet_folder_layout(tmp_path):
    make_tiny(tmp_path / "tiny-imagenet-200")
    train = load_split("tiny", "train", tmp_path)
    test = load_split("tiny", "test", tmp_path)
    assert train.images.shape == (6, 3, 64, 64) and test.images.shape == (6, 3, 64, 64)
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1] == sorted(test.labels.tolist())


def test_missing_dataset_names_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        load_split("cifar10", "train", tmp_path / "empty")
    message = str(err.value)
    assert "empty" in message and "--data-root" in message and "--download" in message


def test_a_data_root_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="--data-root .*nowhere is not a folder"):
        load_split("fashion-mnist", "test", tmp_path / "nowhere")


def test_a_named_root_is_never_completed_from_another_copy(tmp_path):
    """A root holding only the test files: the train split is refused, naming the missing
    file, even where a full copy exists elsewhere on the machine (Debian's, here)."""
    folder = make_mnist_like(tmp_path / "fashion-mnist")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).unlink()
    assert load_split("fashion-mnist", "test", tmp_path).source == folder
    with pytest.raises(DatasetError, match="lacks train-images-idx3-ubyte"):
        load_split("fashion-mnist", "train", tmp_path)


def test_tiny_imagenet_without_val_annotations_names_the_file(tmp_path):
    make_tiny(tmp_path / "tiny-imagenet-200")
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="lacks val/val_annotations.txt"):
        load_split("tiny", "test", tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="cifar10, cifar100, fashion-mnist, mnist, tiny"):
        get_dataset_spec("imagenet")


def test_corrupt_files_are_a_clear_error(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="unreadable CIFAR batch"):
        load_split("cifar10", "train", tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    folder = make_mnist_like(tmp_path / "mnist")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="unreadable idx file"):
        load_split("mnist", "train", tmp_path)


def test_specs_carry_the_reference_constants():
    assert get_dataset_spec("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert get_dataset_spec("fashion-mnist").std == (0.3530,)
    assert get_dataset_spec("tiny").image_size == 64 and get_dataset_spec("tiny").num_classes == 200
    assert set(list_datasets()) == {"cifar10", "cifar100", "tiny", "fashion-mnist", "mnist"}


def test_train_augmentation_draws_per_image():
    spec = get_dataset_spec("cifar10")
    x = torch.rand(1, 3, 32, 32).repeat(64, 1, 1, 1)
    out = train_augment(x, spec, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    distinct = {tuple(img.flatten()[:200].tolist()) for img in out}
    assert len(distinct) > 10  # one crop/flip draw per image, not one per batch
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x[0], (4, 4, 4, 4))
    img = out[0]
    found = any(torch.equal(padded[:, dy:dy + 32, dx:dx + 32], img) or
                torch.equal(padded[:, dy:dy + 32, dx:dx + 32].flip(2), img)
                for dy in range(9) for dx in range(9))
    assert found


def test_real_fashion_mnist_from_debian_if_installed():
    import os
    if not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    test = load_split("fashion-mnist", "test")
    assert len(test) == 10000 and test.images.shape[1:] == (1, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
