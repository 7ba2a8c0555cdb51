"""llm-compressor recipes from a run (``python -m msp.export recipe``), checked without importing llm-compressor:
one sparsity per decoder block equal to the run's parameter-weighted block means, the mask structure in
llm-compressor's convention, targets that match exactly the decoder blocks (in the library's matching rule),
lm_head ignored, and one clear line for what cannot be written."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from msp.export import RecipeError, block_prefix, build_recipe, main, write_recipe
from conftest import run_tiny_msp


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory) -> Path:
    """A real tiny-llama run with a layer-granularity allocation (fisher) and SparseGPT."""
    return run_tiny_msp(tmp_path_factory.mktemp("run"), "allocation=fisher", "sparsity=0.6", "pruner=sparsegpt")


def _modifier(text: str) -> tuple[str, dict]:
    recipe = yaml.safe_load(text)
    (stage,) = recipe.values()
    (group,) = stage.values()
    ((name, args),) = group.items()
    return name, args


def _matches(target: str, name: str) -> bool:
    """llm-compressor's ``match_targets`` rule for one entry: ``re:<regex>`` is ``re.match``, else the exact name."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


def _fake_run(folder: Path, layers: list[tuple[str, int, float, str]], *, pruner: str = "sparsegpt", pattern: str = "unstructured") -> Path:
    """results.json + allocation.json as msp.run writes them; layers: (name, params, sparsity, per-layer pattern)."""
    folder.mkdir(parents=True)
    results = {"model": "tiny-llama", "pruner": pruner, "pattern": pattern, "allocation": "file", "target_sparsity": 0.5, "sparsity": 0.5,
               "pruner_config": {"blocksize": 64, "percdamp": 0.05, "saliency": "obs", "bits": None} if pruner == "sparsegpt" else {},
               "layers": [{"name": n, "params": p, "target": s, "measured": s, "pattern": pat} for n, p, s, pat in layers],
               "data": {"calibration": "book", "nsamples": 4, "seqlen": 64}}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "allocation.json").write_text(json.dumps({"method": "file", "target": 0.5, "sparsities": {n: s for n, _, s, _ in layers}}))
    return folder


def test_real_layer_allocation_becomes_block_means_over_exactly_the_decoder_blocks(layer_run, tmp_path):
    out = write_recipe(layer_run, tmp_path / "recipe.yaml")
    text = out.read_text()
    name, args = _modifier(text)
    assert name == "SparseGPTModifier"
    results = json.loads((layer_run / "results.json").read_text())
    sparsities = json.loads((layer_run / "allocation.json").read_text())["sparsities"]
    params = {l["name"]: l["params"] for l in results["layers"]}
    blocks: dict[int, list[str]] = {}
    for n in sparsities:
        blocks.setdefault(int(n.split(".")[2]), []).append(n)
    want = [sum(sparsities[n] * params[n] for n in names) / sum(params[n] for n in names) for _, names in sorted(blocks.items())]
    assert args["sparsity"] == pytest.approx(want, abs=1e-12) and len(args["sparsity"]) == 2
    assert args["mask_structure"] == "0:0"
    assert args["block_size"] == 128 and args["dampening_frac"] == pytest.approx(results["pruner_config"]["percdamp"])
    assert "re:.*lm_head" in args["ignore"]
    assert "LOST: this is a layer-granularity allocation" in text  # the fisher allocation splits blocks unevenly
    # what llm-compressor would target on this very model: named_modules() order, its matching rule
    from msp.models import build_tiny_model

    model = build_tiny_model("tiny-llama").model
    matched = [n for n, _ in model.named_modules() if any(_matches(t, n) for t in args["targets"])]
    assert matched == ["model.layers.0", "model.layers.1"]
    ignored = [n for n, _ in model.named_modules() if any(_matches(t, n) for t in args["ignore"])]
    assert ignored == ["lm_head"]


def test_layer_granularity_keeps_every_layers_sparsity_in_the_order_llm_compressor_assigns(layer_run):
    recipe = build_recipe(layer_run, granularity="layer")
    _, args = _modifier(recipe.to_yaml())
    sparsities = json.loads((layer_run / "allocation.json").read_text())["sparsities"]
    from msp.models import build_tiny_model

    model = build_tiny_model("tiny-llama").model
    # llm-compressor walks model.named_modules() and gives the i-th matched module the i-th sparsity
    matched = [n for n, _ in model.named_modules() if any(_matches(t, n) for t in args["targets"])]
    assert len(matched) == len(args["sparsity"]) == 14
    assert args["sparsity"] == [sparsities[n] for n in matched]
    assert "LOST" not in recipe.to_yaml() and "kept exactly" in recipe.to_yaml()
    with pytest.raises(RecipeError, match=r"granularity=.blocks.; valid: block \| layer"):
        build_recipe(layer_run, granularity="blocks")


def test_block_means_hand_computed_and_zero_layers_stay_dense(tmp_path):
    run = _fake_run(tmp_path / "r", [
        ("model.layers.0.self_attn.q_proj", 100, 0.2, "unstructured"), ("model.layers.0.mlp.up_proj", 300, 0.6, "unstructured"),
        ("model.layers.1.self_attn.q_proj", 100, 0.0, "unstructured"), ("model.layers.1.mlp.up_proj", 300, 0.4, "unstructured"),
        ("model.layers.2.self_attn.q_proj", 100, 0.5, "unstructured"), ("model.layers.2.mlp.up_proj", 300, 0.5, "unstructured"),
    ])
    recipe = build_recipe(run)
    name, args = _modifier(recipe.to_yaml())
    # block 0: (0.2*100 + 0.6*300) / 400 = 0.5; block 1: q_proj dense, 0.4*300 removed over the 300 pruned weights = 0.4
    assert args["sparsity"] == pytest.approx([0.5, 0.4, 0.5])
    assert args["ignore"] == ["re:.*lm_head", "model.layers.1.self_attn.q_proj"]
    assert args["block_size"] == 64 and args["dampening_frac"] == 0.05  # the run's pruner.blocksize / percdamp
    assert args["targets"] == [r"re:model\.layers\.\d+$"]
    assert recipe.prefix == "model.layers"
    _, by_layer = _modifier(build_recipe(run, granularity="layer").to_yaml())
    assert by_layer["sparsity"] == [0.2, 0.6, 0.4, 0.5, 0.5]  # the dense q_proj of block 1 is not targeted
    assert "model.layers.1.self_attn.q_proj" not in by_layer["targets"] and "model.layers.1.self_attn.q_proj" in by_layer["ignore"]


@pytest.mark.parametrize("pattern, mask, sparsity", [("2:4", "2:4", 0.5), ("1:4", "3:4", 0.75), ("6:8", "2:8", 0.25)])
def test_nm_pattern_is_written_in_llm_compressors_pruned_count(tmp_path, pattern, mask, sparsity):
    s = 1 - int(pattern[0]) / int(pattern[2])
    run = _fake_run(tmp_path / "r", [(f"model.layers.{b}.mlp.up_proj", 64, s, pattern) for b in range(3)], pattern=pattern)
    text = build_recipe(run).to_yaml()
    _, args = _modifier(text)
    assert args["mask_structure"] == mask and isinstance(args["mask_structure"], str)  # quoted: YAML 1.1 reads 2:4 as a number
    assert args["sparsity"] == [sparsity] * 3


def test_mixed_nm_with_one_n_everywhere_is_written_and_with_several_is_refused(tmp_path, capsys):
    same = _fake_run(tmp_path / "same", [(f"model.layers.{b}.mlp.up_proj", 64, 0.5, "4:8") for b in range(2)], pattern="N:8")
    _, args = _modifier(build_recipe(same).to_yaml())
    assert args["mask_structure"] == "4:8"
    mixed = _fake_run(tmp_path / "mixed", [("model.layers.0.mlp.up_proj", 64, 0.75, "2:8"), ("model.layers.1.mlp.up_proj", 64, 0.25, "6:8")], pattern="N:8")
    with pytest.raises(RecipeError, match="mixed N:M cannot be expressed"):
        build_recipe(mixed)
    assert main(["recipe", str(mixed), "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msp.export recipe: error: pattern=N:8 pruned layers with different N:M")
    assert not (tmp_path / "x.yaml").exists()


def test_bad_inputs_are_one_clear_error(tmp_path, capsys):
    assert main(["recipe", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    with pytest.raises(RecipeError, match="does not exist; give the folder of a finished msp run"):
        build_recipe(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "results.json").write_text("{}")
    with pytest.raises(RecipeError, match="has no allocation.json"):
        build_recipe(tmp_path / "half")
    magnitude = _fake_run(tmp_path / "mag", [("model.layers.0.mlp.up_proj", 64, 0.5, "unstructured")], pruner="magnitude")
    with pytest.raises(RecipeError, match=r"pruner=magnitude has no llm-compressor one-shot modifier; valid: --pruner sparsegpt \| wanda"):
        build_recipe(magnitude)
    recipe = build_recipe(magnitude, pruner="wanda")
    name, args = _modifier(recipe.to_yaml())
    assert name == "WandaPruningModifier" and "block_size" not in args
    assert any("the run pruned with magnitude; this recipe uses wanda" in c for c in recipe.comments)


def test_cli_default_out_is_beside_the_run(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", [("model.decoder.layers.0.fc1", 64, 0.5, "unstructured")], pruner="wanda")
    assert main(["recipe", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "recipe.yaml")
    _, args = _modifier((run / "recipe.yaml").read_text())
    assert args["targets"] == [r"re:model\.decoder\.layers\.\d+$"]


def test_block_prefix_needs_one_shared_path():
    assert block_prefix(["model.decoder.layers.0.fc1", "model.decoder.layers.11.fc2"]) == "model.decoder.layers"
    with pytest.raises(RecipeError, match="do not share one"):
        block_prefix(["model.layers.0.mlp", "vision.blocks.0.fc"])
