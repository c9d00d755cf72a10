"""One table from several bench result folders: variants of a method (a `--set`, a sweep
point, a guide set) run into separate `--out` folders, compared side by side.

    python -m orchestrator.report_merge runs/headline "runs/crd=CMI +CRD" "runs/fast_g2=Fast-2, 1 round" \
        --out docs/results/fast_sweep

Each argument is a folder holding a bench's results.csv, optionally `=LABEL` to rename its
rows (allowed only for a folder of one row, so two methods are never merged under one
name). Rows keep the order of first appearance. `--untimed ROW:SEED` keeps a cell's accuracy
but drops its seconds, for cells that shared the cores with other jobs. Writes, like the bench: results.csv (the
merged long format), table_<dataset>.md/.tex (accuracy, cost and accuracy-against-synthesis
tables) and accuracy_vs_synthesis_<dataset>.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from orchestrator.cli import ArgumentParser, UsageError, check_writable, run_cli
from orchestrator.report import LONG_COLUMNS, plot_cost, write_tables


def read_source(arg: str) -> pd.DataFrame:
    folder, _, label = arg.partition("=")
    csv = Path(folder) / "results.csv"
    if not csv.is_file():
        raise UsageError(f"{folder}: no results.csv there (a bench --out folder holds one)")
    long = pd.read_csv(csv)
    missing = [c for c in LONG_COLUMNS if c not in long.columns]
    if missing:
        raise UsageError(f"{csv}: not a bench results file (missing columns: {', '.join(missing)})")
    if label:
        rows = list(dict.fromkeys(long.row))
        if len(rows) != 1:
            raise UsageError(f"{arg}: a label renames a folder of one row; {folder} holds {len(rows)} "
                             f"({', '.join(map(str, rows))})")
        long = long.assign(row=label)
    return long[LONG_COLUMNS]


SECONDS = ("synthesis_seconds", "kd_seconds", "eval_seconds", "startup_seconds", "wall_seconds",
           "synthesis_images_per_second")


def drop_timings(long: pd.DataFrame, untimed: list[str]) -> pd.DataFrame:
    """Removes the seconds (not the accuracy) of cells given as ROW:SEED: cells whose cores
    were shared with other jobs, so their time says nothing about the method."""
    keep = pd.Series(True, index=long.index)
    for spec in untimed:
        row, sep, seed = spec.rpartition(":")
        if not sep or not row or not seed.isdigit():
            raise UsageError(f"--untimed {spec!r}: expected ROW:SEED, e.g. 'CMI:0'")
        cell = (long.row == row) & (long.seed == int(seed))
        if not (cell & (long.metric == "accuracy")).any():
            raise UsageError(f"--untimed {spec!r}: no such cell (rows: {', '.join(map(str, dict.fromkeys(long.row)))})")
        keep &= ~(cell & long.metric.isin(SECONDS))
    return long[keep]


def merge(sources: list[str], untimed: list[str] | None = None) -> pd.DataFrame:
    frames = [read_source(s) for s in sources]
    long = drop_timings(pd.concat(frames, ignore_index=True), untimed or [])
    cells = long[long.metric == "accuracy"]
    dupes = cells[cells.duplicated(["dataset", "teacher", "student", "row", "seed"], keep=False)]
    if not dupes.empty:
        first = dupes.iloc[0]
        raise UsageError(f"row {first.row!r} seed {first.seed} appears in more than one folder; "
                         f"give the folders different labels (FOLDER=LABEL)")
    return long


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m orchestrator.report_merge", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", metavar="FOLDER[=LABEL]", help="bench --out folders")
    p.add_argument("--out", required=True, help="folder for the merged tables and plot")
    p.add_argument("--untimed", action="append", metavar="ROW:SEED", default=[],
                   help="leave this cell's seconds out of the cost table and plot (cores shared with other jobs)")
    args = p.parse_args(argv)
    long = merge(args.sources, args.untimed)
    out = Path(args.out)
    check_writable(out)
    order = list(dict.fromkeys(long.row))
    paths = write_tables(long, out, order)
    for dataset in dict.fromkeys(long.dataset):
        plot = plot_cost(long, dataset, out / f"accuracy_vs_synthesis_{dataset}.png")
        if plot:
            paths[f"plot_{dataset}"] = plot
        print(paths[f"md_{dataset}"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    run_cli(main)
