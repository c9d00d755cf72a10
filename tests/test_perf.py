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
