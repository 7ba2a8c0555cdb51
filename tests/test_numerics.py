"""Numerical guards (msp/numerics.py): NaN or inf stops a run where it first appears, with the stage, block and
layer named; SparseGPT's dampening retries are bounded and logged; half-precision statistics accumulate in float32."""
from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from msp.allocation import Allocation
from msp.errors import MspError
from msp.masks import Pattern
from msp.models import build_tiny_model, find_blocks, prunable_layers
from msp.numerics import NonFiniteError, check_all_finite, check_finite, check_finite_value
from msp.pipeline import sequential_pass
from msp.prune import prune_
from msp.pruners import LayerStats, MagnitudePruner, SparseGPTPruner, WandaPruner
from msp.pruners.sparsegpt import SparseGPTError, inverse_hessian_cholesky
from msp.pruners.stats import check_stats, input_update

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _uniform(model, target: float = 0.5) -> Allocation:
    return Allocation({n: target for n in prunable_layers(model)}, target)


def _tiny():
    return build_tiny_model("tiny-llama", seed=0).model


# ---------------------------------------------------------------------------------------------------- the checks


def test_check_finite_passes_finite_and_names_where_otherwise():
    t = torch.arange(6.0)
    assert check_finite(t, stage="s") is t
    bad = t.clone()
    bad[1], bad[4] = float("nan"), float("-inf")
    with pytest.raises(NonFiniteError, match=r"NaN/inf in the outputs \(1 NaN, 1 inf of 6 values\) at stage 'demo', block 3, layer a.b; ") as err:
        check_finite(bad, stage="demo", block=3, layer="a.b", what="the outputs")
    assert isinstance(err.value, MspError) and (err.value.stage, err.value.block, err.value.layer) == ("demo", 3, "a.b")
    assert "\n" not in str(err.value)
    assert check_finite_value(2.5, stage="s") == 2.5
    with pytest.raises(NonFiniteError, match=r"the perplexity \(inf\) at stage 'ppl'"):
        check_finite_value(math.inf, stage="ppl", what="the perplexity")


def test_check_all_finite_names_the_first_bad_tensor_in_order():
    ok, nan = torch.ones(3), torch.tensor([1.0, float("nan")])
    check_all_finite([("l0", "x", ok), ("l1", "y", None)], stage="s")  # None entries are skipped
    with pytest.raises(NonFiniteError, match=r"NaN/inf in y \(1 NaN, 0 inf of 2 values\) at stage 's', block 2, layer l1; fix it") as err:
        check_all_finite([("l0", "x", ok), ("l1", "y", nan), ("l2", "z", nan)], stage="s", block=2, hint=lambda: "fix it")
    assert err.value.layer == "l1"


def test_check_stats_names_the_layer_and_the_statistic():
    good, bad = LayerStats(4, True, name="m.layers.0.q"), LayerStats(4, True, name="m.layers.0.o")
    good.add_batch(torch.ones(3, 4))
    bad.add_batch(torch.tensor([[1.0, 2.0, float("inf"), 0.0]]))
    check_stats({"q": good}, stage="s", block=0)
    with pytest.raises(NonFiniteError, match=r"Σx² .* at stage 'pruning \(x\)', block 0, layer m.layers.0.o;"):
        check_stats({"q": good, "o": bad}, stage="pruning (x)", block=0)


# ---------------------------------------------------------------------------------------------------- the pruning pass


@pytest.mark.parametrize("true_sequential", [False, True])
@pytest.mark.parametrize("pruner", [WandaPruner(), SparseGPTPruner()], ids=["wanda", "sparsegpt"])
def test_inf_weight_stops_pruning_at_the_first_layer_it_reaches(pruner, true_sequential, windows, cpu):
    """An inf in block 1's o_proj weight first shows in the input statistics of the layer it feeds (block 1's MLP,
    after the residual and the norm): that layer and the culprit weight are named, block 0 was pruned normally."""
    model = _tiny()
    model.model.layers[1].self_attn.o_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        prune_(model, pruner, _uniform(model), windows, cpu, true_sequential=true_sequential)
    msg = str(err.value)
    assert f"at stage 'pruning ({pruner.name})', block 1, layer model.layers.1.mlp.gate_proj;" in msg, msg
    assert "non-finite weights: model.layers.1.self_attn.o_proj.weight" in msg and "\n" not in msg
    assert (err.value.block, err.value.layer) == (1, "model.layers.1.mlp.gate_proj")


def test_nan_embeddings_stop_at_block_0_inputs(windows, cpu):
    model = _tiny()
    model.model.embed_tokens.weight.data[:] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the inputs of block 0 \(the embeddings' output\) .* at stage 'pruning \(wanda\)', block 0;"):
        prune_(model, WandaPruner(), _uniform(model), windows, cpu)


class _NaNPruner(MagnitudePruner):
    """Magnitude pruning that writes a NaN into one layer's pruned weight (a pruner bug)."""

    needs_calibration = True

    def __init__(self, victim: int):
        self.victim, self.calls = victim, 0

    def prune_weight(self, weight, stats, sparsity, pattern):
        out = super().prune_weight(weight, stats, sparsity, pattern)
        self.calls += 1
        if self.calls == self.victim:
            out = out.clone()
            out[0, 0] = float("nan")
        return out


def test_nan_from_a_pruned_weight_stops_at_the_block_outputs(windows, cpu):
    """The statistics were finite; the pruned block's outputs are not: block 0 and the pruned weight are named."""
    model = _tiny()
    with pytest.raises(NonFiniteError) as err:
        prune_(model, _NaNPruner(victim=5), _uniform(model), windows, cpu)  # the 5th layer of block 0: mlp.gate_proj
    msg = str(err.value)
    assert "NaN/inf in the outputs of block 0" in msg and "block 0;" in msg, msg
    assert "non-finite weights: model.layers.0.mlp.gate_proj.weight" in msg


def test_nan_from_a_forward_hook_stops_at_that_block_and_spares_the_next(windows, cpu):
    """A forward hook that poisons block 0's output (an overflowing activation): stopped at block 0's outputs,
    block 1 never calibrated (the pass stops where the NaN appears)."""
    model = _tiny()
    _, blocks = find_blocks(model)

    def poison(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        hidden[..., 0] = float("nan")
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    visited = []
    handle = blocks[0].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match=r"the outputs of block 0 .* at stage 'probe', block 0; check the model's weights"):
            sequential_pass(model, windows, cpu, lambda i, *a: visited.append(i), desc="probe")
    finally:
        handle.remove()
    assert visited == [0]


def test_the_pipeline_names_every_layers_statistics(windows, cpu):
    """The full layer name reaches the pruner (SparseGPT's warnings and errors name it), in both passes."""
    model = _tiny()
    names: list[str | None] = []
    sequential_pass(model, windows, cpu, lambda i, p, b, lin, stats: names.extend(s.name for s in stats.values()) or False)
    assert names == list(prunable_layers(model))
    inline: list[str | None] = []
    sequential_pass(model, windows, cpu, lambda *a: True, on_layer=lambda i, p, local, lin, st: inline.append(st.name))
    assert inline == list(prunable_layers(model))


# ---------------------------------------------------------------------------------------------------- sensitivities, eval, search


@pytest.mark.parametrize("method", ["fisher", "hessian"])
def test_nan_loss_stops_the_sensitivity(method, windows, cpu):
    from msp.sensitivity.fisher import fisher_trace
    from msp.sensitivity.hessian import hessian_trace

    model = _tiny()
    model.model.layers[1].mlp.down_proj.weight.data[3, 3] = float("inf")
    trace = fisher_trace if method == "fisher" else lambda *a, **k: hessian_trace(*a, probes=1, **k)
    with pytest.raises(NonFiniteError, match=rf"the loss of calibration window 0 \(.*\) at stage '{method} sensitivity'"):
        trace(model, windows[:2], cpu)
    assert all(p.grad is None for p in model.parameters())  # grads_on restored the model after the error


def test_nan_loss_stops_the_streamed_fisher(windows, cpu):
    from msp.sensitivity.fisher import fisher_trace
    from msp.streaming import plan_streaming

    model = _tiny()
    model.model.layers[0].self_attn.v_proj.weight.data[0, 0] = float("nan")
    plan = plan_streaming(model, cpu, "true", nsamples=2)
    with pytest.raises(NonFiniteError, match=r"the loss of calibration window 0 of this pass .* at stage 'streamed sensitivity'"):
        fisher_trace(model, windows[:2], cpu, plan=plan)


def test_nan_squared_gradient_sum_names_the_layer():
    from msp.sensitivity.common import per_layer_means

    layers = {"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}
    sums = {"a": torch.tensor(4.0), "b": torch.tensor(float("inf"))}
    assert per_layer_means({"a": sums["a"]}, 2, {"a": layers["a"]}, False, "fisher trace") == {"a": 2.0}
    with pytest.raises(NonFiniteError, match=r"the fisher trace \(streamed\) of b \(inf\) at stage 'fisher trace', layer b"):
        per_layer_means(sums, 2, layers, False, "fisher trace (streamed)")


def test_perplexity_never_returns_nan(windows, cpu):
    from msp.eval.perplexity import perplexity

    model = _tiny()
    assert math.isfinite(perplexity(model, windows, cpu, batch_size=2))
    model.model.layers[1].self_attn.o_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the next-token NLL of windows 0-1 \(nan\) at stage 'pruned ppl wiki'; "
                                             r"non-finite weights: model.layers.1.self_attn.o_proj.weight"):
        perplexity(model, windows, cpu, batch_size=2, desc="pruned ppl wiki")


def _evolution():
    from msp.search.evolution import Evolution, EvolutionConfig, SearchSpace

    space = SearchSpace(lower=(0, 0, 0), upper=(2, 2, 2), weight=(1, 1, 1), budget=3)
    return Evolution(space, EvolutionConfig(generations=1, population=2, offspring=2, survivors=(), seed=0))


def test_search_nan_fitness_stops_and_inf_ranks_last():
    evo = _evolution()
    g_inf, g_nan, g_ok = np.array([2, 1, 0]), np.array([0, 1, 2]), np.array([1, 1, 1])
    fitness = lambda g, s: {(2, 1, 0): math.inf, (0, 1, 2): math.nan}.get(tuple(int(x) for x in g), 0.5)  # noqa: E731
    assert evo.score(fitness, g_inf, 0) == math.inf and evo.score(fitness, g_ok, 0) == 0.5
    with pytest.raises(NonFiniteError, match=r"the fitness of candidate \[0 1 2\] \(NaN\) at stage 'search fitness \(fidelity stage 1\)'"):
        evo.score(fitness, g_nan, 1)

    class Many:
        def __call__(self, g, s):
            raise AssertionError("score_all goes through many")

        def many(self, genomes, s):
            return [fitness(g, s) for g in genomes]

    assert _evolution().score_all(Many(), [g_ok, g_inf], 0) == [0.5, math.inf]
    with pytest.raises(NonFiniteError, match=r"candidate \[0 1 2\] .*\(fidelity stage 0\)"):
        _evolution().score_all(Many(), [g_ok, g_nan], 0)


def test_search_nan_dense_reference_stops_before_the_search(windows, cpu):
    """The search's dense reference (its cached Σ p log p) is checked once, before any candidate is scored."""
    from types import SimpleNamespace

    from msp.search.allocator import _model_fitness

    model = _tiny()
    model.lm_head.weight.data[5, 0] = float("nan")
    ctx = SimpleNamespace(model=model, device=cpu, plan=None)
    search = SimpleNamespace(windows=windows, windows_per_stage=[2, 4], settings=SimpleNamespace(metric="kl", fitness_batch_size=2,
                                                                                                 fitness_blockwise=False, fitness_memory_gb=2.0))
    with pytest.raises(NonFiniteError, match=r"the dense reference Σ p log p .* at stage 'search: dense reference'; "
                                             r"non-finite weights: lm_head.weight"):
        _model_fitness(ctx, search, SimpleNamespace(current=None, unit_layers=[]))


# ---------------------------------------------------------------------------------------------------- SparseGPT


def _indefinite(off: float, n: int = 8) -> torch.Tensor:
    """The identity with H[0,1] = H[1,0] = ``off``: a positive diagonal (no dead inputs, mean(diag H) = 1) and the
    eigenvalue 1 − off, so for off > 1.01 the Cholesky factorisation fails at 1 % dampening."""
    h = torch.eye(n)
    h[0, 1] = h[1, 0] = off
    return h


def test_sparsegpt_retries_more_dampening_and_logs_the_layer(caplog):
    h = _indefinite(1.5)  # eigenvalue -0.5: fails at +0.01 and +0.11, factorises at +1.11
    assert torch.linalg.cholesky_ex(h + 0.01 * torch.eye(8))[1] != 0
    with caplog.at_level(logging.WARNING, logger="msp.pruners.sparsegpt"):
        damped, upper, dead = inverse_hessian_cholesky(h, 0.01, "model.layers.3.self_attn.k_proj")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("model.layers.3.self_attn.k_proj" in w and "pruner.percdamp=0.01" in w for w in warnings)
    assert "dampening 0.11 x mean(diag H)" in warnings[0] and "dampening 1.11 x mean(diag H)" in warnings[1]
    assert torch.allclose(damped.diagonal(), h.diagonal() + 1.11)  # the dampening used is the last one logged
    assert bool(torch.isfinite(upper).all()) and not dead.any()
    # the factor really is the upper Cholesky factor of the damped H's inverse
    hinv = torch.linalg.inv(damped.double())
    assert torch.allclose((upper.t() @ upper).double(), hinv, atol=1e-5)


def test_sparsegpt_gives_up_with_the_layer_and_the_fix(caplog):
    h = _indefinite(100.0)  # eigenvalue -99: even 11.11 x mean(diag H) cannot lift it
    with caplog.at_level(logging.WARNING, logger="msp.pruners.sparsegpt"):
        with pytest.raises(SparseGPTError, match=r"Hessian XᵀX of model.layers.0.mlp.up_proj is not positive definite even with "
                                                 r"dampening 11.11 x .*retries\); raise the dampening \(e.g. pruner.percdamp=0.1\)"):
            inverse_hessian_cholesky(h, 0.01, "model.layers.0.mlp.up_proj")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3  # bounded: three retries
    # through the pruner: the layer name travels in the statistics the pipeline named
    stats = LayerStats(8, True, name="model.layers.0.mlp.up_proj")
    stats.tokens, stats.col_sq_norm, stats.hessian = 1, h.diagonal().clone(), h
    with pytest.raises(SparseGPTError, match=r"of model.layers.0.mlp.up_proj is not positive definite"):
        SparseGPTPruner().prune_weight(torch.randn(4, 8), stats, 0.5, Pattern.parse("unstructured"))


def test_sparsegpt_positive_definite_hessian_is_untouched(caplog):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    h = x.t() @ x
    with caplog.at_level(logging.WARNING, logger="msp.pruners.sparsegpt"):
        damped, upper, _ = inverse_hessian_cholesky(h, 0.01, "l")
    assert not caplog.records
    ref = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(8)
    assert torch.equal(damped, ref)
    assert torch.equal(upper, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True))


# ---------------------------------------------------------------------------------------------------- half precision


def test_fp16_activations_whose_squares_overflow_accumulate_finite_float32_statistics():
    g = torch.Generator().manual_seed(0)
    x = (200 + 200 * torch.rand(3, 40, 16, generator=g)).to(torch.float16)  # |x| in [200, 400]: x² up to 160000 > 65504
    assert torch.isinf(x * x).any() and torch.isinf((x * x).sum(dim=(0, 1))).all()  # fp16 accumulation would overflow
    upd = input_update(x, need_hessian=True)
    assert upd.col_sq.dtype == upd.xtx.dtype == torch.float32 and upd.tokens == 120
    ref = x.reshape(-1, 16).double()
    assert torch.allclose(upd.col_sq.double(), (ref * ref).sum(0), rtol=1e-6, atol=0)
    assert torch.allclose(upd.xtx.double(), ref.t() @ ref, rtol=1e-6, atol=0)
    stats = LayerStats(16, True)
    for chunk in x:
        stats.add_batch(chunk)
    check_stats({"l": stats}, stage="s")
    assert torch.allclose(stats.hessian.double(), ref.t() @ ref, rtol=1e-6, atol=0)


def test_fp16_tiny_model_through_the_statistics_pass(windows, cpu):
    """A float16 tiny-llama whose down_proj inputs are ~300 (a pre-hook makes them so): the statistics pass keeps
    float32, finite statistics equal to a float64 reference of the very inputs the layer saw."""
    model = build_tiny_model("tiny-llama", seed=0, dtype=torch.float16).model
    assert next(model.parameters()).dtype == torch.float16
    layer = model.model.layers[0].mlp.down_proj
    seen: list[torch.Tensor] = []

    def big_inputs(module, args):
        g = torch.Generator().manual_seed(len(seen))
        big = ((200 + 200 * torch.rand(args[0].shape, generator=g)) * torch.sign(torch.randn(args[0].shape, generator=g)))
        big = big.to(args[0].dtype)
        seen.append(big)
        return (big,)

    collected = {}

    def on_block(i, prefix, block, linears, stats):
        collected.update({s.name: s for s in stats.values()})
        return False

    handle = layer.register_forward_pre_hook(big_inputs)  # runs before the pipeline's statistics hook
    try:
        sequential_pass(model, windows, cpu, on_block, need_hessian=True, batch_size=2, propagate=False)
    finally:
        handle.remove()
    stats = collected["model.layers.0.mlp.down_proj"]
    ref = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()
    assert torch.isinf(ref.to(torch.float16) ** 2).any()
    assert stats.col_sq_norm.dtype == stats.hessian.dtype == torch.float32 and stats.tokens == ref.shape[0]
    assert torch.allclose(stats.col_sq_norm.double(), (ref * ref).sum(0), rtol=1e-6, atol=0)
    ref_h = ref.t() @ ref  # off-diagonal sums cancel: compare against the scale of H
    assert torch.allclose(stats.hessian.double(), ref_h, rtol=1e-6, atol=1e-6 * float(ref_h.abs().max()))
    assert all(bool(torch.isfinite(s.hessian).all()) for s in collected.values())


# ---------------------------------------------------------------------------------------------------- the command line


def test_cli_stops_with_one_line_and_no_results(tmp_path):
    """The command line on a tiny-llama with an inf weight (a corrupt checkpoint): non-zero exit, the stage, block
    and layer on one line, no results.json."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        import msp.models as models
        build = models.build_tiny_model
        def corrupt(*args, **kwargs):
            loaded = build(*args, **kwargs)
            loaded.model.model.layers[1].self_attn.o_proj.weight.data[0, 0] = float("inf")
            return loaded
        models.build_tiny_model = corrupt
        sys.argv = ["msp", "model=tiny-llama", "data=tiny", "device=cpu", "eval=none", "pruner=wanda",
                    "cache_dir={tmp_path / 'cache'}", "hydra.run.dir={run_dir}"]
        from msp.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("msp: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "NaN/inf" in errors[0] and "stage 'pruning (wanda)', block 1, layer model.layers.1.mlp.gate_proj" in errors[0]
    assert "model.layers.1.self_attn.o_proj.weight" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists()
