"""Tests for methods/: every registered DFKD method end to end on tiny CPU models, the
shared losses, augmentation and instance bank, and config validation.

    .venv/bin/python -m pytest tests/test_methods.py -q
"""
import copy
import dataclasses
import io
import math
import re

import pytest
import torch
import torch.nn as nn

from methods import (
    BUDGETS,
    ConfigError,
    ImageSpec,
    InstanceBank,
    UnknownMethodError,
    create_synthesizer,
    from_uint8,
    get_method,
    kd_loss,
    list_methods,
    make_config,
    to_uint8,
)
from methods import augment, losses
from methods.cmi import contrastive_loss
from methods.crd import CRD_WEIGHT, EmbeddingQueue, KDObjective, crd_loss
from methods.hooks import BatchNormHooks, channel_moments, instance_means
from models import create_model

METHODS = list_methods()  # every registered method: a new one is tested with no edit here
SPEC = ImageSpec(num_classes=10, channels=3, image_size=32,
                 mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


def calibrated_resnet8(seed: int) -> nn.Module:
    """A resnet8 whose BN running statistics are the exact averages over a few batches of
    smooth random images, so that the BN prior has a reachable target."""
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=10).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average instead of an EMA that remembers the init
            m.reset_running_stats()
    with torch.no_grad():
        for _ in range(4):
            model(SPEC.normalize(smooth_images(16)))
    return model.eval()


def smooth_images(n: int) -> torch.Tensor:
    """Distinct, image-like inputs in [0, 1]: upsampled random colour fields."""
    return nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=32, mode="bilinear")


def tiny_guide(per_class: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A small guide set (smooth images, `per_class` per class), drawn from its own generator."""
    g = torch.Generator().manual_seed(123)
    images = nn.functional.interpolate(torch.rand(10 * per_class, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return images, torch.arange(10).repeat_interleave(per_class)


def synthesizer(name, teacher, student, cfg, spec=SPEC):
    """create_synthesizer, plus a small guide set when the method (or its config) needs one."""
    synth = create_synthesizer(name, teacher, student, cfg, spec)
    if get_method(name).needs_guide(cfg):
        synth.attach_guide(*tiny_guide())
    return synth


@pytest.fixture(scope="module")
def teacher():
    return calibrated_resnet8(0)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(1)
    return create_model("resnet8", num_classes=10).train()


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- registry ------------------------------------------------------------------------

def test_registry_names_modules_and_citations():
    assert METHODS[:6] == ["dafl", "zskt", "dfad", "deepinv", "dfq", "cmi"]  # the reference table's order first
    for name in METHODS:
        cls = get_method(name)
        assert cls.name == name
        assert cls.__module__ == f"methods.{name}"  # module name = registry name
        assert cls.paper and cls.optimizes and cls.kind  # the README's method table comes from these
        cfg = make_config(name, "smoke")
        images, features = cls.store_capacity(cfg)
        if cls.fresh_kd_batches:  # a store for one round of fresh KD images
            assert images == cfg.kd_steps * cfg.batch_size and features is None
        else:  # a growing pool of kept batches
            assert images is None
        assert re.search(r"(19|20)\d\d", cls.__doc__), f"{name} must cite its paper"
        assert set(cls.budgets) == {"smoke", "cpu"}
    with pytest.raises(UnknownMethodError, match="known methods: dafl, zskt"):
        get_method("cmii")


# -- every method end to end -----------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_synthesize_sample_and_kd_step(name, teacher, student):
    cfg = make_config(name, "smoke")
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    torch.manual_seed(0)
    synth = synthesizer(name, teacher, student, cfg)
    makes = 0 if get_method(name).requires_guide else cfg.synthesis_batch_size  # KD on a guide set makes none
    for _ in range(2):  # the second round sees a non-empty bank (CMI negatives)
        result = synth.synthesize()
        assert result.images.shape == (makes, 3, 32, 32)
        assert makes == 0 or (result.images.min() >= 0 and result.images.max() <= 1)
        assert "total" in result.losses and len(result.losses) >= 2
        assert all(math.isfinite(v) for v in result.losses.values()), result.losses
    assert synth.images_synthesized == 2 * makes
    x = synth.sample(cfg.batch_size)
    assert x.shape == (cfg.batch_size, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    # Synthesis touched neither network: weights, BN statistics, gradients, mode.
    assert same_state(snapshot(teacher), teacher_before)
    assert same_state(snapshot(student), student_before)
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])
    assert student.training and not teacher.training
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in teacher.modules())  # hooks removed
    # One KD step on the sampled batch, as the loop does it.
    s = copy.deepcopy(student)
    with torch.no_grad():
        t_logits = teacher(SPEC.normalize(x))
    loss = kd_loss(cfg.kd_criterion, s(SPEC.normalize(x)), t_logits, cfg.T)
    loss.backward()
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("name", ["deepinv", "cmi"])
def test_inversion_lowers_bn_loss(name, teacher, student):
    def bn_after(g_steps):
        lr_g = 0.1 if name == "deepinv" else 0.01  # CMI: 10x the published lr, to fit 20 steps
        cfg = make_config(name, "smoke", {"g_steps": g_steps, "adv": 0.0, "lr_g": lr_g})
        torch.manual_seed(3)
        return create_synthesizer(name, teacher, student, cfg, SPEC).synthesize().losses["bn"]

    start, end = bn_after(1), bn_after(20)
    assert end < 0.7 * start, (start, end)


@pytest.mark.parametrize("name, view_fn", [("deepinv", "jitter_and_flip"), ("cmi", "crop_and_flip")])
def test_inversion_keeps_lowest_loss_iterate(name, view_fn, teacher, student, monkeypatch):
    """Records every iterate and every total; the kept batch must be the argmin's (the
    reference DeepInversion keeps a live reference and so stores the last iterate)."""
    module = __import__(f"methods.{name}", fromlist=[view_fn])
    iterates, totals = [], []
    original_view = getattr(module, view_fn)
    monkeypatch.setattr(module, view_fn, lambda x, *a: (iterates.append(x.detach().clone()),
                                                        original_view(x, *a))[1])
    cls = get_method(name)
    original_total = cls.weighted_total
    monkeypatch.setattr(cls, "weighted_total", lambda self, terms: (
        lambda t: (totals.append(t.item()), t)[1])(original_total(self, terms)))
    cfg = make_config(name, "smoke", {"g_steps": 6})
    torch.manual_seed(5)
    result = create_synthesizer(name, teacher, student, cfg, SPEC).synthesize()
    best = min(range(len(totals)), key=totals.__getitem__)
    assert result.losses["total"] == pytest.approx(totals[best])
    kept = iterates[best] if name == "cmi" else SPEC.denormalize(iterates[best])
    assert torch.allclose(result.images, kept.clamp(0, 1), atol=1e-6)


def test_inversion_sample_uses_the_dataset_augmentation(teacher, student):
    plain = dataclasses.replace(SPEC, crop_padding=0, hflip=False)
    synth = create_synthesizer("deepinv", teacher, student, make_config("deepinv", "smoke"), plain)
    pool = to_uint8(synth.synthesize().images)
    drawn = to_uint8(synth.sample(8))  # no augmentation: exactly the pool's images
    assert sorted(map(bytes, drawn.flatten(1).numpy())) == sorted(map(bytes, pool.flatten(1).numpy()))
    synth.spec = SPEC
    assert not torch.equal(to_uint8(synth.sample(8)).sort(0).values, pool.sort(0).values)


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_images_and_weights(name, teacher, student):
    def run():
        torch.manual_seed(7)
        cfg = make_config(name, "smoke", {"g_steps": 1})
        synth = synthesizer(name, teacher, student, cfg)
        images = [synth.synthesize().images for _ in range(2)]
        return images, synth.state_dict()

    (images_a, state_a), (images_b, state_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
    flat_a, flat_b = _flatten(state_a), _flatten(state_b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        a, b = flat_a[key], flat_b[key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix: tree}


@pytest.mark.parametrize("name", METHODS)
def test_nan_teacher_is_reported_not_raised(name, teacher, student):
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, nn.Linear):
                m.bias.fill_(float("nan"))
    synth = synthesizer(name, broken, student, make_config(name, "smoke"))
    losses_ = synth.synthesize().losses
    assert any(math.isnan(v) for v in losses_.values()), losses_


@pytest.mark.parametrize("name", ["dafl", "cmi", "rdskd"])
def test_synthesizer_state_dict_round_trip(name, teacher, student):
    cfg = make_config(name, "smoke")
    torch.manual_seed(0)
    synth = create_synthesizer(name, teacher, student, cfg, SPEC)
    synth.synthesize()
    buffer = io.BytesIO()
    torch.save(synth.state_dict(), buffer)  # the loop's checkpoint format
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = create_synthesizer(name, teacher, student, cfg, SPEC)
    fresh.load_state_dict(state)
    assert fresh.images_synthesized == synth.images_synthesized
    a, b = _flatten(fresh.state_dict()), _flatten(synth.state_dict())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# -- CMI -----------------------------------------------------------------------------------

def test_cmi_memory_bank_fills(teacher, student):
    cfg = make_config("cmi", "smoke", {"bank_size": 1000})
    synth = create_synthesizer("cmi", teacher, student, cfg, SPEC)
    dim = sum(m.num_features for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    for k in range(1, 4):
        synth.synthesize()
        assert synth.bank.num_features() == len(synth.bank) == k * cfg.synthesis_batch_size
        assert synth.bank.state_dict()["features"].shape == (k * cfg.synthesis_batch_size, 2 * dim)  # [local, global]
    assert synth.bank.negatives(5).shape == (5, 2 * dim)


def test_cmi_fused_views_match_the_plain_per_view_computation(teacher, student):
    """CMI's fast path (one teacher pass over both views, statistics from the global view,
    each BatchNorm and its hook one `ObservedBatchNorm` node) gives every loss term and every
    gradient of the plain computation (two passes, hooks through autograd), to 1e-5.
    Seeded: the two paths round differently in float32, and through the generator's
    BatchNorm some draws of z and weights amplify that to 4e-5 in a gradient element, so
    without a seed the outcome would depend on which tests ran before."""
    torch.manual_seed(0)
    cfg = make_config("cmi", "smoke", {"adv": 0.5})
    synth = create_synthesizer("cmi", teacher, student, cfg, SPEC)
    synth.synthesize()  # a non-empty memory bank, so the cached negatives take part too
    z = torch.randn(cfg.synthesis_batch_size, cfg.latent_dim, requires_grad=True)
    targets = torch.arange(cfg.synthesis_batch_size) % 10
    params = [*synth.generator.parameters(), z, *synth.head.parameters()]
    results = {}
    for fused in (False, True):
        synth.fused_views = fused
        torch.manual_seed(1)  # the same augmentation draws and negatives on both paths
        with BatchNormHooks(teacher, fused=fused) as hooks:
            terms, local_feat, global_feat = synth.loss_terms(synth.generator(z), targets, hooks)
            grads = torch.autograd.grad(synth.weighted_total(terms), params)
        results[fused] = (terms, local_feat, global_feat, grads)
    (plain, *plain_rest), (fast, *fast_rest) = results[False], results[True]
    assert set(plain) == set(fast) == {"bn", "oh", "adv", "cr"}
    for name in plain:
        assert torch.allclose(plain[name], fast[name], rtol=1e-5, atol=1e-5), name
    for a, b in zip(plain_rest[:2], fast_rest[:2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain_rest[2], fast_rest[2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("read", ["stats", "features", "both", "momentum", "trainable"])
def test_observed_batchnorm_matches_the_plain_hooks_in_every_term_and_gradient(layout, read):
    """Each BatchNorm with its hook as one autograd node (`ObservedBatchNorm`, the default)
    against the plain path (the layer, then its statistics through autograd): the output, the
    BN loss, the instance features and the gradient of the input (and of the BN parameters,
    when they require it) agree to 1e-5. In float64, with running statistics far from 0 and 1
    and statistics over the first of two views: in float32 a ReLU input within rounding of
    zero can take the other side on one path, which moves one gradient element by its whole
    size (seen once: 2e-8 against -5e-7) without either path being wrong."""
    torch.manual_seed(3)
    net = create_model("wrn16_1", 10, in_channels=1, image_size=32).eval().double()
    net = net.to(memory_format=layout)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.3, 3.0)
                m.weight.normal_(1, 0.3), m.bias.normal_(0, 0.3)
    trainable = read == "trainable"
    for p in net.parameters():
        p.requires_grad_(trainable)
    x0 = torch.randn(8, 1, 32, 32, dtype=torch.float64).contiguous(memory_format=layout)
    stats, features = read != "features", read in ("features", "both", "trainable")
    results = {}
    for fused in (False, True):
        momentum = None
        if read == "momentum":  # Fast-DFKD's carried statistics (the same on both paths)
            gen = torch.Generator().manual_seed(5)
            momentum = [(torch.randn(m.num_features, generator=gen, dtype=torch.float64),
                         torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
                        for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        x = x0.clone().requires_grad_(True)
        with BatchNormHooks(net, stats=stats, features=features, momentum=momentum, momentum_rate=0.9,
                            fused=fused) as hooks:
            hooks.views(4)
            out = net(x)
            loss = out.square().mean()
            loss = loss + hooks.bn_loss() if stats else loss
            if features:
                feats = hooks.features()
                loss = loss + (feats * torch.linspace(-1, 1, feats.shape[1], dtype=torch.float64)).sum()
            inputs = [x, *net.parameters()] if trainable else [x]
            grads = torch.autograd.grad(loss, inputs)
            results[fused] = [out, loss, *grads]
        assert not any("forward" in m.__dict__ for m in net.modules())  # the layers are as they were
    for name, plain, fast in zip(["output", "loss", "input grad", *["param grad"] * 99], *results.values()):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item(), msg=name)


def test_hooks_compute_only_what_is_read_and_split_views(teacher):
    x = SPEC.normalize(smooth_images(8))
    with BatchNormHooks(teacher, features=False) as stats_only, torch.no_grad():
        teacher(x[:4])
        assert all(h.instance_mean is None for h in stats_only) and stats_only.bn_loss() > 0
        expected = stats_only.bn_loss()
        stats_only.views(4)
        teacher(x)  # statistics over the first view only
        assert torch.allclose(stats_only.bn_loss(), expected, atol=1e-5)
    with BatchNormHooks(teacher, stats=False) as features_only, torch.no_grad():
        teacher(x)
        assert all(h.r_feature is None for h in features_only) and features_only.features().shape[0] == 8


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("centre", [0.0, 5.0])  # 5: a mean 50 stds away, where E[x^2] - E[x]^2 would cancel
def test_channel_moments_match_mean_and_var_and_their_gradients(layout, centre):
    """The one-pass statistics of the BN hooks equal `mean` and biased `var` over (N, H, W),
    values and gradients, to 1e-5, in either memory layout."""
    torch.manual_seed(0)
    x = (centre + 0.1 * torch.randn(6, 5, 7, 7)).contiguous(memory_format=layout).requires_grad_(True)
    shift = x.detach().mean(dim=(0, 2, 3)) + 0.01 * torch.randn(5)  # a running mean near the batch's
    weights = torch.randn(2, 5)
    mean, var = channel_moments(x, shift)
    grad, = torch.autograd.grad((weights[0] * mean).sum() + (weights[1] * var).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    ref_mean, ref_var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    ref_grad, = torch.autograd.grad((weights[0] * ref_mean).sum() + (weights[1] * ref_var).sum(), x64)
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-5, atol=0)
    assert torch.allclose(var.double(), ref_var, rtol=1e-5, atol=0)
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_instance_means_match_the_mean_over_height_and_width(layout):
    """CMI's instance features: the per-image channel means, values and gradients, in either
    memory layout (channels_last is read as an (N, H*W, C) view)."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, 7).contiguous(memory_format=layout).requires_grad_(True)
    weights = torch.randn(6, 5)
    means = instance_means(x)
    grad, = torch.autograd.grad((weights * means).sum(), x)
    ref = x.detach().requires_grad_(True)
    ref_means = ref.mean(dim=(2, 3))
    ref_grad, = torch.autograd.grad((weights * ref_means).sum(), ref)
    torch.testing.assert_close(means, ref_means, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_cmi_contrastive_loss_prefers_true_pairs(teacher, student):
    synth = create_synthesizer("cmi", teacher, student, make_config("cmi", "smoke"), SPEC)
    torch.manual_seed(0)
    images = smooth_images(16)
    with BatchNormHooks(teacher) as hooks, torch.no_grad():
        teacher(SPEC.normalize(augment.crop_and_flip(images)))
        global_feat = hooks.features()
        teacher(SPEC.normalize(augment.resized_crop_and_flip(images)))
        local_feat = hooks.features()
        empty = torch.empty(0, synth.feature_dim)
        paired = contrastive_loss(synth.head, local_feat, global_feat, empty, empty, 0.1)
        shuffled = contrastive_loss(synth.head, local_feat, global_feat.roll(1, dims=0), empty, empty, 0.1)
        direct = losses.info_nce(synth.head(local_feat), synth.head(global_feat), 0.1).mean()
    assert paired < shuffled
    assert torch.allclose(paired, direct)


# -- augmentation ------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [
    augment.random_crop_with_padding, augment.random_resized_crop, augment.random_hflip,
    augment.jitter_and_flip, augment.crop_and_flip,
])
def test_augmentation_draws_per_image_and_passes_gradients(fn):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).repeat(16, 1, 1, 1).requires_grad_()
    out = fn(x)
    assert out.shape == x.shape
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 16))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_crop_and_roll_move_pixels_exactly():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    rolled = augment.random_roll(x, 2, 2)
    for i in range(2):  # a roll is some exact circular shift of each image
        assert any(torch.equal(rolled[i], x[i].roll((dy, dx), (1, 2)))
                   for dy in range(-2, 3) for dx in range(-2, 3))
    cropped = augment.random_crop_with_padding(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(cropped[i], padded[i, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(5) for dx in range(5))


# -- losses --------------------------------------------------------------------------------

def test_losses():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert losses.kl_div(t, t, T=4).abs() < 1e-6
    assert torch.allclose(losses.kl_div(s, t, T=1), torch.nn.functional.kl_div(
        s.log_softmax(1), t.softmax(1), reduction="batchmean"))
    assert losses.kl_div(s, t, reduction="per_sample").shape == (4,)
    js = losses.js_div(s, t, T=3)
    assert 0 < js < math.log(2) and torch.allclose(js, losses.js_div(t, s, T=3))
    assert torch.allclose(kd_loss("l1", s, t, 20.0), (s - t).abs().mean())
    with pytest.raises(ValueError, match="known: kl, l1"):
        kd_loss("l2", s, t, 1.0)
    with pytest.raises(ValueError, match="unknown kd criterion 'kl\\+crd\\+crd'"):
        kd_loss("kl+crd+crd", s, t, 1.0)
    # A generator plays against the logit part of a "+crd" criterion (it has no embedding heads).
    assert torch.equal(kd_loss("kl+crd", s, t, 4.0), kd_loss("kl", s, t, 4.0))
    assert torch.allclose(losses.class_balance_loss(torch.zeros(4, 10)), torch.tensor(-math.log(10)))
    assert losses.total_variation(torch.ones(2, 3, 8, 8)) == 0
    assert losses.activation_loss(torch.tensor([[1.0, -3.0]])) == -2.0


# -- configs --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_config_round_trips_through_asdict(name, budget):
    cfg = make_config(name, budget)
    assert type(cfg)(**dataclasses.asdict(cfg)) == cfg
    assert type(cfg)() == make_config(name, "paper")


def test_published_presets():
    assert make_config("dafl").T == 1.0 and make_config("dafl").latent_dim == 512
    assert make_config("dfad").kd_criterion == "l1"
    assert make_config("dfq").kd_steps == 10
    deepinv, cmi = make_config("deepinv"), make_config("cmi")
    assert (deepinv.T, deepinv.g_steps, deepinv.lr_g, deepinv.bn, deepinv.tv) == (20.0, 1000, 0.1, 10.0, 0.001)
    assert (cmi.T, cmi.g_steps, cmi.batch_size, cmi.synthesis_batch_size) == (20.0, 200, 128, 256)
    assert (cmi.adv, cmi.cr, cmi.cr_T, cmi.bank_size, cmi.n_neg, cmi.head_dim) == (0.5, 0.8, 0.1, 40960, 4096, 256)
    rdskd = make_config("rdskd")  # the authors' MNIST scripts (docs/methods.md)
    assert (rdskd.warmup_epochs, rdskd.epochs, rdskd.ep_steps, rdskd.kd_steps, rdskd.g_steps) == (20, 1020, 120, 1, 1)
    assert (rdskd.batch_size, rdskd.synthesis_batch_size, rdskd.lr_g) == (512, 512, 1e-3)
    assert (rdskd.T, rdskd.latent_dim) == (10.0, 100)
    assert (rdskd.oh, rdskd.balance, rdskd.ds, rdskd.ref_every) == (1.0, 1.0, 1.0, 1)
    assert get_method("rdskd").adam_betas == (0.9, 0.999) and get_method("dafl").adam_betas == (0.5, 0.999)


def test_make_config_budgets_and_overrides():
    cpu = make_config("cmi", "cpu")
    assert (cpu.epochs, cpu.ep_steps, cpu.kd_steps, cpu.g_steps, cpu.batch_size) == (10, 50, 50, 20, 128)
    assert cpu.adv == 0.5  # weights stay as published
    assert make_config("deepinv", "cpu").g_steps == 50
    assert (make_config("dfq", "cpu").kd_steps, make_config("dfq", "cpu").g_steps) == (5, 1)
    cfg = make_config("cmi", "smoke", {"lr_g": "3e-3", "g_steps": "7", "kd_criterion": "l1", "adv": 1})
    assert cfg.lr_g == 0.003 and cfg.g_steps == 7 and cfg.kd_criterion == "l1"
    assert isinstance(cfg.adv, float)


@pytest.mark.parametrize("overrides, message", [
    ({"nope": 1}, "unknown setting 'nope'"),
    ({"lr": "-0.1"}, "lr must be > 0"),
    ({"lr_g": 0}, "lr_g must be > 0"),
    ({"g_steps": 0}, "g_steps must be >= 1"),
    ({"epochs": "-3"}, "epochs must be >= 1"),
    ({"g_steps": "2.5"}, "g_steps must be int"),
    ({"lr_g": "fast"}, "lr_g must be float"),
    ({"g_steps": True}, "g_steps must be int"),
    ({"adv": -1}, "adv must be >= 0"),
    ({"T": 0}, "T must be > 0"),
    ({"cr_T": "0"}, "cr_T must be > 0"),
    ({"kd_steps": 500}, "kd_steps .* must not exceed ep_steps"),
    ({"kd_criterion": "mse"}, "kd_criterion must be one of kl, l1"),
    ({"kd_criterion": "kl+mse"}, "kd_criterion must be one of kl, l1, kl\\+crd, l1\\+crd, got 'kl\\+mse'"),
])
def test_make_config_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("cmi", "paper", overrides)


def test_rdskd_config_refuses_a_batch_it_cannot_pair():
    with pytest.raises(ConfigError, match="synthesis_batch_size \\(1\\) must be at least 2 for rdskd"):
        make_config("rdskd", "smoke", {"synthesis_batch_size": 1})
    with pytest.raises(ConfigError, match="ref_every must be >= 1"):
        make_config("rdskd", "smoke", {"ref_every": 0})


def test_make_config_rejects_unknown_budget_and_method():
    with pytest.raises(ConfigError, match="unknown budget"):
        make_config("cmi", "huge")
    with pytest.raises(UnknownMethodError):
        make_config("nope")


@pytest.mark.parametrize("name", METHODS)
def test_search_space_is_plain_data_over_config_fields(name):
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    space = cls.search_space()
    assert space and set(space) <= fields
    for key, dist in space.items():
        assert dist["type"] in ("loguniform", "uniform", "int", "choice")
        if dist["type"] != "choice":
            assert dist["low"] < dist["high"]
            for value in (dist["low"], dist["high"]):
                make_config(name, "paper", {key: value})  # the bounds are valid values


# -- instance bank ----------------------------------------------------------------------

def test_bank_uint8_round_trip_is_bit_exact():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    u8 = to_uint8(images)
    assert torch.equal(to_uint8(from_uint8(u8)), u8)
    assert (from_uint8(u8) - images).abs().max() <= 0.5 / 255 + 1e-6
    bank = InstanceBank()
    bank.add(u8, torch.arange(6))
    drawn = bank.sample(6)  # without replacement: a permutation of what was added
    assert drawn.dtype == torch.uint8
    assert sorted(map(bytes, drawn.flatten(1).numpy())) == sorted(map(bytes, u8.flatten(1).numpy()))
    assert bank.sample(20).shape == (20, 3, 8, 8)  # more than stored: with replacement
    with pytest.raises(ValueError, match="uint8"):
        bank.add(images)


def test_bank_fifo_eviction_and_state_round_trip():
    bank = InstanceBank(capacity_images=10, capacity_features=6)
    for i in range(3):
        batch = torch.full((4, 1, 2, 2), i, dtype=torch.uint8) + torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1) * 10
        bank.add(batch, labels=torch.arange(4) + 4 * i, features=torch.full((4, 3), float(i)))
    assert len(bank) == 10 and bank.num_features() == 6
    state = bank.state_dict()
    assert state["labels"].tolist() == list(range(2, 12))  # the two oldest evicted
    assert state["features"][:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert bank.negatives(100).shape == (6, 3)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = InstanceBank()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(restored) == 10 and restored.num_features() == 6
    for key in ("images", "labels", "features"):
        assert torch.equal(restored.state_dict()[key], state[key])
    # The restored bank keeps evicting in the same order.
    more = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    bank.add(more, torch.tensor([99, 99, 99]))
    restored.add(more, torch.tensor([99, 99, 99]))
    assert torch.equal(bank.state_dict()["labels"], restored.state_dict()["labels"])
    assert bank.state_dict()["labels"].tolist() == list(range(5, 12)) + [99, 99, 99]


def test_empty_bank():
    bank = InstanceBank()
    assert len(bank) == 0 and bank.num_features() == 0
    assert bank.negatives(4).shape == (0, 0)
    with pytest.raises(RuntimeError, match="empty"):
        bank.sample(1)


# -- Fast-DFKD -----------------------------------------------------------------------------

def test_fast_meta_update_is_the_sum_of_the_inner_gradients(teacher, student):
    """First-order MAML: the meta-generator's gradient is the sum of its clone's gradients
    over the round's steps, and one meta step moves it; the clone and z take the inner steps."""
    cfg = make_config("fast", "smoke", {"g_steps": 3})
    synth = create_synthesizer("fast", teacher, student, cfg, SPEC)
    inner_grads = []
    make_inner = synth.inner_optimizer

    def recording(fast, z):
        optimizer = make_inner(fast, z)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            inner_grads.append([p.grad.clone() for p in fast.parameters()])
            return step(*args, **kwargs)

        optimizer.step = recorded_step
        return optimizer

    synth.inner_optimizer = recording
    before = [p.detach().clone() for p in synth.generator.parameters()]
    synth.synthesize()
    assert len(inner_grads) == 3
    for i, (meta, start) in enumerate(zip(synth.generator.parameters(), before)):
        expected = sum(step[i] for step in inner_grads)
        assert torch.allclose(meta.grad, expected, atol=1e-6)
        assert not torch.equal(meta.detach(), start)  # the meta step moved it
    # Adam's first step moves every parameter by lr * sign(gradient), when the gradient is not ~0.
    lr = cfg.lr_g * cfg.g_steps
    moved = [(m.detach() - b).abs() for m, b in zip(synth.generator.parameters(), before)]
    assert max(float(d.max()) for d in moved) == pytest.approx(lr, rel=1e-3)


def test_fast_adversarial_term_waits_for_the_warm_up(teacher, student):
    cfg = make_config("fast", "smoke", {"epochs": 3, "warmup_epochs": 1, "ep_steps": 2, "kd_steps": 1})
    synth = create_synthesizer("fast", teacher, student, cfg, SPEC)
    terms = [set(synth.synthesize().losses) for _ in range(4)]  # 2 rounds per epoch
    assert "adv" not in terms[0] and "adv" not in terms[1] and "adv" in terms[2] and "adv" in terms[3]
    assert synth.bn_statistics is not None and len(synth.bn_statistics) > 0


# -- NAYER ---------------------------------------------------------------------------------

def test_nayer_redraws_its_noisy_layer_every_loop_and_keeps_the_generator(teacher, student):
    cfg = make_config("nayer", "smoke", {"g_loops": 3, "warmup_loops": 3})
    synth = create_synthesizer("nayer", teacher, student, cfg, SPEC)
    redraw = synth.generator.reinit_noisy_layer
    at_start = []

    def recorded():
        redraw()
        at_start.append([layer.weight.detach().clone() for layer in synth.generator.noisy])

    synth.generator.reinit_noisy_layer = recorded
    body_before = [p.detach().clone() for p in synth.generator.body.parameters()]
    synth.synthesize()
    assert len(at_start) == 3 and synth.images_synthesized == 3 * cfg.synthesis_batch_size
    after = [layer.weight.detach() for layer in synth.generator.noisy]
    assert not any(torch.equal(a, b) for a, b in zip(at_start[-1], after))  # the loop trained it ...
    assert not torch.equal(at_start[0][0], at_start[1][0])  # ... and the next loop drew it anew
    assert 0.5 < float(torch.cat([w.flatten() for w in at_start[1]]).std()) < 1.5  # from N(0, 1)
    # The generator body persists across loops (it is trained, not re-created).
    assert any(not torch.equal(a, b.detach()) for a, b in zip(body_before, synth.generator.body.parameters()))


def test_nayer_targets_are_class_balanced():
    synth_cls = __import__("methods.nayer", fromlist=["Nayer"]).Nayer
    cfg = make_config("nayer", "smoke", {"synthesis_batch_size": 25})
    t = synth_cls.balanced_targets(type("S", (), {"spec": SPEC, "config": cfg, "device": "cpu"})())
    counts = torch.bincount(t, minlength=10)
    assert len(t) == 25 and int(counts.min()) >= 2 and torch.equal(t[:20], torch.arange(10).repeat(2))


# -- RDSKD ---------------------------------------------------------------------------------

def test_rdskd_penalty_on_hand_made_numbers():
    """exp(L - L_ref): a loss that rose above its reference is scaled up, value and gradient
    alike (factor exp(rise) > 1); at its reference the factor is 1 and the gradient is the
    plain loss's; a loss that fell is scaled down (factor < 1)."""
    for value, reference in ((2.5, 2.0), (2.0, 2.0), (1.5, 2.0)):
        loss = torch.tensor(value, requires_grad=True)
        penalised = losses.exp_increment_penalty(loss, reference)
        penalised.backward()
        factor = math.exp(value - reference)
        assert penalised.item() == pytest.approx(factor) and loss.grad.item() == pytest.approx(factor)
    rose, same, fell = (losses.exp_increment_penalty(torch.tensor(v), 2.0).item() for v in (2.5, 2.0, 1.5))
    assert rose > 1 and same == 1 and fell < 1
    # The reference is a constant: no gradient flows into it.
    reference = torch.tensor(2.0, requires_grad=True)
    losses.exp_increment_penalty(torch.tensor(2.5, requires_grad=True), reference).backward()
    assert reference.grad is None


def test_rdskd_total_penalises_the_conflicting_terms_against_their_reference(teacher, student):
    synth = create_synthesizer("rdskd", teacher, student, make_config("rdskd", "smoke", {"ds": 2.0}), SPEC)
    terms = {"oh": torch.tensor(1.5), "balance": torch.tensor(-2.0), "ds": torch.tensor(0.25)}
    # The first step has no earlier loss: each penalised term counts as a factor 1.
    assert synth.weighted_total(terms).item() == pytest.approx(1 + 1 + 2.0 * 0.25)
    synth.references, synth.penalty_steps = {"oh": 1.0, "balance": -1.5}, 1
    # oh rose by 0.5 (penalised), balance fell by 0.5 (damped), ds is not penalised.
    assert synth.weighted_total(terms).item() == pytest.approx(math.exp(0.5) + math.exp(-0.5) + 2.0 * 0.25)


@pytest.mark.parametrize("ref_every, refreshed_at", [(1, 2), (2, 2), (3, 0)])
def test_rdskd_reference_is_the_loss_of_the_last_refresh_step(ref_every, refreshed_at, teacher, student):
    cfg = make_config("rdskd", "smoke", {"g_steps": 3, "ref_every": ref_every})
    synth = create_synthesizer("rdskd", teacher, student, cfg, SPEC)
    seen = []
    original = synth.after_step
    synth.after_step = lambda terms: (seen.append({k: v.item() for k, v in terms.items()}), original(terms))
    torch.manual_seed(0)
    synth.synthesize()
    assert synth.penalty_steps == 3
    assert synth.references == {k: pytest.approx(seen[refreshed_at][k]) for k in ("oh", "balance")}


def test_rdskd_pair_diversity_on_hand_made_numbers():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [9.0, 9.0]])  # the fifth is left out
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0], [5.0, 0.0]])
    # Halves [x0, x1] and [x2, x3]: image gap ||(3, 4), (0, 0)|| = 5; output gap
    # ||(0.75 - 0.5, 0.25 - 0.5), (0, 0)|| = sqrt(0.125).
    assert losses.pair_diversity_loss(x, logits).item() == pytest.approx(math.sqrt(0.125) / 5)
    assert losses.pair_diversity_loss(x[:1], logits[:1]).item() == 0.0


def test_rdskd_resumed_penalty_continues_as_the_uninterrupted_one(teacher, student):
    cfg = make_config("rdskd", "smoke", {"g_steps": 2})
    torch.manual_seed(0)
    whole = create_synthesizer("rdskd", teacher, student, cfg, SPEC)
    whole.synthesize()
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = create_synthesizer("rdskd", teacher, student, cfg, SPEC)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.references == whole.references and resumed.penalty_steps == 2
    rng = torch.get_rng_state()
    expected = whole.synthesize().losses
    torch.set_rng_state(rng)
    assert resumed.synthesize().losses == expected


# -- CRD (a KD-criterion option of every method) --------------------------------------------

def test_crd_loss_prefers_aligned_embeddings():
    torch.manual_seed(0)
    emb = nn.functional.normalize(torch.randn(16, 128), dim=1)
    negatives = nn.functional.normalize(torch.randn(64, 128), dim=1)
    aligned = crd_loss(emb, emb, negatives)
    shuffled = crd_loss(emb, emb.roll(1, dims=0), negatives)
    assert aligned < shuffled
    # More negatives make the same task harder (a larger partition function).
    assert crd_loss(emb, emb, negatives[:0]) < aligned
    # By hand: two orthogonal rows, no negatives, temperature 1: -log(e / (e + 1)).
    eye = torch.eye(2)
    assert crd_loss(eye, eye, torch.empty(0, 2), 1.0).item() == pytest.approx(-math.log(math.e / (math.e + 1)))


def test_crd_queue_is_fifo_and_bounded():
    queue = EmbeddingQueue(capacity=5, dim=2)
    rows = torch.arange(20, dtype=torch.float).view(10, 2)  # row i is (2i, 2i + 1)
    queue.push(rows[:3])
    assert len(queue) == 3 and torch.equal(queue.rows(), rows[:3])
    queue.push(rows[3:7])  # 7 rows pushed into 5 places: the two oldest leave
    assert len(queue) == 5 and torch.equal(queue.rows(), rows[2:7])
    state = queue.state_dict()
    queue.push(rows[7:8])
    assert torch.equal(queue.rows(), rows[3:8])
    restored = EmbeddingQueue(capacity=5, dim=2)
    restored.load_state_dict(state)
    restored.push(rows[7:8])  # the restored queue evicts in the same order
    assert torch.equal(restored.rows(), queue.rows())
    queue.push(rows)  # more than it holds: the newest five
    assert len(queue) == 5 and torch.equal(queue.rows(), rows[5:])


def test_crd_objective_trains_heads_and_student_and_fills_its_queue(teacher):
    torch.manual_seed(0)
    student_ = create_model("resnet8", num_classes=10).train()
    objective = KDObjective("kl+crd", 4.0, student_.num_features, teacher.num_features, queue_size=12)
    assert objective.uses_features and len(list(objective.parameters())) == 4  # two Linear heads
    x = SPEC.normalize(smooth_images(8))
    with torch.no_grad():
        t_logits, t_features = teacher(x, return_features=True)
    for step in (1, 2):  # the second step has the first step's teacher embeddings as negatives
        s_logits, s_features = student_(x, return_features=True)
        terms = objective(s_logits, t_logits, s_features, t_features)
        assert set(terms) == {"loss", "crd"}
        assert len(objective.queue) == min(8 * step, 12)  # bounded by its capacity
        expected = kd_loss("kl", s_logits, t_logits, 4.0) + CRD_WEIGHT * terms["crd"]
        assert torch.allclose(terms["loss"], expected)
        student_.zero_grad(), objective.zero_grad()
        terms["loss"].backward()
        for module in (objective.student_head, objective.teacher_head, student_):
            assert all(p.grad is not None for p in module.parameters() if p.requires_grad), module
            assert sum(float(p.grad.abs().sum()) for p in module.parameters()) > 0
    assert not objective.queue.rows().requires_grad  # queued embeddings are constants
    # Without "+crd": no heads, no state, the plain logit loss.
    plain = KDObjective("kl", 4.0)
    assert not plain.uses_features and not list(plain.parameters()) and plain.state() == {}
    assert torch.equal(plain(s_logits, t_logits)["loss"], kd_loss("kl", s_logits, t_logits, 4.0))


def test_crd_heads_do_not_move_the_random_stream(teacher):
    torch.manual_seed(0)
    KDObjective("kl+crd", 4.0, 64, teacher.num_features)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)
