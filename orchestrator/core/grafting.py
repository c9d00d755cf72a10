"""Progressive network grafting for few-shot distillation (issue #15; Chengchao Shen, Xinchao
Wang, Youtan Yin, Jie Song, Sihui Luo, Mingli Song, "Progressive Network Grafting for
Few-Shot Knowledge Distillation", AAAI 2021, arXiv:2012.04915), for WideResNet pairs.

A WideResNet is a stem conv, three stages (the block groups: strides 1, 2, 2) and a head
(BN-ReLU, pooling, linear). Teacher and student share that layout, so student stage i can
stand in for teacher stage i. The student's grafted units are its stages; the last unit also
carries the student's head, the way the authors' last grafted block is the classifier. The
student's stem has the teacher's shape in every WRN (16 channels), so it is a frozen copy of
the teacher's, as the authors copy the teacher layers their student keeps unchanged.

Where the widths meet, 1x1 convolutions with a bias adapt them: `s2t[i]` after student
stage i (student width -> teacher width) and `t2s[i]` before student stage i+1 (teacher
width -> student width); none before the first unit (the stem is shared) or after the last
(logits). The stages of training (`Schedule`):

1. Block grafting, one unit at a time: the hybrid is the teacher with its stage i replaced
   by [t2s[i-1], student stage i, s2t[i]]; that unit and s2t[i] learn.
2. Progressive connection: units 0..j connected and grafted together (then s2t[j] back into
   the teacher), j = 1 .. n-1; everything in the span learns. The last one is the whole
   student, alone: a plain student, trained against the teacher's logits.

Where this differs from the authors: their t2s[i] is learnt in block stage i+1, and their
connected network keeps both adapters between units (s2t[i] then t2s[i]) and is saved with
them. In their VGG a convolution follows the adapters, so the pair could be folded into it;
a pre-activation WRN block starts with BN-ReLU, through which a channel-mixing map cannot
be folded. Here t2s[i] is tied to s2t[i] instead, as its
left inverse (`tie`: weight pinv(W), bias -pinv(W) b, frozen), so t2s[i](s2t[i](x)) = x
exactly and connecting two units needs no adapter at all: the connected student is a
plain student from the first connection step, with nothing left to fold or absorb.

The loss of every stage is the authors' (their `norm_loss`): the squared distance between
the L2-normalised logits of the hybrid and of the teacher, summed over classes and averaged
over the batch. The teacher is frozen in eval mode; the student's BN layers train. Plain
PyTorch: no Ray, no MLflow, no argparse.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods import ImageSpec
from methods.augment import random_crop_with_padding, random_hflip
from models.wide_resnet import WideResNet
from orchestrator.core.errors import UsageError
from orchestrator.core.training import normalize


# --------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """How long and how fast each stage trains. Epochs are passes over the guide set in
    shuffled batches (the last batch of a pass may be smaller), as in the authors' loaders.

    The defaults are the authors' CIFAR-10 setting for K = 10 (utils/parser_cifar10.py of
    zju-vipa/NetGraft): Adam; block grafting 100, 60, 60 epochs at lr 2.5e-4 for the student
    unit and 2.5e-3 for its adapters; progressive connection 100, 100 epochs at lr 1e-4;
    batches of 64. Their batch size and block-stage rates scale with K / 10 (`for_k`)."""

    block_epochs: tuple[int, ...] = (100, 60, 60)
    net_epochs: tuple[int, ...] = (100, 100)
    batch_size: int = 64
    lr_block: float = 2.5e-4
    lr_adapter: float = 2.5e-3
    lr_net: float = 1e-4
    eval_images: int = 0  # >0: each stage's hybrid is scored on this many fixed test images

    def for_k(self, k: int) -> "Schedule":
        """The authors scale batch size and block-stage rates by K / 10 (64 images at K = 10)."""
        factor = k / 10
        return dataclasses.replace(self, batch_size=max(2, int(self.batch_size * factor)),
                                   lr_block=self.lr_block * factor, lr_adapter=self.lr_adapter * factor)

    def check(self, units: int) -> None:
        if len(self.block_epochs) != units or len(self.net_epochs) != units - 1:
            raise UsageError(f"the schedule needs {units} block-grafting and {units - 1} connection stages "
                             f"(one per student stage), got {len(self.block_epochs)} and {len(self.net_epochs)}")
        if min(*self.block_epochs, *self.net_epochs) < 0 or self.batch_size < 1:
            raise UsageError(f"invalid schedule {self}")
        if min(self.lr_block, self.lr_adapter, self.lr_net) <= 0:
            raise UsageError(f"invalid schedule {self}: every learning rate must be > 0")


PAPER = Schedule()
# The authors' schedule fits the CPU budget: at K = 10 (wrn16_2 -> wrn16_1, Fashion-MNIST) a
# whole seed took 140 s of wall time on one thread of the 2-core machine, beside a running
# benchmark (docs/methods.md, NetGraft). `cpu` adds only the per-stage diagnostic score of
# each hybrid on 1,000 fixed test images (never used to choose anything). Its cost grows
# with K: the batch is 6.4 K images, two steps per epoch.
BUDGETS: dict[str, Schedule] = {
    "paper": PAPER,
    "cpu": dataclasses.replace(PAPER, eval_images=1000),
    "smoke": Schedule(block_epochs=(1, 1, 1), net_epochs=(1, 1), eval_images=0),
}


# ---------------------------------------------------------------------------- the networks
def check_pair(teacher: nn.Module, student: nn.Module, teacher_arch: str = "teacher",
               student_arch: str = "student") -> None:
    """Grafting needs two WideResNets with the same stem and as many stages (the strides of
    WRN stages are always 1, 2, 2); widths and depths may differ."""
    for name, model in ((teacher_arch, teacher), (student_arch, student)):
        if not isinstance(model, WideResNet):
            raise UsageError(f"netgraft grafts WideResNet stages; {name} is a {type(model).__name__}")
    if len(teacher.stages) != len(student.stages) or teacher.conv1.weight.shape != student.conv1.weight.shape \
            or teacher.fc.out_features != student.fc.out_features:
        raise UsageError(f"{teacher_arch} and {student_arch} do not share a stem, a number of stages and classes")
    if any(s > t for s, t in zip(stage_widths(student), stage_widths(teacher))):
        raise UsageError(f"{student_arch} is wider than {teacher_arch}: the student must not be wider")


def stage_widths(model: WideResNet) -> list[int]:
    return [stage[-1].conv2.out_channels for stage in model.stages]


def head(model: WideResNet, x: torch.Tensor) -> torch.Tensor:
    """A WideResNet's head (BN-ReLU, global pooling, linear), as in its forward."""
    return model.fc(model.pool(F.relu(model.bn(x))).flatten(1))


def adapter(c_in: int, c_out: int) -> nn.Conv2d:
    """A 1x1 convolution with a bias, He-initialised (fan_out) with a zero bias, as the
    authors initialise theirs."""
    conv = nn.Conv2d(c_in, c_out, 1, bias=True)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


@torch.no_grad()
def left_inverse(conv: nn.Conv2d, into: nn.Conv2d) -> None:
    """Sets the 1x1 convolution `into` to undo `conv` (y = W x + b): weight pinv(W), bias
    -pinv(W) b, so into(conv(x)) = x for a W of full column rank (a student no wider)."""
    pinv = torch.linalg.pinv(conv.weight.flatten(1).double())
    into.weight.copy_(pinv.to(into.weight.dtype)[:, :, None, None])
    into.bias.copy_(-(pinv @ conv.bias.double()).to(into.bias.dtype))


class Graft(nn.Module):
    """The student, its adapters and the frozen teacher they are grafted onto; `forward`
    runs any hybrid. The teacher is held outside the module tree, so `parameters()` and
    `state_dict()` are the student's and the adapters' only."""

    def __init__(self, teacher: WideResNet, student: WideResNet):
        super().__init__()
        check_pair(teacher, student)
        for p in teacher.parameters():  # never trained here (load_teacher freezes it already)
            p.requires_grad_(False)
        self._teacher = [teacher]
        self.student = student
        tw, sw = stage_widths(teacher), stage_widths(student)
        self.s2t = nn.ModuleList(adapter(sw[i], tw[i]) for i in range(len(sw) - 1))
        self.t2s = nn.ModuleList(adapter(tw[i], sw[i]) for i in range(len(sw) - 1))
        for p in self.t2s.parameters():  # set by `tie`, never trained
            p.requires_grad_(False)
        with torch.no_grad():  # the shared stem: the teacher's, frozen
            student.conv1.weight.copy_(teacher.conv1.weight)
        student.conv1.weight.requires_grad_(False)

    @property
    def teacher(self) -> WideResNet:
        return self._teacher[0]

    @property
    def units(self) -> int:
        return len(self.student.stages)

    def unit_modules(self, i: int) -> list[nn.Module]:
        """Student stage i, plus the student's head for the last unit."""
        s = self.student
        return [s.stages[i], s.bn, s.fc] if i == self.units - 1 else [s.stages[i]]

    def unit_parameters(self, first: int, last: int) -> list[nn.Parameter]:
        return [p for i in range(first, last + 1) for m in self.unit_modules(i) for p in m.parameters()]

    def exit_parameters(self, last: int) -> list[nn.Parameter]:
        """The adapter that takes a span ending at unit `last` back into the teacher."""
        return list(self.s2t[last].parameters()) if last < self.units - 1 else []

    def tie(self, i: int) -> None:
        """t2s[i] := the left inverse of s2t[i] (after s2t[i] has been trained)."""
        left_inverse(self.s2t[i], self.t2s[i])

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's stem and stage outputs [stem, stage 0, ...] and its logits."""
        t = self.teacher
        feats = [t.conv1(x)]
        for stage in t.stages:
            feats.append(stage(feats[-1]))
        return feats, head(t, feats[-1])

    def forward(self, x: torch.Tensor, first: int, last: int, feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the teacher with its stages first..last replaced by the student's
        (through the adapters); `feats` (from `teacher_features`) saves the teacher's prefix."""
        t, s, n = self.teacher, self.student, self.units
        if feats is None:
            x = t.conv1(x)
            with torch.no_grad():
                for i in range(first):
                    x = t.stages[i](x)
        else:
            x = feats[first]
        if first > 0:
            x = self.t2s[first - 1](x)
        for i in range(first, last + 1):  # connected units: directly (the tied pair is the identity)
            x = s.stages[i](x)
        if last == n - 1:
            return head(s, x)
        x = self.s2t[last](x)
        for i in range(last + 1, n):
            x = t.stages[i](x)
        return head(t, x)


def graft_loss(hybrid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' `norm_loss`: squared distance of the L2-normalised logits, summed over
    classes, averaged over the batch (theirs sums over the batch too; Adam does not care)."""
    return (F.normalize(hybrid, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean()


# ------------------------------------------------------------------------------ training
def augment(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """The dataset's training view (random crop with zero padding, horizontal flip)."""
    if spec.crop_padding:
        x = random_crop_with_padding(x, spec.crop_padding)
    return random_hflip(x) if spec.hflip else x


@dataclass
class StageRecord:
    name: str
    span: tuple[int, int]
    epochs: int
    iterations: int = 0
    loss: list[float] = dataclasses.field(default_factory=list)  # mean per epoch
    seconds: float = 0.0
    trainable: int = 0  # parameters updated
    hybrid_accuracy: float | None = None  # on the fixed evaluation subset, if asked


def train_stage(graft: Graft, images: torch.Tensor, spec: ImageSpec, record: StageRecord,
                groups: list[dict], batch_size: int) -> StageRecord:
    """`record.epochs` passes of Adam over the guide images (augmented, shuffled) on the
    hybrid of span `record.span`, updating only the parameters in `groups`."""
    first, last = record.span
    optimizer = torch.optim.Adam(groups)
    record.trainable = sum(p.numel() for g in groups for p in g["params"])
    started = time.perf_counter()
    graft.teacher.eval()
    graft.student.train()
    step = 0
    for _ in range(record.epochs):
        order = torch.randperm(len(images))
        summed, seen = 0.0, 0
        for start in range(0, len(images), batch_size):
            x = spec.normalize(augment(images[order[start:start + batch_size]], spec))
            feats, target = graft.teacher_features(x)
            loss = graft_loss(graft(x, first, last, feats), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{record.name}: the loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            summed += loss.item() * len(x)
            seen += len(x)
            step += 1
        record.loss.append(summed / max(seen, 1))
    record.iterations = step
    record.seconds = time.perf_counter() - started
    return record


@torch.no_grad()
def hybrid_accuracy(graft: Graft, data, first: int, last: int, batch_size: int = 128) -> float:
    """Top-1 accuracy (%) of a hybrid on an ImageSet, with BN running statistics."""
    was = graft.student.training
    graft.student.eval()
    correct = 0
    for x, y in data.batches(batch_size):
        correct += (graft(normalize(x, data.spec.mean, data.spec.std), first, last).argmax(1) == y).sum().item()
    graft.student.train(was)
    return 100.0 * correct / max(len(data), 1)


def stage_plan(graft: Graft, schedule: Schedule) -> list[tuple[StageRecord, Callable[[], list[dict]]]]:
    """(record, its parameter groups) for every stage, in order. The groups are built when
    the stage starts: a block stage first ties the adapter before it to the trained one."""
    n = graft.units

    def block(i: int) -> list[dict]:
        if i > 0:
            graft.tie(i - 1)
        return [{"params": graft.unit_parameters(i, i), "lr": schedule.lr_block},
                {"params": graft.exit_parameters(i), "lr": schedule.lr_adapter}]

    def connect(j: int) -> list[dict]:
        return [{"params": graft.unit_parameters(0, j) + graft.exit_parameters(j), "lr": schedule.lr_net}]

    return ([(StageRecord(f"block {i + 1}", (i, i), schedule.block_epochs[i]), lambda i=i: block(i))
             for i in range(n)]
            + [(StageRecord(f"connect 1-{j + 1}", (0, j), schedule.net_epochs[j - 1]), lambda j=j: connect(j))
               for j in range(1, n)])


def run_graft(graft: Graft, images: torch.Tensor, spec: ImageSpec, schedule: Schedule, eval_set=None,
              log=print) -> list[StageRecord]:
    """Every stage in order; returns their records. The last stage trains the whole student
    alone, so afterwards `graft.student` is the distilled plain student."""
    schedule.check(graft.units)
    records = []
    for record, groups in stage_plan(graft, schedule):
        train_stage(graft, images, spec, record, groups(), schedule.batch_size)
        if eval_set is not None:
            record.hybrid_accuracy = hybrid_accuracy(graft, eval_set, *record.span)
        shown = f", hybrid accuracy {record.hybrid_accuracy:.2f}%" if record.hybrid_accuracy is not None else ""
        loss = f"loss {record.loss[0]:.4f} -> {record.loss[-1]:.4f}" if record.loss else "no step"
        log(f"  {record.name:<12} span {record.span[0] + 1}-{record.span[1] + 1}: {record.epochs} epochs, "
            f"{record.iterations} steps, {loss}{shown} ({record.seconds:.0f}s)")
        records.append(record)
    return records
