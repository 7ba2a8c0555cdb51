"""W&B logging: an offline run writes its files (no network, no login) with the run's metrics, per-layer table and
allocation artifact; a logger that raises never loses results.json; bad logger settings fail in one line."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wandb_offline_run_writes_its_files(tmp_path):
    run_dir = tmp_path / "run"
    env_free = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB_")}  # no key, no mode
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "model=tiny-llama", "data=tiny", "logger=wandb", "experiment=smollm2_table",
         "zeroshot=none", "allocation=owl", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**env_free, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    run_id = offline[0].name.rsplit("-", 1)[1]
    blob = (offline[0] / f"run-{run_id}.wandb").read_bytes()
    # the protobuf log holds the summary keys, the group (experiment), the tags and the artifact by name
    for needle in ("ppl/wiki", "dense_ppl/wiki", "timings/prune", "smollm2_table", "tiny-llama", "owl", f"allocation-{run_id}"):
        assert needle.encode() in blob, needle
    # the per-layer table: one row per pruned layer, values exactly those in results.json
    tables = sorted((offline[0] / "files" / "media" / "table").glob("layers_*.table.json"))
    assert tables, "per-layer table missing"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["index", "name", "params", "sensitivity", "target", "measured"]
    assert [r[1] for r in table["data"]] == [l["name"] for l in res["layers"]]
    assert [r[5] for r in table["data"]] == pytest.approx([l["measured"] for l in res["layers"]])
    assert any(r[3] is not None for r in table["data"])  # owl records a per-layer sensitivity
    assert (offline[0] / "files" / "results.json").exists()


def test_results_survive_a_logger_exception(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.run import run
    from msp.tracking import SafeTracker
    from msp.tracking_wandb import WandbTracker

    class Exploding(WandbTracker):
        def log_results(self, results, run_dir):
            super().log_metrics({"started": 1})
            raise RuntimeError("W&B backend fell over")

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny-llama", "data=tiny", f"cache_dir={tmp_path / 'cache'}"])
    spec = spec_from_config(cfg)
    tracker = SafeTracker(Exploding(mode="offline"))
    tracker.start({"x": 1}, tmp_path / "run", name="t", group="g", tags=["tiny-llama"])
    with caplog.at_level(logging.WARNING, logger="msp.tracking"):
        results = run(spec, tmp_path / "run", tracker)
    tracker.finish()  # after a failure: a no-op, never raises
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["ppl"] == results["ppl"] and on_disk["sparsity"] == results["sparsity"]
    assert tracker.failed
    assert "W&B backend fell over" in caplog.text and "results on disk are unaffected" in caplog.text


def test_bad_logger_settings_fail_in_one_line():
    from msp.tracking import make_tracker
    from msp.tracking_wandb import TrackerError

    with pytest.raises(TrackerError, match=r"logger.mode='sometimes'; valid: offline, online, disabled"):
        make_tracker({"name": "wandb", "mode": "sometimes"})
    assert issubclass(TrackerError, ValueError)  # the cli turns it into one "msp: error:" line and exit code 2
    with pytest.raises(ValueError, match="valid: none, wandb"):
        make_tracker({"name": "tensorboard"})


def test_summary_metrics_flattens_numbers_only():
    from msp.tracking_wandb import summary_metrics

    res = {"dense_ppl": {"wiki": 10.0}, "ppl": {"wiki": 12.5}, "timings": {"prune": 1.5}, "sparsity": 0.5,
           "target_sparsity": 0.5, "zeroshot": {"boolq": {"acc": 0.6}, "mean": 0.6}, "cache": {"hits": 3, "misses": 0},
           "model": "tiny-llama", "peak_memory_bytes": 10}
    assert summary_metrics(res) == {
        "dense_ppl/wiki": 10.0, "ppl/wiki": 12.5, "timings/prune": 1.5, "cache/hits": 3, "cache/misses": 0,
        "zeroshot/boolq/acc": 0.6, "zeroshot/mean": 0.6, "sparsity": 0.5, "target_sparsity": 0.5, "peak_memory_bytes": 10,
    }
