"""Bigger than the GPU: decide whether a run streams its model one decoder block at a time.

``streaming=false``: the whole model moves to the compute device (the fast path when it fits).
``streaming=true``: the model stays on the CPU; :mod:`msp.pipeline` moves one block at a time to the compute
device for pruning, sensitivities and perplexity, so peak device memory ≈ embeddings/head + one block + the
calibration activations (those go to the CPU when they do not fit either).
``streaming=auto`` (default): stream only when the whole model would not fit the device budget.

The budget is ``gpu_budget_gb`` when given (also on CPU, where it is a pretend budget that exercises the
streaming path in tests), else the GPU's free memory, else unlimited (CPU). Every size here is an *estimate*
made before any heavy work so that a model that cannot fit even one block fails in one line.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from msp.device import dtype_bytes, free_memory_bytes, is_gpu
from msp.errors import MspError
from msp.models import block_linears, find_blocks

log = logging.getLogger(__name__)

GiB = 2**30
STREAMING_MODES = ("auto", "true", "false")


def fmt_bytes(n: float) -> str:
    """``1.23 GiB`` / ``45.6 MiB``: sizes in messages stay readable from tiny test models to 70B."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


class StreamingError(MspError):
    """The model (or one block of it) cannot fit the device budget; the message names the fix."""


@dataclass
class StreamingPlan:
    """Where the model, one block and the calibration activations live during a run (sizes in bytes)."""

    stream: bool
    device: str
    store_device: str  # where stored calibration/evaluation activations live
    budget_bytes: int | None
    model_bytes: int
    resident_bytes: int  # embeddings, final norm, lm_head: kept on the device while streaming
    block_bytes: int  # weights of the largest decoder block
    block_work_bytes: int  # activations and statistics of one block for one batch
    activation_bytes: int  # calibration activations stored between blocks
    reason: str
    #: the most windows whose activations a streamed pass holds between blocks (the ``nsamples`` the activation
    #: estimate was made for); a streamed forward over more windows runs in passes of this many
    windows_per_pass: int = 128

    @property
    def store(self) -> torch.device:
        return torch.device(self.store_device)

    def to_json(self) -> dict:
        return asdict(self)


def is_streamed(plan: StreamingPlan | None) -> bool:
    """Whether a stage runs its blocks one at a time (``plan.stream``); no plan means the model is resident."""
    return plan is not None and plan.stream


def parse_mode(mode: str | bool) -> str:
    """``auto`` | ``true`` | ``false`` (YAML booleans accepted)."""
    if isinstance(mode, bool):
        return "true" if mode else "false"
    text = str(mode).strip().lower()
    if text not in STREAMING_MODES:
        raise StreamingError(f"streaming={mode!r} is unknown; valid: auto, true, false (e.g. streaming=auto)")
    return text


def _unique_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, counting shared (tied) tensors once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) in seen:  # tied weights are one Parameter object (works on the meta device too)
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def resident_modules(model: nn.Module) -> list[nn.Module]:
    """Modules outside the decoder blocks (embeddings, rotary tables, final norm, lm_head)."""
    _, blocks = find_blocks(model)
    block_ids = {id(m) for b in blocks for m in b.modules()}
    return [m for m in model.modules() if id(m) not in block_ids]


def block_work_bytes(
    model: nn.Module, batch_size: int, seqlen: int, act_bytes: int, need_hessian: bool, with_logits: bool = True
) -> int:
    """Upper estimate of the working memory of one block on one batch of ``batch_size`` windows.

    hidden states in/out and attention projections ≈ 4·B·T·H, MLP intermediates ≈ 3·B·T·I (gate, up, product),
    attention scores B·n_heads·T² (in case the attention falls back to an eager kernel), float32 statistics
    (XᵀX: in² per Linear for SparseGPT, else one in-vector) and their float32 input copy B·T·max_in; plus the
    head's logits B·T·V (model dtype + a float32 copy) when evaluating.
    """
    _, blocks = find_blocks(model)
    linears = block_linears(blocks[0])
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or max(l.in_features for l in linears.values()))
    inter = max(l.out_features for l in linears.values())
    max_in = max(l.in_features for l in linears.values())
    heads = int(getattr(config, "num_attention_heads", 0) or max(1, hidden // 64))
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = batch_size * seqlen
    acts = tokens * (4 * hidden + 3 * inter) * act_bytes
    scores = batch_size * heads * seqlen * seqlen * act_bytes
    stats = sum((l.in_features**2 if need_hessian else l.in_features) * 4 for l in linears.values()) + tokens * max_in * 4
    logits = tokens * vocab * (act_bytes + 4) if with_logits else 0
    return acts + scores + stats + logits


def _budget_bytes(device: torch.device, budget_gb: float | None) -> int | None:
    """``gpu_budget_gb`` in bytes when given, else the GPU's free memory, else None (CPU: unlimited)."""
    if budget_gb is None:
        return free_memory_bytes(device)
    if float(budget_gb) <= 0:
        raise StreamingError(f"gpu_budget_gb={budget_gb} must be positive (GiB), e.g. gpu_budget_gb=70, or null for the GPU's free memory")
    return int(float(budget_gb) * GiB)


def _decide(mode: str, budget: int | None, whole: int, where: str, model_bytes: int) -> tuple[bool, str]:
    """(stream, reason) for ``streaming=mode`` when the whole run needs ``whole`` bytes."""
    if mode == "false":
        if budget is not None and whole > budget:
            raise StreamingError(
                f"the model needs ~{fmt_bytes(whole)} on {where} ({fmt_bytes(model_bytes)} of weights); "
                "use streaming=auto to stream one decoder block at a time"
            )
        return False, "streaming=false"
    if mode == "auto":
        stream = budget is not None and whole > budget
        return stream, (f"the model needs ~{fmt_bytes(whole)}, more than the budget" if stream
                        else "the whole model fits" if budget is not None else "no device budget (CPU)")
    return True, "streaming=true"


def plan_streaming(
    model: nn.Module,
    device: torch.device,
    mode: str | bool = "auto",
    budget_gb: float | None = None,
    *,
    batch_size: int = 4,
    seqlen: int = 512,
    nsamples: int = 128,
    need_hessian: bool = False,
) -> StreamingPlan:
    """Decide streaming and where activations live; raise :class:`StreamingError` when nothing fits.

    Called after the weights are loaded on the CPU and before anything moves to the device or runs.
    """
    mode = parse_mode(mode)
    budget = _budget_bytes(device, budget_gb)
    _, blocks = find_blocks(model)
    params = list(model.parameters())
    act = dtype_bytes(params[0].dtype) if params else 4
    model_bytes = _unique_bytes(list(model.modules()))
    resident = _unique_bytes(resident_modules(model))
    block = max(_unique_bytes(list(b.modules())) for b in blocks)
    work = block_work_bytes(model, batch_size, seqlen, act, need_hessian)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0) or max(
        l.in_features for l in block_linears(blocks[0]).values()
    )
    # block inputs, the block's first outputs and its re-run outputs can coexist while a block is processed
    acts = 3 * nsamples * seqlen * hidden * act
    one_block = resident + block + work
    whole = model_bytes + work + acts
    where = f"{device}" + (f" (budget {fmt_bytes(budget)})" if budget is not None else "")
    stream, reason = _decide(mode, budget, whole, where, model_bytes)
    if stream and budget is not None and one_block > budget:
        raise StreamingError(
            f"one decoder block needs ~{fmt_bytes(one_block)} on {device} (weights {fmt_bytes(block)} + activations "
            f"{fmt_bytes(work)} at batch_size={batch_size}, data.seqlen={seqlen} + embeddings/head {fmt_bytes(resident)}) "
            f"but the budget is {fmt_bytes(budget)}; lower batch_size (e.g. batch_size=1) or data.seqlen, raise "
            "gpu_budget_gb, or use a larger GPU"
        )
    on_device = budget is None or (one_block + acts <= budget if stream else whole <= budget)
    store = device if on_device or not is_gpu(device) else torch.device("cpu")
    plan = StreamingPlan(
        stream=stream, device=str(device), store_device=str(store), budget_bytes=budget, model_bytes=model_bytes,
        resident_bytes=resident, block_bytes=block, block_work_bytes=work, activation_bytes=acts, reason=reason,
        windows_per_pass=max(1, int(nsamples)),
    )
    if stream:
        log.info(
            "streaming one block at a time on %s (%s): ~%s per block step, activations (%s) on %s",
            where, reason, fmt_bytes(one_block), fmt_bytes(acts), store,
        )
    return plan
