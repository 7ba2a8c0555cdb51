"""Interrupting a run and resuming it, for real: the CLI as a subprocess on tiny-llama, stopped with SIGTERM (what
SLURM sends), SIGKILL and SIGINT in the middle of a stage, then resumed with the command it printed; the resumed
run ends with the same allocation, weights and perplexity as an uninterrupted one. Plus the pieces in-process:
the signal context, the resume command, the atomic folder."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msp.interrupt import STATUS_FILE, RunInterrupted, resume_command, stop_on_signals, sweep_resume_command
from msp.io import atomic_dir
from msp.search.evolution import SearchState, history_path

REPO = Path(__file__).resolve().parents[1]
GENERATIONS = 30  # layer granularity on tiny-llama: tens of ms per generation, so a kill at generation 2 lands mid-search
BASE = ["model=tiny-llama", "data=tiny", "device=cpu", "report=false"]
SEARCH = [*BASE, "allocation=msp", "allocation.granularity=layer", f"allocation.generations={GENERATIONS}"]
SAVED = [*SEARCH, "save_model=true"]  # the pruned weights, to compare


def start(args: list[str], out: Path, *, cache: Path, run_dir: Path | None = None) -> subprocess.Popen:
    """``python -m msp <args>`` in the background, its stdout/stderr in ``out``.out/.err (files: no pipe to fill)."""
    where = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    with open(f"{out}.out", "w") as so, open(f"{out}.err", "w") as se:
        return subprocess.Popen([sys.executable, "-m", "msp", *args, f"cache_dir={cache}", *where], cwd=REPO, stdout=so, stderr=se)


def err_of(out: Path) -> str:
    return Path(f"{out}.err").read_text()


def last_line(text: str) -> str:
    """The last non-blank line, progress-bar redraws (``\\r``) dropped."""
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln][-1]


def generation(run_dir: Path) -> int:
    path = run_dir / "search_state.json"
    return json.loads(path.read_text())["generation"] if path.exists() else -1  # written atomically: never half a file


def status_of(run_dir: Path) -> dict:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def wait_until(proc: subprocess.Popen, ready, out: Path, limit_s: float = 600) -> None:
    """Poll until ``ready()``; fail if the process ends first (it finished before it could be interrupted)."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the point to interrupt it:\n{err_of(out)[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the point to interrupt it")
        time.sleep(0.02)


def finished(proc: subprocess.Popen) -> int:
    return proc.wait(timeout=120)  # a hang guard, not a timing check


def run_shell(command: str, out: Path) -> subprocess.CompletedProcess:
    """The resume command exactly as printed (``cd <dir> && python -m msp ...``)."""
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600)
    Path(f"{out}.err").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


class Reference:
    """The uninterrupted run of :data:`SEARCH`, started once in the background (it runs while a test interrupts)."""

    def __init__(self, root: Path):
        self.run_dir = root / "reference"
        self.proc = start(SAVED, root / "reference", cache=root / "cache-ref", run_dir=self.run_dir)

    def result(self) -> Path:
        assert finished(self.proc) == 0, err_of(self.run_dir)[-2000:]
        return self.run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    """Allocation, pruned weights (so masks), perplexity, config hash and search history as the uninterrupted run."""
    from safetensors.torch import load_file

    assert json.loads((run_dir / "allocation.json").read_text()) == json.loads((ref_dir / "allocation.json").read_text())
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, ref_dir))
    assert got["ppl"] == want["ppl"] and got["sparsity"] == want["sparsity"]
    assert got["config_hash"] == want["config_hash"]  # allocation.resume=true does not make it another run (skip_done)
    weights, ref_weights = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir, ref_dir))
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name
    records = [json.loads(line) for line in history_path(run_dir / "search_state.json").read_text().splitlines()]
    ref_records = [json.loads(line) for line in history_path(ref_dir / "search_state.json").read_text().splitlines()]
    assert [(r["generation"], r["best"], r["mean"]) for r in records] == [(r["generation"], r["best"], r["mean"]) for r in ref_records]
    assert status_of(run_dir)["status"] == "done"


def test_sigterm_mid_search_stops_cleanly_and_the_printed_command_resumes_it_exactly(tmp_path, reference):
    run_dir, out = tmp_path / "run", tmp_path / "run"
    proc = start(SAVED, out, cache=tmp_path / "cache", run_dir=run_dir)
    wait_until(proc, lambda: generation(run_dir) >= 2, out)
    proc.send_signal(signal.SIGTERM)
    assert finished(proc) == 128 + signal.SIGTERM == 143
    stopped_at = SearchState.load(run_dir / "search_state.json").generation  # complete and valid
    assert 2 <= stopped_at < GENERATIONS
    status = status_of(run_dir)
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM" and status["stage"] == "allocation"
    assert status["search_generation"] == stopped_at
    resume = status["resume"]
    assert "allocation.resume=true" in resume and f"hydra.run.dir={run_dir.resolve()}" in resume
    assert not (run_dir / "results.json").exists() and not (run_dir / "allocation.json").exists()
    assert last_line(err_of(out)).endswith(f"resume with: {resume}")
    assert last_line((run_dir / "cli.log").read_text()).endswith(f"resume with: {resume}")

    run_shell(resume, tmp_path / "resumed")
    assert json.loads((run_dir / "results.json").read_text())["search"]["resumed_from"] == stopped_at
    assert_same_run(run_dir, reference.result())


def test_sigkill_mid_search_leaves_whole_files_and_resume_gives_the_same_run(tmp_path, reference):
    run_dir, out = tmp_path / "run", tmp_path / "run"
    proc = start(SAVED, out, cache=tmp_path / "cache", run_dir=run_dir)
    wait_until(proc, lambda: generation(run_dir) >= 2, out)
    proc.send_signal(signal.SIGKILL)
    assert finished(proc) == -signal.SIGKILL
    for path in run_dir.glob("*.json"):  # whatever a kill -9 caught is whole: status.json says running, the checkpoint loads
        json.loads(path.read_text())
    assert status_of(run_dir)["status"] == "running" and "allocation.resume=true" in status_of(run_dir)["resume"]
    stopped_at = SearchState.load(run_dir / "search_state.json").generation
    assert not (run_dir / "results.json").exists()

    proc = start([*SAVED, "allocation.resume=true"], tmp_path / "resumed", cache=tmp_path / "cache", run_dir=run_dir)
    assert finished(proc) == 0, err_of(tmp_path / "resumed")[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["search"]["resumed_from"] == stopped_at
    assert_same_run(run_dir, reference.result())


def test_sigint_during_the_sensitivity_stage_stops_within_the_stage(tmp_path):
    """Fisher sensitivities over 512 windows: a stage of seconds; Ctrl-C there stops the run with status interrupted."""
    run_dir, out = tmp_path / "run", tmp_path / "run"
    proc = start([*BASE, "allocation=fisher", "data.nsamples=512", "use_cache=false"], out, cache=tmp_path / "cache", run_dir=run_dir)
    wait_until(proc, lambda: status_of(run_dir).get("stage") == "allocation", out)
    time.sleep(0.5)  # into the gradient passes (the stage takes seconds)
    proc.send_signal(signal.SIGINT)
    assert finished(proc) == 128 + signal.SIGINT == 130
    status = status_of(run_dir)
    assert (status["status"], status["signal"], status["stage"]) == ("interrupted", "SIGINT", "allocation")  # stopped inside it
    assert "allocation.resume" not in status["resume"] and f"hydra.run.dir={run_dir.resolve()}" in status["resume"]
    assert not any((run_dir / name).exists() for name in ("results.json", "allocation.json", "sensitivity.json"))
    assert last_line(err_of(out)).endswith(f"resume with: {status['resume']}")


def test_a_sweep_interrupted_in_its_second_job_finishes_with_skip_done(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "sweep"
    args = ["--multirun", *SEARCH, "sparsity=0.4,0.5", f"hydra.sweep.dir={sweep}"]
    proc = start(args, out, cache=tmp_path / "cache")
    wait_until(proc, lambda: generation(sweep / "1") >= 2, out)
    proc.send_signal(signal.SIGTERM)
    assert finished(proc) == 143
    assert status_of(sweep / "0")["status"] == "done" and (sweep / "0" / "results.json").exists()
    assert status_of(sweep / "1")["status"] == "interrupted" and not (sweep / "1" / "results.json").exists()
    resume = last_line(err_of(out)).split("resume with: ", 1)[1]
    assert resume == status_of(sweep / "1")["resume"]
    assert "--multirun" in resume and "skip_done=true" in resume and f"hydra.sweep.dir={sweep.resolve()}" in resume
    first = (sweep / "0" / "results.json").read_bytes()

    run_shell(resume, tmp_path / "resumed")
    assert (sweep / "0" / "results.json").read_bytes() == first  # skipped, not rerun
    assert "skip_done: config" in (sweep / "0" / "cli.log").read_text()
    assert json.loads((sweep / "1" / "results.json").read_text())["target_sparsity"] == 0.5
    assert status_of(sweep / "1")["status"] == "done"


# ------------------------------------------------------------------------------------------------ in-process pieces


def test_a_signal_inside_the_context_raises_run_interrupted_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as caught:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next instruction: this sleep is cut short
    assert caught.value.signal == "SIGTERM" and caught.value.exit_code == 143
    assert not isinstance(caught.value, Exception)  # no `except Exception` on the way swallows it
    caught.value.stage, caught.value.resume = "prune", "msp ... allocation.resume=true"
    back = pickle.loads(pickle.dumps(caught.value))  # from a launcher's worker process to the sweep's
    assert (back.signal, back.stage, back.resume) == ("SIGTERM", "prune", "msp ... allocation.resume=true")
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_resume_command_replaces_the_run_dir_and_the_resume_flags():
    single = resume_command(["model=tiny-llama", "allocation=msp", "hydra.run.dir=x", "allocation.resume=false"], argv0="msp",
                            cwd=Path("/w"), multirun=False, run_dir=Path("/r/run"), sweep_dir=None, search=True)
    assert single.endswith("model=tiny-llama allocation=msp allocation.resume=true hydra.run.dir=/r/run")
    assert single.startswith("cd /w && ")
    sweep = resume_command(["--multirun", "seed=0,1", "skip_done=false", "hydra.sweep.dir=s"], argv0="msp", cwd=Path("/w"),
                           multirun=True, run_dir=Path("/r/s/1"), sweep_dir=Path("/r/s"), search=True)
    assert sweep.endswith("--multirun seed=0,1 skip_done=true hydra.sweep.dir=/r/s")
    # the sweep's process, for a job interrupted in a launcher's worker: its sweep dir when known, else the user's
    assert sweep_resume_command(["msp", "-m", "seed=0,1", "hydra.sweep.dir=s"], "/r/t").endswith("-m seed=0,1 skip_done=true hydra.sweep.dir=/r/t")
    assert sweep_resume_command(["msp", "-m", "seed=0,1", "hydra.sweep.dir=s"], None).endswith("-m seed=0,1 hydra.sweep.dir=s skip_done=true")
    assert sweep_resume_command(["msp", "seed=0"], "/r/t") is None  # not a sweep


def test_an_atomic_folder_is_all_or_nothing(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert (target / "a.bin").read_bytes() == b"old"
    with atomic_dir(target) as tmp:
        (tmp / "b.bin").write_bytes(b"new")
    assert [p.name for p in target.iterdir()] == ["b.bin"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left
