"""orchestrator.quantize on the tiny real-format MNIST and its resnet8 teacher (no
torch.compile here: it costs tens of seconds per shape)."""
import contextlib
import csv
import io
import json

import pytest
import torch

from benchmarks.datasets import load_split
from methods.hooks import BatchNormHooks
from orchestrator import quantize
from orchestrator.core.checkpoints import load_classifier
from orchestrator.core.training import normalize

FAST = ["--calib-images", "16", "--bn-steps", "3", "--bn-batch", "8", "--repeats", "2", "--batch-sizes", "1,4",
        "--no-compile"]


def teacher_path(root):
    return root / "teachers" / "mnist-resnet8.pt"


def inputs(data):
    return normalize(data.images.float() / 255, data.spec.mean, data.spec.std)


def make_pool(folder, images, dataset="mnist"):
    """A bench cell folder as the runtime leaves it: config.json and a store/ snapshot."""
    from safetensors.torch import save_file

    (folder / "store").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"cell": {"dataset": dataset}}))
    save_file({"images": images.contiguous(), "labels": torch.zeros(len(images), dtype=torch.long),
               "features": torch.zeros(len(images), 4)}, str(folder / "store" / "store.safetensors"))
    return folder


def run(argv):
    with pytest.raises(SystemExit) as exit_info:
        quantize.run_cli(quantize.main, argv)
    return exit_info.value.code


def test_int8_model_is_int8_smaller_and_close_to_fp32(tiny_mnist, tmp_path):
    model, _ = load_classifier(teacher_path(tiny_mnist), dataset="mnist")
    train, test = (load_split("mnist", s, tiny_mnist / "data") for s in ("train", "test"))
    calib = quantize.calibration_set("train", 32, model=model, spec=train.spec, train=train,
                                     generator=torch.Generator().manual_seed(0))
    int8 = quantize.quantize_int8(model, calib)
    ops = {str(n.target) for n in int8.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    assert any(t.dtype == torch.int8 for t in int8.state_dict().values())
    assert not any(t.dtype == torch.float32 and t.dim() == 4 for t in int8.state_dict().values())  # no FP32 convs left
    x = inputs(test)
    with torch.no_grad():
        fp32, q = model(x), int8(x)
    assert (q.argmax(1) == fp32.argmax(1)).float().mean() >= 0.9
    assert (q - fp32).norm() / (fp32 - fp32.mean(1, keepdim=True)).norm() < 0.1  # a bad scale gives ~0.9
    # The saved program shrinks by most of the 3 bytes in 4 that int8 weights save (the graph
    # and per-channel scales stay); with the replaced FP32 weights kept, it would grow instead.
    example = x[:2].contiguous(memory_format=torch.channels_last)
    weight_bytes = sum(4 * p.numel() for p in model.parameters() if p.dim() > 1)
    saved = quantize.saved_bytes(model, example, tmp_path / "f.pt2") - quantize.saved_bytes(int8, example,
                                                                                           tmp_path / "i.pt2")
    assert saved > 0.4 * weight_bytes


class SharedStem(torch.nn.Module):
    """wrn16_1's first block in small: the stem conv's output feeds a BN and the residual add."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv, self.fc = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(torch.relu(self.bn(x)))
        return self.fc(x.mean((2, 3)))


def test_a_conv_whose_output_is_shared_keeps_its_batchnorm_apart():
    torch.manual_seed(0)
    model = SharedStem()
    with torch.no_grad():  # a BN far from identity, so folding it where it does not belong shows
        model.bn.running_mean.uniform_(-2, 2), model.bn.running_var.uniform_(0.1, 4), model.bn.weight.uniform_(0.2, 3)
    model.eval()
    x = torch.randn(64, 1, 12, 12)
    int8 = quantize.quantize_int8(model, x)
    with torch.no_grad():
        fp32, q = model(x), int8(x)
    assert (q - fp32).norm() / fp32.norm() < 0.1  # torchao's fold alone (the add gets the BN's output): 2.6


def test_bn_statistics_samples_match_the_running_statistics_and_leave_the_model_alone(tiny_mnist):
    model, _ = load_classifier(teacher_path(tiny_mnist), dataset="mnist")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = torch.randn((16, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    samples = quantize.bn_statistics_samples(model, 16, (1, 32, 32), steps=40, lr=0.5, batch_size=16,
                                             generator=torch.Generator().manual_seed(0), progress=False)
    assert samples.shape == (16, 1, 32, 32) and not samples.requires_grad
    with torch.no_grad(), BatchNormHooks(model, stats=True, features=False) as hooks:
        model(start)
        initial = hooks.bn_loss().item()
        model(samples)
        final = hooks.bn_loss().item()
    assert final < 0.6 * initial  # 40 steps take it from 50.5 to 26.6; none leave it where it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def cli_run(tiny_mnist, tmp_path_factory):
    """One CLI run with every source; records what each calibration and load_split saw."""
    tmp = tmp_path_factory.mktemp("quantize")
    pool_images = torch.randint(0, 256, (20, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pool = make_pool(tmp / "cell", pool_images)
    seen, splits = [], []
    real_quantize, real_load = quantize.quantize_int8, quantize.load_split

    def spy_quantize(model, calibration):
        seen.append(calibration.clone())
        return real_quantize(model, calibration)

    def spy_load(name, split, *args, **kwargs):
        splits.append(split)
        return real_load(name, split, *args, **kwargs)

    out, stdout = tmp / "out", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(quantize, "quantize_int8", spy_quantize)
        mp.setattr(quantize, "load_split", spy_load)
        code = run([str(teacher_path(tiny_mnist)), "--data-root", str(tiny_mnist / "data"), "--pool", str(pool),
                    "--calib", "pool,bn,train,noise", "--out", str(out), *FAST])
    return dict(code=code, out=out, seen=dict(zip(["pool", "bn", "train", "noise"], seen)), splits=splits,
                stdout=stdout.getvalue(), pool=pool, pool_images=pool_images, root=tiny_mnist)


def test_every_source_runs_and_the_table_is_written(cli_run, capfd):
    assert cli_run["code"] == 0
    out = cli_run["out"]
    rows = list(csv.DictReader(open(out / "quantization.csv")))
    accuracy = {r["calibration"]: float(r["value"]) for r in rows if r["metric"] == "test_accuracy"}
    assert set(accuracy) == {"-", "pool", "bn", "train", "noise"} and all(0 <= a <= 100 for a in accuracy.values())
    latencies = {(r["model"], r["batch_size"]) for r in rows if r["metric"] == "latency"}
    assert latencies == {(m, b) for m in ("FP32", "INT8") for b in ("1", "4")}
    table = (out / "quantization.md").read_text()
    assert "Gaussian noise (`noise`)" in table and "ms/image" in table
    # The saved program is the model that was scored: reloaded, it gets the same accuracy.
    test = load_split("mnist", "test", cli_run["root"] / "data")
    program = torch.export.load(str(out / "int8-train.pt2")).module()
    with torch.no_grad():
        reloaded = 100.0 * (program(inputs(test)).argmax(1) == test.labels).float().mean().item()
    assert reloaded == pytest.approx(accuracy["train"], abs=1e-6)
    fp32_bytes = [int(r["value"]) for r in rows if r["metric"] == "saved_bytes" and r["model"] == "FP32"][0]
    assert all(int(r["value"]) < fp32_bytes for r in rows if r["metric"] == "saved_bytes" and r["model"] == "INT8")


def test_calibration_reads_what_it_says_and_never_the_test_split(cli_run):
    root = cli_run["root"] / "data"
    train, test = (inputs(load_split("mnist", s, root)) for s in ("train", "test"))
    seen = cli_run["seen"]
    assert {len(v) for v in seen.values()} == {16}

    def found_in(images, bank):
        return [bool((bank.flatten(1) == x.flatten()).all(1).any()) for x in images]

    assert all(found_in(seen["train"], train)) and not any(found_in(seen["train"], test))
    pool = normalize(cli_run["pool_images"].float() / 255, (0.1307,), (0.3081,))
    assert all(found_in(seen["pool"], pool))  # the pool's images as they are: no crop, no flip
    for source in ("bn", "noise", "pool"):
        assert not any(found_in(seen[source], test))
    assert not torch.equal(seen["bn"], seen["noise"])
    # The test split is read once, for scoring; the train split only for its calibration.
    assert sorted(cli_run["splits"]) == ["test", "train"]


def test_every_split_and_the_pool_read_is_named(cli_run):
    lines = cli_run["stdout"].splitlines()
    folder = cli_run["root"] / "data" / "mnist"
    assert f"test split: 64 images from {folder}" in lines
    assert f"train split: 64 images from {folder} (calibration)" in lines
    assert f"pool: 20 images from {cli_run['pool'].resolve() / 'store' / 'store.safetensors'}" in lines


@pytest.mark.parametrize("case", ["missing checkpoint", "unknown source", "empty pool", "missing pool", "pool needs --pool",
                                  "dataset mismatch", "pool of another dataset", "pool of wrong shape"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_mnist, tmp_path, capsys):
    ckpt, data = str(teacher_path(tiny_mnist)), ["--data-root", str(tiny_mnist / "data")]
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, needle = {
        "missing checkpoint": ([str(tmp_path / "nope.pt"), *data], "does not exist"),
        "unknown source": ([ckpt, "--calib", "train,imagenet", *data], "unknown calibration source"),
        "empty pool": ([ckpt, "--pool", str(empty), *data], "no images there"),
        "missing pool": ([ckpt, "--pool", str(tmp_path / "gone"), *data], "gone does not exist"),
        "pool needs --pool": ([ckpt, "--calib", "pool", *data], "needs --pool"),
        "dataset mismatch": ([ckpt, "--dataset", "fashion-mnist", *data], "dataset='mnist'"),
        "pool of another dataset": ([ckpt, "--pool", str(make_pool(tmp_path / "c1", torch.zeros(4, 1, 32, 32,
                                     dtype=torch.uint8), "fashion-mnist")), *data], "is a fashion-mnist cell"),
        "pool of wrong shape": ([ckpt, "--pool", str(make_pool(tmp_path / "c2", torch.zeros(4, 3, 32, 32,
                                 dtype=torch.uint8))), *data], "needs uint8 (1, 32, 32)"),
    }[case]
    out = tmp_path / "out"
    assert run([*argv, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()
