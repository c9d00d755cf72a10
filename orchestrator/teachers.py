"""Train (or reuse) a classifier on real data: the teacher, or a student from scratch.

    python -m orchestrator.teachers --dataset fashion-mnist --arch wrn16_2
    python -m orchestrator.teachers --dataset fashion-mnist --arch wrn16_1   # "S. Scratch"

The checkpoint lands in `--out` (default checkpoints/teachers) as `<dataset>-<arch>.pt`
with its metadata (dataset, arch, test accuracy, normalisation, channels, image size,
recipe). A second call reuses it; `--force` trains again. Training a student arch from
scratch with the same recipe gives the reference table's "S. Scratch" row, the teacher's
own accuracy its "T. Scratch" row.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.datasets import get_dataset_spec
from models import create_model, list_models
from orchestrator.cli import ArgumentParser, parse_device, run_cli
from orchestrator.core.classifiers import DEFAULT_DIR, default_recipe, get_classifier


def _sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,24, got '{text}'") from None


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m orchestrator.teachers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="wrn16_2", help="classifier name (teacher, or student for scratch)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=float, help="fraction of the steps with a linear warm-up of the rate")
    parser.add_argument("--sizes", type=_sizes, help="progressive resizing: training side of the first epochs, "
                        "e.g. 16,24 (the last epoch always uses the dataset's size); 'none' turns it off")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="checkpoint folder")
    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is not found")
    parser.add_argument("--force", action="store_true", help="train again even if a checkpoint exists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    if args.arch not in list_models():
        create_model(args.arch, spec.num_classes)
    device = parse_device(args.device)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    recipe = default_recipe(args.dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            sizes=args.sizes, warmup=args.warmup)
    _, meta = get_classifier(args.dataset, args.arch, out=args.out, recipe=recipe, device=device,
                             data_root=args.data_root, download=args.download, force=args.force, seed=args.seed)
    print(f"{args.arch} on {args.dataset}: test accuracy {meta['accuracy']:.2f}% "
          f"(trained in {meta['train_seconds']:.0f}s, {meta['recipe']['epochs']} epochs)")
    return 0


if __name__ == "__main__":
    run_cli(main)
