"""How fast trainers can pull KD batches from the synthetic store.

    python -m orchestrator.perf.store_throughput                 # the bar, ~1 min
    python -m orchestrator.perf.store_throughput --seconds 5 --depth 1 2 4 --check
    python -m orchestrator.perf.store_throughput --inline-returns   # Ray system-config variant

Fills a SyntheticStore actor with 50,000 random uint8 3x32x32 images, then a consumer
actor calls `store.sample.remote(256)` in a loop for a few seconds (through
StoreBank.sample, as a trainer would), with 1 request in flight (serial) and with a
few pipelined (StoreBank's prefetch), and prints images/s. The bar: at least
50,000 images/s into another actor on a 2-core machine. For reference it also times the
in-process InstanceBank.sample (what a single-process run uses) and the store's own
sampling without Ray. `--check` exits 1 if the best Ray figure misses the bar.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import ray
import torch

from methods.bank import InstanceBank
from orchestrator.runtime.store import StoreBank, SyntheticStore, create_store

BAR = 50_000  # images/s


@ray.remote(num_cpus=1)
class Consumer:
    """Stands in for a trainer actor: pulls batches through StoreBank.sample, i.e. as
    torch uint8 tensors that are zero-copy views of the shared-memory object store,
    with `depth - 1` requests prefetched."""

    def __init__(self):
        torch.set_num_threads(1)

    def pull(self, store, batch_size: int, seconds: float, depth: int) -> dict:
        bank = StoreBank(store, prefetch=depth - 1)
        for _ in range(3):  # warm-up: first calls pay for connections and allocations
            shape = tuple(bank.sample(batch_size).shape)
        assert shape == (batch_size, *ray.get(store.stats.remote())["image_shape"]), shape
        images = calls = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            x = bank.sample(batch_size)
            assert x.dtype == torch.uint8 and x.shape[0] == batch_size
            images += x.shape[0]
            calls += 1
        return {"images_per_s": images / elapsed, "calls": calls,
                "ms_per_call": 1e3 * elapsed / calls * depth}


def timed_loop(fn, seconds: float, batch_size: int) -> float:
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += batch_size
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2, 4],
                        help="requests in flight (1 = serial)")
    parser.add_argument("--address", default=None, help="join a running cluster (default: local)")
    parser.add_argument("--inline-returns", action="store_true",
                        help="start Ray with max_direct_call_object_size=2 MiB, so batches come "
                             "back in the task reply instead of through the shared-memory store")
    parser.add_argument("--check", action="store_true", help=f"exit 1 below {BAR:,} images/s")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or min(args.depth) < 1:
        parser.error("--images, --batch-size and --depth must be positive")

    torch.set_num_threads(1)
    shape = (3, args.image_size, args.image_size)
    pool = np.random.default_rng(0).integers(0, 256, (args.images, *shape), dtype=np.uint8)
    mib = pool.nbytes / 2**20
    print(f"store: {args.images:,} images {'x'.join(map(str, shape))} uint8 ({mib:.1f} MiB), "
          f"batch {args.batch_size}, {args.seconds:g} s per figure")

    bank = InstanceBank()
    bank.add(torch.from_numpy(pool))
    reference = timed_loop(lambda: bank.sample(args.batch_size), args.seconds, args.batch_size)
    local = SyntheticStore()
    local.add(pool)
    no_ray = timed_loop(lambda: local.sample(args.batch_size), args.seconds, args.batch_size)
    del bank, local

    if args.address:
        ray.init(address=args.address)
    else:
        system = {"max_direct_call_object_size": 2 << 20} if args.inline_returns else {}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=system)
    try:
        store = create_store()
        for i in range(0, args.images, 5_000):  # 15 MB per call
            ray.get(store.add.remote(pool[i:i + 5_000]))
        assert ray.get(store.size.remote()) == args.images
        del pool
        consumer = Consumer.remote()
        results = {d: ray.get(consumer.pull.remote(store, args.batch_size, args.seconds, d))
                   for d in args.depth}
        stats = ray.get(store.stats.remote())
    finally:
        ray.shutdown()

    print("batches travel " + ("inline in task replies (--inline-returns)" if args.inline_returns
                               else "through Ray's shared-memory object store (default config)"))
    rows = [("in-process InstanceBank.sample (reference)", reference, ""),
            ("in-process SyntheticStore.sample, no Ray", no_ray, "")]
    for d, r in results.items():
        label = f"store actor -> consumer actor, {d} in flight" + (" (serial)" if d == 1 else "")
        rows.append((label, r["images_per_s"], f"{r['calls']} calls, {r['ms_per_call']:.2f} ms/call"))
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'images/s':>10}  {'x ref':>6}")
    for label, rate, note in rows:
        print(f"{label:{width}}  {rate:>10,.0f}  {rate / reference:>6.2f}  {note}")
    best = max(r["images_per_s"] for r in results.values())
    print(f"store held {stats['images']:,} images ({stats['bytes'] / 2**20:.1f} MiB), "
          f"served {stats['samples_served']:,}")
    ok = best >= BAR
    print(f"bar {BAR:,} images/s into another actor: {'met' if ok else 'MISSED'} (best {best:,.0f})")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
