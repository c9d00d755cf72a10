"""Post-training INT8 quantization of a teacher or a distilled student, calibrated four ways.

    python -m orchestrator.quantize checkpoints/teachers/fashion-mnist-wrn16_2.pt
    python -m orchestrator.quantize runs/bench/cells/CELL/student.pt --pool runs/bench/cells/CELL

torchao's PT2E flow: torch.export -> prepare_pt2e(X86InductorQuantizer) -> calibrate ->
convert_pt2e. Calibration sources (`--calib`, any of them; each gets its own INT8 model):
`pool` the synthetic images a finished cell kept (its `store/` snapshot, or a `--save-bank`
folder), as they are; `bn` images optimised from Gaussian noise until every BatchNorm input
matches that layer's running mean/var (Haroush et al., "The Knowledge Within", CVPR 2020);
`train` real training images (the train split only); `noise` Gaussian noise. It prints
and writes (`--out`: quantization.md, quantization.csv, the saved programs *.pt2) the test
accuracy of FP32 and of each INT8 model, the saved size, and CPU latency per image in eager
mode and after torch.compile, which is what lowers INT8 to oneDNN's int8 kernels.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.datasets import get_dataset_spec, load_split
from methods.hooks import BatchNormHooks
from orchestrator.cli import ArgumentParser, UsageError, check_writable, run_cli, split_list
from orchestrator.core.checkpoints import load_classifier, read_checkpoint
from orchestrator.core.training import evaluate, normalize

SOURCES = {"pool": "a finished cell's synthetic images", "bn": "BatchNorm-statistics samples",
           "train": "real training images", "noise": "Gaussian noise"}
CALIB_BATCH = 64
POOL_FILES = ("store/store.safetensors", "store.safetensors", "bank.safetensors")


# ------------------------------------------------------------------ calibration data
def read_pool(path: Path, dataset: str, spec) -> tuple[torch.Tensor, Path]:
    """uint8 (N, C, H, W) images of a cell folder, its store/ snapshot, a --save-bank folder
    or one of their .safetensors files; a user error when there are none or they do not fit."""
    from safetensors import safe_open

    if not path.exists():
        raise UsageError(f"--pool {path} does not exist")
    config = path / "config.json"
    if config.is_file():  # a cell folder says which dataset its images imitate
        try:
            made_for = json.loads(config.read_text()).get("cell", {}).get("dataset")
        except (OSError, ValueError, AttributeError) as exc:
            raise UsageError(f"--pool {config}: not a cell's config ({exc})") from None
        if made_for and made_for != dataset:
            raise UsageError(f"--pool {path} is a {made_for} cell, but the model is quantized for {dataset}")
    file = path if path.is_file() else next((path / f for f in POOL_FILES if (path / f).is_file()), None)
    if file is None:
        raise UsageError(f"--pool {path}: no images there (looked for {', '.join(POOL_FILES)})")
    try:
        with safe_open(str(file), framework="pt") as fh:
            images = fh.get_tensor("images") if "images" in fh.keys() else None
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"--pool {file}: cannot read it ({exc})") from None
    if images is None or len(images) == 0:
        raise UsageError(f"--pool {file} holds no images")
    want = (spec.channels, spec.image_size, spec.image_size)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise UsageError(f"--pool {file} holds {images.dtype} images of shape {tuple(images.shape[1:])}; "
                         f"{dataset} needs uint8 {want}")
    return images, file


def bn_statistics_samples(model: torch.nn.Module, count: int, shape: tuple, steps: int, lr: float,
                          batch_size: int, generator: torch.Generator, progress: bool = True) -> torch.Tensor:
    """Images at the network's input (already normalised), optimised from N(0, 1) with Adam
    so that each batch's statistics at every BatchNorm input match that layer's running
    mean/var. The distance is DeepInversion's (methods/hooks.py: L2 of mean and of variance)
    where Haroush et al. take squared distances of mean and std; both vanish together."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only the images learn: no weight gradients to compute
    batches = [min(batch_size, count - s) for s in range(0, count, batch_size)]
    bar = tqdm(total=steps * len(batches), desc="BN-statistics samples", unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    out = []
    try:
        with BatchNormHooks(model, stats=True, features=False) as hooks:
            for n in batches:
                x = torch.randn((n, *shape), generator=generator).contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr)
                for _ in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    model(x)
                    loss = hooks.bn_loss()
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
                    bar.set_postfix(bn_loss=f"{loss.item():.3f}", refresh=False)
                out.append(x.detach().contiguous())
    finally:
        bar.close()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return torch.cat(out)


def calibration_set(source: str, count: int, *, model, spec, train=None, pool=None, generator,
                    bn_steps: int = 200, bn_lr: float = 0.1, bn_batch: int = 128, progress: bool = True):
    """`count` network inputs (normalised float) for one source; pool and train draw a
    random subset without replacement (all of them when there are fewer)."""
    shape = (spec.channels, spec.image_size, spec.image_size)
    if source in ("pool", "train"):
        images = pool if source == "pool" else train.images
        pick = torch.randperm(len(images), generator=generator)[:count]
        return normalize(images[pick].float().div_(255), spec.mean, spec.std)
    if source == "noise":
        return torch.randn((count, *shape), generator=generator)
    return bn_statistics_samples(model, count, shape, bn_steps, bn_lr, bn_batch, generator, progress)


# ---------------------------------------------------------------------- quantization
def export(model: torch.nn.Module, example: torch.Tensor):
    # A dynamic batch: one program serves the latency runs at batch 1 and the large batch.
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def keep_shared_convs_unfolded(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao 0.18's prepare_pt2e folds a BatchNorm into the conv before it even when that
    conv's output feeds something else too. wrn16_1's stem conv feeds both its first block's
    BN and that block's residual add; folded, the add receives the BN's output and the INT8
    student lost 55 points whatever the calibration (measured). A clone between such a conv
    and its BN keeps this one fold from happening; the BN stays a separate FP32 op."""
    from torchao.quantization.pt2e.utils import _is_bn_node, _is_conv_or_conv_transpose_node

    graph = graph_module.graph
    for node in list(graph.nodes):
        if not _is_conv_or_conv_transpose_node(node) or len(node.users) < 2:
            continue
        for user in [u for u in node.users if _is_bn_node(u)]:
            with graph.inserting_after(node):
                copy = graph.call_function(torch.ops.aten.clone.default, (node,))
            copy.meta["val"] = node.meta.get("val")
            user.replace_input_with(node, copy)
    graph_module.recompile()
    return graph_module


def quantize_int8(model: torch.nn.Module, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """PT2E post-training static quantization with the x86 inductor recipe (uint8
    activations per tensor, int8 weights per channel, histogram observers)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    # channels_last weights (methods.place) export as they are; the example input follows them.
    exported = export(model, calibration[:2].contiguous(memory_format=torch.channels_last)).module()
    prepared = prepare_pt2e(keep_shared_convs_unfolded(exported), quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), CALIB_BATCH):
            prepared(calibration[start:start + CALIB_BATCH])
    converted = convert_pt2e(prepared)
    # convert_pt2e leaves the FP32 weights it replaced by int8 constants attached to the
    # module; rebuilding from the graph keeps only what the graph reads (else the saved
    # INT8 program is larger than the FP32 one).
    converted = torch.fx.GraphModule(converted, converted.graph)
    allow_exported_model_train_eval(converted)  # training.evaluate switches eval/train
    return converted


def saved_bytes(model: torch.nn.Module, example: torch.Tensor, path: Path) -> int:
    with warnings.catch_warnings():  # torch warns about weights not on the GPU; they are on the CPU
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(export(model, example), str(path))
    return path.stat().st_size


# ---------------------------------------------------------------------------- latency
@torch.no_grad()
def latency(models: dict, shape: tuple, batch_sizes: list[int], repeats: int, warmup: int = 3) -> dict:
    """{(name, batch): (ms per image, first-call seconds)}: the median over `repeats` of one
    batch's time, after the first call (compilation, for compiled models) and `warmup`
    more. Models take turns each repeat, so a neighbour's load lands on all of them alike."""
    out = {}
    for b in batch_sizes:
        x = torch.randn((b, *shape)).contiguous(memory_format=torch.channels_last)
        first = {}
        for name, fn in models.items():
            start = time.perf_counter()
            fn(x)
            first[name] = time.perf_counter() - start
            for _ in range(warmup):
                fn(x)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, fn in models.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
        for name in models:
            out[name, b] = (1e3 * statistics.median(times[name]) / b, first[name])
    return out


def verdict(lat: dict, batch_sizes: list[int], mode: str) -> list[str]:
    lines = []
    for b in batch_sizes:
        fp32, int8 = lat[f"fp32 {mode}", b][0], lat[f"int8 {mode}", b][0]
        if int8 < fp32:
            lines.append(f"batch {b} ({mode}): INT8 is {fp32 / int8:.2f}x faster than FP32 "
                         f"({int8:.3f} vs {fp32:.3f} ms/image)")
        else:
            lines.append(f"batch {b} ({mode}): INT8 is NOT faster than FP32 on this CPU "
                         f"({int8:.3f} vs {fp32:.3f} ms/image, {int8 / fp32:.2f}x the time)")
    return lines


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m orchestrator.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a classifier checkpoint: a teacher, or a cell's student.pt")
    parser.add_argument("--calib", help=f"calibration sources, comma-separated, of {','.join(SOURCES)} "
                        "(default: all; pool only with --pool)")
    parser.add_argument("--pool", help="a finished cell's folder (its store/ snapshot), or a --save-bank folder")
    parser.add_argument("--dataset", help="default: the checkpoint's own")
    parser.add_argument("--data-root", help="folder holding the dataset (see README, Data)")
    parser.add_argument("--calib-images", type=int, default=256, help="images per calibration source")
    parser.add_argument("--bn-steps", type=int, default=200, help="Adam steps per batch of BN-statistics samples")
    parser.add_argument("--bn-lr", type=float, default=0.1)
    parser.add_argument("--bn-batch", type=int, default=128, help="BN-statistics samples optimised together")
    parser.add_argument("--batch-sizes", default="1,128", help="latency batch sizes")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and batch size")
    parser.add_argument("--no-compile", action="store_true", help="time eager mode only (no torch.compile)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1 by default, since on a shared "
                        "machine a second thread mostly measures the neighbours' load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default runs/quantize/<checkpoint folder>-<name>)")
    args = parser.parse_args(argv)

    # Every check comes before anything is computed or written.
    sources = split_list(args.calib, "calib") if args.calib else [s for s in SOURCES if s != "pool" or args.pool]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise UsageError(f"--calib {','.join(unknown)}: unknown calibration source; use {', '.join(SOURCES)}")
    if "pool" in sources and not args.pool:
        raise UsageError("--calib pool needs --pool CELL_FOLDER (a finished cell, or a --save-bank folder)")
    if args.pool and "pool" not in sources:
        raise UsageError(f"--pool is given but --calib {args.calib} does not include pool")
    try:
        batch_sizes = [int(b) for b in split_list(args.batch_sizes, "batch-sizes")]
    except ValueError:
        raise UsageError(f"--batch-sizes {args.batch_sizes}: expected integers such as 1,128") from None
    for flag, value in (("--calib-images", args.calib_images), ("--bn-steps", args.bn_steps),
                        ("--bn-batch", args.bn_batch), ("--repeats", args.repeats), ("--threads", args.threads),
                        *(("--batch-sizes", b) for b in batch_sizes)):
        if value < 1:
            raise UsageError(f"{flag} {value}: it must be >= 1")
    checkpoint = Path(args.checkpoint)
    _, meta = read_checkpoint(checkpoint)
    dataset = args.dataset or meta.get("dataset")
    spec = get_dataset_spec(dataset)
    model, meta = load_classifier(checkpoint, dataset=dataset, num_classes=spec.num_classes, channels=spec.channels)
    test = load_split(dataset, "test", args.data_root)
    train = load_split(dataset, "train", args.data_root) if "train" in sources else None
    pool, pool_file = read_pool(Path(args.pool), dataset, spec) if args.pool else (None, None)
    out = Path(args.out or f"runs/quantize/{checkpoint.resolve().parent.name}-{checkpoint.stem}")
    if args.pool and out.resolve().is_relative_to(Path(args.pool).resolve()):
        raise UsageError(f"--out {out} is inside the pool folder {args.pool}; the pool is only read")
    check_writable(out)

    torch.set_num_threads(args.threads)
    print(f"{meta['arch']} from {checkpoint.resolve()} ({dataset}, {meta.get('accuracy', float('nan')):.2f}% "
          "recorded in the checkpoint)")
    print(f"test split: {len(test)} images from {test.source}")  # the folders read, never a silent copy
    if train is not None:
        print(f"train split: {len(train)} images from {train.source} (calibration)")
    if pool is not None:
        print(f"pool: {len(pool)} images from {pool_file.resolve()}")
        history = Path(args.pool) / "history.json"
        try:
            status = json.loads(history.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = None  # only a note depends on it
        if Path(args.pool, "config.json").is_file() and status != "finished":  # a cell still running, or stopped
            print(f"note: the cell's status is {status or 'unknown (no history.json)'}: its snapshot holds the "
                  "images of its last finished epoch")

    generator = torch.Generator().manual_seed(args.seed)
    shape = (spec.channels, spec.image_size, spec.image_size)
    rows = [("FP32", "-", "-", evaluate(model, test))]
    int8 = {}
    for source in sources:
        calib = calibration_set(source, args.calib_images, model=model, spec=spec, train=train, pool=pool,
                                generator=generator, bn_steps=args.bn_steps, bn_lr=args.bn_lr, bn_batch=args.bn_batch)
        int8[source] = quantize_int8(model, calib)
        rows.append(("INT8", source, len(calib), evaluate(int8[source], test)))
        print(f"INT8 calibrated on {source} ({len(calib)} images): test accuracy {rows[-1][3]:.2f}% "
              f"(FP32 {rows[0][3]:.2f}%)")

    # Size and speed: every INT8 model has the same graph and differs only in its scales,
    # so the first stands for all of them.
    timed = int8[sources[0]]
    example = torch.zeros((2, *shape)).contiguous(memory_format=torch.channels_last)
    size = {"fp32": saved_bytes(model, example, out / "fp32.pt2")}
    for source, q in int8.items():
        size[f"int8 {source}"] = saved_bytes(q, example, out / f"int8-{source}.pt2")
    models = {"fp32 eager": model, "int8 eager": timed}
    lat = latency(models, shape, batch_sizes, args.repeats)
    notes = verdict(lat, batch_sizes, "eager")
    agreement = None
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        # Freezing turns the weights into constants, which is what lets inductor prepack them
        # for oneDNN and fold the q/dq pairs around each conv into one int8 kernel.
        with inductor_config.patch(freezing=True), warnings.catch_warnings():
            # inductor's int8 lowering copies a tensor the way torch warns about; nothing to act on
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            compiled = {"fp32 compiled": torch.compile(model, dynamic=False),
                        "int8 compiled": torch.compile(timed, dynamic=False)}
            lat.update(latency(compiled, shape, batch_sizes, args.repeats))
            with torch.no_grad():  # the lowered kernels must compute the model that was scored
                x, _ = next(test.batches(max(batch_sizes)))
                x = normalize(x, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
                if len(x) == max(batch_sizes):
                    agreement = (compiled["int8 compiled"](x).argmax(1) == timed(x).argmax(1)).float().mean().item()
        notes = verdict(lat, batch_sizes, "compiled") + notes

    report = render(rows, size, lat, batch_sizes, notes, agreement, sources[0], args, checkpoint, meta)
    (out / "quantization.md").write_text(report)
    write_csv(out / "quantization.csv", rows, size, lat)
    print(report)
    print(f"written: {out.resolve()}/quantization.md, quantization.csv, fp32.pt2, int8-*.pt2")
    return 0


def render(rows, size, lat, batch_sizes, notes, agreement, timed, args, checkpoint, meta) -> str:
    fp32_acc = rows[0][3]
    lines = [f"### INT8 post-training quantization: {meta['arch']} ({checkpoint})", "",
             "| model | calibration | images | test accuracy (%) | vs FP32 (points) |", "|---|---|---|---|---|"]
    for kind, source, n, acc in rows:
        delta = "" if kind == "FP32" else f"{acc - fp32_acc:+.2f}"
        lines.append(f"| {kind} | {SOURCES.get(source, source)}{f' (`{source}`)' if source in SOURCES else ''} "
                     f"| {n} | {acc:.2f} | {delta} |")
    lines += ["", f"| | FP32 | INT8 (`{timed}`) | INT8 / FP32 |", "|---|---|---|---|",
              f"| saved exported program (bytes) | {size['fp32']:,} | {size[f'int8 {timed}']:,} | "
              f"{size[f'int8 {timed}'] / size['fp32']:.2f} |"]
    modes = ["eager"] + ([] if ("fp32 compiled", batch_sizes[0]) not in lat else ["compiled"])
    for mode in modes:
        for b in batch_sizes:
            f, i = lat[f"fp32 {mode}", b][0], lat[f"int8 {mode}", b][0]
            lines.append(f"| CPU latency, {mode}, batch {b} (ms/image) | {f:.3f} | {i:.3f} | {i / f:.2f} |")
    if "compiled" in modes:
        f, i = (sum(lat[f"{k} compiled", b][1] for b in batch_sizes) for k in ("fp32", "int8"))
        lines.append(f"| torch.compile seconds ({len(batch_sizes)} shapes) | {f:.1f} | {i:.1f} | |")
    lines += ["", *[f"- {n}" for n in notes]]
    if agreement is not None:
        lines.append(f"- compiled INT8 agrees with eager INT8 on {100 * agreement:.1f}% of a test batch of "
                     f"{max(batch_sizes)}")
    lines.append("- eager INT8 runs quantize/dequantize around FP32 kernels: slower than FP32 by design")
    lines.append(f"- {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}, load average "
                 f"{os.getloadavg()[0]:.2f} at the end; median of {args.repeats} timed calls after warm-up")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows, size, lat) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "model", "calibration", "mode", "batch_size", "value", "unit"])
        for kind, source, n, acc in rows:
            w.writerow(["test_accuracy", kind, source, "", "", f"{acc:.2f}", "%"])
        for name, value in size.items():
            kind, _, source = name.partition(" ")
            w.writerow(["saved_bytes", kind.upper(), source or "-", "", "", value, "bytes"])
        for (name, b), (ms, first) in lat.items():
            kind, mode = name.split()
            w.writerow(["latency", kind.upper(), "", mode, b, f"{ms:.4f}", "ms/image"])
            if mode == "compiled":
                w.writerow(["compile_seconds", kind.upper(), "", mode, b, f"{first:.2f}", "s"])


if __name__ == "__main__":
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecation notice
    run_cli(main)
