"""run_cli's exit: exit codes, and the objects frozen at a program's end (not in-process)."""
import gc

import pytest

from orchestrator.cli import UsageError, run_cli


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process keeps collecting whatever a test froze


def bad_input(argv):
    raise UsageError("no such thing")


@pytest.mark.parametrize("main,code", [(lambda argv: None, 0), (lambda argv: 1, 1), (bad_input, 2)])
def test_as_the_program_it_freezes_what_is_alive_and_exits_with_the_code(unfrozen, main, code):
    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == code
    assert gc.get_freeze_count() > 0  # the interpreter's last collections skip them


def test_called_in_process_it_leaves_the_collector_alone(unfrozen):
    with pytest.raises(SystemExit) as exc:
        run_cli(bad_input, ["--x"])
    assert exc.value.code == 2 and gc.get_freeze_count() == 0
