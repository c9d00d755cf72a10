"""Where a step's time goes: synthesis and KD steps per method, against their floor.

    python -m orchestrator.perf.step                                  # cmi, deepinv and KD at the cpu budget
    python -m orchestrator.perf.step --methods cmi --rounds 5 --steps 6
    python -m orchestrator.perf.step --compare-tree /tmp/old          # the same steps in another checkout

For each method it prints seconds per step, images per second, the FLOPs of one step
(torch.utils.flop_counter), the achieved GFLOP/s, and the ratio to the floor. The floor is
the bare forward and backward passes the step cannot avoid, timed in the same run on the
same tensors: no hooks, no losses, no optimizer, the teacher as it is, with PyTorch's own
BatchNorm. A step can run below 1.0x of it: the KD step's teacher has its BatchNorms folded
(as `Trainer` does), and in a synthesis step each BatchNorm with its hook is one autograd
node whose backward makes fewer passes than BatchNorm's own (methods/hooks.py). The setup is Fashion-MNIST shapes,
wrn16_2 -> wrn16_1, and the batch sizes of the `cpu` budget. Teacher and student are
randomly initialised: the time of a step does not depend on the weights.

With `--compare-tree DIR`, the same steps are also timed on the code in DIR (e.g. a git
worktree of an older commit), in a separate process that alternates rounds with this one,
and the speed-up is printed. Only the public API is used (create_synthesizer, synthesize,
the KD step), which both trees have. Rounds alternate, and medians are reported, because
CPU timings here vary 20-30% from run to run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Runs in this process or, with --compare-tree, in a child process whose sys.path starts
# at the other tree: it may only use what both trees have.
_TIMER = r'''
import json, sys, time, torch
from methods import create_synthesizer, make_config, place
from methods.losses import kd_loss
from methods.spec import ImageSpec
from models import create_model

def build(method, steps):
    torch.manual_seed(0)
    spec = ImageSpec(10, 1, 32, (0.2860,), (0.3530,), crop_padding=4, hflip=True)
    teacher = place(create_model("wrn16_2", 10, in_channels=1, image_size=32), "cpu").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = place(create_model("wrn16_1", 10, in_channels=1, image_size=32), "cpu")
    cfg = make_config(method if method != "kd" else "cmi", "cpu", {"g_steps": steps})
    return spec, teacher, student, cfg

def synth_seconds(method, steps):
    spec, teacher, student, cfg = build(method, steps)
    synth = create_synthesizer(method, teacher, student, cfg, spec)
    synth.synthesize()  # warm-up: allocator, oneDNN kernels
    tick = time.perf_counter()
    synth.synthesize()
    return (time.perf_counter() - tick) / steps

try:  # a tree whose Trainer takes KD targets from the inference copy (models/fuse.py)
    from models import inference_copy as kd_teacher
except ImportError:
    try:  # from the BN-folded teacher (models/fold.py)
        from models import fold_batchnorm as kd_teacher
    except ImportError:  # older trees ran the teacher as it is
        kd_teacher = lambda teacher: teacher

def kd_seconds(steps):
    spec, teacher, student, cfg = build("kd", steps)
    teacher = kd_teacher(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = spec.normalize(torch.rand(cfg.batch_size, 1, 32, 32))
    def step():
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss("kl", student(x), t, cfg.T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tick) / steps

def measure(what, steps):
    return kd_seconds(steps) if what == "kd" else synth_seconds(what, steps)
'''


def _namespace() -> dict:
    scope: dict = {}
    exec(compile(_TIMER, "perf.step timer", "exec"), scope)  # noqa: S102  (our own code, shared with the child)
    return scope


class OtherTree:
    """A child process that times steps on the code in another checkout."""

    def __init__(self, tree: Path, threads: int):
        code = _TIMER + ("\nimport sys\ntorch.set_num_threads(%d)\nfor line in sys.stdin:\n"
                         "    what, steps = line.split()\n"
                         "    print(json.dumps(measure(what, int(steps))), flush=True)\n" % threads)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def measure(self, what: str, steps: int) -> float:
        self.proc.stdin.write(f"{what} {steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the timer in the other tree exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def count_fused_convolutions() -> None:
    """Teaches torch.utils.flop_counter the fused convolution of the inference copy
    (models/fuse.py), which it does not know: uncounted, a KD step's teacher forward (about
    half its FLOPs) went missing from the GFLOP and GFLOP/s columns. Its FLOPs are the
    convolution's; the add and ReLU done inside it are not counted, as for a plain conv."""
    from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

    from models.fuse import POINTWISE

    if POINTWISE is None or POINTWISE[0].overloadpacket in flop_registry:
        return

    @register_flop_formula(POINTWISE[0].overloadpacket)
    def fused_conv_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        # default: (x, weight, bias, padding, ...); binary: (x, other, weight, bias, ...)
        weight = args[0] if len(args) < 12 else args[1]
        return conv_flop_count(x_shape, weight, out_shape)


def floor_seconds(what: str, scope: dict, steps: int) -> tuple[float, float, float]:
    """(seconds per step of the bare passes, FLOPs of one step, FLOPs of the bare passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from methods import place
    from models import create_generator

    count_fused_convolutions()

    spec, teacher, student, cfg = scope["build"](what, 1)
    b = cfg.synthesis_batch_size if what != "kd" else cfg.batch_size
    if what == "kd":
        x = torch.rand(b, 1, 32, 32)

        def bare():
            with torch.no_grad():
                teacher(x)
            student(x).sum().backward()
    else:
        if hasattr(cfg, "latent_dim"):  # a generator makes the images (CMI)
            generator = place(create_generator("generator", cfg.latent_dim, 32, 1), "cpu")
            z = torch.randn(b, cfg.latent_dim, requires_grad=True)
        else:  # the pixels are the parameters (DeepInversion)
            generator, z = None, torch.randn(b, 1, 32, 32, requires_grad=True)
        views = 2 if what == "cmi" else 1  # CMI sends a global and a local view of each image

        def bare():
            images = generator(z) if generator is not None else z
            out = teacher(images.repeat(views, 1, 1, 1)).sum()
            if getattr(cfg, "adv", 0) > 0:
                out = out + student(images).sum()
            params = [z] + ([] if generator is None else list(generator.parameters()))
            out.backward(inputs=params)
    bare()
    tick = time.perf_counter()
    for _ in range(steps):
        bare()
    seconds = (time.perf_counter() - tick) / steps
    with FlopCounterMode(display=False) as counter:
        bare()
    floor_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        scope["measure"](what, 1)
    # measure() runs a warm-up step and a timed one (KD: one more): count one of them.
    step_flops = counter.get_total_flops() / (3 if what == "kd" else 2)
    return seconds, step_flops, floor_flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.perf.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="cmi,deepinv,kd", help="methods to time, and kd for the KD step")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compare-tree", type=Path, help="also time the code in this checkout")
    args = parser.parse_args(argv)
    from methods import list_methods

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in wanted if m != "kd" and m not in list_methods()]
    if bad or not wanted or args.steps < 1 or args.rounds < 1:
        print(f"error: --methods takes {', '.join(list_methods())} or kd (got {args.methods!r}); "
              "--steps and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.compare_tree and not (args.compare_tree / "methods" / "__init__.py").exists():
        print(f"error: --compare-tree {args.compare_tree}: not a checkout of this project", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    scope = _namespace()
    other = OtherTree(args.compare_tree.resolve(), args.threads) if args.compare_tree else None
    print(f"{'step':<10}{'s/step':>9}{'img/s':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'floor s':>9}{'x floor':>9}"
          + (f"{'other s':>9}{'speed-up':>10}" if other else ""))
    try:
        for what in wanted:
            ours, theirs = [], []
            for _ in range(args.rounds):  # alternate, so drift hits both alike
                ours.append(scope["measure"](what, args.steps))
                if other:
                    theirs.append(other.measure(what, args.steps))
            floor, flops, _ = floor_seconds(what, scope, args.steps)
            s = statistics.median(ours)
            _, _, _, cfg = scope["build"](what, 1)
            batch = cfg.batch_size if what == "kd" else cfg.synthesis_batch_size
            line = (f"{what:<10}{s:>9.3f}{batch / s:>9.1f}{flops / 1e9:>9.2f}{flops / 1e9 / s:>9.2f}"
                    f"{floor:>9.3f}{s / floor:>9.2f}")
            if other:
                t = statistics.median(theirs)
                line += f"{t:>9.3f}{t / s:>9.2f}x"
            print(line, flush=True)
    finally:
        if other:
            other.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
