"""report_merge: several bench --out folders into one table, variants under their own labels."""
import subprocess
import sys

import pandas as pd
import pytest

from orchestrator.core.cell import CellKey
from orchestrator.report import long_rows
from orchestrator.report_merge import main


def bench_folder(path, method, accs, synth):
    rows = []
    for seed, (acc, s) in enumerate(zip(accs, synth)):
        key = CellKey("fashion-mnist", "wrn16_2", "wrn16_1", method, seed)
        rows += long_rows(key, "finished", {"accuracy": acc, "synthesis_seconds": s})
    path.mkdir()
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    return path


def test_merged_table_keeps_each_variant_as_its_own_row_with_mean_and_std(tmp_path, capsys):
    plain = bench_folder(tmp_path / "plain", "cmi", [80.0, 82.0, 78.0], [270.0, 280.0, 290.0])
    crd = bench_folder(tmp_path / "crd", "cmi", [81.0, 83.0, 82.0], [275.0, 285.0, 280.0])
    out = tmp_path / "merged"
    assert main([str(plain), f"{crd}=CMI +CRD", "--out", str(out)]) == 0
    table = (out / "table_fashion-mnist.md").read_text()
    assert "| CMI " in table and "80.00 ± 2.00" in table
    assert "| CMI +CRD " in table and "82.00 ± 1.00" in table
    assert (out / "accuracy_vs_synthesis_fashion-mnist.png").stat().st_size > 0
    merged = pd.read_csv(out / "results.csv")
    assert set(merged.row) == {"CMI", "CMI +CRD"} and len(merged) == 12


@pytest.mark.parametrize("args, needle", [
    (["{plain}", "{plain}"], "appears in more than one folder"),
    (["{both}=X"], "a label renames a folder of one row"),
    (["{missing}"], "no results.csv there"),
])
def test_bad_sources_are_one_line_and_exit_2(tmp_path, args, needle):
    plain = bench_folder(tmp_path / "plain", "cmi", [80.0], [270.0])
    both = bench_folder(tmp_path / "both", "cmi", [80.0], [270.0])
    pd.concat([pd.read_csv(both / "results.csv"),
               pd.read_csv(bench_folder(tmp_path / "f", "fast", [79.0], [20.0]) / "results.csv")]
              ).to_csv(both / "results.csv", index=False)
    paths = {"plain": plain, "both": both, "missing": tmp_path / "nowhere"}
    argv = [a.format(**paths) for a in args] + ["--out", str(tmp_path / "merged")]
    proc = subprocess.run([sys.executable, "-m", "orchestrator.report_merge", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_untimed_cells_keep_their_accuracy_and_lose_their_seconds(tmp_path):
    plain = bench_folder(tmp_path / "plain", "cmi", [80.0, 82.0, 78.0], [900.0, 280.0, 290.0])
    out = tmp_path / "merged"
    assert main([str(plain), "--untimed", "CMI:0", "--out", str(out)]) == 0
    merged = pd.read_csv(out / "results.csv")
    assert len(merged[merged.metric == "accuracy"]) == 3  # every seed's accuracy stays
    assert sorted(merged[merged.metric == "synthesis_seconds"].value) == [280.0, 290.0]
    table = (out / "table_fashion-mnist.md").read_text()
    assert "80.00 ± 2.00" in table and "285" in table and "490" not in table  # mean of the timed seeds only


def test_untimed_must_name_a_cell(tmp_path):
    plain = bench_folder(tmp_path / "plain", "cmi", [80.0], [270.0])
    proc = subprocess.run([sys.executable, "-m", "orchestrator.report_merge", str(plain), "--untimed", "CMI:7",
                           "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such cell" in proc.stderr


def test_a_row_without_synthesis_seconds_is_in_the_table_but_not_the_plot(tmp_path):
    plain = bench_folder(tmp_path / "plain", "cmi", [80.0, 82.0], [270.0, 280.0])
    graft = tmp_path / "graft"
    graft.mkdir()
    key = CellKey("fashion-mnist", "wrn16_2", "wrn16_1", "netgraft", 0)
    pd.DataFrame(long_rows(key, "finished", {"accuracy": 70.0, "wall_seconds": 150.0}, row="NetGraft")).to_csv(
        graft / "results.csv", index=False)
    out = tmp_path / "merged"
    assert main([str(plain), str(graft), "--out", str(out)]) == 0
    table = (out / "table_fashion-mnist.md").read_text()
    assert "| NetGraft " in table and "70.00" in table
    assert (out / "accuracy_vs_synthesis_fashion-mnist.png").stat().st_size > 0
