"""The student's KD objective, and CRD as an option of it for every method.

Not a synthesis method (nothing here is registered): `kd_criterion` names the student's
loss, "kl" or "l1" on logits, and "kl+crd" / "l1+crd" add Contrastive Representation
Distillation (Yonglong Tian, Dilip Krishnan, Phillip Isola, "Contrastive Representation
Distillation", ICLR 2020):

    L = kd(s, t) + CRD_WEIGHT * L_crd
    e_s = normalize(W_s h_s),  e_t = normalize(W_t h_t)          128-d heads on the penultimate features
    L_crd = mean_i -log softmax_j(e_s,i . k_j / CRD_TEMPERATURE)[i],   k = [e_t (this batch); queue]

The heads train with the student's optimizer. CRD's memory holds one embedding per dataset
sample and draws its negatives by sample index; data-free KD has no fixed dataset, so the
negatives here are this batch's other teacher embeddings plus a FIFO queue of the most
recent teacher embeddings (MoCo's queue, without a momentum encoder). Only CRD's
student-anchored half is kept: its teacher-anchored half would need a memory of student
embeddings as well. Constants are the published ones (RepDistiller: feat_dim 128,
nce_t 0.07, nce_k 16384, and "CRD+KD" with KD weight 1 and CRD weight b = 0.8).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import KD_CRITERIA, split_criterion

CRD_WEIGHT = 0.8  # the published beta of CRD+KD (KD weight 1)
CRD_TEMPERATURE = 0.07
CRD_DIM = 128
CRD_QUEUE = 16384  # negatives kept: the published nce_k


class EmbedHead(nn.Module):
    """Linear to `dim`, then L2 normalisation (CRD's Embed)."""

    def __init__(self, in_features: int, dim: int = CRD_DIM):
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features.flatten(1)), dim=1)


class EmbeddingQueue:
    """A FIFO of at most `capacity` rows: a ring buffer, so pushing never reallocates."""

    def __init__(self, capacity: int, dim: int, device="cpu"):
        self.buffer = torch.zeros(capacity, dim, device=device)
        self.start = 0  # index of the oldest row
        self.size = 0

    @property
    def capacity(self) -> int:
        return len(self.buffer)

    def __len__(self) -> int:
        return self.size

    def push(self, rows: torch.Tensor) -> None:
        rows = rows.detach()[-self.capacity:]  # a batch larger than the queue keeps its newest rows
        end = (self.start + self.size) % self.capacity
        index = (end + torch.arange(len(rows), device=self.buffer.device)) % self.capacity
        self.buffer[index] = rows.to(self.buffer.dtype)
        overflow = max(self.size + len(rows) - self.capacity, 0)
        self.start = (self.start + overflow) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def rows(self) -> torch.Tensor:
        """The stored rows, oldest first."""
        index = (self.start + torch.arange(self.size, device=self.buffer.device)) % self.capacity
        return self.buffer[index]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.clone(), "start": self.start, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(state["buffer"])
        self.start, self.size = int(state["start"]), int(state["size"])


def crd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, negatives: torch.Tensor,
             temperature: float = CRD_TEMPERATURE) -> torch.Tensor:
    """InfoNCE with the student's embedding as anchor: row i must pick the teacher's row i
    among the batch's teacher rows and the (constant) queued ones. All inputs L2-normalised."""
    keys = torch.cat([teacher_emb, negatives.detach().to(teacher_emb.dtype)])
    logits = student_emb @ keys.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(student_emb), device=logits.device))


class KDObjective(nn.Module):
    """The student's loss for `criterion` ("kl", "l1", "kl+crd", "l1+crd"); its parameters
    (CRD's heads) train with the student, its state (heads and queue) is checkpointed with
    the student's. Without "+crd" it has no parameters and no state."""

    def __init__(self, criterion: str, T: float, student_dim: int | None = None,
                 teacher_dim: int | None = None, queue_size: int = CRD_QUEUE, device="cpu"):
        super().__init__()
        self.base, extras = split_criterion(criterion)
        self.T = T
        self.uses_features = "crd" in extras
        if self.uses_features:
            # Drawn on a forked random stream: turning CRD on does not move the stream the
            # rest of the cell draws from (synthesis, KD sampling).
            with torch.random.fork_rng(devices=[]):
                self.student_head = EmbedHead(student_dim)
                self.teacher_head = EmbedHead(teacher_dim)
            self.to(device)
            self.queue = EmbeddingQueue(queue_size, CRD_DIM, device)

    def forward(self, s_logits, t_logits, s_features=None, t_features=None) -> dict[str, torch.Tensor]:
        """{"loss": the total to minimise, "crd": the unweighted CRD term (with +crd)}; a
        CRD step also pushes this batch's teacher embeddings into the queue."""
        loss = KD_CRITERIA[self.base](s_logits, t_logits, self.T)
        if not self.uses_features:
            return {"loss": loss}
        t_emb = self.teacher_head(t_features)
        crd = crd_loss(self.student_head(s_features), t_emb, self.queue.rows())
        self.queue.push(t_emb)
        return {"loss": loss + CRD_WEIGHT * crd, "crd": crd}

    # Named apart from nn.Module's state_dict: this state holds the queue too, which is no
    # parameter or buffer (its fill level changes), and is empty without CRD.
    def state(self) -> dict:
        if not self.uses_features:
            return {}
        return {"heads": self.state_dict(), "queue": self.queue.state_dict()}

    def load_state(self, state: dict) -> None:
        if self.uses_features:
            self.load_state_dict(state["heads"])
            self.queue.load_state_dict(state["queue"])
