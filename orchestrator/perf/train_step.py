"""How fast one process trains a classifier here, per batch size and image side.

    python -m orchestrator.perf.train_step                      # wrn16_2, 1 channel, ~2 min
    python -m orchestrator.perf.train_step --arch resnet18 --channels 3 --sides 32 --batch-sizes 128

Times full SGD steps (forward, cross-entropy, backward, update) on random batches in the
layout training uses (channels_last), after a few warm-up steps, and prints images/s and
the ratio to the first batch size of each side. This is the figure behind the
Fashion-MNIST teacher recipe (docs/results/teachers.md): which batch sizes cost the same per
image, and what a 16- or 24-pixel epoch costs against a 32-pixel one.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from methods import place
from models import create_model


def images_per_second(arch: str, channels: int, side: int, batch_size: int, seconds: float) -> float:
    torch.manual_seed(0)
    model = place(create_model(arch, 10, in_channels=channels, image_size=side), "cpu").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # oneDNN picks its kernels on the first calls
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="wrn16_2")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per figure")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if min(args.sides + args.batch_sizes + [args.channels, args.threads]) < 1 or args.seconds <= 0:
        print("error: sides, batch sizes, channels, threads and seconds must be positive", file=sys.stderr)
        return 2
    try:
        create_model(args.arch, 10, in_channels=args.channels, image_size=max(args.sides))
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"{args.arch}, {args.channels} channel(s), {args.threads} thread(s): training images/s")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for side in args.sides:
            base = None
            for batch_size in args.batch_sizes:
                rate = images_per_second(args.arch, args.channels, side, batch_size, args.seconds)
                base = base or rate
                print(f"  {side:3d} px  batch {batch_size:4d}: {rate:7.1f} images/s  "
                      f"({rate / base:.2f}x batch {args.batch_sizes[0]})", flush=True)
    finally:
        torch.set_num_threads(previous)  # callers in the same process keep their setting
    return 0


if __name__ == "__main__":
    sys.exit(main())
