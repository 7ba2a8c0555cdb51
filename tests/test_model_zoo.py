"""Architectures that are not LLaMA (docs/models.md), each a tiny random model built from its config: Mistral, Qwen2,
Qwen3, Phi-3 (fused qkv_proj / gate_up_proj), GPT-2 (Conv1D layers), Gemma-2, Gemma-3 and OPT go through every pruner ×
{uniform, fisher, msp} × {unstructured, 2:4} with their layers found automatically (names and count per block), the
parameter-weighted budget exact, embeddings and a tied lm_head untouched and a finite perplexity. GPT-2's Conv1D
layers are pruned in the (out, in) orientation: Wanda on them equals Wanda on the equivalent nn.Linear, and the
saved model (Conv1D layout again) reloads in transformers with its zeros in place. A model whose blocks cannot be
found says how to name them (``model.blocks=``), and the key works."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from msp.allocation.build import AllocationContext, build_allocation
from msp.eval.perplexity import perplexity
from msp.masks import Pattern, prune_count
from msp.models import (Conv1DLinear, ModelError, build_tiny_model, find_blocks, linearize_conv1d_, point_at_blocks,
                        prunable_layers, save_pruned_model, tiny_config)
from msp.pipeline import sequential_pass
from msp.prune import prune_, weighted_sparsity
from msp.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.pruners.stats import LayerStats
from textbook import linear_inputs

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent

LLAMA_LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
#: model → (the blocks' path, number of blocks, the Linear layers of one block in module order)
ZOO = {
    "tiny-mistral": ("model.layers", 2, LLAMA_LAYERS),
    "tiny-qwen2": ("model.layers", 2, LLAMA_LAYERS),
    "tiny-qwen3": ("model.layers", 2, LLAMA_LAYERS),
    "tiny-phi3": ("model.layers", 2, ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "tiny-gpt2": ("transformer.h", 2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "tiny-gemma2": ("model.layers", 2, LLAMA_LAYERS),
    "tiny-gemma3": ("model.layers", 3, LLAMA_LAYERS),
    "tiny-opt": ("model.decoder.layers", 2, ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]),
}
#: a very small search, started from the Fisher allocation (so that its allocation is not uniform)
SEARCH = {"method": "msp", "granularity": "layer", "init": "fisher", "extra": [], "population": 2, "offspring": 2, "generations": 1,
          "stages": [{"tokens": 32}], "fitness_seqlen": 32, "step": 0.05, "init_options": {"beta": 0.2}}
ALLOCATIONS = {"uniform": {"method": "uniform"}, "fisher": {"method": "fisher", "beta": 0.05}, "msp": SEARCH}


def _windows(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _ctx(model, pruner, target: float, pattern: str, calib: torch.Tensor, run_dir: Path) -> AllocationContext:
    return AllocationContext(model=model, layers=prunable_layers(model), target=target, pattern=Pattern.parse(pattern), device=CPU,
                             pruner=pruner, calibration_ids=calib, heldout_tokens=_windows(1, 300, 9)[0], seqlen=calib.shape[1],
                             seed=0, run_dir=run_dir, batch_size=2)


@pytest.fixture(scope="module")
def zoo():
    """Each model once per module (built from its config, seeded); tests prune deep copies."""
    torch.set_num_threads(1)  # tiny tensors: one intra-op thread beats several fighting over shared cores
    return {name: build_tiny_model(name, seed=0).model for name in ZOO}


@pytest.mark.parametrize("name", list(ZOO))
def test_layers_are_found_automatically_and_embeddings_are_left_out(name, zoo):
    model = zoo[name]
    path, count, local = ZOO[name]
    prefix, blocks = find_blocks(model)
    assert (prefix, len(blocks)) == (path, count)
    layers = prunable_layers(model)
    assert list(layers) == [f"{path}.{i}.{n}" for i in range(count) for n in local]
    inside = {id(p) for lin in layers.values() for p in lin.parameters()}
    assert id(model.get_input_embeddings().weight) not in inside and id(model.get_output_embeddings().weight) not in inside
    kv = getattr(model.config, "num_key_value_heads", None)
    if kv is not None and kv < model.config.num_attention_heads and name != "tiny-phi3":  # grouped-query attention: k/v are narrower
        assert layers[f"{path}.0.self_attn.k_proj"].out_features < layers[f"{path}.0.self_attn.q_proj"].out_features


def _expected_zeros(pruner, rows: int, cols: int, sparsity: float, pattern: Pattern) -> int:
    layer = pattern.for_layer(sparsity)
    if layer.kind == "nm":
        return rows * cols // layer.m * (layer.m - layer.n)
    return rows * prune_count(cols, sparsity) if pruner.score_based else prune_count(rows * cols, sparsity)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner(), SparseGPTPruner(blocksize=32)], ids=lambda p: p.name)
@pytest.mark.parametrize("name", list(ZOO))
def test_every_pruner_allocation_and_pattern_keeps_the_budget(name, pruner, pattern, zoo, tmp_path):
    base, target = zoo[name], 0.5
    calib, evals = _windows(4, 32, 2), _windows(2, 32, 3)
    embeddings = base.get_input_embeddings().weight.detach().clone()
    head = base.get_output_embeddings().weight.detach().clone()
    nm = Pattern.parse(pattern)
    for method, options in ALLOCATIONS.items():
        model = copy.deepcopy(base)
        alloc = build_allocation(_ctx(model, pruner, target, pattern, calib, tmp_path / method), dict(options)).allocation
        layers = prunable_layers(model)
        params = {n: lin.weight.numel() for n, lin in layers.items()}
        assert alloc.weighted_mean(params) == pytest.approx(target, abs=1e-9), method
        reports = prune_(model, pruner, alloc, calib, CPU, pattern, batch_size=2)
        assert [r.name for r in reports] == list(layers), method
        for r in reports:  # every layer removes exactly the number of weights its sparsity and pattern ask for
            w = layers[r.name].weight.data
            zeros = w == 0
            assert int(zeros.sum()) == _expected_zeros(pruner, *w.shape, alloc[r.name], nm), (method, r.name)
            if nm.is_nm:
                assert bool((zeros.view(w.shape[0], -1, 4).sum(-1) == 2).all()), (method, r.name)  # 2 of every 4 inputs
        measured = weighted_sparsity(reports)
        if method == "uniform" or nm.is_nm:  # half of every row (of every group of 4): the budget is met exactly
            assert measured == target and set(alloc.sparsities.values()) == {target}, method
        else:  # per-layer sparsities that differ, each rounded to whole weights per row: off by at most that rounding
            assert len(set(alloc.sparsities.values())) > 1, method
            assert abs(measured - target) <= sum(layers[r.name].weight.shape[0] * 0.5 for r in reports) / sum(params.values())
        assert torch.equal(model.get_input_embeddings().weight, embeddings) and torch.equal(model.get_output_embeddings().weight, head)
        assert math.isfinite(perplexity(model, evals, CPU)), method


EVERY_ALLOCATOR = {"owl": {"method": "owl"}, "rank": {"method": "rank"}, "hessian": {"method": "hessian"}, "alpha": {"method": "alpha"},
                   "dlp": {"method": "dlp"}, "atp": {"method": "atp", "beta": 0.02}, "msp-block": {**SEARCH, "granularity": "block"}}


@pytest.mark.parametrize("method", list(EVERY_ALLOCATOR))
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-phi3"])
def test_every_allocator_keeps_the_budget_on_fused_and_conv1d_layers(name, method, zoo, tmp_path):
    """The other allocators (per-block OWL/DLP Wanda scores, spectra, traces, the block-level search) on fused
    qkv/gate_up projections and on GPT-2's linearized Conv1D layers."""
    model = copy.deepcopy(zoo[name])
    calib = _windows(4, 32, 10)
    alloc = build_allocation(_ctx(model, WandaPruner(), 0.6, "unstructured", calib, tmp_path), dict(EVERY_ALLOCATOR[method])).allocation
    params = {n: lin.weight.numel() for n, lin in prunable_layers(model).items()}
    assert set(alloc.sparsities) == set(params)
    assert alloc.weighted_mean(params) == pytest.approx(0.6, abs=1e-9)
    assert len(set(alloc.sparsities.values())) > 1 or method == "msp-block"  # the search may well settle on uniform
    reports = prune_(model, WandaPruner(), alloc, calib, CPU, "unstructured", batch_size=2)
    assert abs(weighted_sparsity(reports) - 0.6) <= sum(l.weight.shape[0] * 0.5 for l in prunable_layers(model).values()) / sum(params.values())


def test_gpt2_streamed_equals_resident(zoo):
    from msp.streaming import plan_streaming

    model = zoo["tiny-gpt2"]
    plan = plan_streaming(model, CPU, "true", batch_size=2, seqlen=32, nsamples=2)
    assert plan.stream
    ids = _windows(4, 32, 11)
    assert perplexity(model, ids, CPU, batch_size=2, plan=plan) == pytest.approx(perplexity(model, ids, CPU, batch_size=2), rel=1e-6)


def _hf_gpt2(attn: str = "sdpa"):
    """tiny-gpt2 exactly as transformers builds it (Conv1D layers), seeded as msp's loader seeds it."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("tiny-gpt2"), attn_implementation=attn).eval()


def test_gpt2_conv1d_layers_become_the_linear_layers_they_compute(zoo):
    from transformers.pytorch_utils import Conv1D

    hf, msp_model = _hf_gpt2(), zoo["tiny-gpt2"]
    convs = {n: m for n, m in hf.named_modules() if isinstance(m, Conv1D)}
    layers = prunable_layers(msp_model)
    assert list(convs) == list(layers) and all(isinstance(l, Conv1DLinear) for l in layers.values())
    for n, conv in convs.items():
        assert torch.equal(layers[n].weight, conv.weight.t()) and layers[n].weight.shape == (conv.nf, conv.nx)
    ids = _windows(2, 16, 4)
    torch.testing.assert_close(msp_model(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match=r"Conv1D.*linearize_conv1d_"):
        find_blocks(hf)  # a GPT-2 built by hand: the message names the conversion


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_on_a_conv1d_layer_equals_wanda_on_the_equivalent_linear(pattern, zoo, tmp_path):
    """Block 0's layers, pruned by msp, against Wanda applied by hand to nn.Linear copies of transformers' own Conv1D
    layers with the inputs those Conv1D layers see in transformers' forward; then the saved model reloads in
    transformers (Conv1D layout) with the zeros in place (2:4 along the inputs) and the same logits."""
    from transformers import AutoModelForCausalLM

    hf = _hf_gpt2()
    calib = _windows(4, 32, 5)
    inputs = _conv1d_inputs(hf, calib)
    model = copy.deepcopy(zoo["tiny-gpt2"])
    alloc = build_allocation(_ctx(model, WandaPruner(), 0.5, pattern, calib, tmp_path), {"method": "uniform"}).allocation
    prune_(model, WandaPruner(), alloc, calib, CPU, pattern, batch_size=2)
    layers = prunable_layers(model)
    for n in [n for n in layers if n.startswith("transformer.h.0.")]:
        conv = hf.get_submodule(n)
        linear = nn.Linear(conv.nx, conv.nf)
        linear.weight.data.copy_(conv.weight.data.t())
        stats = LayerStats(conv.nx, False)
        stats.add_batch(inputs[n])
        expected = WandaPruner().prune_weight(linear.weight.data, stats, 0.5, Pattern.parse(pattern))
        assert torch.equal(layers[n].weight == 0, expected == 0), n
        torch.testing.assert_close(layers[n].weight.data, expected, rtol=0, atol=0)

    from msp.models import LoadedModel

    save_pruned_model(LoadedModel(model, None, "tiny-gpt2", 512), tmp_path / "saved")
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1DLinear)  # the Linear views are back after saving
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    for n, lin in layers.items():
        conv = reloaded.get_submodule(n)
        assert torch.equal(conv.weight, lin.weight.t()), n
        if pattern == "2:4":  # Conv1D weight (in, out): the groups of 4 run down dim 0
            zeros = (conv.weight == 0).view(conv.nx // 4, 4, conv.nf).sum(1)
            assert bool((zeros == 2).all()), n
    ids = _windows(2, 16, 6)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _conv1d_inputs(model, windows):
    """The inputs of every Conv1D of a transformers GPT-2 in one ordinary forward (tokens, in)."""
    from transformers.pytorch_utils import Conv1D

    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in model.named_modules() if isinstance(m, Conv1D)]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_gpt2_blocks_get_their_positional_attention_mask():
    """Eager GPT-2 passes its causal mask to each block positionally; the block-by-block statistics still equal
    those of the model's own forward (without the mask the blocks would attend to later tokens)."""
    model = _hf_gpt2("eager")
    linearize_conv1d_(model)
    ids = _windows(4, 32, 7)
    layers = prunable_layers(model)
    ref = {n: LayerStats(l.in_features, False) for n, l in layers.items()}
    for n, x in linear_inputs(model, ids).items():
        ref[n].add_batch(x)
    seen = {}

    def on_block(i, prefix, block, linears, stats):
        seen.update({f"{prefix}.{i}.{k}": v for k, v in stats.items()})
        return False

    sequential_pass(model, ids, CPU, on_block, batch_size=2)
    assert set(seen) == set(layers)
    for n in layers:
        torch.testing.assert_close(seen[n].col_sq_norm, ref[n].col_sq_norm, rtol=1e-5, atol=1e-5, msg=n)


def _hybrid_llama():
    """tiny-llama whose second block is of another class (as in hybrid models): no ModuleList of identical blocks."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class OtherLayer(LlamaDecoderLayer):
        pass

    model = build_tiny_model("tiny-llama").model
    old = model.model.layers[1]
    new = OtherLayer(model.config, layer_idx=1)
    new.load_state_dict(old.state_dict())
    model.model.layers[1] = new
    return model


def test_blocks_that_cannot_be_found_are_named_with_model_blocks(tmp_path):
    model = _hybrid_llama()
    with pytest.raises(ModelError, match=r"set model\.blocks=<dotted path.*its ModuleLists: model\.layers") as err:
        find_blocks(model)
    assert "\n" not in str(err.value)
    for wrong, why in [("model.nope", "has no module"), ("model.norm", "not a non-empty ModuleList"), ("model", "not a non-empty ModuleList")]:
        with pytest.raises(ModelError, match=rf"model\.blocks='{wrong}'.*{why}.*model\.layers"):
            point_at_blocks(model, wrong)
    point_at_blocks(model, "model.layers")
    assert find_blocks(model)[0] == "model.layers"
    assert list(prunable_layers(model)) == [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LAYERS]
    calib = _windows(4, 32, 8)
    alloc = build_allocation(_ctx(model, WandaPruner(), 0.5, "unstructured", calib, tmp_path), {"method": "uniform"}).allocation
    reports = prune_(model, WandaPruner(), alloc, calib, CPU, "unstructured", batch_size=2)
    assert len(reports) == 14 and weighted_sparsity(reports) == 0.5
    assert math.isfinite(perplexity(model, _windows(2, 32, 9), CPU))
    point_at_blocks(model, None)  # back to the automatic search
    with pytest.raises(ModelError, match="model.blocks="):
        find_blocks(model)


def test_model_blocks_key_reaches_the_loader_and_leaves_hashes_alone():
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.models import load_model, skeleton_layers
    from msp.sweep import config_hash_of

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        plain = compose(config_name="config", overrides=["model=tiny-gpt2", "cache_dir=/tmp/x"])
        null = compose(config_name="config", overrides=["model=tiny-gpt2", "model.blocks=null", "cache_dir=/tmp/x"])
        named = compose(config_name="config", overrides=["model=tiny-gpt2", "model.blocks=transformer.h", "cache_dir=/tmp/x"])
    assert plain.model.blocks is None and config_hash_of(plain) == config_hash_of(null) != config_hash_of(named)
    spec = spec_from_config(named)
    assert spec.model_blocks == "transformer.h"
    loaded = load_model(spec.model, loader=spec.model_loader, blocks=spec.model_blocks)
    assert find_blocks(loaded.model)[0] == "transformer.h" and len(prunable_layers(loaded.model)) == 8
    assert len(skeleton_layers("tiny-gpt2", "transformer.h")) == 8
    with pytest.raises(ModelError, match="model.blocks='transformer.wte'"):
        skeleton_layers("tiny-gpt2", "transformer.wte")


NEW_CONFIGS = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gpt2", "tiny-gemma2", "tiny-gemma3"]


def test_cli_runs_every_new_model_config(tmp_path):
    """One multirun subprocess (a CLI start costs seconds): every new conf/model/tiny-*.yaml as its own job, pruned
    with SparseGPT to 2:4, each job's results.json with the exact budget, its layers and a finite perplexity."""
    assert sorted(NEW_CONFIGS) == sorted(p.stem for p in (ROOT / "conf" / "model").glob("tiny-*.yaml") if p.stem not in ("tiny-llama", "tiny-opt"))
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "-m", f"model={','.join(NEW_CONFIGS)}", "data=tiny", "device=cpu", "pruner=sparsegpt",
         "pattern=2:4", "data.nsamples=2", "data.seqlen=32", "data.eval_windows=2", "report=false",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for path in (tmp_path / "sweep").glob("*/results.json"):
        doc = json.loads(path.read_text())
        results[doc["model"]] = doc
    assert sorted(results) == sorted(NEW_CONFIGS)
    for name, doc in results.items():
        path, count, local = ZOO[name]
        assert [l["name"] for l in doc["layers"]] == [f"{path}.{i}.{n}" for i in range(count) for n in local], name
        assert doc["sparsity"] == 0.5 and all(math.isfinite(v) for v in doc["ppl"].values()), name


def test_cli_wrong_model_blocks_is_one_line_before_loading(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "model=tiny-llama", "model.blocks=model.nope", "data=tiny", "device=cpu",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("msp: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.blocks='model.nope'" in errors[0] and "model.layers" in errors[0]
    assert not (tmp_path / "run" / "results.json").exists()


def test_quantized_export_of_gpt2_is_refused_before_pruning():
    """compressed-tensors replaces nn.Linear layers only: a quantized GPT-2 (Conv1D in transformers) could not load."""
    from hydra import compose, initialize_config_dir

    from msp.cli import CONF_DIR, spec_from_config
    from msp.run import validate_early

    overrides = ["pruner=sparsegpt", "pruner.bits=4", "export.quantized=true", "data=tiny", "device=cpu", "cache_dir=/tmp/x"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        gpt2 = spec_from_config(compose(config_name="config", overrides=["model=tiny-gpt2", *overrides]))
        phi3 = spec_from_config(compose(config_name="config", overrides=["model=tiny-phi3", *overrides]))
    with pytest.raises(ModelError, match=r"export.quantized=true cannot write GPT2LMHeadModel.*drop export.quantized=true"):
        validate_early(gpt2)
    validate_early(phi3)  # fused nn.Linear layers export as any other

