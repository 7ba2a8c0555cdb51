"""Sweeps: a 2x2 multirun on tiny-llama shares the disk cache (dense PPL and tokens computed once), its table
builds, a re-run skips finished jobs by config hash, a corrupt cache entry is recomputed with a warning, and
a sweep naming no valid option fails before any job runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def msp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msp", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def job_results(sweep: Path) -> list[dict]:
    return [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One 2x2 sweep shared by the tests below (the expensive part, ~4 tiny runs in one process)."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = msp("--multirun", "model=tiny-llama", "data=tiny", "pruner=magnitude,wanda", "sparsity=0.5,0.7",
               f"hydra.sweep.dir={tmp / 'sweep'}", f"cache_dir={tmp / 'cache'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_jobs_share_the_dense_ppl_and_tokens(sweep):
    res = job_results(sweep / "sweep")
    assert [(r["pruner"], r["target_sparsity"]) for r in res] == [("magnitude", 0.5), ("magnitude", 0.7), ("wanda", 0.5), ("wanda", 0.7)]
    # data=tiny: calibration tokens (book), evaluation tokens (wiki) and the dense PPL on wiki are the
    # sweep-invariant entries: the first job computes all three, every later job reads them back
    assert res[0]["cache"] == {"hits": 0, "misses": 3}
    for r in res[1:]:
        assert r["cache"]["hits"] >= 3
    assert sum(r["cache"]["hits"] for r in res) >= 2  # the minimum, with room to spare
    assert len({r["dense_ppl"]["wiki"] for r in res}) == 1
    assert len(list((sweep / "cache").glob("dense_ppl-*.pt"))) == 1
    assert len({r["config_hash"] for r in res}) == 4


def test_table_from_the_sweep(sweep):
    out = sweep / "tables"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "build_tables.py"), str(sweep / "sweep"),
                           "--name", "grid", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "grid" / "README.md").read_text()
    res = job_results(sweep / "sweep")
    dense = res[0]["dense_ppl"]["wiki"]
    cell = {(r["pruner"], r["target_sparsity"]): f"{r['ppl']['wiki']:.2f}" for r in res}
    assert "| method | 50% | 70% |" in md
    assert f"| dense | {dense:.2f} | {dense:.2f} |" in md
    assert f"| magnitude | {cell[('magnitude', 0.5)]} | {cell[('magnitude', 0.7)]} |" in md
    assert f"| wanda | {cell[('wanda', 0.5)]} | {cell[('wanda', 0.7)]} |" in md
    assert {p.name for p in (out / "grid").iterdir()} >= {"README.md", "ppl_wiki.csv", "runs.csv", "ppl_tiny-llama_wiki.png", "layers_tiny-llama.png"}


def test_rerun_with_skip_done_skips_every_finished_job(sweep):
    before = {i: (sweep / "sweep" / str(i) / "results.json").stat().st_mtime_ns for i in range(4)}
    # another logger and cache folder do not change a run's numbers, so they do not change its hash
    proc = msp("--multirun", "model=tiny-llama", "data=tiny", "pruner=magnitude,wanda", "sparsity=0.5,0.7", "skip_done=true",
               f"hydra.sweep.dir={sweep / 'sweep'}", f"cache_dir={sweep / 'other-cache'}", cwd=sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished") + proc.stderr.count("already finished") == 4
    assert before == {i: (sweep / "sweep" / str(i) / "results.json").stat().st_mtime_ns for i in range(4)}
    assert not (sweep / "other-cache").exists()  # nothing was computed


def test_corrupt_cache_entry_is_recomputed_with_a_warning(sweep, caplog):
    import logging

    import torch
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.run import run

    dense = job_results(sweep / "sweep")[0]["dense_ppl"]["wiki"]
    (entry,) = (sweep / "cache").glob("dense_ppl-*.pt")
    entry.write_bytes(entry.read_bytes()[:20])  # a half-written file
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny-llama", "data=tiny", "pruner=magnitude", f"cache_dir={sweep / 'cache'}"])
    with caplog.at_level(logging.WARNING, logger="msp.cache"):
        res = run(spec_from_config(cfg), sweep / "again")
    assert "is corrupt" in caplog.text and "recomputing" in caplog.text
    assert res["dense_ppl"]["wiki"] == pytest.approx(dense, rel=1e-6)
    assert res["cache"] == {"hits": 2, "misses": 1}  # tokens still hit; the dense PPL was recomputed
    assert float(torch.load(entry, weights_only=False)) == pytest.approx(dense, rel=1e-6)  # and rewritten whole


def test_sweep_naming_no_valid_option_fails_before_any_job(tmp_path):
    proc = msp("--multirun", "model=tiny-llama", "data=tiny", "pruner=magnitude,wandaa", f"hydra.sweep.dir={tmp_path / 'sw'}",
               f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'pruner/wandaa'" in proc.stderr and "wanda" in proc.stderr.split("Available options")[1]
    assert not list(tmp_path.rglob("results.json"))


def test_config_hash_ignores_output_only_keys():
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR
    from msp.sweep import config_hash_of

    def digest(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return config_hash_of(compose(config_name="config", overrides=["model=tiny-llama", *overrides]))

    base = digest("cache_dir=/a")
    assert digest("cache_dir=/b", "logger=wandb", "skip_done=true", "use_cache=false") == base
    assert digest("cache_dir=/a", "sparsity=0.7") != base
    assert digest("cache_dir=/a", "pruner=magnitude") != base


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        par = compose(config_name="config", overrides=["hydra/launcher=parallel", "cache_dir=/x"], return_hydra_config=True)
        slurm = compose(config_name="config", overrides=["hydra/launcher=slurm", "cache_dir=/x"], return_hydra_config=True)
    assert par.hydra.launcher._target_.endswith("JoblibLauncher") and par.hydra.launcher.n_jobs == 2
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.gpus_per_node == 1


def test_grid_calls_with_other_sparsities_into_one_sweep_folder_keep_every_run(tmp_path):
    """experiment=allocation_grid names a job's folder by its overrides: a second call with another sparsity into the
    same sweep folder adds its runs instead of overwriting job 0's."""
    sweep = tmp_path / "sweep"
    for sparsity in ("0.5", "0.6"):
        proc = msp("--multirun", "experiment=allocation_grid", "model=tiny-llama", "data=tiny", "pruner=magnitude",
                   "allocation=uniform", f"sparsity={sparsity}", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}",
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.parent.name for p in sweep.rglob("results.json"))
    assert folders == ["allocation=uniform,data=tiny,sparsity=0.5", "allocation=uniform,data=tiny,sparsity=0.6"]
    got = {json.loads((sweep / f / "results.json").read_text())["target_sparsity"] for f in folders}
    assert got == {0.5, 0.6}
