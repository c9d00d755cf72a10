"""Run one DFKD cell in this process (no Ray, no MLflow).

    python -m orchestrator.distill --method cmi --dataset fashion-mnist \
        --teacher wrn16_2 --student wrn16_1 --budget cpu
    python -m orchestrator.distill --method deepinv --budget smoke --set g_steps=40 --set bn=5

Trains (or reuses) the teacher, prints the effective config, per-epoch accuracy and a
final line (student and teacher accuracy, synthesis and KD time), and writes
history.json, config.json, grid.png and student.pt under `--out/<cell>/`. A killed run
continues from its last finished epoch when started again with the same arguments
(`--fresh` starts over).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from methods import list_methods
from orchestrator.cell import BUDGETS, CellKey, CellRequest, check_cell, run_cell
from orchestrator.cli import ArgumentParser, UsageError, parse_device, run_cli
from orchestrator.teachers import DEFAULT_DIR as DEFAULT_TEACHER_DIR


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`--set a=1 --set b=2` or `--set a=1,b=2` -> {"a": "1", "b": "2"}."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise UsageError(f"--set {part!r}: expected key=value")
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def add_data_args(parser: ArgumentParser) -> None:
    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is not found")
    parser.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER_DIR),
                        help="where teachers are cached (trained there when missing)")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m orchestrator.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="cmi", help=f"one of {', '.join(list_methods())}")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--teacher", default="wrn16_2")
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--budget", default="cpu", help=f"one of {', '.join(BUDGETS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default="runs/distill", help="output folder")
    parser.add_argument("--teacher-ckpt", help="use this teacher checkpoint instead of the cached one")
    parser.add_argument("--init-pool", help="seed the instance bank from DIR (pool.safetensors or PNGs)")
    parser.add_argument("--save-pool", help="export the instance bank to DIR/pool.safetensors")
    parser.add_argument("--fresh", action="store_true", help="ignore a previous run's resume state")
    parser.add_argument("--no-progress", action="store_true")
    add_data_args(parser)
    args = parser.parse_args(argv)

    key = CellKey(args.dataset, args.teacher, args.student, args.method, args.seed, args.budget)
    overrides = parse_sets(args.set)
    config = check_cell(key, overrides)  # every user mistake is refused here, before work
    if args.init_pool and not Path(args.init_pool).is_dir():
        raise UsageError(f"--init-pool {args.init_pool}: not a folder")
    request = CellRequest(key, overrides, Path(args.out), args.data_root, args.download, parse_device(args.device),
                          Path(args.teacher_dir), Path(args.teacher_ckpt) if args.teacher_ckpt else None,
                          Path(args.init_pool) if args.init_pool else None,
                          Path(args.save_pool) if args.save_pool else None, resume=not args.fresh,
                          progress=not args.no_progress)
    print(f"cell {key.slug}\nconfig {json.dumps(dataclasses.asdict(config))}", flush=True)

    bars: list[tqdm] = []  # opened at the first round, after a missing teacher has trained

    def progress(phase: str, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="round", disable=args.no_progress, dynamic_ncols=True, leave=False))
        bars[0].n = done
        bars[0].set_description(phase)
        bars[0].refresh()

    def write(line: str) -> None:
        tqdm.write(line)

    def on_epoch(epoch: int, metrics: dict) -> None:
        write(f"epoch {epoch}/{config.epochs}  acc {metrics['accuracy']:.2f}%  "
                  f"kd {metrics.get('kd/loss', float('nan')):.4f}  synth total "
                  f"{metrics.get('synth/total', float('nan')):.4f}  "
                  f"(synthesis {metrics['synthesis_seconds']:.0f}s, KD {metrics['kd_seconds']:.0f}s)")

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    result = run_cell(request, on_epoch=on_epoch, progress=progress, log=write)
    for bar in bars:
        bar.close()
    s = result.summary()
    print(f"{args.method} {args.teacher}->{args.student} on {args.dataset}: student {s['accuracy']:.2f}% "
          f"(best {s['best_accuracy']:.2f}%), teacher {s['teacher_accuracy']:.2f}%, "
          f"synthesis {s['synthesis_seconds']:.1f}s ({s['images_synthesized']} images, "
          f"{s['synthesis_images_per_second']:.1f} img/s), KD {s['kd_seconds']:.1f}s, cell wall {s['wall_seconds']:.1f}s, "
          f"status {s['status']}; "
          f"files in {result.cell_dir}")
    return 0 if s["status"] == "finished" else 1


if __name__ == "__main__":
    run_cli(main)
