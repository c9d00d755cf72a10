"""Tests for models/: every registered classifier at every supported input, literature
parameter counts, factory errors, and the DFKD generators.

    .venv/bin/python -m pytest tests/test_models.py -q
"""

import pytest
import torch
import torch.nn as nn

from models import (
    UnknownModelError,
    create_generator,
    create_model,
    fold_batchnorm,
    inference_copy,
    list_generators,
    list_models,
)

CONTRACT_MODELS = {
    "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2",
    "resnet18", "resnet34",
    "vgg8", "vgg11", "vgg13",
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4",
}

# Millions of parameters for 10 classes and RGB input, as the literature quotes them:
# WRN: Zagoruyko & Komodakis / the CMI and CRD tables; resnet18/34: the CIFAR ResNets of
# the DFKD benchmarks; resnet20/56: He et al. 2016, Table 6.
EXPECTED_PARAMS_M = {
    "wrn16_1": 0.175,
    "wrn16_2": 0.69,
    "wrn40_1": 0.56,
    "wrn40_2": 2.24,
    "resnet18": 11.17,
    "resnet34": 21.28,
    "resnet20": 0.27,
    "resnet56": 0.86,
}

# The CIFAR-100 counts quoted for the CRD benchmark's models (100 classes, RGB).
EXPECTED_PARAMS_M_CIFAR100 = {
    "resnet32": 0.47,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "vgg8": 3.96,
    "vgg13": 9.46,
}


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    # Batch-2 forwards gain little from threads, and the 2-core CI box is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_exactly_the_contract_names():
    assert set(list_models()) == CONTRACT_MODELS
    assert list_models() == sorted(list_models())
    assert set(list_generators()) == {"generator", "generator_large"}


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(CONTRACT_MODELS))
@torch.no_grad()
def test_classifier_shapes(name, in_channels, image_size):
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    model.eval()
    x = torch.rand(2, in_channels, image_size, image_size)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.num_features)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name,num_classes",
    [(n, 10) for n in sorted(EXPECTED_PARAMS_M)]
    + [(n, 100) for n in sorted(EXPECTED_PARAMS_M_CIFAR100)],
)
def test_parameter_counts_match_literature(name, num_classes):
    measured = _n_params(create_model(name, num_classes=num_classes, in_channels=3)) / 1e6
    table = EXPECTED_PARAMS_M if num_classes == 10 else EXPECTED_PARAMS_M_CIFAR100
    expected = table[name]
    assert abs(measured - expected) / expected < 0.02, f"{name}: {measured:.4f}M vs {expected}M"


@pytest.mark.parametrize("name", sorted(CONTRACT_MODELS))
def test_every_classifier_uses_batchnorm2d(name):
    model = create_model(name, num_classes=10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _trained_looking(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine weights, so a fold that ignored any of them would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("name", sorted(CONTRACT_MODELS))
def test_folded_copy_matches_the_eval_model(name):
    # The inference copy a KD step's teacher and an evaluation use: outputs, features and a
    # gradient to the input as the eval-mode model's, with fewer BatchNorms, and the model
    # itself untouched (still training, every BN in place).
    model = _trained_looking(create_model(name, num_classes=10, in_channels=3, image_size=32)).to(
        memory_format=torch.channels_last)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    assert model.training and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < bns
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        f_logits, f_feats = folded(x, return_features=True)
    scale = logits.abs().max()
    torch.testing.assert_close(f_logits / scale, logits / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(f_feats / feats.abs().max(), feats / feats.abs().max(), rtol=0, atol=1e-5)
    # The gradient in float64, folded from float64 weights: random BN statistics make deep
    # nets' float32 gradients differ by 1e-3 between two plain runs already.
    model = model.double()
    grads = []
    for net in (model, fold_batchnorm(model)):
        xi = x.double().requires_grad_(True)
        (net(xi) * torch.linspace(-1, 1, 10, dtype=torch.float64)).sum().backward(inputs=[xi])
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9 * grads[0].abs().max().item())


@pytest.mark.parametrize("name", sorted(list_models()))
def test_inference_copy_equals_the_folded_copy_bit_for_bit(name):
    # The copy evaluate and the KD teacher use: the folded copy's graph with ReLUs and
    # residual adds fused into the convolutions. The fused kernels compute the same sums in
    # the same order, so logits and features are equal to the bit, not merely close; a
    # pass that needs a gradient to its input runs the plain ops and gets the same gradient.
    from models.fuse import POINTWISE, fused_count

    model = _trained_looking(create_model(name, num_classes=10, in_channels=3, image_size=32)).to(
        memory_format=torch.channels_last)
    folded, fast = fold_batchnorm(model), inference_copy(model)
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        for features in (False, True):
            expected, got = folded(x, return_features=features), fast(x, return_features=features)
            for e, g in zip(expected if features else [expected], got if features else [got]):
                assert torch.equal(g, e)
    if POINTWISE is not None:  # a PyTorch with oneDNN: every registered model has something to fuse
        assert fused_count(fast) > 0
    grads = []
    for net in (folded, fast):
        xi = x.clone().requires_grad_(True)
        (net(xi) * torch.linspace(-1, 1, 10)).sum().backward(inputs=[xi])
        grads.append(xi.grad)
    assert torch.equal(grads[1], grads[0])


def test_inference_copy_without_the_fused_kernels_runs_the_plain_ops(monkeypatch):
    # A PyTorch without oneDNN's post-op kernels (or with a changed signature: models/fuse.py
    # checks them once) gets a copy whose nodes run the plain convolution, add and ReLU.
    import models.fuse as fuse

    monkeypatch.setattr(fuse, "POINTWISE", None)
    for name in ("wrn16_1", "resnet8"):
        model = _trained_looking(create_model(name, num_classes=10)).to(memory_format=torch.channels_last)
        folded, fast = fold_batchnorm(model), fuse.InferenceCopy(fold_batchnorm(model))
        x = torch.rand(4, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(fast(x), folded(x))
        assert fuse.fused_count(fast) > 0  # the graph has fused nodes, running their plain path


def test_folding_keeps_a_batchnorm_whose_input_is_read_elsewhere():
    # A pre-activation block's first BN follows a residual sum, not a conv: it must stay.
    model = create_model("wrn16_1", num_classes=10).eval()
    folded = fold_batchnorm(model)
    blocks = [m for m in folded.modules() if type(m).__name__ == "WideBlock"]
    assert blocks and all(isinstance(b.bn1, nn.BatchNorm2d) and isinstance(b.bn2, nn.Identity) for b in blocks)


def test_features_feed_the_head():
    # "Penultimate" means the exact vector the final linear layer sees, and the plain
    # call returns the same logits as the features path.
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        torch.testing.assert_close(model.fc(feats), logits)
        torch.testing.assert_close(model(x), logits)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as err:
        create_model("resnet19", num_classes=10)
    msg = str(err.value)
    assert "resnet19" in msg
    for name in list_models():
        assert name in msg
    assert isinstance(err.value, ValueError)


def test_unknown_generator_lists_known_names():
    with pytest.raises(UnknownModelError, match="generator_large"):
        create_generator("gan", latent_dim=8, image_size=32, out_channels=3)


@pytest.mark.parametrize("bad", [2, 0, -32, 32.0, "32", None])
def test_rejects_unusable_image_size(bad):
    with pytest.raises(ValueError, match="image_size"):
        create_model("vgg11", num_classes=10, image_size=bad)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0}])
def test_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError):
        create_model("resnet8", **kwargs)


def test_rejects_unknown_option():
    with pytest.raises(ValueError, match="dropout"):
        create_model("wrn16_1", num_classes=10, droput=0.3)
    assert create_model("wrn16_1", num_classes=10, dropout=0.3) is not None


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("name", ["generator", "generator_large"])
@torch.no_grad()
def test_generator_output(name, out_channels, image_size):
    gen = create_generator(name, latent_dim=16, image_size=image_size,
                           out_channels=out_channels, ngf=8)
    assert gen.latent_dim == 16
    out = gen(torch.randn(2, 16))  # train mode: BN uses batch statistics, as in DFKD
    assert out.shape == (2, out_channels, image_size, image_size)
    assert out.min() >= 0 and out.max() <= 1


def test_generator_default_width_and_reinitialize():
    gen = create_generator("generator", latent_dim=32, image_size=32, out_channels=3)
    assert gen.fc.out_features == 2 * 64 * 8 * 8  # ngf=64, start at 32 / 4
    with torch.no_grad():
        gen(torch.randn(4, 32))  # moves the BN running statistics off their defaults
    before = [t.clone() for t in gen.state_dict().values() if t.is_floating_point()]
    gen.reinitialize()
    after = [t for t in gen.state_dict().values() if t.is_floating_point()]
    weights = [(b, a) for b, a in zip(before, after) if b.dim() > 1]
    assert all(not torch.equal(b, a) for b, a in weights)
    # BN running mean back to 0 after the reset.
    assert all(m.running_mean.abs().sum() == 0
               for m in gen.modules() if isinstance(m, nn.BatchNorm2d))


def test_generator_trains_through_a_classifier():
    # The DFKD use: gradients reach the generator through a frozen teacher.
    gen = create_generator("generator", latent_dim=8, image_size=28, out_channels=1, ngf=8)
    teacher = create_model("resnet8", num_classes=10, in_channels=1, image_size=28).eval()
    loss = teacher(gen(torch.randn(2, 8))).logsumexp(1).mean()
    loss.backward()
    assert gen.fc.weight.grad is not None and gen.fc.weight.grad.abs().sum() > 0
