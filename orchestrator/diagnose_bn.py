"""Is a distilled student's low accuracy a BatchNorm-statistics artefact?

    python -m orchestrator.diagnose_bn runs/bench/cells/*/student.pt --dataset fashion-mnist

A student distilled on synthetic images keeps BatchNorm running statistics of those
images. For each checkpoint this prints the real test accuracy with those running
statistics (what the bench reports), with each test batch's own statistics instead, and
how the predictions spread over the classes. A large gain from the second column means
the student learned but its statistics do not fit real data; a student that predicts
one class either way has learned nothing usable yet.
"""
from __future__ import annotations

import torch

from benchmarks.datasets import get_dataset_spec, load_split
from orchestrator.core.checkpoints import load_classifier
from orchestrator.cli import ArgumentParser, run_cli
from orchestrator.core.training import normalize


@torch.no_grad()
def accuracy_and_spread(model: torch.nn.Module, data, batch_stats: bool, batch_size: int = 500):
    """(accuracy %, predictions per class); batch_stats=True normalises each batch with
    its own statistics (train-mode BatchNorm) without touching the running ones."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(batch_stats)
    correct, spread = 0, torch.zeros(data.spec.num_classes, dtype=torch.long)
    for x, y in data.batches(batch_size):
        predicted = model(normalize(x, data.spec.mean, data.spec.std)).argmax(1)
        correct += (predicted == y).sum().item()
        spread += torch.bincount(predicted, minlength=data.spec.num_classes)
    model.load_state_dict(saved)  # train mode updated the running statistics: undo it
    model.eval()
    return 100.0 * correct / max(len(data), 1), spread.tolist()


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m orchestrator.diagnose_bn", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="student checkpoints (student.pt of bench or distill cells)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    args = parser.parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    test = load_split(args.dataset, "test", args.data_root)
    # All checkpoints are checked before anything is printed: a bad one is one clean error.
    models = [(path, load_classifier(path, dataset=args.dataset, num_classes=spec.num_classes,
                                     channels=spec.channels)[0]) for path in args.checkpoints]
    print(f"test split: {len(test)} images from {test.source}")  # never a silent fallback copy
    print(f"{'checkpoint':60s} {'running BN':>10s} {'batch BN':>9s}  predictions per class")
    for path, model in models:
        running, spread = accuracy_and_spread(model, test, batch_stats=False)
        batch, _ = accuracy_and_spread(model, test, batch_stats=True)
        print(f"{str(path)[-60:]:60s} {running:9.2f}% {batch:8.2f}%  {spread}")
    return 0


if __name__ == "__main__":
    run_cli(main)
