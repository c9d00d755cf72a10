"""The speed benchmarks refuse bad input with one line and exit 2 (their figures are
measured by running them, never in tests: docs/results/speed.md)."""
import re

import pytest
import torch

from orchestrator.perf import cell_anatomy, step


@pytest.mark.parametrize("argv", [["--methods", "nosuch"], ["--methods", ""], ["--steps", "0"],
                                  ["--compare-tree", "/nonexistent"]])
def test_step_benchmark_bad_input(argv, capsys):
    assert step.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [(["--method", "nosuch"], "unknown method"),
                                          (["--set", "g_steps=0"], "g_steps"),
                                          (["--pairs", "0"], "--pairs")])
def test_cell_anatomy_bad_input(argv, needle, capsys, tmp_path):
    assert cell_anatomy.main([*argv, "--teacher-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # refused before the teacher was even looked up


def test_eval_speed_scores_the_whole_split_per_batch_size(tiny_mnist, capsys):
    from orchestrator.perf import eval_speed

    assert eval_speed.main(["--arch", "resnet8", "--dataset", "mnist", "--data-root", str(tiny_mnist / "data"),
                            "--threads", "1", "--batches", "32,16", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"resnet8 on 64 images from {tiny_mnist / 'data' / 'mnist'}")
    assert [line.split(":")[0] for line in lines[1:3]] == ["batch    32", "batch    16"]
    assert lines[1].endswith("1.00x")
    # Then the plain model, its BN-folded copy and its inference copy: the same accuracy on
    # the same images.
    assert lines[3] == "batch    16, median of 1 alternating rounds:"
    assert [line.split()[0] for line in lines[4:7]] == ["plain", "folded", "inference"]
    accuracies = {re.search(r"\(([\d.]+)%\)", line).group(1) for line in lines[4:7]}
    assert len(accuracies) == 1


@pytest.mark.parametrize("extra,needle", [(["--batches", "x"], "comma list"), (["--arch", "nosuch"], "unknown model")])
def test_eval_speed_bad_input_is_one_line_and_exit_2(tiny_mnist, capsys, extra, needle):
    from orchestrator.cli import run_cli
    from orchestrator.perf import eval_speed

    with pytest.raises(SystemExit) as exc:
        run_cli(eval_speed.main, ["--dataset", "mnist", "--data-root", str(tiny_mnist / "data"), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err


def test_chunked_teacher_pass_recombines_to_the_one_pass_statistics_and_gradient(capsys):
    from orchestrator.perf import chunking

    assert chunking.main(["--arch", "resnet8", "--batch", "8", "--chunks", "8,4,2", "--threads", "1",
                          "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    diffs = [line for line in out.splitlines() if line.startswith("chunk")]
    assert len(diffs) == 3
    for line in diffs:  # same mathematics: the merged statistics give the one-pass loss and gradient
        loss = float(line.split("one pass| ")[1].split(",")[0])
        grad = float(line.split("difference ")[1].split(" ")[0])
        assert loss < 1e-5 and grad < 1e-5, line
    assert "| 2 |" in out


@pytest.mark.parametrize("extra", [["--chunks", "x"], ["--chunks", "0"], ["--arch", "nosuch"]])
def test_chunking_bad_input_is_one_line_and_exit_2(capsys, extra):
    from orchestrator.cli import run_cli
    from orchestrator.perf import chunking

    with pytest.raises(SystemExit) as exc:
        run_cli(chunking.main, extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and "Traceback" not in err


def test_flop_count_sees_the_inference_copys_fused_convolutions():
    """perf.step's GFLOP columns: the KD teacher runs as the inference copy, whose fused
    convolutions the flop counter does not know unless perf.step teaches it."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import create_model, inference_copy
    from models.fuse import POINTWISE, fused_count

    model = create_model("wrn16_1", 10, in_channels=1, image_size=32).eval()
    fast = inference_copy(model)
    x = torch.rand(2, 1, 32, 32)

    def flops(net):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        return counter.get_total_flops()

    step.count_fused_convolutions()
    step.count_fused_convolutions()  # a second call (a second benchmark row) registers nothing twice
    assert flops(fast) == flops(model) > 0
    assert POINTWISE is None or fused_count(fast) > 0  # traced on the first call: fused convs were counted


def test_cell_anatomy_reports_each_pairs_ratio_and_their_mean_and_std(capsys):
    def row(kd, synthesis, wall):
        parts = {k: 0.0 for k in cell_anatomy.PARTS}
        parts.update(kd_seconds=kd, synthesis_seconds=synthesis, other_seconds=0.0, wall_seconds=wall,
                     invocation_seconds=wall, kd_per_step=kd / 10)
        parts["outside_share"] = 1 - (kd + synthesis) / wall
        return parts

    pairs = [{"distill": row(10.0, 20.0, 40.0), "bench": row(11.0, 20.0, 40.0)},
             {"distill": row(10.0, 20.0, 40.0), "bench": row(9.0, 20.0, 40.0)}]
    cell_anatomy.report(pairs, "header")
    lines = {line.split()[0] + (" " + line.split()[1] if line.startswith("KD") else ""): line
             for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["kd"].split()[1:] == ["10.0", "10.0", "1.10", "0.90", "1.00", "±", "0.14"]
    assert lines["KD s/step"].split()[2:] == ["1.000", "1.000", "1.10", "0.90", "1.00", "±", "0.14"]
    assert lines["outside"].endswith("distill 25.0% ± 0.0%, bench 25.0% ± 3.5% of the cell")
