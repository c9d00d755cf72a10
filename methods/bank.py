"""In-memory instance bank: the pool of synthesized images, their labels, and CMI's
feature memory bank.

Plain tensors in, plain tensors out, so the orchestrator can put the same interface
behind a Ray actor. Images are stored as uint8, what a PNG pool holds, at a quarter of
float32's memory; storage grows by doubling and, once at capacity, overwrites the oldest
rows (FIFO), so adding a batch costs O(batch), not O(pool).
"""
from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 pixels, rounded to nearest."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


class _Fifo:
    """Rows in arrival order, in a buffer that grows to `capacity` and then wraps."""

    def __init__(self, capacity: int | None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be positive or None, got {capacity}")
        self.capacity = capacity
        self.data: torch.Tensor | None = None
        self.start = 0  # physical row of the oldest entry
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().cpu()
        if self.data is not None and (x.shape[1:] != self.data.shape[1:] or x.dtype != self.data.dtype):
            raise ValueError(f"cannot add rows of shape {tuple(x.shape[1:])} {x.dtype} to a bank of "
                             f"{tuple(self.data.shape[1:])} {self.data.dtype}")
        n = len(x)
        if n == 0:
            return
        cap = self.capacity
        if cap is not None and n >= cap:
            self.data, self.start, self.size = x[n - cap:].clone(), 0, cap
            return
        rows = 0 if self.data is None else len(self.data)
        if self.size + n > rows and (cap is None or rows < cap):
            new_rows = max(self.size + n, 2 * rows, 64)
            if cap is not None:
                new_rows = min(new_rows, cap)
            grown = torch.empty((new_rows, *x.shape[1:]), dtype=x.dtype)
            if self.size:
                grown[:self.size] = self.ordered()
            self.data, self.start, rows = grown, 0, new_rows
        pos = (self.start + self.size + torch.arange(n)) % rows
        self.data[pos] = x
        overflow = self.size + n - rows
        if overflow > 0:  # the oldest `overflow` rows were just overwritten
            self.start = (self.start + overflow) % rows
            self.size = rows
        else:
            self.size += n

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Rows by logical index (0 = oldest). index_select, not x[index]: several times
        faster for image rows."""
        return self.data.index_select(0, (self.start + index) % len(self.data))

    def ordered(self) -> torch.Tensor:
        return self.take(torch.arange(self.size))

    def load(self, rows: torch.Tensor) -> None:
        self.data, self.start, self.size = None, 0, 0
        self.append(rows)


class InstanceBank:
    """Synthetic images (uint8, N x C x H x W), optional labels (-1 where unknown) and a
    separate FIFO of feature vectors (CMI's negatives).

    `capacity_images=None` keeps every image (the reference pool grows without bound);
    `capacity_features` is CMI's memory-bank size (None: unbounded). A method states both
    in `Synthesizer.store_capacity`.
    """

    def __init__(self, capacity_images: int | None = None, capacity_features: int | None = None):
        self._images = _Fifo(capacity_images)
        self._labels = _Fifo(capacity_images)
        self._features = _Fifo(capacity_features)

    def __len__(self) -> int:
        return len(self._images)

    def num_features(self) -> int:
        return len(self._features)

    def add(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None,
            features: torch.Tensor | None = None) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}; convert with methods.bank.to_uint8")
        n = len(images_uint8)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
        if features is not None and (features.dim() != 2 or not features.is_floating_point()):
            raise ValueError(f"features must be float (N, D), got {features.dtype} {tuple(features.shape)}")
        self._images.append(images_uint8)
        self._labels.append(labels.long())
        if features is not None:
            self._features.append(features.float())

    def _draw(self, n: int, size: int) -> torch.Tensor:
        if size == 0:
            raise RuntimeError("the instance bank is empty: synthesize a batch before sampling")
        # Distinct images within one call when the pool has enough; else with replacement.
        if n <= size:
            return torch.randperm(size)[:n]
        return torch.randint(0, size, (n,))

    def sample(self, n: int) -> torch.Tensor:
        """n random images, uint8 (n, C, H, W)."""
        return self._images.take(self._draw(n, len(self)))

    def negatives(self, k: int) -> torch.Tensor:
        """min(k, stored) random feature rows, float (., D); (0, 0) while empty."""
        size = self.num_features()
        if size == 0:
            return torch.empty(0, 0)
        return self._features.take(torch.randperm(size)[:k])

    def state_dict(self) -> dict:
        # Plain tensors and ints only: loads with torch.load(weights_only=True) and
        # converts to npz/safetensors as is.
        return {
            "images": self._images.ordered() if len(self) else torch.empty(0, dtype=torch.uint8),
            "labels": self._labels.ordered() if len(self) else torch.empty(0, dtype=torch.long),
            "features": self._features.ordered() if self.num_features() else torch.empty(0, 0),
            "capacity_images": -1 if self._images.capacity is None else self._images.capacity,
            "capacity_features": -1 if self._features.capacity is None else self._features.capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        cap_i, cap_f = int(state["capacity_images"]), int(state["capacity_features"])
        self.__init__(None if cap_i < 0 else cap_i, None if cap_f < 0 else cap_f)
        self._images.load(state["images"])
        self._labels.load(state["labels"])
        self._features.load(state["features"])
