"""Fisher and Hessian sensitivities for models bigger than the GPU: block-streamed forward, then block-streamed backward.

The resident :func:`msp.sensitivity.fisher.fisher_trace` builds one autograd graph over the whole model; with a
streaming plan it calls :func:`streamed_fisher_sums` instead, where no graph ever spans more than one decoder block:

1. forward: every calibration sequence goes through the blocks one block at a time on the device
   (:func:`msp.pipeline.stream_blocks`), keeping each block's input h_i (on the plan's store device);
2. head: ℓ_n = CE(lm_head(norm(h_L))) per sequence and its gradient g_L = ∂ℓ_n/∂h_L;
3. backward, blocks L−1 … 0: recompute block i from its stored input, h_{i+1} = f_i(h_i; θ_i), and one
   vector–Jacobian product with g_{i+1} gives both ∂ℓ_n/∂θ_i (squared and summed per Linear layer) and
   g_i = ∂ℓ_n/∂h_i for the block below.

By the chain rule ∂ℓ_n/∂θ_i = (∂h_{i+1}/∂θ_i)ᵀ g_{i+1} exactly as in the full backward, so the result equals
the in-memory Fisher trace  tr(F_u) ≈ (1/N) Σ_n Σ_{θ∈u} (∂ℓ_n/∂θ)²  up to floating-point summation order.
Each sequence is its own backward (the empirical Fisher squares per-sequence gradients before averaging).

The Hutchinson Hessian trace tr(H_u) = E_z[z_uᵀ (H z)_u] (:func:`streamed_hessian_sums`) needs the
Hessian-vector product H z of the whole-model loss; block by block it is forward-over-reverse (Pearlmutter):

* tangent forward: ḣ_0 = 0, ḣ_{i+1} = ∂f_i/∂h · ḣ_i + ∂f_i/∂θ_i · z_i (one JVP per block, by the double-VJP trick);
* head: g_L = ∇φ(h_L), ġ_L = ∇²φ(h_L) ḣ_L with φ the loss as a function of the last hidden state;
* backward: with s_i = ⟨g_{i+1}, f_i(h_i, θ_i)⟩, (ġ_h, ġ_θ) = ∇²s_i · (ḣ_i, z_i) + (∂f_i)ᵀ ġ_{i+1} — one double
  backward of block i — and g_i = ∂f_i/∂hᵀ g_{i+1}; then (H z)_{θ_i} = ġ_θ and z_uᵀ (H z)_u is accumulated.

The probes are the same Rademacher vectors as the in-memory :func:`msp.sensitivity.hessian.hessian_trace` draws
(same seeded generator, same order), so both give the same estimate up to floating-point rounding.

Memory: one block + its activations for one sequence on the device (every block visits it with
:func:`msp.pipeline.block_on`); the stored inputs of all blocks (L × N × T × H values) on ``plan.store``. The
plan's ``windows_per_pass`` bounds that by running the forward/backward in passes over subsets of the sequences
(every block then visits the device twice per pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from msp.models import find_blocks
from msp.numerics import check_finite
from msp.pipeline import StreamedHidden, block_forward, block_on, head_from_hidden, stream_blocks, window_passes
from msp.sensitivity.common import SensitivityError, check_probes, grads_on, logits_loss, math_attention, rademacher_like
from msp.streaming import StreamingPlan


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
        raise SensitivityError(f"streamed sensitivities cover Linear layers inside decoder blocks only; not in a block: {sorted(missing)[:3]}")
    return out


@dataclass
class _Pass:
    """One pass over a chunk of sequences: the blocks, the requested layers of each, every block's stored input
    (``streamed.block_inputs[block][sequence]``, one sequence per batch) and where things live."""

    model: nn.Module
    chunk: torch.Tensor
    blocks: nn.ModuleList
    by_block: dict[int, list[tuple[str, nn.Linear]]]
    streamed: StreamedHidden
    device: torch.device
    store_device: torch.device

    @classmethod
    def forward(cls, model, chunk, device, store_device, by_block, desc: str) -> "_Pass":
        """The block-streamed forward of ``chunk`` (no graph), keeping every block's input."""
        with torch.no_grad():
            streamed = stream_blocks(model, chunk, device, batch_size=1, store_device=store_device, keep_all=True, desc=desc)
        return cls(model, chunk, find_blocks(model)[1], by_block, streamed, device, store_device)

    def block_input(self, i: int, n: int, requires_grad: bool) -> torch.Tensor:
        return self.streamed.block_inputs[i][n].to(self.device).detach().requires_grad_(requires_grad)

    def run(self, i: int, block: nn.Module, h_in: torch.Tensor, n: int) -> torch.Tensor:
        """Block ``i``'s output for sequence ``n`` from ``h_in`` (on the device), with the graph to ``h_in`` and
        the weights (block ``i``'s own keyword arguments: layer types differ in masks and rotary embeddings)."""
        return block_forward(block, h_in, self.streamed.final.per_block[i][n], self.device)

    def head_loss(self, logits_fn, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_L requiring grad, ℓ_n): sequence ``n``'s mean next-token cross-entropy as a function of h_L."""
        h = self.streamed.final.hidden[n].to(self.device).detach().requires_grad_(True)
        seq = self.chunk[n : n + 1].to(self.device)
        loss = check_finite(logits_loss(logits_fn(seq, h), seq), stage="streamed sensitivity",
                            what=f"the loss of calibration window {n} of this pass")
        return h, loss

    def store(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.store_device)


def _zeros(layers: dict[str, nn.Linear], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.zeros((), dtype=torch.float32, device=device) for name in layers}


def streamed_fisher_sums(model: nn.Module, used: torch.Tensor, device: torch.device, layers: dict[str, nn.Linear],
                         plan: StreamingPlan) -> dict[str, torch.Tensor]:
    """Σ_n Σ_{θ∈u} (∂ℓ_n/∂θ)² per layer (float32 scalars on ``device``) over the sequences ``used`` (n, seqlen),
    without a whole-model autograd graph: the model may stay on the CPU, blocks visit ``device`` one at a time,
    activations on ``plan.store``, ``plan.windows_per_pass`` sequences per forward/backward pass."""
    by_block = _layers_by_block(model, layers)
    acc = _zeros(layers, device)
    with grads_on(model, layers):
        for span, chunk in window_passes(used, plan.windows_per_pass):
            run = _Pass.forward(model, chunk, device, plan.store, by_block, f"fisher forward {span}")
            grads_out = _head_gradients(run)
            _fisher_backward(run, grads_out, acc, f"fisher backward {span}")
            del run, grads_out
    return acc


def _head_gradients(run: _Pass) -> list[torch.Tensor]:
    """g_L = ∂ℓ_n/∂h_L for every sequence n, ℓ_n the mean next-token cross-entropy (float32) of sequence n."""
    grads = []
    with head_from_hidden(run.model, run.streamed.tuple_out) as logits_fn, torch.enable_grad():
        for n in range(len(run.streamed.final.hidden)):
            h, loss = run.head_loss(logits_fn, n)
            (g,) = torch.autograd.grad(loss, h)
            grads.append(run.store(g))
    return grads


def _fisher_backward(run: _Pass, grads_out: list[torch.Tensor], acc: dict[str, torch.Tensor], desc: str) -> None:
    """Blocks L−1 … 0: one vector–Jacobian product per sequence gives ∂ℓ_n/∂θ_i (squared into ``acc``) and g_i."""
    for i in tqdm(range(len(run.blocks) - 1, -1, -1), desc=desc, unit="block", leave=False):
        with block_on(run.blocks[i], run.device) as block:
            pairs = run.by_block.get(i, [])
            weights = [lin.weight for _, lin in pairs]
            for n in range(run.chunk.shape[0]):
                h_in = run.block_input(i, n, i > 0)
                out = run.run(i, block, h_in, n)
                targets = weights + ([h_in] if i > 0 else [])
                if not targets:
                    continue
                grads = torch.autograd.grad(out, targets, grad_outputs=grads_out[n].to(run.device, out.dtype))
                for (name, _), g in zip(pairs, grads):
                    acc[name] += g.detach().to(torch.float32).pow(2).sum()
                if i > 0:
                    grads_out[n] = run.store(grads[-1])
                del out, grads, h_in
        run.streamed.block_inputs[i] = []  # no longer needed: free as we go down


class _Probes:
    """The Rademacher probes z_p of every (sequence, probe) of one pass, drawn exactly as the resident
    :func:`msp.sensitivity.hessian.hessian_trace` draws them (sequence → probe → layer, one generator) and kept as
    generator states, so each probe is re-created on the device when needed instead of being stored."""

    def __init__(self, layers: dict[str, nn.Linear], sequences: int, probes: int, gen: torch.Generator, device: torch.device):
        self.device = device
        self.pairs = [(n, p) for n in range(sequences) for p in range(probes)]  # k ↔ (sequence, probe)
        self.states: list[dict[str, torch.Tensor]] = []
        for _ in self.pairs:
            st = {}
            for name, lin in layers.items():
                st[name] = gen.get_state()
                rademacher_like(lin.weight, gen)  # advance exactly as hessian_trace does
            self.states.append(st)

    def of(self, k: int, pairs: list[tuple[str, nn.Linear]]) -> list[torch.Tensor]:
        """z restricted to the layers ``pairs`` for (sequence, probe) number ``k``, on the device."""
        out = []
        for name, lin in pairs:
            g = torch.Generator()
            g.set_state(self.states[k][name])
            out.append(rademacher_like(lin.weight, g).to(device=self.device, dtype=lin.weight.dtype))
        return out


def streamed_hessian_sums(model: nn.Module, used: torch.Tensor, device: torch.device, layers: dict[str, nn.Linear],
                          plan: StreamingPlan, *, probes: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Σ_n Σ_p z_pᵀ (H_n z_p)_u per layer (float32 scalars on ``device``) without a whole-model autograd graph:
    the probes of the resident Hutchinson estimate (``probes`` per sequence from ``seed``), blocks visiting ``device``
    one at a time, twice per pass of ``plan.windows_per_pass`` sequences (tangent forward, then backward).
    See the module docstring for the recursion."""
    probes = check_probes(probes)
    by_block = _layers_by_block(model, layers)
    gen = torch.Generator().manual_seed(int(seed))
    acc = _zeros(layers, device)
    with grads_on(model, layers), math_attention():
        for span, chunk in window_passes(used, plan.windows_per_pass):
            z = _Probes(layers, chunk.shape[0], probes, gen, device)
            run = _Pass.forward(model, chunk, device, plan.store, by_block, f"hessian forward {span}")
            tangents = _tangent_forward(run, z, f"hessian tangents {span}")
            g_out, g_dot = _head_second_order(run, z, tangents[-1])
            _hessian_backward(run, z, tangents, g_out, g_dot, acc, f"hessian backward {span}")
            del run, tangents, g_out, g_dot
    return acc


def _tangent_forward(run: _Pass, z: _Probes, desc: str) -> list[list[torch.Tensor | None]]:
    """ḣ_i for every block i (0 … L) and every (sequence, probe) k; None where it is zero."""
    tangents: list[list[torch.Tensor | None]] = [[None] * len(z.pairs)]
    for i in tqdm(range(len(run.blocks)), desc=desc, unit="block", leave=False):
        with block_on(run.blocks[i], run.device) as block:
            pairs = run.by_block.get(i, [])
            nxt: list[torch.Tensor | None] = []
            for k, (n, _p) in enumerate(z.pairs):
                h_dot = tangents[i][k]
                zs = z.of(k, pairs)
                if h_dot is None and not zs:
                    nxt.append(None)
                    continue
                h_in = run.block_input(i, n, h_dot is not None)
                out = run.run(i, block, h_in, n)
                u = torch.zeros_like(out, requires_grad=True)
                wrt = [lin.weight for _, lin in pairs] + ([h_in] if h_dot is not None else [])
                vjp = torch.autograd.grad(out, wrt, grad_outputs=u, create_graph=True, allow_unused=True)
                dirs = zs + ([h_dot.to(run.device)] if h_dot is not None else [])
                dot = sum((g * d).sum() for g, d in zip(vjp, dirs) if g is not None)
                (jvp,) = torch.autograd.grad(dot, u)
                nxt.append(run.store(jvp))
                del out, u, vjp, dot
            tangents.append(nxt)
    return tangents


def _head_second_order(run: _Pass, z: _Probes, last: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """g_L = ∇φ(h_L) and ġ_L = ∇²φ(h_L) ḣ_L for every (sequence, probe); ``last``: the ḣ_L."""
    g_out: list[torch.Tensor] = []
    g_dot: list[torch.Tensor | None] = []
    with head_from_hidden(run.model, run.streamed.tuple_out) as logits_fn:
        for k, (n, _p) in enumerate(z.pairs):
            h, loss = run.head_loss(logits_fn, n)
            (g,) = torch.autograd.grad(loss, h, create_graph=True)
            h_dot = last[k]
            if h_dot is None:
                g_dot.append(None)
            else:
                (gd,) = torch.autograd.grad((g * h_dot.to(run.device)).sum(), h)
                g_dot.append(run.store(gd))
            g_out.append(run.store(g))
    return g_out, g_dot


def _hessian_backward(
    run: _Pass, z: _Probes, tangents: list[list[torch.Tensor | None]], g_out: list[torch.Tensor],
    g_dot: list[torch.Tensor | None], acc: dict[str, torch.Tensor], desc: str,
) -> None:
    """Blocks L−1 … 0 with the second-order terms: z_uᵀ (H z)_u into ``acc``, (g_i, ġ_i) for the block below."""
    for i in tqdm(range(len(run.blocks) - 1, -1, -1), desc=desc, unit="block", leave=False):
        with block_on(run.blocks[i], run.device) as block:
            pairs = run.by_block.get(i, [])
            for k in range(len(z.pairs)):
                _hessian_backward_step(run, block, i, pairs, z, k, tangents[i][k], g_out, g_dot, acc)
        run.streamed.block_inputs[i] = []
        tangents[i] = []


def _hessian_backward_step(
    run: _Pass, block: nn.Module, i: int, pairs: list[tuple[str, nn.Linear]], z: _Probes, k: int,
    h_dot: torch.Tensor | None, g_out: list[torch.Tensor], g_dot: list[torch.Tensor | None], acc: dict[str, torch.Tensor],
) -> None:
    """One double backward of block ``i`` (on the device; ``pairs``: its requested layers) for (sequence, probe)
    number ``k`` with tangent ``h_dot`` = ḣ_i: adds z_uᵀ (H z)_u to ``acc`` and replaces g_out[k], g_dot[k] by the
    block's input gradients (g_i, ġ_i)."""
    n, _p = z.pairs[k]
    need_h = i > 0
    h_in = run.block_input(i, n, need_h)
    out = run.run(i, block, h_in, n)
    wrt = [lin.weight for _, lin in pairs] + ([h_in] if need_h else [])
    if not wrt:
        return
    first = torch.autograd.grad(out, wrt, grad_outputs=g_out[k].to(run.device, out.dtype), create_graph=True, allow_unused=True)
    zs = z.of(k, pairs)
    dirs = zs + ([h_dot.to(run.device) if h_dot is not None else None] if need_h else [])
    terms = [(g * d).sum() for g, d in zip(first, dirs) if g is not None and d is not None]
    if g_dot[k] is not None:
        terms.append((out * g_dot[k].to(run.device, out.dtype)).sum())
    second = torch.autograd.grad(sum(terms), wrt, allow_unused=True) if terms else [None] * len(wrt)
    for (name, _), zu, hz in zip(pairs, zs, second):
        if hz is not None:
            acc[name] += (hz.to(torch.float32) * zu.to(torch.float32)).sum()
    if need_h:
        g_out[k] = run.store(first[-1])
        g_dot[k] = run.store(second[-1]) if second[-1] is not None else None


__all__ = ["streamed_fisher_sums", "streamed_hessian_sums"]
