"""Run one DFKD cell in this process (no Ray, no MLflow).

    python -m orchestrator.distill --method cmi --dataset fashion-mnist \
        --teacher wrn16_2 --student wrn16_1 --budget cpu
    python -m orchestrator.distill --method deepinv --budget smoke --set g_steps=40 --set bn=5
    python -m orchestrator.distill --method cmi --guide real:10 --set guide=0.5     # guided inversion

Trains (or reuses) the teacher, prints the effective config, per-epoch accuracy and a
final line (student and teacher accuracy, synthesis and KD time), and writes
history.json, config.json, grid.png and student.pt under `--out/<cell>/`. A killed run
continues from its last finished epoch when started again with the same arguments
(`--fresh` starts over).
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from methods import BUDGETS, list_methods
from benchmarks.datasets import load_split
from orchestrator.cli import (ArgumentParser, UsageError, add_data_args, add_guide_arg, parse_device, parse_sets,
                              resolve_teacher, run_cli)
from orchestrator.core.cell import CellKey, CellSpec, check_cell, check_guide, run_in_process
from orchestrator.core.loop import cell_steps, rounds_per_epoch, steps_done


def build_parser() -> ArgumentParser:
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
    parser.add_argument("--init-bank", help="seed the instance bank from DIR (bank.safetensors or PNGs)")
    parser.add_argument("--save-bank", help="export the instance bank to DIR/bank.safetensors")
    parser.add_argument("--fresh", action="store_true", help="ignore a previous run's resume state")
    parser.add_argument("--no-progress", action="store_true")
    add_data_args(parser)
    add_guide_arg(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    key = CellKey(args.dataset, args.teacher, args.student, args.method, args.seed, args.budget, guide=args.guide or "")
    overrides = parse_sets(args.set)
    check_cell(key, overrides)  # every user mistake is refused here, before a teacher trains
    if key.guide and args.download:  # a real guide set reads the training split
        load_split(args.dataset, "train", args.data_root, download=True)
    if guide := check_guide(key, args.data_root):  # a bad guide set too, before anything is written
        tqdm.write(f"guide {key.guide} (guide seed {guide.identity['seed']}): {len(guide)} images from "
                   f"{guide.identity['source']}, sha256 {guide.identity['sha256'][:12]}")
    if args.init_bank and not Path(args.init_bank).is_dir():
        raise UsageError(f"--init-bank {args.init_bank}: not a folder")
    device = parse_device(args.device)
    write = tqdm.write
    teacher = resolve_teacher(args.dataset, args.teacher, args.teacher_dir, args.teacher_ckpt, device=device,
                              data_root=args.data_root, download=args.download, progress=not args.no_progress,
                              log=write)
    spec = CellSpec.build(key, overrides, teacher, args.data_root)
    print(f"cell {key.slug}\nconfig {json.dumps(spec.config_dict())}", flush=True)
    # Over synthesis and KD steps, as the bench's bar (orchestrator/core/loop.py: steps_done):
    # it moves every second or two where an epoch can take minutes.
    cfg, rounds = spec.config, rounds_per_epoch(spec.config)
    bar = tqdm(total=cell_steps(cfg), desc="steps", unit="step", disable=args.no_progress,
               dynamic_ncols=True, leave=False)

    def progress(phase: str, done_rounds: int, total: int) -> None:
        bar.update(steps_done(cfg, done_rounds, phase) - bar.n)

    def on_epoch(epoch: int, m: dict) -> None:
        bar.update(steps_done(cfg, epoch * rounds) - bar.n)
        write(f"epoch {epoch}/{spec.config.epochs}  acc {m['accuracy']:.2f}%  kd {m.get('kd/loss', float('nan')):.4f}"
              f"  synth total {m.get('synth/total', float('nan')):.4f}  (synthesis {m['synthesis_seconds']:.0f}s, "
              f"KD {m['kd_seconds']:.0f}s)")

    result = run_in_process(spec, Path(args.out) / key.slug, device, resume=not args.fresh,
                            init_bank=Path(args.init_bank) if args.init_bank else None,
                            save_bank_to=Path(args.save_bank) if args.save_bank else None, on_epoch=on_epoch,
                            progress=progress, log=write)
    bar.close()
    print(final_line(result))
    return 0 if result.history.status == "finished" else 1


def final_line(result) -> str:
    s, k = result.summary(), result.key
    return (f"{k.method} {k.teacher}->{k.student} on {k.dataset}: student {s['accuracy']:.2f}% "
            f"(best {s['best_accuracy']:.2f}%), teacher {s['teacher_accuracy']:.2f}%, synthesis "
            f"{s['synthesis_seconds']:.1f}s ({s['images_synthesized']} images, {s['synthesis_images_per_second']:.1f}"
            f" img/s), KD {s['kd_seconds']:.1f}s, cell wall {s['wall_seconds']:.1f}s, status {s['status']}; "
            f"files in {result.cell_dir}")


if __name__ == "__main__":
    run_cli(main)
