"""Guided inversion (issue #15): the guided discriminator term of CMI, DeepInversion and Fast
(methods/guided.py), the naive mixing baseline (`guide_mix`, in the Trainer), KD on the guide
samples alone (methods/samples.py), the `--guide` plumbing of the CLIs, MLflow and row labels,
and the backward-compatible config identity that keeps earlier cells and states matching.

    .venv/bin/python -m pytest tests/test_guided.py -q
"""
import dataclasses
import io
import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from methods import ConfigError, ImageSpec, create_synthesizer, get_method, make_config
from methods.config import identity, same_identity
from methods.guided import FeatureDiscriminator, GuidedInversion, discriminator_loss
from methods.inversion import InversionSynthesizer
from models import create_model

SPEC = ImageSpec(num_classes=10, channels=3, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GUIDED = ["cmi", "deepinv", "fast"]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10).eval(), create_model("resnet8", num_classes=10).train()


def guide_set(per_class: int = 2, value: float | None = None):
    g = torch.Generator().manual_seed(99)
    images = torch.rand(10 * per_class, 3, 32, 32, generator=g) if value is None else \
        torch.full((10 * per_class, 3, 32, 32), value)
    return images, torch.arange(10).repeat_interleave(per_class)


def synth(name, nets, overrides=None, guide=True):
    teacher, student = nets
    s = create_synthesizer(name, teacher, student, make_config(name, "smoke", overrides or {}), SPEC)
    if guide:
        s.attach_guide(*guide_set())
    return s


# -- the discriminator and the guided term ---------------------------------------------

def test_discriminator_learns_to_separate_a_fixed_toy_set():
    torch.manual_seed(0)
    real, fake = torch.randn(64, 16) + 1.0, torch.randn(64, 16) - 1.0
    labels = torch.arange(64) % 4
    d = FeatureDiscriminator(16, 4, hidden=32)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(60):
        loss = discriminator_loss(d(real, labels), d(fake, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.2 and losses[-1] < 0.3 * losses[0], losses[::10]


@pytest.mark.parametrize("name", GUIDED)
def test_guided_term_reaches_what_synthesis_optimises_and_trains_the_discriminator(name, nets):
    """The guide term's gradient reaches the images (DeepInv's pixels, CMI's and Fast's
    generator) and never the discriminator; a round reports it and the mean D loss, and
    moves D; the networks stay untouched."""
    s = synth(name, nets, {"guide": 1.0, "g_steps": 2})
    targets = s.random_targets()
    if name == "deepinv":
        x = torch.rand(8, 3, 32, 32, requires_grad=True)
        leaves, images = [x], x
    else:
        z = torch.randn(8, s.config.latent_dim)
        leaves = list(s.generator.parameters())
        images = s.generator(z)
    _, extra = s.teacher_pass(SPEC.normalize(images), targets)
    extra["guide"].backward(inputs=leaves)
    assert all(p.grad is not None for p in leaves) and sum(p.grad.abs().sum() for p in leaves) > 0
    assert all(p.grad is None for p in s.discriminator.parameters())
    before = {k: v.clone() for k, v in s.discriminator.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in nets[0].state_dict().items()}
    result = s.synthesize()
    assert {"guide", "disc"} <= set(result.losses) and result.losses["disc"] > 0
    assert any(not torch.equal(before[k], v) for k, v in s.discriminator.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in nets[0].state_dict().items())
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in nets[0].modules())


@pytest.mark.parametrize("name", GUIDED)
def test_guide_zero_is_the_plain_method_draw_for_draw(name, nets, monkeypatch):
    """guide = 0 (the default): the guided hooks compute and draw nothing, so synthesis is
    what the method's plain code gives (the pre-guide code, compared once against git HEAD:
    bit-identical images, losses, samples and random state for cmi, deepinv, fast, nayer, dafl).
    Here: the same run with the hooks replaced by the plain InversionSynthesizer's."""
    def run():
        torch.manual_seed(11)
        s = synth(name, nets, {"g_steps": 2})
        out = [s.synthesize() for _ in range(2)]
        return out, s.sample(4), torch.get_rng_state(), s.state_dict()

    guided = run()
    for hook in ("teacher_pass", "after_step", "round_report"):
        monkeypatch.setattr(GuidedInversion, hook, getattr(InversionSynthesizer, hook))
    plain = run()
    assert all(torch.equal(a.images, b.images) and a.losses == b.losses for a, b in zip(guided[0], plain[0]))
    assert torch.equal(guided[1], plain[1]) and torch.equal(guided[2], plain[2])
    assert "guide" not in guided[0][0].losses and "discriminator" not in guided[3]


def test_guided_state_resumes_exactly(nets):
    """The discriminator and its optimizer are in the synthesizer's state: a synthesizer
    rebuilt from round 1's state (and random state) makes round 2 as the uninterrupted one."""
    torch.manual_seed(3)
    a = synth("cmi", nets, {"guide": 1.0, "g_steps": 2})
    a.synthesize()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # the loop's checkpoint format
    rng = torch.get_rng_state()
    second = a.synthesize()
    buffer.seek(0)
    b = synth("cmi", nets, {"guide": 1.0, "g_steps": 2})
    b.load_state_dict(torch.load(buffer, weights_only=True))
    torch.set_rng_state(rng)
    again = b.synthesize()
    assert torch.equal(second.images, again.images) and second.losses == again.losses
    assert all(torch.equal(v, b.discriminator.state_dict()[k]) for k, v in a.discriminator.state_dict().items())


@pytest.mark.parametrize("name", GUIDED)
def test_a_guided_config_without_a_guide_set_is_refused(name, nets):
    s = synth(name, nets, {"guide": 0.5}, guide=False)
    with pytest.raises(ConfigError, match="guide=0.5 weights the guided discriminator term.*--guide"):
        s.synthesize()


# -- guide_mix: the naive mixing baseline, in the Trainer ------------------------------

@pytest.mark.parametrize("frac, batch, guided", [(0.25, 8, 2), (0.3, 8, 2), (0.5, 7, 4), (1.0, 6, 6)])
def test_guide_mix_puts_exactly_round_frac_b_guide_images_in_a_kd_batch(frac, batch, guided, nets):
    from orchestrator.core.loop import Trainer

    teacher, student = nets
    config = make_config("dafl", "smoke", {"guide_mix": frac, "batch_size": batch})
    trainer = Trainer(teacher, create_model("resnet8", num_classes=10), config, [], SPEC)
    trainer.attach_guide(*guide_set(value=1.0))  # guide images are all ones, KD images all zeros
    seen = []
    original = trainer.mix_guide
    trainer.mix_guide = lambda x: seen.append(original(x)) or seen[-1]
    trainer.kd_steps(lambda n: torch.zeros(n, 3, 32, 32), steps=1)
    (x,) = seen
    from_guide = x.flatten(1).abs().sum(1) > 0  # a cropped all-ones image still has ones
    assert len(x) == batch and int(from_guide.sum()) == guided == round(frac * batch)
    assert not from_guide[:batch - guided].any()  # the guide images replace the batch's last ones


def test_guide_mix_zero_leaves_the_batch_and_the_random_stream_alone(nets):
    from orchestrator.core.loop import Trainer

    trainer = Trainer(*nets, make_config("dafl", "smoke"), [], SPEC)
    x, state = torch.rand(8, 3, 32, 32), torch.get_rng_state()
    assert trainer.mix_guide(x) is x and torch.equal(torch.get_rng_state(), state)
    mixing = Trainer(*nets, make_config("dafl", "smoke", {"guide_mix": 0.5}), [], SPEC)
    with pytest.raises(ConfigError, match="guide_mix=0.5 .*no guide set"):
        mixing.mix_guide(x)


# -- samples, the cell builders (in process and in Ray actors), a guided cell ----------

def test_samples_trains_on_the_augmented_guide_set_alone(nets):
    s = synth("samples", nets)
    for _ in range(2):
        result = s.synthesize()
        assert len(result.images) == 0 and result.losses["total"] == 0.0
    assert s.images_synthesized == 0 and len(s.bank) == 20  # added once
    assert s.sample(32).shape == (32, 3, 32, 32)
    assert get_method("samples").row_label(make_config("samples", "smoke")) == "KD on samples"


def test_builders_give_the_guide_to_synthesizer_and_trainer_in_every_process(tiny_mnist):
    """Ray actors build their synthesizer and trainer with the same builders, from the
    pickled spec: each process loads the guide set from disk (nothing is shipped)."""
    from orchestrator.core import cell
    from orchestrator.core.guides import load_guide

    env = tiny_mnist
    key = cell.CellKey("mnist", "resnet8", "resnet8", "cmi", 0, "smoke", guide="real:2")
    spec = pickle.loads(pickle.dumps(cell.CellSpec.build(key, {"guide": 1, "guide_mix": 0.5},
                                                         env / "teachers" / "mnist-resnet8.pt", str(env / "data"))))
    cell._guide.cache_clear()  # as in a fresh actor process
    teacher, _ = cell.load_teacher(spec.teacher_ckpt, "mnist")
    student = cell.make_student(spec)
    expected = load_guide("real:2", "mnist", str(env / "data"))
    synthesizer, trainer = cell.make_synthesizer(spec, teacher, [student]), cell.make_trainer(spec, student)
    assert torch.equal(synthesizer.guide_images, expected.images)
    assert torch.equal(trainer.guide_images, expected.images) and torch.equal(trainer.guide_labels, expected.labels)
    assert spec.guide_params()["guide.sha256"] == expected.identity["sha256"]


def test_a_guided_mixed_cell_runs_and_logs_its_terms(tiny_mnist, tmp_path):
    from orchestrator.core.cell import CellKey, CellSpec, run_in_process

    env = tiny_mnist
    key = CellKey("mnist", "resnet8", "resnet8", "deepinv", 0, "smoke", guide="real:2")
    spec = CellSpec.build(key, {"guide": 1, "guide_mix": 0.25}, env / "teachers" / "mnist-resnet8.pt",
                          str(env / "data"))
    result = run_in_process(spec, tmp_path / key.slug, log=lambda *_: None)
    h = result.history
    assert h.status == "finished" and {"synth/guide", "synth/disc", "kd/loss"} <= set(h.losses)
    assert key.slug.endswith("_guide-real2")
    assert json.loads((result.cell_dir / "config.json").read_text())["cell"]["guide"] == "real:2"


# -- the CLIs: bad input is one line, exit 2, nothing written ---------------------------

def _cli(main, argv, capsys):
    from orchestrator.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def condensed_elsewhere(tmp_path, monkeypatch):
    """A cached condensed set under mnist's name that was made for fashion-mnist."""
    from orchestrator.core import guides

    cache = tmp_path / "guides"
    path = guides.save_condensed(cache, "fashion-mnist", 2, 0, torch.rand(20, 1, 32, 32),
                                 torch.arange(10).repeat_interleave(2), {})
    path.rename(cache / f"{guides.condensed_name('mnist', 2, 0)}.safetensors")
    monkeypatch.setattr(guides, "DEFAULT_CACHE", cache)


@pytest.mark.parametrize("guide, method, message", [
    ("fake:3", "cmi", "unknown guide kind 'fake'"),
    ("real:0", "cmi", "must be at least 1"),
    ("real:50", "cmi", "K = 50 images per class, but class"),
    ("condensed:2", "cmi", "made for dataset fashion-mnist"),
    ("", "samples", "samples distills on the guide images alone; give the cell a guide set with --guide"),
    ("", "cmi --set guide=0.5", "guide=0.5 weights the guided discriminator term"),
])
def test_distill_refuses_a_bad_guide_in_one_line_before_writing(guide, method, message, tiny_mnist, tmp_path,
                                                                 capsys, condensed_elsewhere):
    from orchestrator import distill

    env, out = tiny_mnist, tmp_path / "out"
    method, *sets = method.split()
    argv = ["--method", method, *sets, "--dataset", "mnist", "--teacher", "resnet8", "--student", "resnet8",
            "--budget", "smoke", "--teacher-dir", str(tmp_path / "no_teachers"), "--data-root", str(env / "data"),
            "--out", str(out), "--no-progress", "--device", "cpu"] + (["--guide", guide] if guide else [])
    assert message in _cli(distill.main, argv, capsys)
    assert not out.exists() and not (tmp_path / "no_teachers").exists()  # no teacher trained, nothing written


@pytest.mark.parametrize("cli, extra", [("bench", ["--guide", "real:50"]), ("bench", ["--methods", "samples"]),
                                        ("tune", ["--guide", "real:50"]), ("tune", ["--method", "samples"])])
def test_bench_and_tune_refuse_a_bad_guide_before_writing(cli, extra, tiny_mnist, tmp_path, capsys):
    import importlib

    env, out = tiny_mnist, tmp_path / "out"
    common = ["--budget", "smoke", "--teacher-dir", str(env / "teachers"), "--data-root", str(env / "data"),
              "--out", str(out)]
    argv = (["--methods", "cmi", "--datasets", "mnist", "--pairs", "resnet8:resnet8"] if cli == "bench" else
            ["--method", "cmi", "--dataset", "mnist", "--pair", "resnet8:resnet8", "--num-samples", "1"])
    err = _cli(importlib.import_module(f"orchestrator.{cli}").main, argv + common + extra, capsys)
    assert ("K = 50 images per class" in err) if "real:50" in extra else ("--guide KIND:K" in err)
    assert not out.exists()


# -- MLflow, row labels, backward-compatible identity -------------------------------------

def test_the_cell_run_has_the_guide_params_and_tag(tiny_mnist, tmp_path):
    from orchestrator.bench import BenchRecorder
    from orchestrator.core.cell import CellKey, CellSpec
    from orchestrator.core.loop import History
    from orchestrator.tracking import Tracker, cell_key

    env = tiny_mnist
    key = CellKey("mnist", "resnet8", "resnet8", "cmi", 0, "smoke", guide="real:2")
    spec = CellSpec.build(key, {"guide": 1}, env / "teachers" / "mnist-resnet8.pt", str(env / "data"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "guided", artifact_root=tmp_path / "art")
    args = SimpleNamespace(methods="cmi", datasets="mnist", seeds="0", budget="smoke", mode="paper", guide="real:2")
    recorder = BenchRecorder(tracker, "", args, tmp_path, log=lambda *_: None)
    run_id = recorder.cell_started(spec, History())
    tracker.finish(run_id, "FINISHED")
    run = tracker.client.get_run(run_id)
    identity_ = spec.load_guide().identity
    assert {k: run.data.params[k] for k in ("guide.kind", "guide.k", "guide.seed", "guide.dataset")} == \
        {"guide.kind": "real", "guide.k": "2", "guide.seed": "0", "guide.dataset": "mnist"}
    assert run.data.params["guide.sha256"] == identity_["sha256"] and run.data.params["guide"] == "1.0"
    assert run.data.tags["cell.guide"] == "real:2"
    assert cell_key(dataclasses.asdict(key)) in tracker.finished_cells()  # --resume finds the guided cell
    plain = dataclasses.replace(key, guide="")
    assert cell_key(dataclasses.asdict(plain)) not in tracker.finished_cells()  # never the plain one's


def test_row_labels_name_each_variant_and_keep_plain_rows():
    from orchestrator.core.cell import CellKey
    from orchestrator.report import long_rows, row_name

    label = lambda m, **o: get_method(m).row_label(make_config(m, "smoke", o))  # noqa: E731
    assert [label(m) for m in ("cmi", "dafl", "dfad", "fast")] == ["CMI", "DAFL", "DFAD", "Fast"]
    assert label("cmi", guide=0.5) == "CMI +guide" and label("deepinv", guide_mix=0.2) == "DeepInv +mix"
    assert label("dafl", kd_criterion="kl+crd") == "DAFL +CRD"
    assert label("dfad", one_stage=True, g_steps=1) == "DFAD one-stage"
    assert label("fast", guide=1, guide_mix=0.5, kd_criterion="kl+crd") == "Fast +guide +mix +CRD"
    key = CellKey("mnist", "resnet8", "resnet8", "cmi", 0, "smoke", guide="real:2")
    assert long_rows(key, "finished", {"accuracy": 1.0})[0]["row"] == "CMI" == row_name("cmi")
    assert long_rows(key, "finished", {"accuracy": 1.0}, config=make_config("cmi", "smoke", {"guide": 1}))[0]["row"] \
        == "CMI +guide"


def test_a_config_stored_before_the_guide_fields_still_matches(tmp_path):
    from orchestrator.bench import config_hash, same_config
    from orchestrator.core.loop import load_matching_state
    from orchestrator.tracking import flatten_params

    new_fields = ("guide_mix", "guide", "lr_d")
    config = make_config("cmi", "cpu")
    stored = {k: v for k, v in dataclasses.asdict(config).items() if k not in new_fields}  # as written before
    assert same_identity(stored, config) and identity(config) == stored
    import hashlib
    assert config_hash(config) == hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]
    assert same_config({"tags": {}, "params": flatten_params(stored)}, config)
    torch.save({"config": stored, "histories": [{}], "strategy": {}}, tmp_path / "state.pt")
    assert load_matching_state(tmp_path / "state.pt", config, 1) is not None
    guided = make_config("cmi", "cpu", {"guide": 0.5})
    assert not same_identity(stored, guided) and config_hash(guided) != config_hash(config)
    assert load_matching_state(tmp_path / "state.pt", guided, 1) is None
    assert not same_identity(stored, make_config("cmi", "cpu", {"guide_mix": 0.1}))


def test_tune_searches_the_guide_fields_only_with_a_guide_set():
    cmi, samples = get_method("cmi"), get_method("samples")
    assert "guide" not in cmi.search_space() and {"guide", "lr_d"} <= set(cmi.search_space(guided=True))
    assert samples.requires_guide and not get_method("nayer").GUIDE_SEARCH_SPACE
    for name in GUIDED:
        fields = {f.name for f in dataclasses.fields(get_method(name).Config)}
        assert {"guide", "lr_d", "guide_mix"} <= fields and make_config(name).guide == 0.0
    with pytest.raises(ConfigError, match="guide_mix must be <= 1"):
        make_config("cmi", "smoke", {"guide_mix": 1.5})
    with pytest.raises(ConfigError, match="one_stage=true: guide_mix must be 0"):
        make_config("dfad", "smoke", {"one_stage": True, "g_steps": 1, "guide_mix": 0.5})


def test_a_resumed_search_keeps_its_guide_set():
    from orchestrator import tune
    from orchestrator.cli import UsageError

    started = {"key": {"dataset": "mnist", "teacher": "resnet8", "student": "resnet8", "method": "cmi", "seed": 0,
                       "budget": "smoke", "mode": "paper", "guide": "real:2"}, "fixed": {}}
    assert tune.saved_settings(tune.parse_args(["--resume"]), started, {})["key"].guide == "real:2"
    with pytest.raises(UsageError, match="--guide real:3: this search was started with --guide real:2"):
        tune.saved_settings(tune.parse_args(["--resume", "--guide", "real:3"]), started, {})
