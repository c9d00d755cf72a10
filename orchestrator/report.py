"""Bench results as the tables researchers publish, plus a long CSV and accuracy plots.

Rows are methods (and the T./S. Scratch baselines), columns are teacher->student pairs,
entries are mean +- std over seeds of the final test accuracy, with the published number
in brackets where the CMI paper has one (benchmarks/reference.py). A failed cell shows as "failed".
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmarks.reference import published

def row_name(method: str, config=None) -> str:
    """A method's table label: its class's `row_label(config)`, the `display` plus a suffix per
    non-default option of the cell's config (" +guide", " +mix", " +CRD", " one-stage"), so a
    variant never shares a row with the plain method. Baselines keep their own label."""
    from methods import get_method
    from methods.registry import is_registered

    return get_method(method).row_label(config) if is_registered(method) else method


# The long format: one row per (cell, metric).
LONG_COLUMNS = ["dataset", "teacher", "student", "row", "method", "seed", "budget", "mode", "status",
                "metric", "value"]


def long_rows(key, status: str, metrics: dict[str, float], row: str | None = None, config=None) -> list[dict]:
    base = {"dataset": key.dataset, "teacher": key.teacher, "student": key.student,
            "row": row or row_name(key.method, config), "method": key.method, "seed": key.seed, "budget": key.budget,
            "mode": key.mode, "status": status}
    return [{**base, "metric": m, "value": float(v)} for m, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _fmt(values: list[float]) -> str:
    return mean_std(values) if values else "failed"


def mean_std(values: list[float]) -> str:
    """"m" for one value, "m ± s" (sample std) for more."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def accuracy_table(long: pd.DataFrame, dataset: str, row_order: list[str]) -> pd.DataFrame:
    """One dataset's table: rows = methods/baselines, columns = "teacher->student"."""
    df = long[(long.dataset == dataset) & (long.metric == "accuracy")]
    pairs = list(dict.fromkeys(zip(df.teacher, df.student)))
    rows = [r for r in row_order if r in set(df.row)]
    table = {}
    for teacher, student in pairs:
        column = {}
        for row in rows:
            cell = df[(df.teacher == teacher) & (df.student == student) & (df.row == row)]
            if cell.empty:
                column[row] = ""
                continue
            ok = cell[cell.status == "finished"].value.tolist()
            text = _fmt(ok)
            if len(ok) < len(cell):
                text += f" ({len(cell) - len(ok)} failed)" if ok else ""
            ref = published(dataset, teacher, student, row)
            column[row] = f"{text} [{ref:.2f}]" if ref is not None else text
        table[f"{teacher}->{student}"] = column
    frame = pd.DataFrame(table, index=rows)
    frame.index.name = "Method"
    return frame


COST_METRICS = {"accuracy": "student %", "teacher_accuracy": "teacher %", "synthesis_seconds": "synthesis s",
                "kd_seconds": "KD s", "eval_seconds": "eval s", "startup_seconds": "start s",
                "images_synthesized": "images", "synthesis_images_per_second": "img/s", "wall_seconds": "wall s"}


def cost_table(long: pd.DataFrame, dataset: str, row_order: list[str]) -> pd.DataFrame:
    """Per method and pair, means over seeds: accuracy next to what it cost."""
    df = long[(long.dataset == dataset) & long.metric.isin(list(COST_METRICS)) & (long.status == "finished")]
    if df.empty:
        return pd.DataFrame()
    df = df.assign(pair=df.teacher + "->" + df.student)
    table = df.pivot_table(index=["row", "pair"], columns="metric", values="value", aggfunc="mean")
    table = table[[m for m in COST_METRICS if m in table.columns]].rename(columns=COST_METRICS)
    order = {r: i for i, r in enumerate(row_order)}
    table = table.sort_index(key=lambda idx: idx.map(lambda r: order.get(r, len(order))) if idx.name == "row"
                             else idx)
    table.index.names = ["Method", "Pair"]
    return table.round(2)


def write_tables(long: pd.DataFrame, out: Path, row_order: list[str]) -> dict[str, Path]:
    """Writes results.csv (long) and per dataset table_<dataset>.{md,tex}; returns paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv"}
    long.to_csv(paths["csv"], index=False)
    for dataset in dict.fromkeys(long.dataset):
        table = accuracy_table(long, dataset, row_order)
        md, tex = out / f"table_{dataset}.md", out / f"table_{dataset}.tex"
        cost, points = cost_table(long, dataset, row_order), cost_points(long, dataset)
        md.write_text(f"### {dataset}: student test accuracy (%), mean ± std over seeds "
                      f"[published]\n\n{table.to_markdown()}\n"
                      + (f"\n### {dataset}: what each finished cell cost (means over seeds)\n\n"
                         f"{cost.reset_index().to_markdown(index=False)}\n" if not cost.empty else "")
                      + (f"\n### {dataset}: accuracy against synthesis seconds (mean and std over seeds)\n\n"
                         f"{points.round(2).reset_index().to_markdown(index=False)}\n" if not points.empty else ""))
        tex.write_text(table.to_latex(escape=True))
        paths[f"md_{dataset}"], paths[f"tex_{dataset}"] = md, tex
    return paths


def plot_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """curves: {label: {"accuracy": [...]}} -> PNG of test accuracy against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, acc in sorted(curves.items()):
        ax.plot(range(1, len(acc) + 1), acc, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    # orchestrator/core/loop.py: CURVE_IMAGES
    ax.set_ylabel("student test accuracy (%)\n(before the last epoch: 2,000 fixed images)", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_points(long: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per method and pair over its finished seeds: n, mean and std of the student's accuracy
    and of the synthesis seconds (std 0 for one seed)."""
    df = long[(long.dataset == dataset) & (long.status == "finished")
              & long.metric.isin(["accuracy", "synthesis_seconds"])]
    cells = df.pivot_table(index=["row", "teacher", "student", "seed"], columns="metric", values="value")
    if cells.empty or not {"accuracy", "synthesis_seconds"} <= set(cells.columns):
        return pd.DataFrame()
    grouped = cells.groupby(level=[0, 1, 2])
    out = pd.DataFrame({"n": grouped.size(),
                        "accuracy": grouped.accuracy.mean(), "accuracy_std": grouped.accuracy.std().fillna(0.0),
                        "synthesis_s": grouped.synthesis_seconds.mean(),
                        "synthesis_s_std": grouped.synthesis_seconds.std().fillna(0.0)})
    out.index.names = ["Method", "teacher", "student"]
    return out[out.synthesis_s.notna()]  # rows with no synthesis time (e.g. NetGraft) have no point


def plot_cost(long: pd.DataFrame, dataset: str, path: Path) -> Path | None:
    """Student accuracy against synthesis seconds, one colour per method and pair: a dot per
    seed, and the mean with one standard deviation on both axes. Log x: the methods differ
    by orders of magnitude in synthesis cost."""
    points = cost_points(long, dataset)
    if points.empty:
        return None
    df = long[(long.dataset == dataset) & (long.status == "finished")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for (row, teacher, student), p in points.iterrows():
        cell = df[(df.row == row) & (df.teacher == teacher) & (df.student == student)]
        seeds = cell.pivot_table(index="seed", columns="metric", values="value").dropna(subset=["synthesis_seconds"])
        dots = ax.scatter(seeds.synthesis_seconds.clip(lower=1e-3), seeds.accuracy, s=12, alpha=0.5)
        ax.errorbar(max(p.synthesis_s, 1e-3), p.accuracy, xerr=p.synthesis_s_std, yerr=p.accuracy_std, fmt="o",
                    markersize=6, capsize=3, color=dots.get_facecolor()[0][:3],
                    label=f"{row} {teacher}->{student} (n={int(p.n)})")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 10, 100, not 10^1
    ax.xaxis.set_minor_formatter(NullFormatter())  # unlabeled minor ticks: labels overlapped
    ax.set_xlabel("synthesis seconds per cell (log)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{dataset}: accuracy against synthesis cost")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points fill the axes
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bench_tables(plan, results: list, reused: list, finished: dict, metas: dict, baselines: bool) -> dict[str, Path]:
    """The bench's outputs from the cells it ran and the ones it reused: results.csv, the
    tables and, per dataset, the accuracy-per-epoch plot (reused cells read from their
    history.json). Returns the paths written."""
    import dataclasses
    import json

    from benchmarks.reference import BASELINE_ROWS
    from methods import list_methods
    from orchestrator.tracking import cell_key

    rows, curves = [], {}
    configs = {spec.key: spec.config for spec in plan.specs}  # a row's label depends on its config
    for r in results:
        rows += long_rows(r.key, r.history.status, r.summary(), config=configs.get(r.key))
        curves[r.key] = r.history.accuracy
    for spec in reused:
        info = finished[cell_key(dataclasses.asdict(spec.key))]
        rows += long_rows(spec.key, "finished", {k.removeprefix("final/"): v for k, v in info["metrics"].items()
                                                 if k.startswith("final/")}, config=spec.config)
        history = plan.out / "cells" / spec.key.slug / "history.json"
        if history.exists():
            curves[spec.key] = json.loads(history.read_text())["accuracy"]
    if baselines:
        budget_mode = plan.specs[0].key
        for d in plan.datasets:
            for teacher, student in plan.pairs[d]:
                for row, arch in zip(BASELINE_ROWS, (teacher, student)):
                    key = dataclasses.replace(budget_mode, dataset=d, teacher=teacher, student=student, method=row,
                                              seed=0)
                    rows += long_rows(key, "finished", {"accuracy": metas[(d, arch)]["accuracy"]}, row=row)
    if not rows:
        return {}
    long = pd.DataFrame(rows, columns=list(rows[0]))
    # Methods in registry order, each plain row first, then its variants (" +guide", ...).
    variants = {m: sorted({r["row"] for r in rows if r["method"] == m} - {row_name(m)}) for m in list_methods()}
    order = ([*BASELINE_ROWS] if baselines else []) + [row for m in list_methods() for row in [row_name(m), *variants[m]]]
    paths = write_tables(long, plan.out, order)
    for d in plan.datasets:
        lines = {f"{k.method} {k.teacher}->{k.student} s{k.seed}" + (f" {k.guide}" if k.guide else ""): acc
                 for k, acc in curves.items()
                 if k.dataset == d and acc}
        if lines:
            paths[f"png_{d}"] = plot_curves(lines, plan.out / f"accuracy_{d}.png", f"{d}: accuracy per epoch")
        if cost := plot_cost(long, d, plan.out / f"accuracy_vs_synthesis_{d}.png"):
            paths[f"png_cost_{d}"] = cost
    return paths
