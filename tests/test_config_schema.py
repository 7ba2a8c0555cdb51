"""The config schemas (msp/config.py): defaults in one place, unknown keys and wrong types fail at compose time
naming the key, earlier commands compose to the same config hash, and the allocator table resolves."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from msp.cli import CONF_DIR, spec_from_config
from msp.sweep import config_hash_of

HERE = Path(__file__).resolve().parent


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "cache_dir=/tmp/msp-test-cache"])


def test_earlier_config_hashes_still_match():
    """tests/data/config_hashes.json: the hashes these commands composed to before the schemas (skip_done finds
    the runs made then)."""
    recorded = json.loads((HERE / "data" / "config_hashes.json").read_text())
    assert len(recorded) > 30
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for command, digest in recorded:
            cfg = compose(config_name="config", overrides=[*command.split(), "cache_dir=/tmp/x"])
            assert config_hash_of(cfg) == digest, command


@pytest.mark.parametrize("override, key", [
    (["allocation=owl", "allocation.lamda=0.1"], "lamda"),  # a typo'd option of one allocator
    (["allocation=owl", "allocation.beta=0.1"], "beta"),  # another allocator's option
    (["data.nsample=4"], "nsample"),
    (["pruner=sparsegpt", "pruner.blocksiz=64"], "blocksiz"),
    (["sparsty=0.5"], "sparsty"),
    (["logger=wandb", "logger.projet=x"], "projet"),
])
def test_unknown_keys_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(*override)
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [
    (["data.nsamples=abc"], "nsamples"),
    (["sparsity=lots"], "sparsity"),
    (["allocation=fisher", "allocation.beta=big"], "beta"),
    (["true_sequential=maybe"], "true_sequential"),
])
def test_wrong_types_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(*override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_sparsity_out_of_range_is_an_error_even_with_a_fixed_pattern():
    from msp.allocation import AllocationError

    with pytest.raises(AllocationError, match=r"sparsity=1.5 is outside \[0, 1\)"):
        spec_from_config(_compose("model=tiny-llama", "sparsity=1.5", "pattern=2:4"))
    spec = spec_from_config(_compose("model=tiny-llama", "sparsity=0.7", "pattern=2:4"))
    assert spec.sparsity == 0.5  # the documented rule: a fixed N:M pattern sets the sparsity to 1 - N/M


def test_sparsegpt_schema_defaults_are_the_constructors():
    from msp.config import SparseGPTConfig
    from msp.pruners import SparseGPTPruner

    params = inspect.signature(SparseGPTPruner.__init__).parameters
    schema = SparseGPTConfig()
    for name in ("blocksize", "percdamp", "saliency", "bits"):
        assert getattr(schema, name) == params[name].default, name


def test_model_entries_carry_their_facts():
    spec = spec_from_config(_compose("model=tiny-llama"))
    assert (spec.model_loader, spec.max_seqlen) == ("tiny", 512)
    cfg = _compose()
    assert (cfg.model.loader, cfg.model.max_seqlen, cfg.model.licence) == ("gguf", 8192, "apache-2.0")


def test_library_callers_get_the_schema_check():
    from msp.allocation import AllocationError
    from msp.allocation.build import typed_options

    assert typed_options({"method": "owl"})["lambda"] == 0.08  # the schema's default
    with pytest.raises(AllocationError, match="allocation.lamda"):
        typed_options({"method": "owl", "lamda": 0.1})


def test_every_allocator_of_the_table_resolves():
    from msp.allocation.registry import ALLOCATORS, load

    for name, entry in ALLOCATORS.items():
        assert callable(load(entry.function)), name
        assert load(entry.schema)().method == name if name != "owl" else True
        if entry.check:
            assert callable(load(entry.check)), name


def test_importing_the_allocation_package_loads_no_allocator():
    code = ("import sys, msp.allocation.build; "
            "print(any(m in sys.modules for m in ('msp.search.allocator', 'msp.allocation.allocators', 'msp.sensitivity')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
