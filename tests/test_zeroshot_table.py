"""experiments/zeroshot_table.py: mean accuracy ± sqrt(Σ stderr²)/T next to perplexity, from hand-made results.json files."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("boolq", "rte", "arc_easy")


def fake_run(folder: Path, pruner: str, allocation: str, sparsity: float, accs: list[float], ses: list[float], ppl: float) -> None:
    folder.mkdir(parents=True)
    zs = {t: {"acc": a, "acc_stderr": e} for t, a, e in zip(TASKS, accs, ses)}
    dense = {t: {"acc": 0.6, "acc_stderr": 0.03} for t in TASKS}
    res = {"model": "m", "pruner": pruner, "allocation": allocation, "pattern": "unstructured", "target_sparsity": sparsity,
           "sparsity": sparsity, "ppl": {"wiki": ppl}, "dense_ppl": {"wiki": 20.0}, "config_hash": folder.name,
           "zeroshot": {**zs, "mean": sum(accs) / len(accs)}, "dense_zeroshot": {**dense, "mean": 0.6},
           "zeroshot_source": {"limit": 500, "tasks": {t: {"source": "embedded", "split": "validation"} for t in TASKS}},
           "timings": {"total": 3600.0, "zeroshot": 1800.0}}
    (folder / "results.json").write_text(json.dumps(res))


def test_mean_stderr_is_the_error_of_a_mean_of_independent_tasks():
    sys.path.insert(0, str(ROOT / "experiments"))
    from zeroshot_table import mean_stderr

    assert mean_stderr([0.03, 0.04]) == pytest.approx(0.025)  # sqrt(9e-4 + 16e-4) / 2
    assert mean_stderr([0.02] * 4) == pytest.approx(0.01)
    assert math.isnan(mean_stderr([]))


def test_table_rows_means_and_errors(tmp_path):
    fake_run(tmp_path / "runs" / "a", "wanda", "uniform", 0.5, [0.5, 0.6, 0.7], [0.03, 0.04, 0.05], 40.0)
    fake_run(tmp_path / "runs" / "b", "wanda", "owl", 0.5, [0.55, 0.6, 0.65], [0.03, 0.03, 0.03], 35.0)
    proc = subprocess.run([sys.executable, "experiments/zeroshot_table.py", str(tmp_path / "runs"), "--model", "m",
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out" / "zeroshot_m"
    rows = {r["method"]: r for r in csv.DictReader((out / "zeroshot_m.csv").open())}
    assert list(rows) == ["dense", "wanda", "wanda + owl"]
    assert rows["dense"]["n_runs"] == "1"  # the same cached dense evaluation in both runs counts once
    assert float(rows["dense"]["mean_stderr"]) == pytest.approx(math.sqrt(3 * 0.03 ** 2) / 3)
    assert float(rows["wanda"]["mean"]) == pytest.approx(0.6)
    assert float(rows["wanda"]["mean_stderr"]) == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2 + 0.05 ** 2) / 3)
    assert float(rows["wanda + owl"]["ppl_wiki"]) == pytest.approx(35.0) and float(rows["dense"]["ppl_wiki"]) == pytest.approx(20.0)
    md = (out / "README.md").read_text()
    assert "| wanda @ 50% | 40.00 | 50.0 ± 3.0 | 60.0 ± 4.0 | 70.0 ± 5.0 | **60.0 ± 2.4** |" in md
    assert "first 500 examples per task" in md and "1.00 h of it in zero-shot" in md
    assert (out / "zeroshot_m.png").stat().st_size > 10_000


def test_archive_keeps_finished_runs_for_the_next_sweep(tmp_path):
    """--archive copies each zero-shot run's results.json to ARCHIVE/<config hash>/ (a later sweep's done_dirs), keeps
    one already there, and the table reads the archive back when the sweep folder is gone."""
    from msp.sweep import find_finished_run

    fake_run(tmp_path / "sweep" / "a", "wanda", "uniform", 0.5, [0.5, 0.6, 0.7], [0.03, 0.04, 0.05], 40.0)
    fake_run(tmp_path / "sweep" / "b", "wanda", "owl", 0.5, [0.55, 0.6, 0.65], [0.03, 0.03, 0.03], 35.0)
    kept = tmp_path / "kept"
    (kept / "b").mkdir(parents=True)
    (kept / "b" / "results.json").write_text((tmp_path / "sweep" / "b" / "results.json").read_text().replace("35.0", "36.0"))

    def table(*paths):
        return subprocess.run([sys.executable, "experiments/zeroshot_table.py", *map(str, paths), "--model", "m",
                               "--out", str(tmp_path / "out"), "--archive", str(kept)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    proc = table(tmp_path / "sweep", kept)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 new run(s) kept" in proc.stdout
    assert (kept / "a" / "results.json").read_text() == (tmp_path / "sweep" / "a" / "results.json").read_text()
    assert "36.0" in (kept / "b" / "results.json").read_text()  # the one already kept is not overwritten
    assert find_finished_run("a", [kept]) == kept / "a" / "results.json"  # what skip_done with done_dirs=[kept] finds

    import shutil
    shutil.rmtree(tmp_path / "sweep")
    proc = table(kept)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "out" / "zeroshot_m" / "zeroshot_m.csv").open())}
    assert list(rows) == ["dense", "wanda", "wanda + owl"] and float(rows["wanda"]["ppl_wiki"]) == pytest.approx(40.0)
