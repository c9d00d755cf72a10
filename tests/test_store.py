"""The synthetic store actor on a real local Ray: round trips, FIFO eviction, snapshots,
restart after a kill, and StoreBank as the bank of real synthesizers.

Each store actor is a worker process that imports torch (seconds on a busy 2-core
machine), so the tests share one store, emptied between tests, plus the one the restart
test kills.
"""
import json
import struct
import time

import numpy as np
import pytest
import ray
import torch

from orchestrator.runtime.store import (META_FILE, SNAPSHOT_FILE, SnapshotError, StoreBank,
                                create_store)

SHAPE = (3, 8, 8)  # small images keep the tests fast; the perf script uses 32x32


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stale cluster
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shared(ray_local):
    return create_store(seed=0)


@pytest.fixture
def store(shared):
    """The shared store, emptied, with the default capacities."""
    empty(shared)
    return shared


def empty(store, capacity_images=None, capacity_features=40960):
    ray.get(store.load_state_arrays.remote({
        "images": np.empty(0, np.uint8), "labels": np.empty(0, np.int64),
        "features": np.empty((0, 0), np.float32),
        "capacity_images": -1 if capacity_images is None else capacity_images,
        "capacity_features": -1 if capacity_features is None else capacity_features}))


def batch(first: int, n: int, dim: int = 4):
    """n distinct images whose first two bytes encode their id, labels = id % 10,
    features = id in every column."""
    ids = np.arange(first, first + n)
    images = np.random.default_rng(first).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
    labels = (ids % 10).astype(np.int64)
    features = np.repeat(ids[:, None], dim, axis=1).astype(np.float32)
    return images, labels, features


def ids_of(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def state(store) -> dict:
    return ray.get(store.state_arrays.remote())


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_add_sample_negatives_round_trip(store):
    before = ray.get(store.stats.remote())
    parts = [batch(0, 50), batch(50, 30), batch(80, 70)]
    assert [ray.get(store.add.remote(*p)) for p in parts] == [50, 80, 150]
    images, labels, features = (np.concatenate(x) for x in zip(*parts))
    assert_same_state(state(store), {"images": images, "labels": labels, "features": features,
                                     "capacity_images": -1, "capacity_features": 40960})

    x = ray.get(store.sample.remote(64))
    assert x.dtype == np.uint8 and x.shape == (64, *SHAPE) and x.flags.c_contiguous
    ids = ids_of(x)
    assert len(set(ids.tolist())) == 64  # distinct within a call
    assert np.array_equal(x, images[ids])  # every row is bit-exactly an added image

    assert np.array_equal(state(store)["labels"], labels)

    more = ray.get(store.sample.remote(500))  # more than held: with replacement
    assert more.shape == (500, *SHAPE) and np.array_equal(more, images[ids_of(more)])

    prefetching = StoreBank(store, prefetch=2)  # keeps 2 requests in flight
    for n in (32, 32, 32, 8):
        x = prefetching.sample(n).numpy()
        assert x.shape == (n, *SHAPE) and np.array_equal(x, images[ids_of(x)])

    neg = ray.get(store.negatives.remote(16))
    assert neg.dtype == np.float32 and neg.shape == (16, 4)
    assert len(set(neg[:, 0].tolist())) == 16 and np.array_equal(neg, features[neg[:, 0].astype(int)])
    assert ray.get(store.negatives.remote(10_000)).shape == (150, 4)

    stats = ray.get(store.stats.remote())
    assert (stats["images"], stats["features"]) == (150, 150)
    assert stats["adds"] - before["adds"] == 3 and stats["images_added"] - before["images_added"] == 150
    assert stats["samples_served"] - before["samples_served"] == 64 + 500 + 5 * 32 + 3 * 8  # prefetches count
    assert stats["bytes"] == images.nbytes + labels.nbytes + features.nbytes


def test_a_rounds_batches_in_one_request_are_the_draws_of_one_request_each(store):
    # A trainer asks for all of a KD round's batches at once (one wake-up of the store's
    # process per round): the same images, in the same order, as a request per batch.
    from orchestrator.runtime.store import StoreBank

    images, labels, features = batch(0, 300)
    ray.get(store.add.remote(images, labels, features))
    rng = ray.get(store.rng_state.remote())
    one_by_one = [ids_of(StoreBank(store).sample(64).numpy()) for _ in range(5)]
    calls = ray.get(store.stats.remote())["sample_calls"]
    ray.get(store.set_rng_state.remote(rng))
    at_once = [ids_of(b.numpy()) for b in StoreBank(store).sample_batches(64, 5)]
    assert len(at_once) == 5 and all(len(b) == 64 for b in at_once)
    assert all(np.array_equal(a, b) for a, b in zip(one_by_one, at_once))
    assert ray.get(store.stats.remote())["sample_calls"] == calls + 5  # counted per batch either way


def test_errors_cross_the_boundary_clearly(store):
    with pytest.raises(RuntimeError, match="empty"):
        ray.get(store.sample.remote(4))
    assert ray.get(store.negatives.remote(4)).shape == (0, 0)
    with pytest.raises(ValueError, match="uint8"):
        ray.get(store.add.remote(np.zeros((2, *SHAPE), np.float32)))
    with pytest.raises(TypeError, match="numpy"):
        ray.get(store.add.remote(torch.zeros((2, *SHAPE), dtype=torch.uint8)))
    with pytest.raises(ValueError, match="labels"):
        ray.get(store.add.remote(np.zeros((2, *SHAPE), np.uint8), np.zeros(3, np.int64)))
    with pytest.raises(SnapshotError):
        ray.get(store.restore.remote("/nonexistent/store"))
    assert ray.get(store.size.remote()) == 0


def test_fifo_eviction_at_capacity(store):
    empty(store, capacity_images=100, capacity_features=50)
    for first in (0, 40, 80):
        ray.get(store.add.remote(*batch(first, 40)))
    held = state(store)
    assert np.array_equal(ids_of(held["images"]), np.arange(20, 120))  # oldest 20 evicted
    assert np.array_equal(held["labels"], np.arange(20, 120) % 10)
    assert np.array_equal(held["features"][:, 0], np.arange(70, 120))  # its own FIFO
    x = ray.get(store.sample.remote(100))
    assert sorted(ids_of(x).tolist()) == list(range(20, 120))
    ray.get(store.add.remote(*batch(1000, 130)))  # one batch larger than the store
    assert np.array_equal(ids_of(state(store)["images"]), np.arange(1030, 1130))


def test_snapshot_restore_bit_exact_and_pickle_free(store, tmp_path):
    empty(store, capacity_images=100, capacity_features=60)
    for first in (0, 70):
        ray.get(store.add.remote(*batch(first, 70, dim=3)))
    ray.get(store.add.remote(*batch(500, 5)[:2]))  # no features: labels only
    path = ray.get(store.snapshot.remote(str(tmp_path)))
    assert path == str(tmp_path / SNAPSHOT_FILE)
    before = state(store)

    empty(store, capacity_images=3)  # restore adopts the snapshot's capacities
    assert ray.get(store.restore.remote(str(tmp_path))) == 100
    assert_same_state(state(store), before)
    stats = ray.get(store.stats.remote())
    assert stats["restored_from"] == path and (stats["capacity_images"], stats["capacity_features"]) == (100, 60)

    # Plain arrays only: the directory holds exactly the two files (no temporaries);
    # the safetensors file is an 8-byte header length, a JSON header and raw tensor
    # bytes that end exactly where the header says; the sidecar is JSON.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SNAPSHOT_FILE, META_FILE])
    raw = (tmp_path / SNAPSHOT_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {k: v["dtype"] for k, v in tensors.items()} == {"images": "U8", "labels": "I64", "features": "F32"}
    assert max(v["data_offsets"][1] for v in tensors.values()) == len(raw) - 8 - header_len
    assert json.loads(header["__metadata__"]["store"])["capacity_images"] == 100
    sidecar = json.loads((tmp_path / META_FILE).read_text())
    assert sidecar["file"] == SNAPSHOT_FILE and sidecar["shapes"]["images"] == [100, *SHAPE]
    for p in tmp_path.iterdir():  # neither a pickle nor a torch.save zip
        assert p.read_bytes()[:1] != b"\x80" and p.read_bytes()[:2] != b"PK"


def test_killed_store_restarts_with_exactly_what_was_snapshotted(ray_local, tmp_path):
    store = create_store(capacity_images=100, capacity_features=60, snapshot_dir=str(tmp_path),
                         snapshot_every=2, max_restarts=-1)
    ray.get(store.add.remote(*batch(0, 30)))
    assert not (tmp_path / SNAPSHOT_FILE).exists()
    ray.get(store.add.remote(*batch(30, 30, dim=3)[:2]))  # 2nd add: automatic snapshot (A)
    stats = ray.get(store.stats.remote())
    assert stats["last_snapshot"] == str(tmp_path / SNAPSHOT_FILE)
    snapshotted = state(store)
    ray.get(store.add.remote(*batch(60, 20)))  # B: never snapshotted
    assert ray.get(store.size.remote()) == 80

    ray.kill(store, no_restart=False)
    deadline = time.monotonic() + 45
    while True:  # Ray re-runs __init__, which restores the snapshot in snapshot_dir
        try:
            restarted = ray.get(store.stats.remote(), timeout=15)
            if restarted["pid"] != stats["pid"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the store did not come back within 45 s"
        time.sleep(0.2)
    assert restarted["restored_from"] == str(tmp_path / SNAPSHOT_FILE) and restarted["adds"] == 2
    assert_same_state(state(store), snapshotted)  # exactly A, bit for bit, capacities too
    assert ray.get(store.add.remote(*batch(60, 20))) == 80  # and it goes on working


def test_a_numbered_add_is_applied_once_however_often_it_arrives(ray_local, tmp_path):
    """Ray re-sends a call to a restarting actor at least once, not exactly once: a
    repeated add (same writer, same number) changes nothing, before and after a restart
    from a snapshot; an add made after the snapshot, lost with the process, is applied
    when it comes again; and each StoreBank, copies in other processes included, numbers
    its adds under a name of its own."""
    import pickle

    store = create_store(snapshot_dir=str(tmp_path))
    assert ray.get(store.add.remote(*batch(0, 10), token=("w", 1))) == 10
    assert ray.get(store.add.remote(*batch(0, 10), token=("w", 1))) == 10  # the same add again
    assert ray.get(store.add.remote(*batch(10, 10), token=("v", 1))) == 20  # another writer's first
    ray.get(store.snapshot.remote())
    assert ray.get(store.add.remote(*batch(20, 10), token=("w", 2))) == 30  # after the snapshot
    ray.kill(store, no_restart=False)
    deadline = time.monotonic() + 45
    while True:
        try:
            if ray.get(store.stats.remote(), timeout=15)["restored_from"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the store did not come back within 45 s"
        time.sleep(0.2)
    assert ray.get(store.size.remote()) == 20
    assert ray.get(store.add.remote(*batch(0, 10), token=("w", 1))) == 20  # held in the snapshot
    assert ray.get(store.add.remote(*batch(20, 10), token=("w", 2))) == 30  # lost with the process
    assert ray.get(store.add.remote(*batch(20, 10), token=("w", 2))) == 30
    assert ray.get(store.stats.remote())["repeated_adds"] == 3
    bank = StoreBank(store)
    copy = pickle.loads(pickle.dumps(bank))
    bank.add(torch.from_numpy(batch(30, 10)[0]))
    copy.add(torch.from_numpy(batch(40, 10)[0]))  # its own name: not taken for bank's first add
    assert len(bank) == 50
    ray.kill(store, no_restart=True)


# -- StoreBank as the bank of real synthesizers ---------------------------------------

def spec():
    from methods import ImageSpec

    return ImageSpec(num_classes=10, channels=3, image_size=32,
                     mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


def resnet8_pair():
    from models import create_model

    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)


@ray.remote(num_cpus=1)
def synthesize_into(bank: StoreBank) -> np.ndarray:
    """A synthesizer in another worker process pushes one DeepInversion batch."""
    torch.set_num_threads(1)
    from methods import create_synthesizer, make_config, to_uint8

    synth = create_synthesizer("deepinv", *resnet8_pair(), make_config("deepinv", "smoke"), spec(), bank=bank)
    return to_uint8(synth.synthesize().images).numpy()


def test_store_bank_feeds_real_synthesizers(store):
    from methods import InstanceBank, create_synthesizer, make_config

    bank = StoreBank(store)
    kept = ray.get(synthesize_into.remote(bank))  # pushed from another process
    assert len(bank) == len(kept) == 8
    assert np.array_equal(bank.state_dict()["images"].numpy(), kept)

    teacher, student = resnet8_pair()
    trainer_side = create_synthesizer("deepinv", teacher, student, make_config("deepinv", "smoke"), spec(), bank=bank)
    x = trainer_side.sample(16)  # pulled from the actor
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1

    # CMI reads negatives from the store's feature bank on its second round.
    cmi = create_synthesizer("cmi", teacher, student, make_config("cmi", "smoke"), spec(), bank=bank)
    for _ in range(2):
        cmi.synthesize()
    assert len(bank) == 24 and bank.num_features() == 16
    neg = bank.negatives(4)
    assert neg.dtype == torch.float32 and neg.shape[0] == 4
    images, labels = bank.sample(5), bank.state_dict()["labels"]
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape == (5, 3, 32, 32)

    # Cell checkpoints: StoreBank and InstanceBank state dicts are interchangeable.
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in bank.state_dict().items()}
    local = InstanceBank()
    local.load_state_dict(saved)
    empty(store)
    bank.load_state_dict(local.state_dict())
    again = bank.state_dict()
    assert all(torch.equal(saved[k], again[k]) if torch.is_tensor(saved[k]) else saved[k] == again[k]
               for k in saved)
    with pytest.raises(ValueError, match="uint8"):
        bank.add(torch.zeros(2, 3, 32, 32))


def stream_of(tiny_mnist, method: str, seed: int = 0, **overrides):
    from orchestrator.core.cell import CellKey, CellSpec
    from orchestrator.runtime.driver import Stream

    key = CellKey("mnist", "resnet8", "resnet8", method, seed, "smoke", "paper")
    return Stream([CellSpec.build(key, overrides, tiny_mnist / "teachers" / "mnist-resnet8.pt",
                                  str(tiny_mnist / "data"))])


def runner_of(stream, out, **kw):
    from orchestrator.runtime.driver import Resources, StreamRunner

    return StreamRunner(stream, out, Resources(cpus_per_actor=1.0, node_cpus=2), "cpu", log=lambda *_: None, **kw)


def test_streams_reserve_all_their_actors_at_once(ray_local, tiny_mnist, tmp_path):
    """Two 2-actor streams on a 2-CPU Ray, both allowed to start: created one actor at a
    time, each stream could grab a synthesizer slot and wait forever for its trainer. With
    a placement group per stream the second waits for the first and both finish."""
    import threading

    from orchestrator.runtime.driver import run_streams

    runners = [runner_of(stream_of(tiny_mnist, method), tmp_path / method) for method in ("dafl", "dfq")]
    result: list = []
    worker = threading.Thread(target=lambda: result.extend(run_streams(runners, max_concurrent=2)), daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive(), "streams deadlocked waiting for each other's CPU slots"
    assert sorted(o.key.method for o in result) == ["dafl", "dfq"]
    assert all(o.history.status == "finished" for o in result), [o.history.status for o in result]
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_a_stream_on_kept_actors_has_the_history_it_has_on_new_ones(ray_local, tiny_mnist, tmp_path):
    """The bench starts the first stream's actors ahead (ActorSlots.prestart), and
    run_streams keeps a finished stream's actors for the next stream of the same shape.
    The first stream runs on the prestarted actors; the second (another method, another
    seed) runs in the first one's processes and ends with exactly the history it has in
    processes of its own."""
    from orchestrator.runtime.driver import ActorSlots, run_streams

    kept = [runner_of(stream_of(tiny_mnist, "cmi", 0, epochs=2), tmp_path / "kept"),
            runner_of(stream_of(tiny_mnist, "deepinv", 1, epochs=2), tmp_path / "kept")]
    handles = []
    for runner in kept:  # the actors each stream ran on, noted when its first cell starts
        runner.on_cell_start = lambda spec, history, r=runner: handles.append(r.strategy.synth._actor_id)
    slots = ActorSlots()
    slots.prestart([r.stream for r in kept], kept[0].resources, 1)
    (prestarted,) = [slot.synth._actor_id for slot in slots._idle]
    first, second = run_streams(kept, max_concurrent=1, slots=slots)
    (alone,) = run_streams([runner_of(stream_of(tiny_mnist, "deepinv", 1, epochs=2), tmp_path / "alone")], 1)
    assert handles[0] == prestarted  # the first stream ran on the prestarted synthesizer
    assert handles[0] == handles[1]  # the second stream ran on the first one's synthesizer
    assert first.history.status == second.history.status == alone.history.status == "finished"
    assert second.history.accuracy == alone.history.accuracy
    assert second.history.losses == alone.history.losses
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_a_killed_store_comes_back_from_its_snapshot_and_the_cell_finishes(ray_local, tiny_mnist, tmp_path):
    """SIGKILL the stream's store in epoch 2 (of 3): Ray restarts it from the snapshot taken
    at the end of epoch 1, the calls in flight are sent again, the cell finishes, and only
    the batch added since that snapshot is lost."""
    import os
    import signal

    runner = runner_of(stream_of(tiny_mnist, "deepinv", epochs=3), tmp_path)
    killed, stats = [], {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "synthesis" and done == 3 and not killed:  # epoch 2's first batch is in the store
            killed.append(ray.get(runner.strategy.store.stats.remote())["pid"])
            os.kill(killed[0], signal.SIGKILL)

    runner.progress = progress
    runner.on_epoch = lambda key, epoch, m: stats.__setitem__(epoch, ray.get(runner.strategy.store.stats.remote()))
    (result,) = runner.run()
    assert result.history.status == "finished", result.history.status
    assert result.history.images_synthesized[-1] == 48  # 6 rounds of 8 were synthesized ...
    assert stats[1]["pid"] == killed[0] and stats[2]["pid"] != killed[0]
    assert stats[2]["restored_from"] == str(result.cell_dir / "store" / SNAPSHOT_FILE)
    assert stats[3]["images"] == 48 - 8  # ... and only the one batch added after the snapshot is lost
    assert json.loads((result.cell_dir / "store" / META_FILE).read_text())["shapes"]["images"][0] == 40


@pytest.fixture(scope="module")
def uninterrupted_cmi(ray_local, tiny_mnist, tmp_path_factory):
    """A 3-epoch CMI stream run without a fault: what every faulted run must end with."""
    return runner_of(stream_of(tiny_mnist, "cmi", epochs=3), tmp_path_factory.mktemp("whole")).run()[0].history


def test_a_stream_stopped_half_way_continues_from_its_last_epoch(uninterrupted_cmi, tiny_mnist, tmp_path):
    """A bench stream interrupted after epoch 1 continues (resume=True) from epoch 2, and
    ends with the history of an uninterrupted run: the state holds every actor's random
    state, the store's snapshot its sampling state."""
    import threading

    stop = threading.Event()
    first = runner_of(stream_of(tiny_mnist, "cmi", epochs=3), tmp_path / "cut",
                      on_epoch=lambda key, epoch, m: stop.set()).run(stop)[0]
    assert first.history.epochs_done == 1 and first.history.status == "interrupted"
    seen = []
    again = runner_of(stream_of(tiny_mnist, "cmi", epochs=3), tmp_path / "cut", resume=True,
                      on_epoch=lambda key, epoch, m: seen.append(epoch)).run()[0]
    assert seen == [2, 3] and again.history.status == "finished", (seen, again.history.status)
    assert again.history.accuracy == uninterrupted_cmi.accuracy
    assert again.history.losses == uninterrupted_cmi.losses


@pytest.mark.parametrize("victim", ["synth", "trainer"])
def test_a_killed_actor_is_replaced_and_the_cell_continues_from_its_last_epoch(uninterrupted_cmi, tiny_mnist,
                                                                                tmp_path, victim):
    """SIGKILL the synthesizer or the trainer in epoch 2: the stream's actors are built
    again from the epoch-1 checkpoint and the cell ends exactly as if nothing happened;
    no epoch is reported twice."""
    import os
    import signal

    runner = runner_of(stream_of(tiny_mnist, "cmi", epochs=3), tmp_path)
    killed, seen = [], []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "kd" and done == 3 and not killed:  # epoch 2, after its first synthesis round
            actor = runner.strategy.synth if victim == "synth" else runner.strategy.trainers[0]
            killed.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))
            os.kill(killed[0], signal.SIGKILL)

    runner.progress = progress
    runner.on_epoch = lambda key, epoch, m: seen.append(epoch)
    (result,) = runner.run()
    assert killed and result.history.status == "finished", result.history.status
    assert seen == [1, 2, 3]
    assert result.history.accuracy == uninterrupted_cmi.accuracy
    assert result.history.losses == uninterrupted_cmi.losses
