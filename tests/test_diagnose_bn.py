"""orchestrator.diagnose_bn on a real checkpoint and real (tiny) idx files."""
import ast

import torch

from orchestrator import diagnose_bn
from orchestrator.core.checkpoints import load_classifier


def test_reports_both_accuracies_and_leaves_running_stats_alone(tiny_mnist, capsys):
    path = tiny_mnist / "teachers" / "mnist-resnet8.pt"
    before, _ = load_classifier(path, dataset="mnist", num_classes=10, channels=1)
    assert diagnose_bn.main([str(path), "--dataset", "mnist", "--data-root", str(tiny_mnist / "data")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"test split: 64 images from {tiny_mnist / 'data' / 'mnist'}"  # the folder read, named
    line = lines[2]
    running, batch = [float(part.rstrip("%")) for part in line.split()[1:3]]
    assert 0 <= running <= 100 and 0 <= batch <= 100
    spread = ast.literal_eval(line[line.index("["):])  # predictions per class, summing to the test set size
    assert len(spread) == 10 and sum(spread) == 64

    model, _ = load_classifier(path, dataset="mnist", num_classes=10, channels=1)
    from benchmarks.datasets import load_split
    test = load_split("mnist", "test", tiny_mnist / "data")
    diagnose_bn.accuracy_and_spread(model, test, batch_stats=True)
    for (name, a), b in zip(before.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # train-mode BN must not leak into the model
