"""Run and sweep pictures (msp.report): the files are written, the PNG is a real picture, the markdown holds the
run's own numbers, a run without search or sensitivity still renders, and ``import msp.report`` stays light."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msp.report import ReportError, load_run, main, render_run, render_sweep
from conftest import run_tiny_msp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory) -> Path:
    """A real tiny-llama run with the msp search (sensitivity.json, allocation.json, search history)."""
    return run_tiny_msp(tmp_path_factory.mktemp("run"), "allocation=msp", "allocation.generations=2")


def _png_facts(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a PNG, decoded with matplotlib's reader."""
    from matplotlib import image

    pixels = image.imread(str(path))
    flat = (pixels[..., :3] * 255).round().astype("uint8").reshape(-1, 3)
    return pixels.shape[1], pixels.shape[0], len({tuple(p) for p in flat[:: max(1, len(flat) // 200_000)]})


def _assert_picture(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 20_000, f"{path}: {path.stat().st_size if path.exists() else 0} bytes"
    width, height, colours = _png_facts(path)
    assert width > 600 and height > 400
    assert colours > 50, f"only {colours} distinct colours: an empty page?"


def _minimal_run(folder: Path, *, ppl: float = 31.25, dense: float = 20.5, with_eval: bool = True) -> Path:
    """A results.json with the fields msp.run writes, no allocation/sensitivity files and no search."""
    folder.mkdir(parents=True)
    layers = [{"name": f"model.layers.{b}.{kind}", "params": 64 * 64, "target": 0.5, "measured": 0.5, "pattern": "unstructured"}
              for b in range(3) for kind in ("self_attn.q_proj", "mlp.down_proj")]
    results = {"model": "tiny-llama", "pruner": "wanda", "pattern": "unstructured", "allocation": "uniform", "target_sparsity": 0.5,
               "sparsity": 0.5, "dense_ppl": {"wiki": dense} if with_eval else {}, "ppl": {"wiki": ppl} if with_eval else {},
               "layers": layers, "data": {"calibration": "book", "nsamples": 4, "seqlen": 64}, "timings": {"total": 1.5}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_run_summary_png_and_markdown_hold_the_runs_numbers(searched_run):
    png, md = render_run(searched_run)
    assert png == searched_run / "summary.png" and md == searched_run / "summary.md"
    _assert_picture(png)
    results = json.loads((searched_run / "results.json").read_text())
    allocation = json.loads((searched_run / "allocation.json").read_text())
    sensitivity = json.loads((searched_run / "sensitivity.json").read_text())
    text = md.read_text()
    assert "![run summary](summary.png)" in text
    for name, value in results["ppl"].items():
        assert f"| {name} | {results['dense_ppl'][name]:.3f} | {value:.3f} |" in text
    assert f"| measured sparsity | {results['sparsity']:.4f} |" in text
    for h in results["search"]["history"]:
        assert f"| {h['generation']} | {h['best']:.6g} | {h['mean']:.6g} |" in text
    for layer in results["layers"]:
        row = f"| {layer['name']} | {layer['name'].rsplit('.', 1)[-1]} | {layer['params']} | {allocation['sparsities'][layer['name']]:.4f} |"
        assert row in text
        assert f"{sensitivity['layers'][layer['name']]:.3e}" in text
    assert not list(searched_run.glob(".summary*")), "temporary files left behind"


def test_loaded_facts_follow_the_files(searched_run):
    facts = load_run(searched_run)
    assert facts.sensitivity_method == json.loads((searched_run / "sensitivity.json").read_text())["method"]
    assert {l.kind for l in facts.layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert [l.block for l in facts.layers[:8]] == [0] * 7 + [1]
    assert len(facts.history) == len(json.loads((searched_run / "results.json").read_text())["search"]["history"])


def test_run_without_search_or_sensitivity_still_renders(tmp_path):
    run = _minimal_run(tmp_path / "plain")
    png, md = render_run(run, tmp_path / "out")
    assert png.parent == tmp_path / "out"
    _assert_picture(png)
    text = md.read_text()
    assert "| wiki | 20.500 | 31.250 | 1.524 |" in text and "## Search" not in text
    assert "| sensitivity | – |" in text


def test_run_without_perplexity_still_renders(tmp_path):
    png, md = render_run(_minimal_run(tmp_path / "noeval", with_eval=False))
    assert png.stat().st_size > 10_000 and "## Perplexity" not in md.read_text()


def test_sweep_plot_has_one_line_per_method_and_follows_skipped_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (alloc, s, ppl) in enumerate([("uniform", 0.5, 30.0), ("uniform", 0.7, 90.0), ("msp", 0.5, 28.0), ("msp", 0.7, 70.0)]):
        run = _minimal_run(sweep / str(i), ppl=ppl)
        r = json.loads((run / "results.json").read_text())
        r.update(allocation=alloc, sparsity=s)
        (run / "results.json").write_text(json.dumps(r))
    elsewhere = _minimal_run(tmp_path / "earlier", ppl=150.0)  # a skip_done job points at a run outside the sweep
    r = json.loads((elsewhere / "results.json").read_text())
    r.update(allocation="owl", sparsity=0.8)
    (elsewhere / "results.json").write_text(json.dumps(r))
    (sweep / "4").mkdir()
    (sweep / "4" / "skipped.json").write_text(json.dumps({"config_hash": "x", "existing": str(elsewhere / "results.json")}))
    png, md = render_sweep([sweep], sweep)
    _assert_picture(png)
    rows = [l for l in md.read_text().splitlines() if l.startswith("| ") and "method" not in l]
    assert len(rows) == 5
    assert {r.split(" | ")[0][2:] for r in rows} == {"uniform, wanda", "msp, wanda", "owl, wanda"}
    assert "| msp, wanda | 0.7000 | 70.000 | 20.500 |" in md.read_text()


def test_cli_renders_a_run_or_a_sweep_and_refuses_an_empty_folder(tmp_path, capsys):
    run = _minimal_run(tmp_path / "sweep" / "0")
    assert main([str(run)]) == 0 and (run / "summary.png").is_file()
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "plots")]) == 0 and (tmp_path / "plots" / "pareto.png").is_file()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.json under" in err[0]
    with pytest.raises(ReportError, match="has no results.json"):
        render_run(tmp_path / "empty")


def test_import_stays_light():
    code = "import sys, msp.report; print(sorted(m for m in ('matplotlib', 'torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_run_stage_turns_a_failure_into_one_warning(tmp_path, caplog):
    """msp.run.report_stage runs after results.json is written: a folder it cannot render is a warning, not an error."""
    import logging

    from msp.run import report_stage

    with caplog.at_level(logging.WARNING, logger="msp.run"):
        report_stage(tmp_path)  # no results.json: render_run raises ReportError
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "run summary not written (ReportError" in warnings[0].getMessage()
    assert not (tmp_path / "summary.png").exists()
