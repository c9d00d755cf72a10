"""Condense a dataset's training split into K images per class by distribution matching:
the `condensed:K` guide set of guided inversion (issue #15).

    python -m orchestrator.condense --dataset fashion-mnist --k 10

writes checkpoints/guides/condensed-fashion-mnist-k10-seed0.safetensors (the set), .json
(how it was made, the loss curve) and .png (one row per class); `load_guide("condensed:10",
"fashion-mnist")` reads it. `--out DIR` puts them elsewhere; `--seed S` changes the start
images (the `real:K` set of seed S) and every random draw.

Why distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution
Matching", WACV 2023): it only matches mean embeddings under random, untrained ConvNets,
so there is no bi-level optimisation (no network trained inside the loop, unlike gradient
or trajectory matching) and a set is made in minutes on a CPU. The guided method needs a
handful of class-typical images, not a state-of-the-art condensed set. The default is a
CPU budget of 60 iterations with 32 real images per class (about 2 CPU-minutes; 4 min of
wall time for the command above on a 2-core machine busy with a benchmark); the paper
runs 20000 iterations with 256 (`--iterations 20000 --batch-real 256`).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from benchmarks.datasets import get_dataset_spec, load_split
from orchestrator.cli import ArgumentParser, check_writable, run_cli
from orchestrator.core.condensation import DMConfig, condense, fixed_dm_loss
from orchestrator.core.guides import DEFAULT_CACHE, DEFAULT_SEED, check_k, condensed_name, image_sha256, \
    save_condensed, select_real

PAPER = {"iterations": 20000, "batch_real": 256}  # Zhao & Bilen's setting (and their code's defaults)


def main(argv=None) -> int:
    defaults = DMConfig()
    parser = ArgumentParser(prog="python -m orchestrator.condense", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--k", type=int, default=10, help="images per class (default 10)")
    parser.add_argument("--iterations", type=int, default=defaults.iterations,
                        help=f"DM iterations (default {defaults.iterations}, CPU budget; the paper: 20000)")
    parser.add_argument("--batch-real", type=int, default=defaults.batch_real,
                        help=f"real images per class per iteration (default {defaults.batch_real}; the paper: 256)")
    parser.add_argument("--width", type=int, default=defaults.width,
                        help=f"channels of the random ConvNet (default and paper: {defaults.width})")
    parser.add_argument("--no-dsa", action="store_true", help="no differentiable Siamese augmentation")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    parser.add_argument("--out", default=str(DEFAULT_CACHE), help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # Every check comes before the first write: bad input leaves nothing behind.
    check_k(args.k, f"--k {args.k}")
    config = DMConfig(iterations=args.iterations, batch_real=args.batch_real, width=args.width,
                      dsa=not args.no_dsa)
    config.check()
    get_dataset_spec(args.dataset)
    train = load_split(args.dataset, "train", args.data_root)
    init = select_real(train, args.k, args.seed)
    out = Path(args.out)
    check_writable(out)

    name = condensed_name(args.dataset, args.k, args.seed)
    print(f"condensing {args.dataset} ({len(train)} training images from {train.source}) into {args.k} per class: "
          f"{config.iterations} iterations, {config.batch_real} real images per class, "
          f"DSA {'on' if config.dsa else 'off'}, seed {args.seed}", flush=True)
    result = condense(train, init, args.k, args.seed, config, progress=not args.no_progress)
    start_images = train.images[init].float() / 255
    before, after = fixed_dm_loss([start_images, result.images], result.labels, train, config)
    tail = result.losses[-10:]
    record = {
        "method": "distribution matching (Zhao & Bilen, WACV 2023, arXiv:2110.04181)",
        "config": dataclasses.asdict(config), "paper": PAPER,
        "init": f"real:{args.k} seed {args.seed} (the images load_guide('real:{args.k}', seed={args.seed}) gives)",
        "init_sha256": image_sha256(start_images), "data_folder": str(train.source),
        "seconds": round(result.seconds, 1), "loss_per_class": result.losses,
        "final_loss_per_class_last10": sum(tail) / len(tail),
        "fixed_eval_loss_per_class": {"start": before, "final": after, "nets": 2, "real_per_class": 64},
        "command": "python -m orchestrator.condense " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    from orchestrator.core.provenance import code_version

    record["provenance"] = code_version()
    path = save_condensed(out, args.dataset, args.k, args.seed, result.images, result.labels, record)
    print(f"done in {result.seconds:.0f} s: DM loss per class, mean of the last {len(tail)} iterations "
          f"{record['final_loss_per_class_last10']:.4g} (first iteration {result.losses[0]:.4g}); "
          f"on fixed nets {before:.4g} -> {after:.4g}")
    print(f"wrote {path} (+ {name}.json, {name}.png)")
    return 0


if __name__ == "__main__":
    run_cli(main)
