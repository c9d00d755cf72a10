"""Would a synthesis step run faster if the frozen teacher saw its batch in chunks?

    python -m orchestrator.perf.chunking                     # wrn16_2, 1x32x32, batch 128, chunks 128 64 32 16

Evaluation ran 2.2x faster at batches of 128 than of 1000 on this CPU (cache-sized
activations, perf/eval_speed.py). This asks the same of a synthesis step at the `cpu`
budget's 128 images: the eval-mode teacher's forward and backward to its input, with the
BatchNorm-statistics loss (DeepInversion's R_feature) over the whole batch, computed in
chunks and recombined exactly (per-chunk means and variances merged with the parallel
formula). It prints, per chunk size, the loss and gradient difference to one pass of 128
(the mathematics is unchanged) and the median seconds over alternating repetitions: the
step (forward + backward) and the inference pass of a KD step's teacher.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.chunking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="wrn16_2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", default="128,64,32,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    import torch
    import torch.nn as nn

    from methods.base import place
    from models import create_model
    from orchestrator.cli import UsageError

    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        raise UsageError(f"--chunks {args.chunks!r}: expected a comma list of integers, e.g. 128,32") from None
    if min([args.batch, args.threads, args.repeats, *chunks]) < 1:
        raise UsageError("--batch, --threads, --repeats and every --chunks value must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = place(create_model(args.arch, 10, in_channels=1, image_size=32), "cpu").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    parts: list = []
    for bn in (m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.register_forward_hook(lambda m, i, o: parts.append(
            (m, i[0].mean(dim=(0, 2, 3)), i[0].var(dim=(0, 2, 3), unbiased=False), len(i[0]))))
    images = torch.rand(args.batch, 1, 32, 32)

    def step(chunk):
        parts.clear()
        x = images.clone().requires_grad_(True)
        loss = torch.cat([teacher(c) for c in x.split(chunk)]).logsumexp(1).mean()
        per_layer: dict = {}
        for m, mean, var, n in parts:
            per_layer.setdefault(m, []).append((mean, var, n))
        for m, pieces in per_layer.items():  # exact merge of per-chunk statistics
            total = sum(n for _, _, n in pieces)
            mean = sum(n * mu for mu, _, n in pieces) / total
            var = sum(n * (v + (mu - mean) ** 2) for mu, v, n in pieces) / total
            loss = loss + torch.linalg.vector_norm(mean - m.running_mean) + torch.linalg.vector_norm(var - m.running_var)
        loss.backward(inputs=[x])
        return loss.detach(), x.grad

    def infer(chunk):
        with torch.inference_mode():
            return torch.cat([teacher(c) for c in images.split(chunk)])

    ref_loss, ref_grad = step(args.batch)
    for chunk in chunks:
        loss, grad = step(chunk)
        print(f"chunk {chunk:4d}: |loss - one pass| {float((loss - ref_loss).abs()):.1e}, "
              f"max gradient difference {float((grad - ref_grad).abs().max() / ref_grad.abs().max()):.1e} (relative)")
    times: dict = {}
    for _ in range(args.repeats):
        for name, fn in (("step", step), ("infer", infer)):
            for chunk in chunks:
                tick = time.perf_counter()
                fn(chunk)
                times.setdefault((name, chunk), []).append(time.perf_counter() - tick)
    print(f"\n{args.arch}, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    print("| chunk | step s | step speed-up | inference s | inference speed-up |\n|---|---|---|---|---|")
    for chunk in chunks:
        s, i = (statistics.median(times[(n, chunk)]) for n in ("step", "infer"))
        s0, i0 = (statistics.median(times[(n, chunks[0])]) for n in ("step", "infer"))
        print(f"| {chunk} | {s:.4f} | {s0 / s:.2f}x | {i:.4f} | {i0 / i:.2f}x |")
    return 0


if __name__ == "__main__":
    from orchestrator.cli import run_cli

    run_cli(main)
