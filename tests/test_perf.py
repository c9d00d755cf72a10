"""The speed benchmarks refuse bad input with one line and exit 2 (their figures are
measured by running them, never in tests: docs/results/speed.md)."""
import pytest

from orchestrator.perf import cell_anatomy, step


@pytest.mark.parametrize("argv", [["--methods", "nosuch"], ["--methods", ""], ["--steps", "0"],
                                  ["--compare-tree", "/nonexistent"]])
def test_step_benchmark_bad_input(argv, capsys):
    assert step.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [(["--method", "nosuch"], "unknown method"),
                                          (["--set", "g_steps=0"], "g_steps")])
def test_cell_anatomy_bad_input(argv, needle, capsys, tmp_path):
    assert cell_anatomy.main([*argv, "--teacher-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # refused before the teacher was even looked up


def test_eval_speed_scores_the_whole_split_per_batch_size(tiny_mnist, capsys):
    from orchestrator.perf import eval_speed

    assert eval_speed.main(["--arch", "resnet8", "--dataset", "mnist", "--data-root", str(tiny_mnist / "data"),
                            "--threads", "1", "--batches", "32,16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"resnet8 on 64 images from {tiny_mnist / 'data' / 'mnist'}")
    assert [line.split(":")[0] for line in lines[1:]] == ["batch    32", "batch    16"]
    assert lines[1].endswith("1.00x")


@pytest.mark.parametrize("extra,needle", [(["--batches", "x"], "comma list"), (["--arch", "nosuch"], "unknown model")])
def test_eval_speed_bad_input_is_one_line_and_exit_2(tiny_mnist, capsys, extra, needle):
    from orchestrator.cli import run_cli
    from orchestrator.perf import eval_speed

    with pytest.raises(SystemExit) as exc:
        run_cli(eval_speed.main, ["--dataset", "mnist", "--data-root", str(tiny_mnist / "data"), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err
