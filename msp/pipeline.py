"""Block-by-block streaming: the one place that owns forward hooks and moves blocks between devices.

1. ``capture_block_inputs`` runs the model's forward on the calibration windows with stand-ins in place of
   the decoder blocks and keeps what block 0 receives (the hidden states) and what *every* block receives as
   keyword arguments (rotary embeddings, masks ...): models with several layer types (Gemma-3: sliding-window
   and full attention, each with its own RoPE and mask) give different blocks different ones.
2. ``sequential_pass`` then visits each block in order: optionally collects per-Linear input statistics with
   hooks (always removed in ``finally``), hands them to a callback (which may prune the block's weights),
   and propagates the block's *current* (possibly pruned) outputs to the next block.
3. ``batch_logits`` is the one forward of every evaluation (perplexity, the search's fitness): the model's own
   forward when it is resident, or the blocks one at a time (``stream_blocks`` + ``head_from_hidden``) when the
   run's :class:`msp.streaming.StreamingPlan` streams it.

Only one block is on the compute device at a time: every stage that moves a block there (pruning, OWL,
perplexity, fitness, the streamed Fisher/Hessian) does it with :func:`block_on`, which always puts the block
back. The stored activations live on ``store_device`` (the compute device when they fit, the CPU otherwise).

``sequential_pass`` checks what it produces (:mod:`msp.numerics`): block 0's inputs, every block's calibration
statistics and every block's outputs; NaN or inf stops the pass with the stage (``desc``), block and layer named.
"""
from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from msp.device import to_device
from msp.errors import MspError
from msp.models import block_linears, find_blocks
from msp.numerics import check_all_finite, weights_hint
from msp.pruners.stats import LayerStats, StatsUpdate, check_stats, input_update
from msp.streaming import StreamingPlan, is_streamed, resident_modules

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class PipelineError(MspError):
    """A model whose blocks the pipeline cannot run as configured; the message names the setting to change."""


@contextmanager
def block_on(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Inside the context, ``block`` sits on ``device``; on leaving (also after an exception) it goes back to the
    device it came from (the CPU when the model is streamed; a no-op when the model is resident on ``device``)."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


@dataclass
class BlockInputs:
    """What the current block receives, one entry per batch of windows: ``hidden`` and ``kwargs`` (the current
    block's keyword arguments; :meth:`enter` switches them to another block's). ``per_block[block][batch]``
    holds every block's keyword arguments; blocks that receive the same tensors (one layer type) share one
    stored dict, so a LLaMA stores one dict per batch and a Gemma-3 two."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    per_block: list[list[dict]] = field(default_factory=list)

    def enter(self, block: int) -> None:
        """Make ``kwargs`` block ``block``'s (a no-op when the per-block arguments were not captured)."""
        if self.per_block:
            self.kwargs = self.per_block[block]


def move_non_block_modules(model: nn.Module, device: torch.device) -> None:
    """Put what lies outside the decoder blocks (embeddings, rotary tables, final norm, lm_head) on ``device``;
    only modules holding tensors of their own move, so the blocks stay where they are."""
    for m in resident_modules(model):
        if m is not model and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))):
            m.to(device)


def _stored_kwargs(kwargs: dict, seen: dict[tuple, tuple[dict, dict]], store_device: torch.device) -> dict:
    """A block's keyword arguments without the hidden states and the cache, on ``store_device``; blocks given the
    very same objects get the very same stored dict (``seen`` keeps the originals alive, so ids stay unique)."""
    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kw["use_cache"] = False
    key = tuple((k, id(v)) for k, v in kw.items())
    hit = seen.get(key)
    if hit is None:
        hit = seen[key] = (kw, to_device(kw, store_device))
    return hit[1]


def _positionals_by_name(block: nn.Module, args: tuple) -> dict:
    """The positional arguments a block was given after its hidden states, by parameter name: GPT-2 passes its
    cache and attention mask positionally, and the stored keyword arguments must carry the mask."""
    if len(args) <= 1:
        return {}
    params = [p for p in inspect.signature(block.forward).parameters.values()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise PipelineError(f"{type(block).__name__} was called with {len(args)} positional arguments but names only {len(params)}")
    return {p.name: value for p, value in zip(params[1:], args[1:])}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device, store_device: torch.device
) -> BlockInputs:
    """Run embeddings etc. on ``device`` and record, for every batch, the hidden states block 0 receives and the
    keyword arguments of every block (the result is entered at block 0, see :meth:`BlockInputs.enter`).

    The blocks are replaced by stand-ins (:class:`_BlockStandIn`) that record their call and pass the hidden
    states through, so no block runs; the last stand-in stops the forward before the final norm and lm_head.
    """
    _, blocks = find_blocks(model)
    originals = list(blocks)  # the stand-ins take their places below; their signatures name the positional arguments
    move_non_block_modules(model, device)
    captured = BlockInputs(per_block=[[] for _ in blocks])
    seen: dict[tuple, tuple[dict, dict]] = {}

    def recorder(i: int):
        def record(args, kwargs):
            if i == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                captured.hidden.append(hidden.detach().to(store_device))
            kwargs = {**_positionals_by_name(originals[i], args), **kwargs}
            captured.per_block[i].append(_stored_kwargs(kwargs, seen, store_device))
            if i == len(blocks) - 1:
                raise _StopForward

        return record

    stand_ins = [_BlockStandIn(b, tuple_out=False, record=recorder(i)) for i, b in enumerate(blocks)]
    with _blocks_replaced(blocks, stand_ins):
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            finally:
                seen.clear()
    captured.enter(0)
    return captured


def block_output(out):
    """The hidden states a decoder block returns (the first element when it returns a tuple, as OPT's do)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def block_forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    """``block``'s output hidden states for ``hidden`` and its stored keyword arguments, run on ``device``
    (a tensor already there, e.g. one that requires grad, is used as it is)."""
    return block_output(block(hidden.to(device), **to_device(kwargs, device)))


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, store_device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every stored batch, kept on ``store_device``."""
    return [block_forward(block, hidden, kw, device).detach().to(store_device) for hidden, kw in zip(inputs.hidden, inputs.kwargs)]


#: on_block(index, prefix, block, linears, stats) -> whether it changed the block's weights (None counts as True)
BlockCallback = Callable[[int, str, nn.Module, dict[str, nn.Linear], dict[str, LayerStats]], "bool | None"]
#: on_layer(index, prefix, local_name, linear, stats): prune one Linear in place, inside the block's forward
LayerCallback = Callable[[int, str, str, nn.Linear, LayerStats], None]


def _shared_update(shared: dict[int, tuple[torch.Tensor, StatsUpdate]], x: torch.Tensor, need_hessian: bool) -> StatsUpdate:
    """The statistics update of input ``x``, computed once for all layers that read the same tensor (q/k/v)."""
    hit = shared.get(id(x))
    if hit is None or hit[0] is not x:
        hit = (x, input_update(x, need_hessian))
        shared[id(x)] = hit
    return hit[1]


def inline_block_pass(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: "BlockInputs",
    device: torch.device,
    store_device: torch.device,
    need_hessian: bool,
    on_layer: Callable[[str, nn.Linear, LayerStats], None],
) -> list[torch.Tensor]:
    """One run of the block over the whole calibration batch, pruning each Linear in its forward pre-hook.

    A pre-hook sees the layer's complete input (all calibration tokens are in the one batch), so it can build
    the layer's statistics, prune the weight in place, and let the forward go on with the pruned weight: every
    later layer of the block sees its pruned predecessors' outputs (SparseGPT's "true sequential" order), and
    the block's output is already the pruned block's output — one block pass instead of a statistics pass plus
    a propagation pass. Layers reading the same tensor (q/k/v) share one statistics computation.
    """
    if len(inputs.hidden) != 1:
        raise ValueError(f"the inline pass needs the calibration set in one batch, got {len(inputs.hidden)} batches")
    shared: dict[int, tuple[torch.Tensor, StatsUpdate]] = {}
    done: set[str] = set()

    def make_hook(name: str):
        def hook(module, args):
            if name in done:  # a layer called twice in one forward keeps its first pruning
                return
            stats = LayerStats(module.in_features, need_hessian)
            stats.add_update(_shared_update(shared, args[0], need_hessian))
            on_layer(name, module, stats)
            done.add(name)

        return hook

    handles = []
    try:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(make_hook(name)))
        out = block_forward(block, inputs.hidden[0], inputs.kwargs[0], device).detach().to(store_device)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    skipped = [n for n in linears if n not in done]
    if skipped:
        raise PipelineError(f"the block's forward never called {', '.join(skipped)}; use true_sequential=false for this model")
    return [out]


def collect_block_stats(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: BlockInputs,
    device: torch.device,
    store_device: torch.device,
    need_hessian: bool,
    keep_outputs: bool = True,
) -> tuple[dict[str, LayerStats], list[torch.Tensor] | None]:
    """Run the stored inputs through ``block`` with forward pre-hooks accumulating each Linear's input statistics.

    Layers that read the *same* input tensor (q/k/v, gate/up) share one computation of Σx² and XᵀX per batch.
    Without ``keep_outputs`` the block's outputs are not needed, so after the first batch has shown the order in
    which the Linear layers run (each exactly once), later batches stop right after the last Linear's input is
    recorded — that layer's matmul and everything after it are skipped. Hooks are always removed.
    Returns (statistics by local layer name, the block's outputs per batch or None).
    """
    stats = {name: LayerStats(lin.in_features, need_hessian) for name, lin in linears.items()}
    shared: dict[int, tuple[torch.Tensor, StatsUpdate]] = {}
    order: list[str] = []
    stop_after: list[str | None] = [None]

    def make_hook(name: str):
        def hook(module, args):
            stats[name].add_update(_shared_update(shared, args[0], need_hessian))
            order.append(name)
            if name == stop_after[0]:
                raise _StopForward

        return hook

    handles = []
    outputs: list[torch.Tensor] | None = [] if keep_outputs else None
    try:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(make_hook(name)))
        for b, (hidden, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            shared.clear()
            order.clear()
            try:
                out = block_forward(block, hidden, kw, device)
                if outputs is not None:
                    outputs.append(out.detach().to(store_device))
            except _StopForward:
                pass
            if b == 0 and not keep_outputs and len(order) == len(linears) == len(set(order)):
                stop_after[0] = order[-1]
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    return stats, outputs


def _calibrate_and_visit(
    index: int,
    prefix: str,
    block: nn.Module,
    inputs: BlockInputs | None,
    on_block: BlockCallback,
    *,
    collect_stats: bool,
    need_hessian: bool,
    keep_dense: bool,
    next_inputs: bool,
    device: torch.device,
    store_device: torch.device,
    stage: str = "blocks",
) -> list[torch.Tensor] | None:
    """One block of :func:`sequential_pass` (the block is on ``device``): statistics pass (checked finite, each
    layer's statistics named), ``on_block``, then the next block's inputs when ``next_inputs`` (None otherwise)."""
    linears = block_linears(block)
    stats: dict[str, LayerStats] = {}
    dense_outputs = None
    if collect_stats and inputs is not None:
        stats, dense_outputs = collect_block_stats(block, linears, inputs, device, store_device, need_hessian, keep_outputs=keep_dense)
        for local, st in stats.items():
            st.name = f"{prefix}.{index}.{local}"
        check_stats(stats, stage=stage, block=index, hint=weights_hint(block, f"{prefix}.{index}."))
    changed = on_block(index, prefix, block, linears, stats)
    del stats
    if not next_inputs or inputs is None:
        return None
    if changed is False and dense_outputs is not None:
        return dense_outputs  # the block is unchanged: its first run's outputs are the answer
    del dense_outputs
    return run_block(block, inputs, device, store_device)


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    on_block: BlockCallback,
    *,
    collect_stats: bool = True,
    need_hessian: bool = False,
    propagate: bool = True,
    batch_size: int = 4,
    store_device: torch.device | None = None,
    desc: str = "blocks",
    modifies_blocks: bool = False,
    on_layer: LayerCallback | None = None,
) -> None:
    """Visit every decoder block once, in order, each on ``device`` only while it is visited (:func:`block_on`).

    For block i: if ``collect_stats``, run the stored inputs through it with hooks on its Linear layers
    accumulating :class:`LayerStats`; call ``on_block(i, prefix, block, linears, stats)``; if ``propagate``, run
    the (now possibly modified) block again to produce the next block's inputs.

    ``modifies_blocks=True`` promises that ``on_block`` changes every block (pruning), so the statistics pass
    need not keep the block's dense outputs and stops after its last Linear layer's input (see
    :func:`collect_block_stats`); when the callback returns False the block is simply run again. With the
    default False, a callback returning False reuses the statistics pass's outputs (no second run).

    ``on_layer`` (with ``collect_stats``) switches to the inline pass (:func:`inline_block_pass`): the whole
    calibration set runs through each block as one batch (``batch_size`` is ignored for the block passes), each
    Linear is handed to ``on_layer`` inside the forward, and the same run's outputs feed the next block;
    ``on_block`` is then called with empty statistics, after the block's layers are done.
    """
    prefix, blocks = find_blocks(model)
    store_device = store_device or device
    inline = on_layer is not None and collect_stats
    if inline:
        batch_size = max(1, int(input_ids.shape[0]))  # one batch: each pre-hook sees a layer's whole input
    inputs = capture_block_inputs(model, input_ids, batch_size, device, store_device) if (collect_stats or propagate) else None
    if inputs is not None:
        check_all_finite([(None, "the inputs of block 0 (the embeddings' output)", h) for h in inputs.hidden], stage=desc, block=0)
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", leave=False)
    for i in bar:
        next_inputs = propagate and i + 1 < len(blocks)
        if inputs is not None:
            inputs.enter(i)
        with block_on(blocks[i], device) as block:
            if inline and inputs is not None:
                bar.set_description(f"{desc} {i + 1}/{len(blocks)}: pruning inline")
                linears = block_linears(block)

                def layer_inline(local, lin, st, _i=i, _block=block):
                    st.name = f"{prefix}.{_i}.{local}"
                    check_stats({local: st}, stage=desc, block=_i, hint=weights_hint(_block, f"{prefix}.{_i}."))
                    on_layer(_i, prefix, local, lin, st)

                outputs = inline_block_pass(block, linears, inputs, device, store_device, need_hessian, layer_inline)
                on_block(i, prefix, block, linears, {})
                outputs = outputs if next_inputs else None
            else:
                bar.set_description(f"{desc} {i + 1}/{len(blocks)}: {'calibrating' if collect_stats else 'processing'}")
                outputs = _calibrate_and_visit(i, prefix, block, inputs, on_block, collect_stats=collect_stats,
                                               need_hessian=need_hessian, keep_dense=next_inputs and not modifies_blocks,
                                               next_inputs=next_inputs, device=device, store_device=store_device, stage=desc)
            if outputs is not None:
                check_all_finite([(None, f"the outputs of block {i}", o) for o in outputs], stage=desc, block=i,
                                 hint=weights_hint(block, f"{prefix}.{i}."))
                inputs.hidden = outputs
            del outputs
    bar.close()


@dataclass
class StreamedHidden:
    """What :func:`stream_blocks` returns: the last block's outputs (``final.hidden``, per batch; every block's
    keyword arguments in ``final.per_block[block][batch]``), the inputs of every block when asked for
    (``block_inputs[block][batch]``), and whether the blocks return tuples (OPT) or bare tensors (LLaMA)."""

    final: BlockInputs
    block_inputs: list[list[torch.Tensor]]
    tuple_out: bool


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 1,
    store_device: torch.device | None = None,
    keep_all: bool = False,
    desc: str = "streaming blocks",
) -> StreamedHidden:
    """Run ``input_ids`` through every decoder block, one block at a time on ``device`` (:func:`block_on`).
    Activations between blocks live on ``store_device``. With ``keep_all`` the input of every block is kept
    (for a block-by-block backward)."""
    _, blocks = find_blocks(model)
    store_device = store_device or device
    state = capture_block_inputs(model, input_ids, batch_size, device, store_device)
    kept: list[list[torch.Tensor]] = []
    tuple_out = False
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False):
        with block_on(blocks[i], device) as block:
            if keep_all:
                kept.append(state.hidden)
            state.enter(i)
            outs = []
            for hidden, kw in zip(state.hidden, state.kwargs):
                raw = block(hidden.to(device), **to_device(kw, device))
                tuple_out = isinstance(raw, (tuple, list))
                outs.append(block_output(raw).detach().to(store_device))
            state.hidden = outs
    return StreamedHidden(state, kept, tuple_out)


class _BlockStandIn(nn.Module):
    """Takes a decoder block's place so that ``model(...)`` skips the blocks: calls ``record(args, kwargs)`` when
    given one (it may stop the forward), then returns ``value`` (the real last block's output) when set, else its
    input. Attribute reads fall back to the real block (some models read e.g. ``attention_type`` from each layer)."""

    def __init__(self, original: nn.Module, tuple_out: bool, record: Callable[[tuple, dict], None] | None = None):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: .to()/parameters() ignore it
        self.tuple_out = tuple_out
        self.record = record
        self.value: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        if self.record is not None:
            self.record(args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        out = hidden if self.value is None else self.value
        return (out,) if self.tuple_out else out


@contextmanager
def _blocks_replaced(blocks: nn.ModuleList, stand_ins: list[_BlockStandIn]) -> Iterator[None]:
    """Inside the context, ``stand_ins`` take the blocks' places; the real blocks are put back in ``finally``."""
    originals = list(blocks)
    try:
        for i, s in enumerate(stand_ins):
            blocks[i] = s
        yield
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


@contextmanager
def head_from_hidden(model: nn.Module, tuple_out: bool) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Inside the context, ``logits_fn(input_ids, final_hidden)`` returns the model's logits when the last
    decoder block outputs ``final_hidden``: the model's own forward runs its embeddings (cheap), skips the
    blocks and applies its final norm and lm_head, so no architecture-specific head code is needed. Gradients
    flow to ``final_hidden`` when it requires them. The real blocks are put back in ``finally``."""
    _, blocks = find_blocks(model)
    stand_ins = [_BlockStandIn(b, tuple_out) for b in blocks]

    def logits_fn(input_ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        stand_ins[-1].value = final_hidden
        try:
            return model(input_ids=input_ids, use_cache=False).logits
        finally:
            stand_ins[-1].value = None

    with _blocks_replaced(blocks, stand_ins):
        yield logits_fn


def window_passes(windows: torch.Tensor, windows_per_pass: int | None, batch_size: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """(``"first-last/total"`` label, windows) per streamed pass: ``windows_per_pass`` windows each (all at once
    when None), rounded down to whole batches of ``batch_size`` so that passes never split a batch."""
    total = windows.shape[0]
    per_pass = int(windows_per_pass or total)
    if per_pass < 1:
        raise ValueError(f"windows_per_pass={windows_per_pass}: need at least 1")
    per_pass = max(batch_size, per_pass - per_pass % batch_size)
    for start in range(0, total, per_pass):
        chunk = windows[start : start + per_pass]
        yield f"{start + 1}-{start + chunk.shape[0]}/{total}", chunk


@torch.no_grad()
def batch_logits(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    *,
    plan: StreamingPlan | None = None,
    batch_size: int = 1,
    desc: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids on ``device``, logits) for every batch of ``batch_size`` consecutive ``windows`` (n, seqlen), in order.

    Resident (no ``plan``, or one that does not stream): the model's own forward, the model already on ``device``.
    Streamed (``plan.stream``): in passes of ``plan.windows_per_pass`` windows, the blocks visit ``device`` one at a
    time (:func:`stream_blocks`, activations on ``plan.store``) and the head runs per batch
    (:func:`head_from_hidden`). Both give the same logits batch for batch (tests/test_streaming.py). Runs under
    ``torch.no_grad`` (inside the caller's ``inference_mode`` where it has one).
    """
    if not is_streamed(plan):
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
            batch = windows[start : start + batch_size].to(device)
            yield batch, model(input_ids=batch, use_cache=False).logits
        return
    for span, chunk in window_passes(windows, plan.windows_per_pass, batch_size):
        streamed = stream_blocks(model, chunk, device, batch_size=batch_size, store_device=plan.store,
                                 desc=f"{desc or 'streaming blocks'}: windows {span}")
        with head_from_hidden(model, streamed.tuple_out) as logits_fn:
            for b, hidden in enumerate(streamed.final.hidden):
                batch = chunk[b * batch_size : (b + 1) * batch_size].to(device)
                yield batch, logits_fn(batch, hidden.to(device))
