"""2:4 export: the 2:4 check, the one-line refusals, the run's export step on CPU (nothing converted, nothing written:
the packed ``model-2of4`` format is retired), the retired CLI's message, and (GPU only) the semi-structured
conversion's outputs."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from msp.allocation.base import uniform_allocation
from msp.cli import CONF_DIR, spec_from_config
import msp.export
from msp.export import ExportError, check_24, export_run, groups_over_24, is_24, main, to_semi_structured_
from msp.models import build_tiny_model, prunable_layers
from msp.prune import prune_
from msp.pruners import MagnitudePruner
from msp.run import ConfigError, validate_early

from conftest import run_tiny_msp


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


def test_check_24_names_the_layer_and_the_fix():
    loaded = build_tiny_model("tiny-llama", seed=0)
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj is not 2:4 .* prune with pattern=2:4"):
        check_24(prunable_layers(loaded.model))


def test_not_24_model_is_refused_by_the_export_step():
    loaded = build_tiny_model("tiny-llama", seed=0)
    with pytest.raises(ExportError, match="is not 2:4"):
        export_run(loaded.model, torch.randint(0, 256, (1, 8)))


def test_cpu_conversion_is_skipped_with_a_reason_and_nothing_changes():
    loaded = pruned_24()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    report = to_semi_structured_(loaded.model)
    assert report.converted == [] and len(report.skipped) == 14
    assert all("need a CUDA GPU" in why for why in report.skipped.values())
    out = export_run(loaded.model, ids)
    assert out["converted"] == 0 and "CUDA" in out["note"]
    assert all(type(l.weight) is torch.nn.Parameter and l.weight.layout == torch.strided for l in prunable_layers(loaded.model).values())
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, before)


def test_packed_24_format_is_retired():
    for name in ("pack_24", "unpack_24", "save_24", "load_24", "load_24_state_dict"):
        assert not hasattr(msp.export, name), name


def test_export_cli_without_a_subcommand_says_the_packed_format_is_retired(capsys):
    assert main(["some/model", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msp.export: error: give a subcommand, recipe or quantized (the packed 2:4 export is retired")
    assert main(["--help"]) == 0 and "msp.export recipe" in capsys.readouterr().out


def test_run_with_semi_structured_export_on_cpu_writes_no_packed_folder(tmp_path):
    run = run_tiny_msp(tmp_path / "run", "pattern=2:4", "export.semi_structured=true")
    res = json.loads((run / "results.json").read_text())
    assert res["export"]["converted"] == 0 and "CUDA" in res["export"]["note"]
    assert not (run / "model-2of4").exists()


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
    out = export_run(model, ids)
    assert out["converted"] == 14, out
    assert out["max_abs_logit_diff"] <= 0.02 * out["max_abs_logit"] + 1e-3
    with torch.no_grad():
        sparse = model(input_ids=ids).logits.float()
    torch.testing.assert_close(sparse, dense, rtol=0.02, atol=0.02 * float(dense.abs().max()))
