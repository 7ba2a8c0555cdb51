"""Block-streamed sensitivities equal the in-memory ones (no whole-model autograd graph is ever built)."""
from __future__ import annotations

import pytest
import torch

from msp.models import build_tiny_model, prunable_layers
from msp.sensitivity.fisher import fisher_trace
from msp.streaming import plan_streaming


def _streamed(model, cpu, windows_per_pass):
    """A plan that streams the model one block at a time, ``windows_per_pass`` sequences per pass."""
    plan = plan_streaming(model, cpu, "true", nsamples=windows_per_pass)
    assert plan.stream and plan.windows_per_pass == windows_per_pass
    return plan


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-opt"])
def test_streamed_fisher_equals_in_memory_fisher(kind, cpu):
    model = build_tiny_model(kind, seed=0).model
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reference = fisher_trace(model, windows, cpu)
    # passes of 2 sequences then 1: each pass streams the blocks forward and backward once
    streamed = fisher_trace(model, windows, cpu, plan=_streamed(model, cpu, 2))
    assert set(streamed) == set(reference) == set(prunable_layers(model))
    for name in reference:
        assert reference[name] > 0
        assert streamed[name] == pytest.approx(reference[name], rel=1e-5), name
    # the model leaves as it came: same weights, same requires_grad flags, no gradients left behind
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


def test_streamed_fisher_subset_of_layers_and_raw_traces(cpu):
    model = build_tiny_model("tiny-llama", seed=0).model
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = {n: l for n, l in prunable_layers(model).items() if n.endswith(("o_proj", "down_proj"))}
    raw = fisher_trace(model, windows, cpu, normalize=False, layers=layers, plan=_streamed(model, cpu, 2))
    ref = fisher_trace(model, windows, cpu, normalize=False, layers=layers)
    assert set(raw) == set(layers) and len(raw) == 4
    for name in raw:
        assert raw[name] == pytest.approx(ref[name], rel=1e-5)
    with pytest.raises(ValueError, match="decoder blocks only"):
        fisher_trace(model, windows, cpu, layers={"lm_head": model.lm_head}, plan=_streamed(model, cpu, 2))


def test_streamed_hessian_equals_in_memory_hutchinson(cpu):
    """Same probes (seeded generator, same draw order) → the same estimate; the forward-over-reverse recursion is
    exact, so only rounding differs. Traces can be negative, hence the tolerance relative to the largest one."""
    from msp.sensitivity.hessian import hessian_trace

    model = build_tiny_model("tiny-llama", seed=0).model
    windows = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = hessian_trace(model, windows, cpu, probes=2, seed=3)
    streamed = hessian_trace(model, windows, cpu, probes=2, seed=3, plan=_streamed(model, cpu, 1))
    scale = max(abs(v) for v in reference.values())
    assert scale > 0 and set(streamed) == set(reference)
    for name in reference:
        assert abs(streamed[name] - reference[name]) <= 1e-5 * scale, name
    one = hessian_trace(model, windows, cpu, probes=1, seed=4, nsamples=1, plan=_streamed(model, cpu, 2))  # other probes, other estimate
    assert any(abs(one[n] - streamed[n]) > 1e-3 * scale for n in streamed)
    assert all(p.grad is None for p in model.parameters())
