"""The table builder on hand-made fixture runs: exact markdown and CSV, dense reference, averaging of repeats,
zero-shot table, skip_done pointers, de-duplication by config hash, W&B copies ignored, plots written, atomic
replacement of an older output folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "experiments" / "build_tables.py"


def layers(profile: list[float]) -> list[dict]:
    return [{"name": f"model.layers.{i}.mlp.down_proj", "params": 100, "target": s, "measured": s, "pattern": "unstructured"}
            for i, s in enumerate(profile)]


def run(folder: Path, *, pruner: str, allocation: str, sparsity: float, ppl: float, h: str, zs: dict | None = None,
        dense_zs: dict | None = None, search: list | None = None, seed: int = 0) -> Path:
    res = {
        "model": "tiny", "pruner": pruner, "allocation": allocation, "pattern": "unstructured",
        "target_sparsity": sparsity, "sparsity": sparsity, "seed": seed,
        "dense_ppl": {"wiki": 10.0}, "ppl": {"wiki": ppl},
        "layers": layers([sparsity - 0.1, sparsity + 0.1] if allocation != "uniform" else [sparsity, sparsity]),
        "data": {"calibration": "book", "nsamples": 4, "seqlen": 64, "eval_windows": {"wiki": 4}},
        "timings": {"total": 1.0}, "config_hash": h,
    }
    if zs is not None:
        res["zeroshot"] = zs
        res["zeroshot_source"] = {"tasks": {"boolq": {"source": "embedded", "split": "validation", "builtin_split": "validation"},
                                            "arc_easy": {"source": "embedded", "split": "validation", "builtin_split": "test"}},
                                  "limit": 20}
    if dense_zs is not None:
        res["dense_zeroshot"] = dense_zs
    if search is not None:
        res["search"] = {"history": search}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(res))
    return folder / "results.json"


@pytest.fixture
def fixture_runs(tmp_path) -> Path:
    root = tmp_path / "sweep"
    zs = lambda b, a: {"boolq": {"acc": b, "acc_stderr": 0.1}, "arc_easy": {"acc": a, "acc_norm": a + 0.01}, "mean": (a + b) / 2}  # noqa: E731
    run(root / "0", pruner="wanda", allocation="uniform", sparsity=0.5, ppl=12.0, h="a", zs=zs(0.6, 0.5), dense_zs=zs(0.7, 0.6))
    run(root / "1", pruner="wanda", allocation="uniform", sparsity=0.7, ppl=40.0, h="b")
    run(root / "2", pruner="wanda", allocation="owl", sparsity=0.5, ppl=11.0, h="c", zs=zs(0.65, 0.55))
    run(root / "3", pruner="wanda", allocation="owl", sparsity=0.7, ppl=30.0, h="d",
        search=[{"generation": 0, "best": 2.0, "mean": 2.5}, {"generation": 1, "best": 1.5, "mean": 2.0}])
    # a second seed of wanda@0.7 (different hash): averaged with run 1 → 50.0
    run(root / "4", pruner="wanda", allocation="uniform", sparsity=0.7, ppl=60.0, h="e", seed=1)
    # an older run with hash "a" elsewhere: the newer one (run 0) wins
    old = run(tmp_path / "old" / "0", pruner="wanda", allocation="uniform", sparsity=0.5, ppl=999.0, h="a")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    # a skip_done pointer to a finished run outside the sweep folder
    ext = run(tmp_path / "elsewhere" / "0", pruner="magnitude", allocation="uniform", sparsity=0.5, ppl=100.0, h="f")
    (root / "5").mkdir()
    (root / "5" / "skipped.json").write_text(json.dumps({"config_hash": "f", "existing": str(ext)}))
    # W&B's copy of a results.json must not count twice
    (root / "2" / "wandb" / "offline-run-x" / "files").mkdir(parents=True)
    (root / "2" / "wandb" / "offline-run-x" / "files" / "results.json").write_text((root / "2" / "results.json").read_text())
    return tmp_path


EXPECTED_MD = """\
# grid

Built by `experiments/build_tables.py` from 6 runs. Perplexity: lower is better; dense = the unpruned model. Columns are target sparsities.

## tiny

Calibration: book, 4 x 64 tokens. Evaluation windows of 64 tokens: wiki 4.

### Perplexity on wiki

| method | 50% | 70% |
|---|---:|---:|
| dense | 10.00 | 10.00 |
| magnitude | 100.00 | – |
| wanda | 12.00 | 50.00 |
| wanda + owl | 11.00 | 30.00 |

### Run-to-run noise (wiki, calibration seeds)

| method | sparsity | n | mean | sd | per seed |
|---|---:|---:|---:|---:|---:|
| wanda | 70% | 2 | 50.00 | 14.14 | 0: 40.00, 1: 60.00 |

### Zero-shot accuracy

Accuracy (%), 0-shot; first 20 examples per task (zeroshot.limit); data: embedded validation split (lm-eval's default split differs for arc_easy); typical standard error ±10.0 points.

| method | boolq | arc_easy | mean |
|---|---:|---:|---:|
| dense | 70.00 | 60.00 | 65.00 |
| wanda @ 50% | 60.00 | 50.00 | 55.00 |
| wanda + owl @ 50% | 65.00 | 55.00 | 60.00 |
"""


def build(paths: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILD), *map(str, paths), "--name", "grid", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def test_builder_writes_the_expected_markdown_csv_and_plots(fixture_runs):
    out = fixture_runs / "tables"
    (out / "grid").mkdir(parents=True)
    (out / "grid" / "stale.txt").write_text("from an older build")
    proc = build([fixture_runs / "sweep"], out)
    assert proc.returncode == 0, proc.stderr
    folder = out / "grid"
    assert (folder / "README.md").read_text() == EXPECTED_MD
    assert (folder / "ppl_wiki.csv").read_text() == (
        "model,method,50%,70%\n"
        "tiny,dense,10.0,10.0\n"
        "tiny,magnitude,100.0,\n"
        "tiny,wanda,12.0,50.0\n"
        "tiny,wanda + owl,11.0,30.0\n"
    )
    assert (folder / "zeroshot.csv").read_text().splitlines()[:2] == [
        "model,method,boolq,arc_easy,mean", "tiny,dense,70.0,60.0,65.0"]
    assert len((folder / "runs.csv").read_text().splitlines()) == 1 + 6
    for png in ("ppl_tiny_wiki.png", "layers_tiny.png", "search_tiny.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (folder / "stale.txt").exists()  # the old folder was replaced as a whole
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_builder_without_runs_fails_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = build([tmp_path / "empty"], tmp_path / "tables")
    assert proc.returncode == 1 and "no results.json under" in proc.stderr
    assert not (tmp_path / "tables" / "grid").exists()


def test_dedup_keeps_the_newest_run_of_a_config_hash(fixture_runs):
    sys.path.insert(0, str(BUILD.parent))
    try:
        import build_tables
    finally:
        sys.path.pop(0)
    runs = build_tables.load_runs([fixture_runs / "sweep", fixture_runs / "old"])
    a = [r for r in runs if r["config_hash"] == "a"]
    assert len(a) == 1 and a[0]["ppl"]["wiki"] == 12.0
    assert len(runs) == 6


def provenance(torch_version: str = "2.5.0", calibration: str = "c1") -> dict:
    return {"msp_version": "0.1.0", "git": {"revision": "f" * 40, "dirty": False},
            "versions": {"python": "3.11.7", "torch": torch_version, "transformers": "4.0", "lm_eval": None, "datasets": "3.0"},
            "device_name": "cpu model", "seeds": {"seed": 0}, "config_hash": "x",
            "model_sha256": {"source": "state_dict", "sha256": "m" * 64},
            "data_sha256": {"calibration": calibration, "heldout": "h", "evaluation": {"wiki": "w"}}}


def with_provenance(path: Path, prov: dict) -> None:
    res = json.loads(path.read_text())
    path.write_text(json.dumps({**res, "provenance": prov}))


def test_a_table_mixing_versions_or_data_hashes_is_warned_about(tmp_path):
    root = tmp_path / "sweep"
    a = run(root / "0", pruner="wanda", allocation="uniform", sparsity=0.5, ppl=12.0, h="a")
    b = run(root / "1", pruner="wanda", allocation="uniform", sparsity=0.7, ppl=40.0, h="b", seed=1)
    with_provenance(a, provenance())
    with_provenance(b, {**provenance(), "seeds": {"seed": 1}, "config_hash": "y"})  # seeds and hashes may differ
    proc = build([root], tmp_path / "tables", "--no-plots")
    assert proc.returncode == 0 and "mixes runs" not in proc.stderr, proc.stderr
    with_provenance(b, provenance(torch_version="2.6.0", calibration="c2"))
    proc = build([root], tmp_path / "tables", "--no-plots")
    warnings = [line for line in proc.stderr.splitlines() if "mixes runs" in line]
    assert warnings == ["warning: table tiny / perplexity on wiki mixes runs that differ in data_sha256.calibration, versions.torch"]
    (root / "2").mkdir()  # a run from before provenance existed
    run(root / "2", pruner="magnitude", allocation="uniform", sparsity=0.5, ppl=90.0, h="c")
    with_provenance(b, provenance())
    proc = build([root], tmp_path / "tables", "--no-plots")
    assert "differ in provenance (missing in 1 of 3 runs)" in proc.stderr


def _searched(folder: Path, init: str, initial: float, bests: list[float], h: str) -> None:
    path = run(folder, pruner="wanda", allocation="msp", sparsity=0.7, ppl=30.0, h=h,
               search=[{"generation": g, "best": b, "mean": b + 0.1, "evaluations": 10 * g} for g, b in enumerate(bests)])
    res = json.loads(path.read_text())
    res["search"].update(init=init, initial_fitness=initial)
    path.write_text(json.dumps(res))


def test_convergence_table_counts_evaluations_to_within_one_percent_of_the_best(tmp_path):
    _searched(tmp_path / "runs" / "0", "fisher", 2.0, [1.5, 1.2, 1.0, 1.0], "a")
    _searched(tmp_path / "runs" / "1", "uniform", 3.0, [2.5, 1.8, 1.3, 1.005], "b")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_convergence.py"), str(tmp_path / "runs"),
                           "--name", "conv", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["init"]: r for r in __import__("csv").DictReader((out / "conv" / "convergence.csv").open())}
    # fisher reaches 1.0 (<= 1.01 x the best final 1.0) at generation 2 = 20 evaluations; uniform at 1.005 after 30
    assert rows["fisher"]["evaluations_to_within_1pct"] == "20" and rows["uniform"]["evaluations_to_within_1pct"] == "30"
    assert float(rows["uniform"]["start_fitness"]) == 3.0 and float(rows["fisher"]["final_fitness"]) == 1.0
    assert (out / "conv" / "convergence.png").stat().st_size > 5000
    assert "| tiny | wanda | 70% | fisher | 2.0000 | 1.0000 | 30 | 20 |" in (out / "conv" / "convergence.md").read_text()


def test_a_search_that_does_not_start_from_fisher_is_its_own_method(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import build_tables

    assert build_tables.method_of({"pruner": "wanda", "allocation": "msp", "search": {"init": "best"}}) == "wanda + msp (init=best)"
    assert build_tables.method_of({"pruner": "wanda", "allocation": "msp", "search": {"init": "fisher"}}) == "wanda + msp"
    rerank = {"pruner": "wanda", "allocation": "msp", "search": {"init": "fisher", "verify": {"chosen": "start"}}}
    assert build_tables.method_of(rerank) == "wanda + msp (verify=rerank)"  # session 7's check, before modes
    guard = {"pruner": "wanda", "allocation": "msp", "search": {"init": "fisher", "verify": {"mode": "guard"}}}
    assert build_tables.method_of(guard) == "wanda + msp (verify=guard)"
    default = {"pruner": "wanda", "allocation": "msp", "search": {"init": "fisher", "verify": {"mode": "rerank_guard"}}}
    assert build_tables.method_of(default) == "wanda + msp"


def test_the_search_is_compared_with_the_best_baseline_of_each_row_and_allocation_time_is_a_table(tmp_path):
    root = tmp_path / "runs"
    for i, (alloc, ppl, t) in enumerate([("uniform", 40.0, 0.0), ("owl", 30.0, 5.0), ("alpha", 33.0, 12.0), ("msp", 27.0, 300.0)]):
        path = run(root / str(i), pruner="wanda", allocation=alloc, sparsity=0.7, ppl=ppl, h=f"h{i}")
        res = json.loads(path.read_text())
        res["timings"]["allocation"] = t
        path.write_text(json.dumps(res))
    best = run(root / "9", pruner="wanda", allocation="msp", sparsity=0.7, ppl=24.0, h="h9", search=[])
    res = json.loads(best.read_text())
    res["search"]["init"] = "best"
    best.write_text(json.dumps(res))
    run(root / "10", pruner="sparsegpt", allocation="uniform", sparsity=0.7, ppl=20.0, h="h10")  # no search in this row
    proc = build([root], tmp_path / "out", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "out" / "grid" / "README.md").read_text()
    # owl (30) is the best baseline; the better search run (init=best, 24) is 20% below it
    assert "| pruner | sparsity | best baseline | its ppl | msp | msp (init=best) | search vs best baseline |" in md
    assert "| wanda | 70% | owl | 30.00 | 27.00 | 24.00 | -20.0% |" in md
    assert "| sparsegpt | 70% | uniform | 20.00 | – | – | – |" in md
    assert "| wanda + msp | 300 |" in md and "| wanda + owl | 5 |" in md


def test_the_profile_plot_averages_each_block_by_parameters():
    sys.path.insert(0, str(ROOT / "experiments"))
    import build_tables

    layers_ = [{"name": "model.layers.0.self_attn.q_proj", "params": 1, "measured": 0.5},
               {"name": "model.layers.0.mlp.up_proj", "params": 3, "measured": 0.7},
               {"name": "model.layers.1.mlp.up_proj", "params": 2, "measured": 0.2}]
    assert build_tables.block_profile(layers_) == pytest.approx([0.65, 0.2])
    assert build_tables.block_profile([{"name": "lm_head", "params": 1, "measured": 0.3}]) == [0.3]


def test_the_ablation_table_keeps_every_run_apart_with_what_its_command_changed(tmp_path):
    """experiments/ablation_table.py: one row per run, the overrides every run shares printed once, the rest per row,
    each dataset's perplexity, the search's fitness and the verified pick."""
    root = tmp_path / "ablation"
    for name, extra, ppl, heldout in (("a", [], 190.5, 127.3), ("b", ["allocation.verify_tokens=4096"], 180.25, 125.0)):
        f = run(root / name, pruner="sparsegpt", allocation="msp", sparsity=0.7, ppl=ppl, h=name)
        res = json.loads(f.read_text())
        res["ppl"]["heldout"], res["dense_ppl"]["heldout"] = heldout, 40.0
        res["search"] = {"initial_fitness": 1.5584, "best_fitness": 1.3456, "verify": {"chosen": "population[1]"} if extra else None}
        res["timings"]["allocation"] = 1400.0
        f.write_text(json.dumps(res))
        (root / name / ".hydra").mkdir()
        (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ["model=gemma3-270m", "allocation=msp", *extra, "hydra.run.dir=x"]))
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablation_table.py"), str(root), "--name", "abl", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    readme = (out / "abl" / "README.md").read_text()
    assert "Every run: `model=gemma3-270m allocation=msp`" in readme and "hydra.run.dir" not in readme
    assert "| a | `(defaults)` | 190.5 | 127.3 | 1.558 → 1.346 | – | 1400 | 1 |" in readme
    assert "| b | `allocation.verify_tokens=4096` | 180.2 | 125.0 | 1.558 → 1.346 | population[1] | 1400 | 1 |" in readme
    assert "Dense perplexity: wiki 10.00, heldout 40.00" in readme
    rows = (out / "abl" / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("run,changes,ppl_wiki,ppl_heldout") and rows[2].startswith("b,allocation.verify_tokens=4096,180.25,125.0")


def test_a_finalist_of_a_verified_search_becomes_an_allocation_file(tmp_path):
    """experiments/finalist_allocation.py: every layer gets its unit's value from the named finalist's genome (block
    units by prefix, layer units by name), in the format allocation=file reads; a run without verification, or an
    unknown finalist, gets one line."""
    from msp.allocation.base import Allocation

    sys.path.insert(0, str(ROOT / "experiments"))
    from finalist_allocation import finalist_allocation

    layers = ["model.layers.0.q", "model.layers.0.o", "model.layers.1.q", "model.layers.10.q"]
    units = {"model.layers.0": 0.7, "model.layers.1": 0.7, "model.layers.10": 0.7}
    verify = {"chosen": "population[1]", "tokens": 4096, "finalists": [
        {"name": "start", "genome": "0.700 0.700 0.700"}, {"name": "population[0]", "genome": "0.650 0.800 0.750"},
        {"name": "population[1]", "genome": "0.700 0.750 0.650"}]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"target_sparsity": 0.7, "search": {"units": units, "verify": verify}}))
    (run / "allocation.json").write_text(json.dumps({"method": "msp", "target": 0.7, "sparsities": dict.fromkeys(layers, 0.7)}))
    alloc = Allocation.from_json(finalist_allocation(run))
    assert [alloc[n] for n in layers] == [0.65, 0.65, 0.8, 0.75]  # layers.1 is not layers.10's block
    assert [finalist_allocation(run, "population[1]")["sparsities"][n] for n in layers] == [0.7, 0.7, 0.75, 0.65]
    with pytest.raises(SystemExit, match=r"no finalist 'population\[7\]'.*valid: start, population\[0\], population\[1\]"):
        finalist_allocation(run, "population[7]")
    (run / "results.json").write_text(json.dumps({"target_sparsity": 0.7, "search": {"units": units, "verify": None}}))
    with pytest.raises(SystemExit, match="has no verification"):
        finalist_allocation(run)


def test_archive_keeps_every_run_and_the_tables_read_it_back(tmp_path):
    """--archive copies each run's results.json to ARCHIVE/<config hash>/ (a later grid call's done_dirs) and keeps
    one already there; the tables built from the archive alone, once the sweep folder is gone, are the same."""
    from msp.sweep import find_finished_run

    run(tmp_path / "sweep" / "0", pruner="wanda", allocation="uniform", sparsity=0.7, ppl=40.0, h="a")
    run(tmp_path / "sweep" / "1", pruner="wanda", allocation="owl", sparsity=0.7, ppl=30.0, h="b")
    kept = tmp_path / "kept"
    run(kept / "b", pruner="wanda", allocation="owl", sparsity=0.7, ppl=31.0, h="b")

    def build(*paths):
        proc = subprocess.run([sys.executable, str(BUILD), *map(str, paths), "--name", "t", "--out", str(tmp_path / "out"),
                               "--no-plots", "--archive", str(kept)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout, (tmp_path / "out" / "t" / "ppl_wiki.csv").read_text()

    out, _ = build(tmp_path / "sweep")
    assert "1 new run(s) kept" in out
    assert (kept / "a" / "results.json").read_text() == (tmp_path / "sweep" / "0" / "results.json").read_text()
    assert '"wiki": 31.0' in (kept / "b" / "results.json").read_text()  # the one already kept is not overwritten
    assert find_finished_run("a", [kept]) == kept / "a" / "results.json"  # what skip_done with done_dirs=[kept] finds
    import shutil

    shutil.rmtree(tmp_path / "sweep")
    out, table = build(kept)
    assert "0 new run(s) kept" in out and "wanda,40.0\n" in table and "wanda + owl,31.0\n" in table
