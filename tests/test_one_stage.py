"""One-stage adversarial updates (`one_stage=true`, DFAD and ZSKT): a joint step has the
gradients of the two stages it replaces, a cell runs and resumes exactly in one process and
runs on Ray, and impossible settings are refused with one line.

    .venv/bin/python -m pytest tests/test_one_stage.py -q
"""
import copy
from pathlib import Path

import pytest
import torch

from benchmarks.datasets import ImageSet, get_dataset_spec
from methods import ConfigError, ImageSpec, create_synthesizer, make_config
from models import create_model
from orchestrator import distill as distill_cli
from orchestrator.core.cell import CellKey, CellSpec, run_in_process
from orchestrator.core.loop import InProcess, RoundLoop, Trainer

SPEC = ImageSpec(10, 1, 32, (0.2860,), (0.3530,))
# Two rounds per epoch of 2 KD steps: one joint step, then one ordinary KD step.
CELL = {"one_stage": "true", "g_steps": "1", "kd_steps": "2", "ep_steps": "4"}


def eval_set() -> ImageSet:
    return ImageSet(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                    get_dataset_spec("mnist"), Path("."))


@pytest.mark.parametrize("method", ["dfad", "zskt"])
def test_a_joint_step_has_the_gradients_of_the_two_stages(method):
    """Same parameters, z and batch: the generator's gradient from the reversed image
    gradient is that of its own step on adv * -KD (student in train mode, as in the joint
    step), and the student's gradient is that of a KD step on the same images."""
    cfg = make_config(method, "smoke", {"one_stage": True, "g_steps": 1, "adv": 0.5})  # adv != 1: scaled
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10, in_channels=1, image_size=32).eval()
    student = create_model("resnet8", 10, in_channels=1, image_size=32)
    synth = create_synthesizer(method, teacher, student, cfg, SPEC)
    trainer = Trainer(teacher, student, cfg, eval_set(), SPEC)
    ref_student = copy.deepcopy(student)
    ref_synth = create_synthesizer(method, teacher, ref_student, cfg, SPEC)
    ref_synth.generator.load_state_dict(synth.generator.state_dict())
    ref_trainer = Trainer(teacher, ref_student, cfg, eval_set(), SPEC)

    torch.manual_seed(1)
    images = synth.begin_joint()
    terms, grad = trainer.joint_step(images)
    synth_terms = synth.end_joint(grad, terms["loss"])

    # The two stages, on the same z: the generator's step (the method's own loss terms),
    # then the student's KD step on the same images.
    torch.manual_seed(1)
    z = torch.randn(cfg.synthesis_batch_size, cfg.latent_dim)
    ref_synth.generator.train()
    ref_student.train()
    ref_images = ref_synth.generator(z)
    x = SPEC.normalize(ref_images)
    t_logits, t_features = teacher(x, return_features=True)
    total = ref_synth.weighted_total(ref_synth.loss_terms(x, t_logits, t_features, None))
    total.backward(inputs=list(ref_synth.generator.parameters()))
    ref_kd = ref_trainer.kd_steps(lambda n: ref_images.detach(), steps=1)

    torch.testing.assert_close(images, ref_images.detach(), rtol=0, atol=0)
    for name, (p, q) in zip(dict(synth.generator.named_parameters()),
                            zip(synth.generator.parameters(), ref_synth.generator.parameters())):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=f"generator {name}")
    assert any(p.grad.abs().max() > 1e-4 for p in synth.generator.parameters())  # not vacuous
    for name, (p, q) in zip(dict(student.named_parameters()), zip(student.parameters(), ref_student.parameters())):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=f"student {name}")
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # the same SGD step
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient accumulates
    assert terms["loss"] == pytest.approx(ref_kd["loss"], rel=1e-5)
    assert synth_terms["adv"] == pytest.approx(-terms["loss"]) and synth_terms["adv"] == pytest.approx(
        float(total.detach()) / 0.5, rel=1e-5)
    assert synth_terms["total"] == pytest.approx(0.5 * synth_terms["adv"])
    assert synth.images_synthesized == cfg.synthesis_batch_size


def cell(tiny_mnist, method="dfad", overrides=None, mode="paper"):
    key = CellKey("mnist", "resnet8", "resnet8", method, 0, "smoke", mode)
    return CellSpec.build(key, {**CELL, **(overrides or {})}, tiny_mnist / "teachers" / "mnist-resnet8.pt",
                          str(tiny_mnist / "data"))


def test_a_one_stage_cell_runs_and_resumes_with_the_same_history(tiny_mnist, tmp_path):
    spec = cell(tiny_mnist, overrides={"epochs": "3"})
    run = lambda **kw: run_in_process(spec, tmp_path / spec.key.slug, log=lambda *_: None, **kw)  # noqa: E731
    whole = run(resume=False).history
    assert whole.status == "finished"
    assert {"synth/adv", "synth/total", "kd/loss"} <= set(whole.losses)
    assert whole.images_synthesized == [16, 32, 48]  # one batch of 8 per round, as two stages count
    assert all(s > 0 for s in whole.synthesis_seconds) and all(s > 0 for s in whole.kd_seconds)

    def killed_after_first_epoch(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(resume=False, on_epoch=killed_after_first_epoch)
    seen = []
    again = run(on_epoch=lambda e, m: seen.append(e)).history
    assert seen == [2, 3]
    assert again.accuracy == whole.accuracy and again.losses == whole.losses


def test_with_only_joint_steps_the_generator_reports_minus_the_students_loss(tiny_mnist, tmp_path):
    """kd_steps = g_steps = 1: every KD step is a joint step, so the generator's adversarial
    term is exactly minus the student's KD loss (two stages evaluate it on another batch,
    with the student in eval mode)."""
    spec = cell(tiny_mnist, "zskt", {"kd_steps": "1", "ep_steps": "2"})
    h = run_in_process(spec, tmp_path / spec.key.slug, log=lambda *_: None).history
    assert h.status == "finished"
    assert h.losses["synth/adv"][0] == pytest.approx(-h.losses["kd/loss"][0], rel=1e-6)


def test_a_one_stage_cell_runs_on_ray(tiny_mnist, tmp_path):
    """The same loop through RayStrategy: two joint steps per round across the synthesizer
    and trainer actors (images and image gradients between them), then the round's third KD
    step on images shipped through the store."""
    import ray

    from orchestrator.runtime.driver import Resources, Stream, StreamRunner

    spec = cell(tiny_mnist, overrides={"g_steps": "2", "kd_steps": "3", "ep_steps": "6"})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runner = StreamRunner(Stream([spec]), tmp_path, Resources(cpus_per_actor=1.0, node_cpus=2), "cpu",
                              log=lambda *_: None)
        (result,) = runner.run()
    finally:
        ray.shutdown()
    h = result.history
    assert h.status == "finished", h.status
    assert h.images_synthesized == [16]  # one batch of 8 per round of two joint steps
    assert {"synth/adv", "synth/total", "kd/loss"} <= set(h.losses)
    assert h.synthesis_seconds[0] > 0 and h.kd_seconds[0] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--method", "dafl"], "unknown setting 'one_stage' for DAFLConfig"),
    (["--method", "dfad"], "one_stage=true: g_steps (2) must not exceed kd_steps (1)"),  # the smoke budget
    (["--method", "zskt", "--set", "g_steps=1", "--set", "kd_criterion=kl+crd"], "one_stage=true: kd_criterion"),
    (["--method", "dfad", "--set", "g_steps=1", "--set", "batch_size=4"],
     "synthesis_batch_size (8) must equal batch_size (4)"),
])
def test_impossible_one_stage_settings_are_refused_with_one_line(argv, needle, tmp_path, capsys):
    from orchestrator.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(distill_cli.main, [*argv, "--budget", "smoke", "--set", "one_stage=true", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1, err


def test_a_shared_stream_of_several_students_is_refused(tiny_mnist):
    """The generator of a shared stream plays against the students' mean logits: no single
    student's loss for a joint step to share."""
    cfg = make_config("dfad", "smoke", {"one_stage": True, "g_steps": 1})
    teacher = create_model("resnet8", 10, in_channels=1, image_size=32).eval()
    students = [create_model("resnet8", 10, in_channels=1, image_size=32) for _ in range(2)]
    synth = create_synthesizer("dfad", teacher, students[0], cfg, SPEC)
    strategy = InProcess(synth, [Trainer(teacher, s, cfg, eval_set(), SPEC) for s in students])
    with pytest.raises(ConfigError, match="one_stage=true .* 2 students .*--mode paper"):
        RoundLoop(strategy, cfg, n_students=2)


@pytest.mark.parametrize("argv, needle", [(["--method", "dafl"], "unknown setting 'one_stage'"),
                                          (["--g-steps", "6"], "g_steps (6) must not exceed kd_steps (5)"),
                                          (["--repeats", "0"], "--repeats")])
def test_the_one_stage_benchmark_refuses_bad_input_with_one_line(argv, needle, capsys):
    """Its figure is measured by running it, never in tests (docs/methods.md)."""
    from orchestrator.perf import one_stage

    assert one_stage.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and err.count("\n") == 1


def test_the_bench_refuses_one_stage_in_a_shared_stream_before_starting(tiny_mnist, tmp_path, capsys):
    import ray

    from orchestrator import bench as bench_cli
    from orchestrator.cli import run_cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_cli(bench_cli.main, ["--datasets", "mnist", "--pairs", "resnet8:resnet8,resnet8:wrn16_1",
                                 "--methods", "dfad", "--mode", "shared", "--budget", "smoke",
                                 "--set", "one_stage=true", "--set", "g_steps=1",
                                 "--data-root", str(tiny_mnist / "data"), "--teacher-dir",
                                 str(tiny_mnist / "teachers"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "a stream of 2 students (shared mode)" in err and "--mode paper" in err
    assert err.count("\n") == 1 and not out.exists() and not ray.is_initialized()
