"""2:4 export: the 2:4 check, the packed format's exact round trip, save/load, the one-line refusals, and (GPU only)
the semi-structured conversion's outputs."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from msp.allocation.base import uniform_allocation
from msp.cli import CONF_DIR, spec_from_config
from msp.export import (
    ExportError, check_24, export_run, groups_over_24, is_24, load_24, load_24_state_dict, pack_24, save_24,
    to_semi_structured_, unpack_24,
)
from msp.models import build_tiny_model, prunable_layers
from msp.prune import prune_
from msp.pruners import MagnitudePruner
from msp.run import ConfigError, validate_early


def random_24(rows: int, cols: int, seed: int, density: float = 1.0) -> torch.Tensor:
    """A random weight with at most 2 non-zeros per group of 4; ``density`` < 1 also zeroes some of the kept ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)
    mask &= torch.rand(rows, cols, generator=g) < density
    return w * mask


def pruned_24(kind: str = "tiny-llama"):
    loaded = build_tiny_model(kind, seed=0)
    layers = prunable_layers(loaded.model)
    alloc = uniform_allocation({n: l.weight.numel() for n, l in layers.items()}, 0.5)
    prune_(loaded.model, MagnitudePruner(), alloc, None, torch.device("cpu"), "2:4")
    return loaded


def test_groups_over_24_golden():
    w = torch.tensor([[1.0, 0, 2, 0, 3, 4, 5, 0], [0, 0, 0, 0, 1, 1, 0, 1]])
    # row 0: group 1 has 3 non-zeros; row 1: group 1 has 3 non-zeros; group 0s are fine
    assert groups_over_24(w) == 2 and not is_24(w)
    assert is_24(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 7]]))
    assert groups_over_24(torch.ones(2, 6)) == -1  # in_features not a multiple of 4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [1.0, 0.6, 0.0])
def test_pack_unpack_is_exact(seed, density):
    w = random_24(8, 32, seed, density)
    values, meta = pack_24(w)
    assert values.shape == (8, 16) and meta.shape == (8, 8) and meta.dtype == torch.uint8
    assert int(meta.max()) <= 15 and bool(((meta & 3) < (meta >> 2)).all())  # two distinct positions, ascending
    assert torch.equal(unpack_24(values, meta), w)
    assert int((values != 0).sum()) == int((w != 0).sum())  # every non-zero is among the kept values


def test_check_24_names_the_layer_and_the_fix():
    loaded = build_tiny_model("tiny-llama", seed=0)
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj is not 2:4 .* prune with pattern=2:4"):
        check_24(prunable_layers(loaded.model))


def test_save_load_round_trip_gives_the_same_model(tmp_path, cpu):
    loaded = pruned_24()
    model = loaded.model
    manifest = save_24(model, tmp_path / "m24", loaded.tokenizer)
    assert len(manifest["layers"]) == 14
    # packed: 14 layers at half the values + 1/8 byte per weight; the rest (embeddings, head, norms) dense
    layer_bytes = sum(l.weight.numel() * 4 for l in prunable_layers(model).values())
    assert manifest["dense_bytes"] - manifest["packed_bytes"] == layer_bytes // 2 - layer_bytes // 16
    state, _ = load_24_state_dict(tmp_path / "m24")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    again = load_24(tmp_path / "m24", cpu, semi_structured=True)  # on CPU: stays dense with zeros (logged)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_not_24_model_is_refused_before_writing(tmp_path):
    loaded = build_tiny_model("tiny-llama", seed=0)
    with pytest.raises(ExportError, match="is not 2:4"):
        save_24(loaded.model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cpu_conversion_is_skipped_with_a_reason_and_run_export_packs(tmp_path):
    loaded = pruned_24()
    report = to_semi_structured_(loaded.model)
    assert report.converted == [] and len(report.skipped) == 14
    assert all("need a CUDA GPU" in why for why in report.skipped.values())
    out = export_run(loaded.model, loaded.tokenizer, tmp_path / "e", torch.randint(0, 256, (1, 8)))
    assert out["converted"] == 0 and "CUDA" in out["note"] and (tmp_path / "e" / "sparse24.safetensors").exists()


def test_export_needs_a_24_pattern_before_any_work(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bad = compose("config", overrides=["+debug=default", "export.semi_structured=true", f"cache_dir={tmp_path}"])
        good = compose("config", overrides=["+debug=default", "export.semi_structured=true", "pattern=2:4", f"cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="export.semi_structured=true needs pattern=2:4"):
        validate_early(spec_from_config(bad))
    validate_early(spec_from_config(good))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_conversion_matches_dense_on_gpu(tmp_path, dtype):
    from msp.device import resolve_device

    device = resolve_device("cuda")
    loaded = pruned_24()
    model = loaded.model.to(device, dtype)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
    out = export_run(model, loaded.tokenizer, tmp_path / "e", ids)
    assert out["converted"] == 14, out
    assert out["max_abs_logit_diff"] <= 0.02 * out["max_abs_logit"] + 1e-3
    with torch.no_grad():
        sparse = model(input_ids=ids).logits.float()
    torch.testing.assert_close(sparse, dense, rtol=0.02, atol=0.02 * float(dense.abs().max()))
    reloaded = load_24(tmp_path / "e", device, dtype)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), dense, rtol=0.02, atol=0.02 * float(dense.abs().max()))
