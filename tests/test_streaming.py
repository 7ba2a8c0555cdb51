"""Block streaming (model bigger than the device): same masks and perplexity as the in-memory path; the plan puts
activations where they fit; a model whose single block cannot fit fails in one clear line."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from msp.cli import CONF_DIR, spec_from_config
from msp.eval.perplexity import perplexity
from msp.masks import Pattern
from msp.models import build_tiny_model, prunable_layers
from msp.run import ConfigError, run, validate_early
from msp.streaming import GiB, StreamingError, plan_streaming


def _spec(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+debug=default", f"cache_dir={tmp_path / 'cache'}", *overrides])
    return spec_from_config(cfg)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_streamed_perplexity_equals_in_memory(kind, cpu):
    model = build_tiny_model(kind, seed=1).model
    windows = torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(0))
    dense = perplexity(model, windows, cpu, batch_size=2)
    # passes of 2 windows (the last pass has 1): every block visits the device once per pass
    plan = plan_streaming(model, cpu, "true", nsamples=2)
    assert plan.stream and plan.windows_per_pass == 2
    streamed = perplexity(model, windows, cpu, batch_size=2, plan=plan)
    assert math.isfinite(dense) and streamed == pytest.approx(dense, rel=1e-6)
    # the blocks are back in place after the head trick: the ordinary forward still gives the same number
    assert perplexity(model, windows, cpu, batch_size=2) == dense


def test_streaming_run_gives_the_same_masks_and_ppl_as_in_memory(tmp_path):
    """The whole run (dense PPL → prune with SparseGPT → PPL) with streaming=true and a pretend 3 MiB budget on
    CPU matches streaming=false: identical pruned weights and perplexities."""
    results, weights = {}, {}
    for mode in ("false", "true"):
        spec = _spec(tmp_path, "pruner=sparsegpt", f"streaming={mode}", "gpu_budget_gb=0.003", "save_model=true")
        results[mode] = run(spec, tmp_path / mode)
        from safetensors.torch import load_file

        weights[mode] = load_file(tmp_path / mode / "model" / "model.safetensors")
    on, off = results["true"], results["false"]
    assert on["streaming"]["stream"] is True and off["streaming"]["stream"] is False
    assert on["streaming"]["budget_bytes"] == int(0.003 * GiB)
    assert on["ppl"]["wiki"] == pytest.approx(off["ppl"]["wiki"], rel=1e-5)
    assert on["dense_ppl"]["wiki"] == pytest.approx(off["dense_ppl"]["wiki"], rel=1e-5)
    assert on["ppl"]["wiki"] != on["dense_ppl"]["wiki"]  # pruning really happened
    layer_names = [l["name"] for l in on["layers"]]
    assert len(layer_names) == 14
    for name in layer_names:
        a, b = weights["true"][f"{name}.weight"], weights["false"][f"{name}.weight"]
        assert torch.equal(a == 0, b == 0), name  # the same mask
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plan_streams_when_the_model_does_not_fit_and_places_activations(cpu):
    model = build_tiny_model("tiny-llama").model
    kw = dict(batch_size=4, seqlen=64, nsamples=16)
    unlimited = plan_streaming(model, cpu, "auto", None, **kw)
    assert not unlimited.stream and unlimited.budget_bytes is None  # CPU without a budget: never streams
    whole = unlimited.model_bytes + unlimited.block_work_bytes + unlimited.activation_bytes
    one_block = unlimited.resident_bytes + unlimited.block_bytes + unlimited.block_work_bytes
    assert unlimited.model_bytes == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert unlimited.block_bytes * 2 + unlimited.resident_bytes == unlimited.model_bytes  # 2 equal blocks + the rest
    fits = plan_streaming(model, cpu, "auto", (whole + 1) / GiB, **kw)
    assert not fits.stream
    tight = plan_streaming(model, cpu, "auto", (whole - 1024) / GiB, **kw)
    assert tight.stream
    # a (pretend) GPU: activations stay on it when one block + activations fit, else go to the CPU.
    # Planning with an explicit budget never touches CUDA, so this runs on machines without a GPU.
    gpu = torch.device("cuda", 0)
    roomy = plan_streaming(model, gpu, "true", (one_block + unlimited.activation_bytes + 1) / GiB, **kw)
    assert roomy.stream and roomy.store_device == "cuda:0"
    cramped = plan_streaming(model, gpu, "true", (one_block + unlimited.activation_bytes // 2) / GiB, **kw)
    assert cramped.stream and cramped.store_device == "cpu"


def test_a_block_that_cannot_fit_is_one_clear_error(cpu):
    model = build_tiny_model("tiny-llama").model
    with pytest.raises(StreamingError, match=r"one decoder block needs ~.* but the budget is .*; lower batch_size"):
        plan_streaming(model, cpu, "true", 0.0005, batch_size=4, seqlen=64, nsamples=16)
    with pytest.raises(StreamingError, match="use streaming=auto"):
        plan_streaming(model, cpu, "false", 0.001, batch_size=4, seqlen=64, nsamples=16)
    with pytest.raises(StreamingError, match="must be positive"):
        plan_streaming(model, cpu, "auto", 0, batch_size=4, seqlen=64, nsamples=16)


def test_bad_streaming_mode_fails_validation(tmp_path):
    spec = _spec(tmp_path)
    spec.streaming = "sometimes"
    with pytest.raises(ConfigError, match="valid: auto, true, false"):
        validate_early(spec)


def test_streaming_leaves_the_model_on_the_cpu_between_blocks(cpu):
    """While block i runs, every other block's weights stay where they were (here: marked as untouched by
    counting `.to` calls on each block), and the prunable layers are found as before."""
    from msp.pipeline import stream_blocks

    model = build_tiny_model("tiny-llama").model
    calls: dict[int, int] = {}
    blocks = model.model.layers
    originals = [b.to for b in blocks]
    for i, b in enumerate(blocks):
        def counting_to(*args, _i=i, _orig=originals[i], **kwargs):
            calls[_i] = calls.get(_i, 0) + 1
            return _orig(*args, **kwargs)

        b.to = counting_to
    out = stream_blocks(model, torch.randint(0, 256, (3, 16)), cpu, batch_size=2, keep_all=True)
    assert calls == {0: 2, 1: 2}  # each block: to the device, then back home — once
    assert len(out.block_inputs) == 2 and len(out.final.hidden) == 2 and out.tuple_out is False
    assert len(prunable_layers(model)) == 14


def test_a_block_too_big_is_refused_before_loading_weights(tmp_path, cpu):
    """validate_early plans on a weightless meta-device skeleton: the same sizes as the loaded model, no loading."""
    from msp.models import skeleton_model

    skeleton = skeleton_model("tiny-llama")
    assert next(skeleton.parameters()).is_meta
    kw = dict(batch_size=4, seqlen=64, nsamples=4)
    assert plan_streaming(skeleton, cpu, "true", 0.003, **kw) == plan_streaming(build_tiny_model("tiny-llama").model, cpu, "true", 0.003, **kw)
    spec = _spec(tmp_path, "streaming=true", "gpu_budget_gb=0.0005")
    with pytest.raises(StreamingError, match="one decoder block needs"):
        validate_early(spec)
    validate_early(_spec(tmp_path, "streaming=true", "gpu_budget_gb=0.003"))


@pytest.mark.parametrize("metric", ["kl", "ppl"])
def test_streamed_search_fitness_equals_the_resident_forward(metric, cpu):
    """A candidate's fitness with the model streamed block by block equals the ordinary forward's."""
    import numpy as np

    from msp.eval.perplexity import perplexity
    from msp.pruners import WandaPruner
    from msp.search.fitness import CandidateModel, ModelFitness, precompute_variants

    model = build_tiny_model("tiny-llama", seed=3).model.eval()
    layers = prunable_layers(model)
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    variants = precompute_variants(model, layers, WandaPruner(), Pattern.parse("unstructured"), calib, cpu)
    units = [[n] for n in layers]
    levels = [0.3, 0.6, 0.9]
    values = {}
    plans = {False: None, True: plan_streaming(model, cpu, "true", nsamples=2)}  # streamed: passes of 2 windows
    for streamed, plan in plans.items():
        candidate = CandidateModel(layers, variants, units, lambda u, l: levels[l])
        fitness = ModelFitness(model, candidate, windows, [2, 3], cpu, metric, batch_size=2, plan=plan)
        genome = np.arange(len(units)) % 3
        values[streamed] = (fitness(genome, 0), fitness(genome, 1))
        candidate.restore()
    assert values[True] == pytest.approx(values[False], rel=1e-5)
    # the candidate really is pruned: KL > 0, or another perplexity than the dense model's
    dense = 0.0 if metric == "kl" else perplexity(model, windows, cpu, batch_size=2)
    assert values[False][1] != pytest.approx(dense, rel=1e-3)


def test_streaming_search_run_gives_the_same_allocation_as_in_memory(tmp_path):
    """allocation=msp with streaming=true (pretend 3 MiB budget) on CPU: the same search history and allocation."""
    results = {}
    for mode in ("false", "true"):
        spec = _spec(tmp_path, "allocation=msp", "allocation.generations=2", "sparsity=0.6", f"streaming={mode}", "gpu_budget_gb=0.003")
        results[mode] = run(spec, tmp_path / f"search_{mode}")
    on, off = results["true"], results["false"]
    assert on["streaming"]["stream"] is True
    best = lambda r: [h["best"] for h in r["search"]["history"]]  # noqa: E731
    assert best(on) == pytest.approx(best(off), rel=1e-5) and len(best(on)) == 3  # generation 0 + 2
    assert [l["target"] for l in on["layers"]] == [l["target"] for l in off["layers"]]
    assert on["ppl"]["wiki"] == pytest.approx(off["ppl"]["wiki"], rel=1e-5)
