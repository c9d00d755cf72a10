"""Tests run on CPU with the machine's two cores; keep torch from oversubscribing them."""
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

# Tests use tiny models and batches, where a second thread costs more than it gives
# (and CLIs started by the tests run in their own processes with their own threads).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A tiny MNIST in its real idx format and a resnet8 teacher trained on it once per
    session: `root/data/mnist/*-ubyte.gz`, `root/teachers/mnist-resnet8.pt`."""
    from orchestrator.core.classifiers import default_recipe, get_classifier
    from tests.test_datasets import make_mnist_like

    root = tmp_path_factory.mktemp("tiny_mnist")
    make_mnist_like(root / "data" / "mnist", n=64)
    get_classifier("mnist", "resnet8", out=root / "teachers", recipe=default_recipe("mnist", epochs=1, batch_size=32),
                   data_root=root / "data", progress=False, log=lambda *_: None)
    return root
