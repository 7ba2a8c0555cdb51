"""A documented command is a test: every ``msp ...`` line of README.md and docs/*.md runs on a tiny model.

Each command line found in a fenced code block (``msp ...``, ``$ msp ...``, or after ``&&``) runs as written, with tiny
settings appended after it (later Hydra overrides win): ``model=tiny-llama data=tiny`` with short windows, a run (or
sweep) folder and a cache folder of the test's own, two generations for the search, two examples per zero-shot task,
no run summary (``report=false``).
A line that cannot run here says why with a trailing ``# needs: gpu`` / ``# needs: hub`` / ``# needs: slurm`` and is
reported as skipped with that reason. ``<run dir>`` in a command stands for the directory of the run of the nearest
command above it in the same file. Every run must exit with 0 and write ``results.json`` (a sweep: in every job folder).

All commands run in one subprocess that calls ``msp.cli.main()`` once per command (about 0.5-1 s per tiny run instead
of several seconds of interpreter start-up each); then the same process runs the Python blocks of docs/python-api.md
as one script, in a fresh namespace and a folder of its own.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KNOWN_NEEDS = {"gpu", "hub", "slurm"}
MAX_SKIPPED = 6  # documentation is for commands that run: keep the marked ones few

# appended after every documented command; later overrides win
TINY = ["model=tiny-llama", "data=tiny", "data.nsamples=4", "data.seqlen=64", "data.eval_windows=4",
        "report=false"]  # the run summary (seconds of matplotlib per run) is tested in tests/test_cli.py
PLACEHOLDER = "<run dir>"


@dataclass
class Command:
    file: str
    line: int
    text: str  # the command as documented (without its comment)
    needs: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def multirun(self) -> bool:
        return any(a in ("-m", "--multirun") for a in shlex.split(self.text)[1:])


def fenced_lines(text: str):
    """(line number, line) of every line inside a fenced code block that is not Python."""
    inside, lang = False, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            inside, lang = (not inside), stripped[3:].strip()
            continue
        if inside and lang != "python":
            yield number, line


def commands_in(text: str, file: str) -> list[Command]:
    """The ``msp`` commands of one markdown text, their comments stripped, their ``# needs:`` markers read."""
    commands = []
    for number, line in fenced_lines(text):
        code, _, comment = line.partition(" #")
        needs = re.search(r"needs:\s*([a-z]+(?:\s*,\s*[a-z]+)*)", comment)
        for part in code.split("&&"):
            part = part.strip().removeprefix("$ ").strip()
            if part == "msp" or part.startswith("msp "):
                commands.append(Command(file, number, part, [n.strip() for n in needs.group(1).split(",")] if needs else []))
    return commands


COMMANDS = [c for path in DOC_FILES for c in commands_in(path.read_text(), str(path.relative_to(ROOT)))]
RUNNABLE = [c for c in COMMANDS if not c.needs]


def tiny_overrides(args: list[str], run_dir: Path, cache_dir: Path, multirun: bool) -> list[str]:
    joined = " ".join(args)
    extra = list(TINY) + [f"cache_dir={cache_dir}"]
    if multirun:
        extra.append(f"hydra.sweep.dir={run_dir}")
    elif not any(a.startswith("hydra.run.dir=") for a in args):
        extra.append(f"hydra.run.dir={run_dir}")
    if "experiment=" in joined:  # the search inside the experiment grids: the allocators' schemas have no generations
        extra.append("search_generations=2")
    elif "allocation=msp" in joined:  # the search
        extra.append("++allocation.generations=2")
    if "zeroshot=" in joined:
        extra.append("zeroshot.limit=2")
    if "experiment=" in joined:  # the table grids: zero-shot is covered by the zero-shot lines, the grid by this one
        extra.append("zeroshot.tasks=[]")
    if "hydra/launcher=parallel" in joined:
        extra.append("hydra.launcher.n_jobs=1")  # one worker process: its start-up is the cost
    return extra


def plan(commands: list[Command], base: Path) -> list[dict]:
    """argv, run folder and kind of every runnable command; ``<run dir>`` → the previous run of the same file."""
    jobs, last_dir = [], {}
    for n, c in enumerate(commands):
        text = c.text
        if PLACEHOLDER in text:
            assert c.file in last_dir, f"{c.id}: {PLACEHOLDER} needs a command above it in {c.file}"
            text = text.replace(PLACEHOLDER, shlex.quote(str(last_dir[c.file])))
        args = shlex.split(text)[1:]
        unknown = [a for a in args if re.search(r"<[^>]+>", a)]
        assert not unknown, f"{c.id}: placeholder the test cannot fill: {unknown} (only {PLACEHOLDER})"
        run_dir = base / f"{n:02d}"
        extra = tiny_overrides(args, run_dir, base / "cache", c.multirun)
        own = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
        if own and not c.multirun:
            run_dir = Path(own[-1])
        if not c.multirun:
            last_dir[c.file] = run_dir
        jobs.append({"id": c.id, "argv": [*args, *extra], "run_dir": str(run_dir), "multirun": c.multirun})
    return jobs


def sweep_size(argv: list[str]) -> int | None:
    """Jobs of a plain comma sweep (the product of the value counts); None where a config's grid decides."""
    if any(a.startswith("experiment=") for a in argv):
        return None
    size = 1
    for a in argv:
        key, _, value = a.partition("=")
        if value and not key.startswith(("hydra.", "+")) and "[" not in value and "{" not in value:
            size *= len(value.split(","))
    return size


DRIVER = r"""
import contextlib, io, json, os, sys, time, traceback
from pathlib import Path
from msp.cli import main
work = json.loads(Path(sys.argv[1]).read_text())
report = {}
def save():
    Path(work["report"]).write_text(json.dumps(report))
for job in work["jobs"]:
    stale = Path(job["run_dir"]) / "results.json"
    if not job["multirun"] and stale.exists():
        stale.unlink()  # a command that continues an earlier run must write its own
    sys.argv = ["msp", *job["argv"]]
    start, rc, error = time.perf_counter(), 0, ""
    try:
        main()
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        rc, error = 1, traceback.format_exc()
    report[job["id"]] = {"rc": rc, "error": error[-3000:], "seconds": time.perf_counter() - start}
    save()
# the Python API page, as a script of its own (fresh namespace, its own working folder)
os.makedirs(work["api_dir"], exist_ok=True)
os.chdir(work["api_dir"])
out, start, rc, error = io.StringIO(), time.perf_counter(), 0, ""
try:
    with contextlib.redirect_stdout(out):
        exec(compile(work["api_code"], "docs/python-api.md", "exec"), {"__name__": "__main__"})
except BaseException:
    rc, error = 1, traceback.format_exc()
report["python-api"] = {"rc": rc, "error": error[-3000:], "stdout": out.getvalue(), "seconds": time.perf_counter() - start}
save()
"""


def api_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S)
    assert blocks, "docs/python-api.md has no python block"
    return "\n\n".join(blocks)


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """Run every runnable documented command, then the Python API page, in one process."""
    base = tmp_path_factory.mktemp("docs")
    jobs = plan(RUNNABLE, base / "runs")
    work = {"jobs": jobs, "report": str(base / "report.json"), "api_dir": str(base / "api"), "api_code": api_code()}
    (base / "work.json").write_text(json.dumps(work))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(base / "work.json")], cwd=base, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads(Path(work["report"]).read_text()) if Path(work["report"]).exists() else {}
    return {"jobs": {j["id"]: j for j in jobs}, "report": report, "stderr": proc.stderr[-4000:], "api_dir": Path(work["api_dir"])}


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs_on_a_tiny_model(command, ran):
    if command.needs:
        pytest.skip(f"needs {', '.join(command.needs)}: `{command.text}`")
    job, outcome = ran["jobs"][command.id], ran["report"].get(command.id)
    assert outcome is not None, f"{command.id} did not run; driver stderr:\n{ran['stderr']}"
    assert outcome["rc"] == 0, f"`{command.text}` exited {outcome['rc']}\n{outcome['error']}\n{ran['stderr']}"
    run_dir = Path(job["run_dir"])
    if job["multirun"]:
        jobs = [d for d in run_dir.iterdir() if d.is_dir() and d.name.isdigit()] if run_dir.is_dir() else []
        assert jobs, f"`{command.text}`: no job folders in {run_dir}"
        missing = [d.name for d in jobs if not (d / "results.json").exists()]
        assert not missing, f"`{command.text}`: jobs without results.json: {missing}"
        expected = sweep_size(job["argv"])
        assert expected is None or len(jobs) == expected, f"`{command.text}`: {len(jobs)} jobs, expected {expected}"
    else:
        results = json.loads((run_dir / "results.json").read_text())
        assert results["model"] == "tiny-llama"


def test_marked_commands_are_few_and_say_why():
    skipped = [c for c in COMMANDS if c.needs]
    assert len(RUNNABLE) >= 20, "the docs should show commands that run"
    assert len(skipped) <= MAX_SKIPPED, [c.id for c in skipped]
    for c in skipped:
        assert set(c.needs) <= KNOWN_NEEDS, f"{c.id}: unknown need {c.needs}; valid: {sorted(KNOWN_NEEDS)}"
    # a line that names the hub model loader, a GPU or SLURM must say so (else it would fail here, not skip)
    for c in COMMANDS:
        if "model=hf" in c.text or "data=paper" in c.text:
            assert "hub" in c.needs, f"{c.id}: `{c.text}` needs the hub: mark it `# needs: hub`"
        if re.search(r"device=cuda|eval\.devices=", c.text):
            assert "gpu" in c.needs, f"{c.id}: `{c.text}` needs a GPU: mark it `# needs: gpu`"


def test_the_extraction_finds_commands_comments_and_markers():
    text = "\n".join([
        "```bash", "bash install.sh && msp   # the default run", "$ msp pruner=wanda  # needs: gpu, hub — why",
        "msp -m pruner=a,b", "python x.py msp=1", "```", "msp outside a block", "```python", "msp = 1", "```",
    ])
    assert [n for n, _ in fenced_lines(text)] == [2, 3, 4, 5]
    found = commands_in(text, "probe.md")
    assert [(c.text, c.needs, c.multirun) for c in found] == [
        ("msp", [], False), ("msp pruner=wanda", ["gpu", "hub"], False), ("msp -m pruner=a,b", [], True)]


def test_python_api_example_runs(ran):
    outcome = ran["report"].get("python-api")
    assert outcome is not None, f"the API example did not run; driver stderr:\n{ran['stderr']}"
    assert outcome["rc"] == 0, outcome["error"]
    assert re.search(r"sparsity 0\.500: perplexity [\d.]+ -> [\d.]+", outcome["stdout"]), outcome["stdout"]
    assert (ran["api_dir"] / "outputs" / "api-run" / "results.json").exists()


def test_layout_names_every_module_and_config_group():
    layout = (ROOT / "docs" / "layout.md").read_text()
    block = layout[layout.index("## Layout"):]
    words = set(re.findall(r"[\w.-]+/?", block))
    missing = []
    for path in sorted((ROOT / "msp").rglob("*.py")):
        rel = path.relative_to(ROOT / "msp")
        if path.name not in words or (len(rel.parts) > 1 and f"{rel.parts[0]}/" not in words):
            missing.append(f"msp/{rel}")
    for group in sorted(p for p in (ROOT / "conf").rglob("*") if p.is_dir()):
        if f"{group.name}/" not in words:
            missing.append(f"conf/{group.relative_to(ROOT / 'conf')}/")
    assert not missing, f"docs/layout.md does not list: {missing}"
