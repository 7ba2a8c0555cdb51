"""The search's settings schema (one place for its defaults), the pruner capabilities it reads, its report."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from msp.allocation.base import AllocationError
from msp.masks import Pattern
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.pruners.base import Pruner
from msp.search.fitness import resolve_mode
from msp.search.settings import SearchConfig, StageConfig, parse_options

UNSTRUCTURED = Pattern.parse("unstructured")


def _shipped() -> dict:
    """The composed ``allocation=msp`` node (conf/allocation/msp.yaml on its schema), as a plain dict."""
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["allocation=msp", "cache_dir=/tmp/msp-test-cache"])
    return OmegaConf.to_container(cfg.allocation, resolve=True)


def test_the_shipped_yaml_picks_exactly_the_schema_defaults():
    merged = OmegaConf.merge(OmegaConf.structured(SearchConfig), _shipped())  # Hydra's check: known keys, right types
    assert OmegaConf.to_object(merged) == SearchConfig()
    assert SearchConfig().variant_nsamples == 8  # the YAML's value (the old dict of defaults said None)


def test_a_partial_dict_gets_the_defaults_and_gives_the_same_settings_as_the_full_config():
    partial = parse_options({"method": "msp", "granularity": "layer"}, 0.7, UNSTRUCTURED, seed=3)
    full = parse_options({**_shipped(), "granularity": "layer"}, 0.7, UNSTRUCTURED, seed=3)
    assert partial == full
    assert partial.tokens == [256, 512] and partial.survivors == [2] and partial.bounds == pytest.approx((0.5, 0.9))
    assert partial.config.seed == 3 and partial.variant_nsamples == 8
    assert parse_options(SearchConfig(stages=[StageConfig(64)], seed=5), 0.7, UNSTRUCTURED).config.seed == 5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"generation": 3}, "allocation=msp has no option generation; valid: candidates"),
        ({"population": "four"}, "allocation.population='four' is not an integer, e.g. allocation.population=4"),
        ({"step": float("nan")}, "allocation.step=nan is not a number, e.g. allocation.step=0.025"),
        ({"resume": "yes"}, "allocation.resume='yes' is not true or false, e.g. allocation.resume=false"),
        ({"extra": "owl"}, "allocation.extra='owl' is not a list, e.g. allocation.extra=[uniform]"),
        ({"stages": [{"tokens": 64, "keep": 2}, {"tokens": 128}]}, "allocation.stages[0]={'tokens': 64, 'keep': 2} needs 'tokens'"),
        ({"stages": [{"tokens": 64, "survivors": "two"}, {"tokens": 128}]}, "allocation.stages[0].survivors='two' is not an integer"),
        ({"init": "random"}, "allocation.init='random' is unknown; valid: alpha, atp, best, dlp, file, fisher, hessian, owl, rank, uniform"),
        ({"fitness_seqlen": 1}, "allocation.fitness_seqlen=1 must be >= 2, e.g. allocation.fitness_seqlen=256"),
        ({"offspring": 0}, "allocation.offspring=0 must be >= 1"),
        ({"min": 0.8}, "do not contain sparsity=0.7"),
    ],
)
def test_each_bad_value_is_one_error_naming_the_key(options, message):
    with pytest.raises(AllocationError) as err:
        parse_options(options, 0.7, UNSTRUCTURED)
    assert message in str(err.value)


def test_integral_numbers_are_accepted_as_their_declared_type():
    st = parse_options({"population": 3.0, "step": 1 / 40, "crossover": 0, "stages": [{"tokens": 512.0}]}, 0.7, UNSTRUCTURED)
    assert st.config.population == 3 and isinstance(st.config.population, int)
    assert st.config.crossover == 0.0 and isinstance(st.config.crossover, float)
    assert st.tokens == [512] and isinstance(st.tokens[0], int)


# ------------------------------------------------------------------------------------------ pruner capabilities


def test_pruners_declare_whether_they_are_score_based():
    assert MagnitudePruner().score_based and WandaPruner().score_based and not SparseGPTPruner().score_based
    assert resolve_mode("auto", WandaPruner()) == "ranking" and resolve_mode("auto", SparseGPTPruner()) == "store"

    class Undeclared(Pruner):  # has a `scores` method but does not declare score_based: the interface decides
        name = "undeclared"

        def scores(self, weight, stats):
            return weight.abs()

        def prune_weight(self, weight, stats, sparsity, pattern):
            return weight

    assert resolve_mode("auto", Undeclared()) == "store"


def test_the_default_prune_weight_levels_is_one_prune_weight_per_level():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    pruner, levels = MagnitudePruner(), [0.25, 0.5, 0.75]
    outs = list(pruner.prune_weight_levels(w, None, levels, UNSTRUCTURED))
    assert [int((o == 0).sum()) for o in outs] == [32, 64, 96]
    assert all(torch.equal(o, pruner.prune_weight(w, None, s, UNSTRUCTURED)) for o, s in zip(outs, levels))
