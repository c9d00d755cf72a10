"""How fast a student is scored on the test split, by batch size.

    python -m orchestrator.perf.eval_speed                      # wrn16_1, fashion-mnist, 2 threads, batches 1000 128 64
    python -m orchestrator.perf.eval_speed --arch wrn16_2 --batches 256,128
    python -m orchestrator.perf.eval_speed --batches 128 --rounds 5    # folded BN against plain, alternating

Times `orchestrator.core.training.evaluate` (inference mode, channels_last weights as in
training) on the whole split, after one warm-up pass per batch size, and prints seconds,
images/s and the speed-up over the first batch size; then, at the last batch size, the
plain model (`fold=False`) against the BN-folded copy evaluate scores by default
(models/fold.py), in alternating rounds, with both accuracies. The weights are random: the time of a
pass does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.eval_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="wrn16_1")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1000,128,64")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of plain against folded")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.datasets import load_split
    from methods.base import place
    from models import create_model
    from orchestrator.cli import UsageError
    from orchestrator.core.training import evaluate

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UsageError(f"--batches {args.batches!r}: expected a comma list of integers, e.g. 1000,128") from None
    if args.threads < 1 or args.rounds < 1 or any(b < 1 for b in batches):
        raise UsageError("--threads, --rounds and every --batches value must be at least 1")
    torch.set_num_threads(args.threads)
    test = load_split(args.dataset, "test", args.data_root)
    try:
        model = create_model(args.arch, num_classes=test.spec.num_classes, in_channels=test.spec.channels)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--arch {args.arch}: {exc}") from None
    model = place(model, "cpu")
    print(f"{args.arch} on {len(test)} images from {test.source}, {args.threads} threads")
    first = None
    for batch in batches:
        evaluate(model, test, batch_size=batch)  # warm-up
        tick = time.perf_counter()
        evaluate(model, test, batch_size=batch)
        seconds = time.perf_counter() - tick
        first = first or seconds
        print(f"batch {batch:5d}: {seconds:6.2f} s  {len(test) / seconds:7.0f} img/s  {first / seconds:4.2f}x")
    times: dict[bool, list[float]] = {False: [], True: []}
    accuracy = {}
    for _ in range(args.rounds):
        for fold in (False, True):
            tick = time.perf_counter()
            accuracy[fold] = evaluate(model, test, batch_size=batches[-1], fold=fold)
            times[fold].append(time.perf_counter() - tick)
    plain, folded = statistics.median(times[False]), statistics.median(times[True])
    print(f"batch {batches[-1]:5d}, median of {args.rounds}: plain {plain:.2f} s ({accuracy[False]:.2f}%), "
          f"folded {folded:.2f} s ({accuracy[True]:.2f}%): {plain / folded:.2f}x")
    return 0


if __name__ == "__main__":
    from orchestrator.cli import run_cli

    run_cli(main)
