"""Hydra composes every option of every config group, and each composes into a valid run spec."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

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


@pytest.mark.parametrize("group,option", list(options()))
def test_every_config_option_composes_and_instantiates(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*override_for(group, option), "cache_dir=/tmp/msp-test-cache"])
    pruner = instantiate(cfg.pruner)
    assert hasattr(pruner, "prune_weight")
    spec = spec_from_config(cfg)
    if spec.model in ("smollm2-135m", "tiny-llama", "tiny-opt") and group != "experiment":
        validate_early(spec)


def test_config_groups_exist():
    names = {g for g, _ in options()}
    assert {"model", "pruner", "allocation", "data", "eval", "logger"} <= names


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
