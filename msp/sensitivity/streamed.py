"""Fisher sensitivities for models bigger than the GPU: block-streamed forward, then block-streamed backward.

The in-memory :func:`msp.sensitivity.fisher.fisher_trace` builds one autograd graph over the whole model. Here
no graph ever spans more than one decoder block:

1. forward: every calibration sequence goes through the blocks one block at a time on the device
   (:func:`msp.pipeline.stream_blocks`), keeping each block's input h_i (on ``store_device``);
2. head: ℓ_n = CE(lm_head(norm(h_L))) per sequence and its gradient g_L = ∂ℓ_n/∂h_L;
3. backward, blocks L−1 … 0: recompute block i from its stored input, h_{i+1} = f_i(h_i; θ_i), and one
   vector–Jacobian product with g_{i+1} gives both ∂ℓ_n/∂θ_i (squared and summed per Linear layer) and
   g_i = ∂ℓ_n/∂h_i for the block below.

By the chain rule ∂ℓ_n/∂θ_i = (∂h_{i+1}/∂θ_i)ᵀ g_{i+1} exactly as in the full backward, so the result equals
the in-memory Fisher trace  tr(F_u) ≈ (1/N) Σ_n Σ_{θ∈u} (∂ℓ_n/∂θ)²  up to floating-point summation order.
Each sequence is its own backward (the empirical Fisher squares per-sequence gradients before averaging).

The Hutchinson Hessian trace tr(H_u) = E_z[z_uᵀ (H z)_u] (:func:`streamed_hessian_trace`) needs the
Hessian-vector product H z of the whole-model loss; block by block it is forward-over-reverse (Pearlmutter):

* tangent forward: ḣ_0 = 0, ḣ_{i+1} = ∂f_i/∂h · ḣ_i + ∂f_i/∂θ_i · z_i (one JVP per block, by the double-VJP trick);
* head: g_L = ∇φ(h_L), ġ_L = ∇²φ(h_L) ḣ_L with φ the loss as a function of the last hidden state;
* backward: with s_i = ⟨g_{i+1}, f_i(h_i, θ_i)⟩, (ġ_h, ġ_θ) = ∇²s_i · (ḣ_i, z_i) + (∂f_i)ᵀ ġ_{i+1} — one double
  backward of block i — and g_i = ∂f_i/∂hᵀ g_{i+1}; then (H z)_{θ_i} = ġ_θ and z_uᵀ (H z)_u is accumulated.

The probes are the same Rademacher vectors as the in-memory :func:`msp.sensitivity.hessian.hessian_trace` draws
(same seeded generator, same order), so both give the same estimate up to floating-point rounding.

Memory: one block + its activations for one sequence on the device; the stored inputs of all blocks
(L × N × T × H values) on ``store_device``. ``windows_per_pass`` bounds that by running the forward/backward
in passes over subsets of the sequences (every block then visits the device twice per pass).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from msp.models import find_blocks, prunable_layers
from msp.pipeline import _block_output, _to, head_from_hidden, stream_blocks
from msp.sensitivity._grad import grads_on, windows_to_use

log = logging.getLogger(__name__)


def _layers_by_block(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[int, list[tuple[str, nn.Linear]]]:
    """Block index → the requested Linear layers inside that block (found by identity, not by name)."""
    _, blocks = find_blocks(model)
    wanted = {id(lin): name for name, lin in layers.items()}
    out: dict[int, list[tuple[str, nn.Linear]]] = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            if id(m) in wanted:
                out.setdefault(i, []).append((wanted[id(m)], m))
    missing = set(layers) - {name for pairs in out.values() for name, _ in pairs}
    if missing:
        raise ValueError(f"streamed Fisher covers Linear layers inside decoder blocks only; not in a block: {sorted(missing)[:3]}")
    return out


def streamed_fisher_trace(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    nsamples: int | None = None,
    normalize: bool = True,
    layers: dict[str, nn.Linear] | None = None,
    store_device: torch.device | None = None,
    windows_per_pass: int | None = None,
) -> dict[str, float]:
    """Empirical Fisher trace of every prunable Linear layer without a whole-model autograd graph.

    Same inputs and outputs as :func:`msp.sensitivity.fisher.fisher_trace` (windows (num, seqlen); the first
    ``nsamples`` used; ``normalize`` divides by the layer's parameter count), but the model may stay on the CPU:
    blocks visit ``device`` one at a time. Squared gradients are accumulated in float32.
    """
    layers = layers if layers is not None else prunable_layers(model)
    used = windows_to_use(windows, nsamples)
    _, blocks = find_blocks(model)
    by_block = _layers_by_block(model, layers)
    store_device = store_device or device
    acc = {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}
    per_pass = int(windows_per_pass or used.shape[0])
    if per_pass < 1:
        raise ValueError(f"windows_per_pass={windows_per_pass}: need at least 1")
    with grads_on(model, layers):
        for start in range(0, used.shape[0], per_pass):
            chunk = used[start : start + per_pass]
            span = f"{start + 1}-{start + chunk.shape[0]}/{used.shape[0]}"
            with torch.no_grad():
                streamed = stream_blocks(model, chunk, device, batch_size=1, store_device=store_device, keep_all=True,
                                         desc=f"fisher forward {span}")
            grads_out = _head_gradients(model, chunk, streamed.final.hidden, streamed.tuple_out, device, store_device)
            kwargs = streamed.final.kwargs
            bar = tqdm(range(len(blocks) - 1, -1, -1), desc=f"fisher backward {span}", unit="block", leave=False)
            for i in bar:
                block = blocks[i]
                home = next(block.parameters()).device
                block.to(device)
                pairs = by_block.get(i, [])
                weights = [lin.weight for _, lin in pairs]
                for n in range(chunk.shape[0]):
                    h_in = streamed.block_inputs[i][n].to(device).detach().requires_grad_(i > 0)
                    out = _block_output(block(h_in, **_to(kwargs[n], device)))
                    targets = weights + ([h_in] if i > 0 else [])
                    if not targets:
                        continue
                    grads = torch.autograd.grad(out, targets, grad_outputs=grads_out[n].to(device, out.dtype))
                    for (name, _), g in zip(pairs, grads):
                        acc[name] += g.detach().to(torch.float32).pow(2).sum()
                    if i > 0:
                        grads_out[n] = grads[-1].detach().to(store_device)
                    del out, grads, h_in
                block.to(home)
                streamed.block_inputs[i] = []  # no longer needed: free as we go down
            del streamed, grads_out
    count = used.shape[0]
    result = {}
    for name, lin in layers.items():
        value = float(acc[name].item()) / count
        result[name] = value / lin.weight.numel() if normalize else value
    log.info("streamed fisher trace over %d sequences: %d layers, range [%.3e, %.3e]", count, len(result),
             min(result.values()), max(result.values()))
    return result


def _head_gradients(
    model: nn.Module, ids: torch.Tensor, finals: list[torch.Tensor], tuple_out: bool,
    device: torch.device, store_device: torch.device,
) -> list[torch.Tensor]:
    """g_L = ∂ℓ_n/∂h_L for every sequence n, ℓ_n the mean next-token cross-entropy (float32) of sequence n."""
    grads = []
    with head_from_hidden(model, tuple_out) as logits_fn, torch.enable_grad():
        for n, final in enumerate(finals):
            h = final.to(device).detach().requires_grad_(True)
            seq = ids[n : n + 1].to(device)
            logits = logits_fn(seq, h)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), seq[:, 1:].reshape(-1))
            (g,) = torch.autograd.grad(loss, h)
            grads.append(g.detach().to(store_device))
    return grads


def streamed_hessian_trace(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    probes: int = 4,
    nsamples: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    layers: dict[str, nn.Linear] | None = None,
    store_device: torch.device | None = None,
    windows_per_pass: int | None = None,
) -> dict[str, float]:
    """Hutchinson tr(H_u) of every prunable Linear layer without a whole-model autograd graph.

    Same inputs and outputs as :func:`msp.sensitivity.hessian.hessian_trace` (``probes`` Rademacher vectors per
    sequence from ``seed``; ``normalize`` divides by the parameter count); blocks visit ``device`` one at a time,
    twice per probe (tangent forward, then backward). See the module docstring for the recursion.
    """
    from msp.sensitivity.hessian import _math_attention, rademacher_like

    if int(probes) < 1:
        raise ValueError(f"hessian probes={probes}: need at least 1 Rademacher probe (e.g. allocation.probes=4)")
    layers = layers if layers is not None else prunable_layers(model)
    used = windows_to_use(windows, nsamples)
    _, blocks = find_blocks(model)
    by_block = _layers_by_block(model, layers)
    names = list(layers)
    store_device = store_device or device
    gen = torch.Generator().manual_seed(int(seed))
    acc = {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}
    per_pass = int(windows_per_pass or used.shape[0])
    if per_pass < 1:
        raise ValueError(f"windows_per_pass={windows_per_pass}: need at least 1")

    def probe_of(states: dict[str, torch.Tensor], name: str, lin: nn.Linear) -> torch.Tensor:
        g = torch.Generator()
        g.set_state(states[name])
        return rademacher_like(lin.weight, g).to(device=device, dtype=lin.weight.dtype)

    with grads_on(model, layers), _math_attention():
        for start in range(0, used.shape[0], per_pass):
            chunk = used[start : start + per_pass]
            span = f"{start + 1}-{start + chunk.shape[0]}/{used.shape[0]}"
            # the generator's state before each layer's draw, in the in-memory order: sequence → probe → layer
            states: list[dict[str, torch.Tensor]] = []
            for _n in range(chunk.shape[0]):
                for _p in range(int(probes)):
                    st = {}
                    for name in names:
                        st[name] = gen.get_state()
                        rademacher_like(layers[name].weight, gen)  # advance exactly as hessian_trace does
                    states.append(st)
            pairs_np = [(n, p) for n in range(chunk.shape[0]) for p in range(int(probes))]
            with torch.no_grad():
                streamed = stream_blocks(model, chunk, device, batch_size=1, store_device=store_device, keep_all=True,
                                         desc=f"hessian forward {span}")
            kwargs = streamed.final.kwargs
            # tangent forward: ḣ_i for every block i and every (sequence, probe)
            tangents: list[list[torch.Tensor | None]] = [[None] * len(pairs_np)]
            for i in tqdm(range(len(blocks)), desc=f"hessian tangents {span}", unit="block", leave=False):
                block = blocks[i]
                home = next(block.parameters()).device
                block.to(device)
                pairs = by_block.get(i, [])
                nxt: list[torch.Tensor | None] = []
                for k, (n, _p) in enumerate(pairs_np):
                    h_dot = tangents[i][k]
                    zs = [probe_of(states[k], name, lin) for name, lin in pairs]
                    if h_dot is None and not zs:
                        nxt.append(None)
                        continue
                    h_in = streamed.block_inputs[i][n].to(device).detach().requires_grad_(h_dot is not None)
                    out = _block_output(block(h_in, **_to(kwargs[n], device)))
                    u = torch.zeros_like(out, requires_grad=True)
                    wrt = [lin.weight for _, lin in pairs] + ([h_in] if h_dot is not None else [])
                    vjp = torch.autograd.grad(out, wrt, grad_outputs=u, create_graph=True, allow_unused=True)
                    dirs = zs + ([h_dot.to(device)] if h_dot is not None else [])
                    dot = sum((g * d).sum() for g, d in zip(vjp, dirs) if g is not None)
                    (jvp,) = torch.autograd.grad(dot, u)
                    nxt.append(jvp.detach().to(store_device))
                    del out, u, vjp, dot
                tangents.append(nxt)
                block.to(home)
            # head: g_L and ġ_L
            g_out: list[torch.Tensor] = []
            g_dot: list[torch.Tensor | None] = []
            with head_from_hidden(model, streamed.tuple_out) as logits_fn:
                for k, (n, _p) in enumerate(pairs_np):
                    h = streamed.final.hidden[n].to(device).detach().requires_grad_(True)
                    seq = chunk[n : n + 1].to(device)
                    logits = logits_fn(seq, h)
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), seq[:, 1:].reshape(-1))
                    (g,) = torch.autograd.grad(loss, h, create_graph=True)
                    h_dot = tangents[-1][k]
                    if h_dot is None:
                        g_dot.append(None)
                    else:
                        (gd,) = torch.autograd.grad((g * h_dot.to(device)).sum(), h)
                        g_dot.append(gd.detach().to(store_device))
                    g_out.append(g.detach().to(store_device))
            # backward with the second-order terms
            for i in tqdm(range(len(blocks) - 1, -1, -1), desc=f"hessian backward {span}", unit="block", leave=False):
                block = blocks[i]
                home = next(block.parameters()).device
                block.to(device)
                pairs = by_block.get(i, [])
                weights = [lin.weight for _, lin in pairs]
                for k, (n, _p) in enumerate(pairs_np):
                    h_dot = tangents[i][k]
                    need_h = i > 0
                    h_in = streamed.block_inputs[i][n].to(device).detach().requires_grad_(need_h)
                    out = _block_output(block(h_in, **_to(kwargs[n], device)))
                    wrt = weights + ([h_in] if need_h else [])
                    if not wrt:
                        continue
                    first = torch.autograd.grad(out, wrt, grad_outputs=g_out[k].to(device, out.dtype), create_graph=True, allow_unused=True)
                    zs = [probe_of(states[k], name, lin) for name, lin in pairs]
                    dirs = zs + ([h_dot.to(device) if h_dot is not None else None] if need_h else [])
                    terms = [(g * d).sum() for g, d in zip(first, dirs) if g is not None and d is not None]
                    if g_dot[k] is not None:
                        terms.append((out * g_dot[k].to(device, out.dtype)).sum())
                    if terms:
                        second = torch.autograd.grad(sum(terms), wrt, allow_unused=True)
                    else:
                        second = [None] * len(wrt)
                    for (name, _), z, hz in zip(pairs, zs, second):
                        if hz is not None:
                            acc[name] += (hz.to(torch.float32) * z.to(torch.float32)).sum()
                    if need_h:
                        g_out[k] = first[-1].detach().to(store_device)
                        g_dot[k] = second[-1].detach().to(store_device) if second[-1] is not None else None
                    del out, first, second, terms
                block.to(home)
                streamed.block_inputs[i] = []
                tangents[i] = []
            del streamed, tangents, g_out, g_dot
    count = used.shape[0] * int(probes)
    result = {}
    for name, lin in layers.items():
        value = float(acc[name].item()) / count
        result[name] = value / lin.weight.numel() if normalize else value
    log.info("streamed hessian trace (%d sequences x %d probes): %d layers, range [%.3e, %.3e]", used.shape[0], probes,
             len(result), min(result.values()), max(result.values()))
    return result


__all__ = ["streamed_fisher_trace", "streamed_hessian_trace"]
