"""The synthetic store: one Ray actor that owns the instance bank, so synthesizer actors
push images into it and trainer actors pull KD batches from it.

    store = create_store(capacity_images=50_000, snapshot_dir="runs/bank", snapshot_every=10)
    bank = StoreBank(store)          # the methods.InstanceBank interface, over Ray
    synth = create_synthesizer("deepinv", teacher, student, cfg, spec, bank=bank)
    synth.synthesize()               # pushes into the actor
    x = bank.sample(256)             # pulls from it, in any process that has `bank`

Only numpy arrays and plain Python cross the actor boundary (returned numpy arrays
travel through Ray's shared-memory object store without pickling and come back as
zero-copy views); snapshots are one safetensors file plus a JSON sidecar, never pickles.
"""
from __future__ import annotations

import functools
import json
import os
import time
import uuid
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import ray
import torch

from methods.bank import InstanceBank

SNAPSHOT_FILE = "store.safetensors"
META_FILE = "store.json"
FORMAT = "dfkd-synthetic-store/1"

# If the store dies under a call, Ray re-sends it to the restarted actor (which comes back
# from its last snapshot) instead of failing the synthesizer or the trainer; the call waits
# for the restart however long it takes (three quick retries ran out on a slower CPU), and a
# store that keeps dying ends after `create_store`'s `max_restarts`. Ray delivers a re-sent
# call at least once, not exactly once, so each `StoreBank` numbers its adds and the store
# applies each number once; the numbers applied are in the snapshot, so an add lost with the
# process is applied when it comes again. A repeated read only advances the sampling RNG.
_READ = dict(max_task_retries=-1)
_WRITE = dict(max_task_retries=-1)


class SnapshotError(RuntimeError):
    """A snapshot is missing, unreadable or not a store snapshot."""


def _tensor(array: np.ndarray) -> torch.Tensor:
    """torch view of a numpy array without a copy. Arrays that come out of Ray's object
    store are read-only; torch warns about that once per process, and the tensor must
    not be written in place (the bank and the loop only read it)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _rows(fifo, index: np.ndarray) -> np.ndarray:
    """Rows of one of InstanceBank's ring buffers by logical index (0 = oldest), as one
    new contiguous numpy array, ready for Ray to ship without a conversion. Reads the
    ring directly (its `data`, `start`): with indices from numpy's O(n) `choice` this is
    ~0.2 ms per 256-image batch from 50,000, where InstanceBank.sample (an O(pool)
    randperm, then torch -> numpy) takes ~0.7 ms."""
    data = fifo.data.numpy()
    if fifo.start:
        index = (index + fifo.start) % len(data)
    return data[index]


def _as_array(name: str, value, dtype, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"SyntheticStore.add: {name} is a torch tensor; pass numpy arrays "
                        f"(StoreBank converts for you)")
    array = np.asarray(value)
    if array.ndim != ndim:
        raise ValueError(f"SyntheticStore.add: {name} must have {ndim} dimensions, got shape {array.shape}")
    if dtype is np.uint8 and array.dtype != np.uint8:
        raise ValueError(f"SyntheticStore.add: images must be uint8 (N, C, H, W), got {array.dtype}; "
                         f"convert with methods.bank.to_uint8")
    if dtype is np.int64 and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"SyntheticStore.add: labels must be integers, got {array.dtype}")
    if dtype is np.float32 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"SyntheticStore.add: features must be floats, got {array.dtype}")
    return array.astype(dtype, copy=False)


class SyntheticStore:
    """An InstanceBank behind a Ray actor: uint8 images (N, C, H, W), int64 labels (-1
    where unknown) and CMI's float32 feature memory bank (N, D).

    Eviction: FIFO. Once `capacity_images` images are held, each add evicts the oldest
    images (and their labels) first; features form their own FIFO of
    `capacity_features` rows, evicted oldest first independently of the images.
    `capacity_images=None` keeps everything (the reference pool grows without bound).

    `sample(n)` draws n distinct images uniformly when the store holds at least n, else
    with replacement. Persistence: `snapshot()` writes `store.safetensors` (arrays, plus
    capacities and counters in its header) atomically, and a `store.json` sidecar for
    people. Built with a `snapshot_dir`, `__init__` restores the snapshot found there,
    so when Ray restarts a killed store (`max_restarts`) it comes back holding
    everything up to the last snapshot; adds after it are lost. `snapshot_every=N`
    snapshots after every N adds.

    Everything in and out is numpy or plain Python. Use `create_store()` to start one
    and `StoreBank` to use it as a methods `bank`.
    """

    def __init__(self, capacity_images: int | None = None, capacity_features: int | None = None,
                 snapshot_dir: str | None = None, snapshot_every: int = 0, seed: int | None = None):
        torch.set_num_threads(1)  # the store only copies bytes; leave the cores to workers
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        if snapshot_every and snapshot_dir is None:
            raise ValueError("snapshot_every needs a snapshot_dir")
        self._bank = InstanceBank(capacity_images, capacity_features)
        self._rng = np.random.default_rng(seed)
        self.snapshot_dir = None if snapshot_dir is None else str(snapshot_dir)
        self.snapshot_every = int(snapshot_every)
        self._counters = dict(adds=0, images_added=0, sample_calls=0, samples_served=0)
        self._adds_since_snapshot = 0
        self._applied: dict[str, int] = {}  # writer -> the last add number applied
        self._last_snapshot: str | None = None
        self._last_snapshot_time: float | None = None
        self._restored_from: str | None = None
        if self.snapshot_dir is not None and (Path(self.snapshot_dir) / SNAPSHOT_FILE).exists():
            self.restore()

    # -- writes -----------------------------------------------------------------------

    @ray.method(**_WRITE)
    def add(self, images: np.ndarray, labels: np.ndarray | None = None,
            features: np.ndarray | None = None, token: tuple[str, int] | None = None) -> int:
        """Append a batch; returns the number of images now held. `token` = (writer, n): the
        writer's n-th add (n counts from 1), applied once however often it arrives."""
        if token is not None:
            writer, number = token
            if self._applied.get(writer, 0) >= number:
                self._counters["repeated_adds"] = self._counters.get("repeated_adds", 0) + 1
                return len(self._bank)
        images = _as_array("images", images, np.uint8, 4)
        labels = None if labels is None else _as_array("labels", labels, np.int64, 1)
        features = None if features is None else _as_array("features", features, np.float32, 2)
        self._bank.add(_tensor(images), None if labels is None else _tensor(labels),
                       None if features is None else _tensor(features))
        if token is not None:  # recorded once the batch is in: a refused batch is not "applied"
            self._applied[token[0]] = token[1]
        self._counters["adds"] += 1
        self._counters["images_added"] += len(images)
        self._adds_since_snapshot += 1
        if self.snapshot_every and self._adds_since_snapshot >= self.snapshot_every:
            self.snapshot()
        return len(self._bank)

    # -- reads ------------------------------------------------------------------------

    def _draw(self, n: int) -> np.ndarray:
        size = len(self._bank)
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        if size == 0:
            raise RuntimeError("the synthetic store is empty: synthesize a batch before sampling")
        self._counters["sample_calls"] += 1
        self._counters["samples_served"] += n
        if n <= size:
            return self._rng.choice(size, n, replace=False)
        return self._rng.integers(0, size, n)

    @ray.method(**_READ)
    def sample(self, batch_size: int) -> np.ndarray:
        """`batch_size` random images as one contiguous uint8 (n, C, H, W) array."""
        return _rows(self._bank._images, self._draw(batch_size))

    @ray.method(**_READ)
    def sample_many(self, batch_size: int, count: int) -> np.ndarray:
        """`count` successive `sample(batch_size)` draws (the same images, in the same order)
        in one (count * batch_size, C, H, W) array: one call, so the store's process wakes
        once per KD round instead of once per step, beside a trainer using every core."""
        return np.concatenate([_rows(self._bank._images, self._draw(batch_size)) for _ in range(count)])

    @ray.method(**_READ)
    def negatives(self, k: int) -> np.ndarray:
        """min(k, stored) distinct random feature rows, float32 (., D); (0, 0) while empty."""
        size = self._bank.num_features()
        if size == 0:
            return np.empty((0, 0), dtype=np.float32)
        return _rows(self._bank._features, self._rng.choice(size, min(k, size), replace=False))

    @ray.method(**_READ)
    def size(self) -> int:
        return len(self._bank)

    @ray.method(**_READ)
    def num_features(self) -> int:
        return self._bank.num_features()

    @ray.method(**_READ)
    def state_arrays(self) -> dict:
        """InstanceBank.state_dict() as numpy arrays (oldest row first) and ints."""
        return {k: v.numpy() if isinstance(v, torch.Tensor) else v
                for k, v in self._bank.state_dict().items()}

    def load_state_arrays(self, state: dict) -> int:
        """Replace the contents (and capacities) with a `state_arrays()` dict."""
        self._bank.load_state_dict({k: _tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v
                                    for k, v in state.items()})
        return len(self._bank)

    @ray.method(**_READ)
    def rng_state(self) -> str:
        """The sampling generator's state, as JSON (a cell's state file keeps it)."""
        return json.dumps(self._rng.bit_generator.state)

    def set_rng_state(self, state: str) -> None:
        self._rng.bit_generator.state = json.loads(state)

    @ray.method(**_READ)
    def stats(self) -> dict:
        images, labels, features = self._bank._images, self._bank._labels, self._bank._features
        held = sum(0 if f.data is None else f.size * f.data[0].nbytes for f in (images, labels, features))
        allocated = sum(0 if f.data is None else f.data.nbytes for f in (images, labels, features))
        return {
            "images": len(self._bank),
            "features": self._bank.num_features(),
            "image_shape": None if images.data is None else tuple(images.data.shape[1:]),
            "feature_dim": None if features.data is None else int(features.data.shape[1]),
            "capacity_images": images.capacity,
            "capacity_features": features.capacity,
            "bytes": held,
            "bytes_allocated": allocated,
            **self._counters,
            "snapshot_dir": self.snapshot_dir,
            "snapshot_every": self.snapshot_every,
            "last_snapshot": self._last_snapshot,
            "last_snapshot_time": self._last_snapshot_time,
            "restored_from": self._restored_from,
            "pid": os.getpid(),
        }

    # -- persistence ------------------------------------------------------------------

    def _dir(self, directory: str | None) -> Path:
        directory = directory if directory is not None else self.snapshot_dir
        if directory is None:
            raise ValueError("no snapshot directory: pass one or create the store with snapshot_dir")
        return Path(directory)

    def snapshot(self, dir: str | None = None) -> str:  # noqa: A002  (the design's name)
        """Write the store to `dir/store.safetensors` (+ `store.json`); returns the path.

        Each file is written to a temporary name, fsynced and renamed over the old one,
        so a crash leaves the previous snapshot or the new one, never a torn file. The
        safetensors header carries the capacities and counters: it alone is restored.
        """
        from safetensors.numpy import save_file

        directory = self._dir(dir)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_arrays()
        now = time.time()
        meta = {
            "format": FORMAT,
            "created": now,
            "capacity_images": int(state["capacity_images"]),
            "capacity_features": int(state["capacity_features"]),
            "counters": dict(self._counters),
            "rng": self._rng.bit_generator.state,  # a restored store draws on as this one would
            "applied": dict(self._applied),  # a re-sent add it holds is not applied again
        }
        arrays = {k: np.ascontiguousarray(state[k]) for k in ("images", "labels", "features")}
        path = directory / SNAPSHOT_FILE
        tmp = directory / f".{SNAPSHOT_FILE}.{os.getpid()}.tmp"
        save_file(arrays, str(tmp), metadata={"store": json.dumps(meta)})
        _fsync_replace(tmp, path)
        sidecar = {**meta, "file": SNAPSHOT_FILE,
                   "shapes": {k: list(v.shape) for k, v in arrays.items()},
                   "dtypes": {k: str(v.dtype) for k, v in arrays.items()}}
        tmp = directory / f".{META_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(sidecar, indent=1) + "\n")
        _fsync_replace(tmp, directory / META_FILE)
        self._adds_since_snapshot = 0
        self._last_snapshot, self._last_snapshot_time = str(path), now
        return str(path)

    def restore(self, dir: str | None = None) -> int:  # noqa: A002
        """Replace the contents with the snapshot in `dir`, taking its capacities and
        counters too; returns the images held."""
        from safetensors import safe_open

        path = self._dir(dir) / SNAPSHOT_FILE
        if not path.exists():
            raise SnapshotError(f"no store snapshot at {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {}).get("store", "{}"))
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise SnapshotError(f"cannot read store snapshot {path}: {exc}") from None
        if meta.get("format") != FORMAT or set(arrays) != {"images", "labels", "features"}:
            raise SnapshotError(f"{path} is not a {FORMAT} snapshot "
                                f"(format {meta.get('format')!r}, arrays {sorted(arrays)})")
        self.load_state_arrays({**arrays, "capacity_images": meta["capacity_images"],
                                "capacity_features": meta["capacity_features"]})
        self._counters.update(meta.get("counters", {}))
        self._applied = {str(k): int(v) for k, v in meta.get("applied", {}).items()}
        if "rng" in meta:
            self._rng.bit_generator.state = meta["rng"]
        self._adds_since_snapshot = 0
        self._restored_from = str(path)
        return len(self._bank)


def _fsync_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def _actor_class():
    return ray.remote(SyntheticStore)


def create_store(name: str | None = None, capacity_images: int | None = None,
                 capacity_features: int | None = None, snapshot_dir: str | None = None,
                 snapshot_every: int = 0, num_cpus: float = 0, max_restarts: int = 10,
                 seed: int | None = None, namespace: str | None = None):
    """Start a SyntheticStore actor and return its handle (ray.init() must have run).

    `num_cpus=0`: the store only copies bytes between requests, so it reserves no core
    and coexists with CPU-bound trainer/synthesizer actors that take them all.
    After a crash or kill Ray restarts it, up to `max_restarts` times (-1: forever), and
    the calls in flight wait for it; give a `snapshot_dir` so the restarted store comes
    back with the last snapshot. `name` registers it
    (fetch it elsewhere with `ray.get_actor(name)`).
    """
    options = dict(num_cpus=num_cpus, max_restarts=max_restarts)
    if name is not None:
        options.update(name=name, namespace=namespace)
    return _actor_class().options(**options).remote(
        capacity_images, capacity_features, snapshot_dir, snapshot_every, seed)


class StoreBank:
    """The methods.InstanceBank interface over a SyntheticStore actor, for synthesizers
    (push) and trainers (pull) in any process; it pickles with its actor handle.

    Every call is a blocking `ray.get`. Tensors returned by `sample`, `negatives` and
    `state_dict` are zero-copy views of read-only shared memory: read them (the
    methods do: `from_uint8` makes a new float tensor) or `.clone()` before writing.

    `prefetch=k` keeps k `sample` requests in flight, so a trainer's KD step overlaps
    the next batch's round trip (a prefetched batch was drawn before images added
    since). 0 (the default) draws each batch when asked.
    """

    def __init__(self, store, timeout: float | None = None, prefetch: int = 0):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.store = store
        self.timeout = timeout
        self.prefetch = prefetch
        self._pending: deque = deque()  # sample refs in flight, all of size _pending_n
        self._pending_n = None
        self._writer, self._adds = uuid.uuid4().hex, 0  # this bank's add numbers (see `add`)

    def __getstate__(self):
        # Requests in flight stay with the process that made them; a copy in another process
        # writes under a name of its own.
        return {**self.__dict__, "_pending": deque(), "_pending_n": None, "_writer": uuid.uuid4().hex, "_adds": 0}

    def _get(self, ref):
        return ray.get(ref, timeout=self.timeout)

    def __len__(self) -> int:
        return self._get(self.store.size.remote())

    def num_features(self) -> int:
        return self._get(self.store.num_features.remote())

    def add(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None,
            features: torch.Tensor | None = None) -> int:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}; convert with methods.bank.to_uint8")

        if labels is not None:
            labels = labels.long()
        if features is not None and features.is_floating_point():
            features = features.float()  # the store checks that they are floats at all

        def array(t):
            return None if t is None else t.detach().cpu().contiguous().numpy()

        # Numbered, so that a re-send after the store restarts adds the batch once.
        self._adds += 1
        return self._get(self.store.add.remote(array(images_uint8), array(labels), array(features),
                                               token=(self._writer, self._adds)))

    def sample(self, n: int) -> torch.Tensor:
        if not self.prefetch:
            return _tensor(self._get(self.store.sample.remote(n)))
        if n != self._pending_n:
            self._pending.clear()
            self._pending_n = n
        while len(self._pending) <= self.prefetch:
            self._pending.append(self.store.sample.remote(n))
        return _tensor(self._get(self._pending.popleft()))

    def sample_batches(self, n: int, count: int):
        """`count` batches of `n`, in one request (the same draws as `count` calls of
        `sample`), yielded in order: the consumer waits for one round trip, not one per batch."""
        if count <= 0:
            return
        yield from _tensor(self._get(self.store.sample_many.remote(n, count))).split(n)

    def negatives(self, k: int) -> torch.Tensor:
        return _tensor(self._get(self.store.negatives.remote(k)))

    def state_dict(self) -> dict:
        """The store's arrays as tensors: same keys as InstanceBank.state_dict(), so a
        cell checkpoint loads into either bank."""
        return {k: _tensor(v) if isinstance(v, np.ndarray) else v
                for k, v in self._get(self.store.state_arrays.remote()).items()}

    def load_state_dict(self, state: dict) -> None:
        arrays = {k: v.detach().cpu().contiguous().numpy() if isinstance(v, torch.Tensor) else v
                  for k, v in state.items()}
        self._pending.clear()  # drawn from the old contents
        self._get(self.store.load_state_arrays.remote(arrays))
