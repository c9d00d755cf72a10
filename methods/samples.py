"""KD on the guide samples alone: the student distills the teacher on nothing but the K real
or condensed images per class of the cell's guide set (`--guide KIND:K`), read through the
dataset's crop and flip. The baseline guided inversion (methods/guided.py) must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bank import to_uint8
from .base import SynthesisResult
from .budgets import CPU, SMOKE
from .config import BaseConfig
from .inversion import InversionSynthesizer
from .registry import register


@dataclass(frozen=True)
class SamplesConfig(BaseConfig):
    """BaseConfig's defaults, the inversion methods' KD schedule: 200 epochs of 400 student
    steps on batches of 256 (one round per epoch), SGD lr 0.1, KD at T=20. The synthesis
    fields (g_steps, synthesis_batch_size, lr_g) are unused."""


@register("samples")
class Samples(InversionSynthesizer):
    """KD on the guide set alone (Binici et al., arXiv:2408.13850, 2024, compare guided
    inversion with distilling on the condensed samples only).

    The first round puts the guide images (as uint8, like every bank) in the bank; KD
    samples the bank with the dataset's crop and flip, as for an inversion pool. Nothing
    is synthesized: `images_synthesized` stays 0 and each round returns no images. Each
    round reports `teacher_ce`, the teacher's cross-entropy on the (unaugmented) guide set,
    a check of the set's quality that costs one pass per process (the teacher is frozen)."""

    Config = SamplesConfig
    display = "KD on samples"
    kind = "baseline"
    paper = "baseline of Binici et al., arXiv 2024"
    optimizes = "nothing: KD on the augmented guide images (--guide KIND:K) alone"
    requires_guide = True
    budgets = {"smoke": dict(SMOKE), "cpu": {**CPU, "kd_steps": 50}}
    SEARCH_SPACE = {
        "lr": {"type": "loguniform", "low": 0.01, "high": 0.5},
        "T": {"type": "loguniform", "low": 1.0, "high": 20.0},
    }

    def __init__(self, teacher, student, config, spec, bank=None, device="cpu"):
        super().__init__(teacher, student, config, spec, bank, device)
        self._teacher_ce: float | None = None

    def synthesize(self) -> SynthesisResult:
        self.check_guide()
        if len(self.bank) == 0:  # once per cell: a resumed cell's bank (or store) has them already
            self.bank.add(to_uint8(self.guide_images.cpu()), self.guide_labels.cpu())
        if self._teacher_ce is None:
            self.teacher.eval()
            with torch.no_grad():
                logits = torch.cat([self.teacher(self.spec.normalize(x)) for x in self.guide_images.split(256)])
            self._teacher_ce = float(F.cross_entropy(logits, self.guide_labels))
        return SynthesisResult(torch.empty(0, *self.spec.shape), {"teacher_ce": self._teacher_ce, "total": 0.0})
