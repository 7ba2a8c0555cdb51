"""Every option of every config group composes into values of the documented types, a valid run spec, and a pruner that
prunes a small layer to the configured sparsity and pattern."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import ListConfig, OmegaConf

from msp.cli import CONF_DIR, spec_from_config
from msp.run import validate_early

CONF = Path(CONF_DIR)
# groups selected with `+group=option` (not in the defaults list)
OPTIONAL_GROUPS = {"debug"}  # experiment is in the defaults list (experiment: null), so experiment=<name>
OPTIONAL_GROUPS_WITH_DEFAULT = set()


def options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for yaml in sorted(group.glob("*.yaml")):
            yield group.name, yaml.stem


def _allocation_file() -> Path:
    """A real allocation.json (uniform 50% over the embedded model's layer names) for allocation=file."""
    import json
    import tempfile


    path = Path(tempfile.gettempdir()) / "msp-test-configs-allocation.json"
    names = [f"model.layers.{b}.{l}" for b in range(30) for l in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    path.write_text(json.dumps({"method": "uniform", "target": 0.5, "sparsities": {n: 0.5 for n in names}}))
    return path


def override_for(group: str, option: str) -> list[str]:
    prefix = "+" if group in OPTIONAL_GROUPS else ""
    extra = []
    if group == "model" and option == "hf":
        extra.append("model.name=some-org/some-model")
    if group == "allocation" and option == "file":
        extra.append(f"allocation.path={_allocation_file()}")
    return [f"{prefix}{group}={option}", *extra]


# the documented type of every top-level value a run reads (conf/config.yaml and the groups' YAML comments)
DOCUMENTED_TYPES = {
    "sparsity": float, "pattern": str, "seed": int, "device": str, "dtype": str, "batch_size": int,
    "true_sequential": bool, "streaming": (str, bool), "save_model": bool, "use_cache": bool, "skip_done": bool,
    "model.name": str, "data.calibration": str, "data.evaluation": (list, ListConfig), "data.nsamples": int, "data.seqlen": int,
    "data.heldout_fraction": float, "data.eval_windows": (int, type(None)), "eval.dense": bool, "eval.batch_size": int,
    "allocation.method": str, "logger.name": str, "zeroshot.tasks": (list, ListConfig), "export.semi_structured": bool,
    "export.quantized": bool, "report": bool,
}


def _value(cfg, dotted: str):
    return OmegaConf.select(cfg, dotted, throw_on_missing=True)


def _pruned_counts_match(pruner, sparsity: float, pattern) -> None:
    """The instantiated pruner prunes a small random layer to the configured sparsity and pattern."""
    import torch

    from msp.masks import prune_count
    from msp.pruners import LayerStats

    g = torch.Generator().manual_seed(0)
    rows, cols = 8, 32
    weight, x = torch.randn(rows, cols, generator=g), torch.randn(256, cols, generator=g)
    stats = LayerStats(cols, need_hessian=pruner.needs_hessian)
    stats.add_batch(x)
    pruned = pruner.prune_weight(weight, stats, sparsity, pattern)
    assert pruned.shape == weight.shape and pruned.dtype == weight.dtype
    layer_pattern = pattern.for_layer(sparsity)
    zeros = pruned == 0
    if getattr(pruner, "bits", None):  # quantization may round a kept weight to zero: at least the pruned ones
        assert int(zeros.sum()) >= prune_count(rows * cols, sparsity)
    elif layer_pattern.kind == "nm":
        assert (zeros.view(rows, cols // layer_pattern.m, layer_pattern.m).sum(-1) == layer_pattern.m - layer_pattern.n).all()
    elif pruner.score_based:  # score pruners: an exact count per row
        assert (zeros.sum(dim=1) == prune_count(cols, sparsity)).all()
    else:  # SparseGPT: an exact count per layer
        assert int(zeros.sum()) == prune_count(rows * cols, sparsity)
    kept = ~zeros
    if not getattr(pruner, "bits", None) and pruner.score_based:
        assert torch.equal(pruned[kept], weight[kept])  # score pruners only remove


@pytest.mark.parametrize("group,option", list(options()))
def test_every_config_option_composes_with_the_documented_types_and_prunes(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*override_for(group, option), "cache_dir=/tmp/msp-test-cache"])
    wrong = {}
    for key, kind in DOCUMENTED_TYPES.items():
        value = _value(cfg, key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            wrong[key] = value
    assert not wrong, f"{group}={option}: values of the wrong type: {wrong}"
    assert all(isinstance(t, str) for t in cfg.data.evaluation) and all(isinstance(t, str) for t in cfg.zeroshot.tasks)
    spec = spec_from_config(cfg)
    if spec.model in ("smollm2-135m", "tiny-llama", "tiny-opt") and group != "experiment":
        validate_early(spec)
    assert spec.pruner.name == cfg.pruner._target_.rsplit(".", 1)[1].removesuffix("Pruner").lower()
    _pruned_counts_match(spec.pruner, spec.sparsity, spec.pattern)


@pytest.mark.parametrize("pattern", ["2:4", "N:8"])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruner_config_prunes_to_an_nm_pattern(pruner, pattern):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"pruner={pruner}", f"pattern={pattern}", "sparsity=0.75", "cache_dir=/tmp/x"])
    spec = spec_from_config(cfg)
    _pruned_counts_match(spec.pruner, spec.sparsity, spec.pattern)


def test_defaults_are_the_documented_ones():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["cache_dir=/tmp/x"])
    assert cfg.model.name == "smollm2-135m"
    assert cfg.pruner._target_.endswith("WandaPruner")
    assert cfg.sparsity == 0.5 and cfg.pattern == "unstructured" and cfg.allocation.method == "uniform"
    assert cfg.data.calibration == "book" and list(cfg.data.evaluation) == ["wiki"]


def test_pattern_override_arrives_as_a_string():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["pattern=2:4", "cache_dir=/tmp/x"])
    spec = spec_from_config(cfg)
    assert str(spec.pattern) == "2:4" and spec.sparsity == 0.5
