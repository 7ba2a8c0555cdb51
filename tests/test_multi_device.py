"""Evaluation over several devices: the block split, the accelerate device map, and the same numbers on CPU."""
from __future__ import annotations

import pytest
import torch

from msp.device import DeviceError, balanced_split, cuda_available, resolve_devices
from msp.eval.multi_device import block_device_map, spread_over
from msp.models import build_tiny_model
from msp.sweep import config_hash

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "sizes, parts, expected",
    [
        ([1] * 8, 2, [0, 0, 0, 0, 1, 1, 1, 1]),
        ([1] * 6, 3, [0, 0, 1, 1, 2, 2]),
        ([5, 1, 1, 1, 1, 1], 2, [0, 1, 1, 1, 1, 1]),
        ([1, 1, 1], 1, [0, 0, 0]),
        ([1, 1], 4, [0, 1]),
    ],
)
def test_balanced_split_is_contiguous_and_even(sizes, parts, expected):
    got = balanced_split(sizes, parts)
    assert got == expected
    assert got == sorted(got) and all(0 <= p < parts for p in got)


def test_block_device_map_places_every_parameter_once():
    model = build_tiny_model("tiny-llama", 0).model
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]  # only names: nothing is moved
    device_map = block_device_map(model, devices)
    assert device_map["model.layers.0"] == devices[0] and device_map["model.layers.1"] == devices[1]
    assert device_map["model.embed_tokens"] == devices[0] and device_map["lm_head"] == devices[0]
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owners = [m for m in device_map if name.startswith(m + ".")]
        assert len(owners) == 1, (name, owners)


def test_spread_over_gives_the_same_logits_and_puts_the_model_back():
    model = build_tiny_model("tiny-llama", 1).model.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with spread_over(model, [CPU, CPU]) as first:
            out = model(input_ids=ids.to(first)).logits
    assert torch.equal(out, ref)
    assert all(p.device == CPU for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def test_resolve_devices_and_its_errors():
    assert resolve_devices(None) == [] and resolve_devices([]) == []
    assert resolve_devices("cpu") == [CPU]
    with pytest.raises(DeviceError, match="twice"):
        resolve_devices(["cpu", "cpu"])
    if not cuda_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_devices("all")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_devices(["cuda:0", "cuda:1"])


def test_eval_devices_null_keeps_earlier_config_hashes():
    base = {"sparsity": 0.5, "eval": {"dense": True, "batch_size": 1}}
    assert config_hash({**base, "eval": {**base["eval"], "devices": None}}) == config_hash(base)
    assert config_hash({**base, "eval": {**base["eval"], "devices": ["cuda:0", "cuda:1"]}}) != config_hash(base)


def test_run_with_eval_devices_matches_the_plain_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.run import run

    results = {}
    for extra in ([], ["eval.devices=[cpu]"]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["+debug=default", f"cache_dir={tmp_path / 'cache'}", *extra])
        results[bool(extra)] = run(spec_from_config(cfg), tmp_path / str(bool(extra)))
    assert results[True]["eval_devices"] == ["cpu"]
    assert results[True]["ppl"]["wiki"] == pytest.approx(results[False]["ppl"]["wiki"], rel=1e-6)
