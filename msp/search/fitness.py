"""Cheap candidates on the real model for the evolutionary search.

Per-layer *variants* are computed once, from ONE dense calibration pass (EvoPress-style), and a candidate
allocation is evaluated by swapping into the model only the layers whose level changed since the previous
candidate:

* **ranking** (magnitude, Wanda — any pruner declaring ``score_based``): each layer's per-row ranking of its scores is
  stored once (int16 positions), and the mask of any level is a threshold of it: a weight is kept iff its
  position in its row's stable ascending score order is ≥ k = ``prune_count(cols, s)`` — exactly the mask
  :func:`msp.masks.topk_row_mask` builds, without re-sorting and without per-level weight copies. For N:M the
  position inside each group of M (stable descending) is stored and a weight is kept iff it is < N.
* **store** (SparseGPT — any pruner): the pruned weight of every (layer, level) the grid can reach, from
  ``pruner.prune_weight_levels`` on the dense-pass statistics (SparseGPT: all of a layer's levels in one sweep
  sharing the H⁻¹ factor), packed (kept values + a bitmask: :func:`pack_weight`), in memory or on disk, in float16
  (bounded by ``max_levels`` levels per layer, or by ``allocation.store_budget_gb``: :func:`store_estimate`).

Fitness (lower is better) on held-out *calibration* tokens (never the evaluation split), with the dense
model's next-token log-probabilities cached once:

* ``kl``:  (1/T) Σ_t Σ_v p_dense(v|t) · (log p_dense(v|t) − log p_cand(v|t))   (mean token KL(dense ‖ candidate))
* ``ppl``: exp((1/T) Σ_t −log p_cand(x_{t+1}|x_≤t))
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msp.device import to_device
from msp.masks import Pattern, prune_count
from msp.eval.perplexity import batch_nll
from msp.models import find_blocks, layer_block_index
from msp.pipeline import batch_logits, block_on, block_output, capture_block_inputs, head_from_hidden, sequential_pass, window_passes
from msp.pruners import Pruner
from msp.search.evolution import SearchError
from msp.search.settings import METRICS, MODES, STORE_DTYPES, STORES
from msp.streaming import StreamingPlan, is_streamed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- rankings


def ranking_of(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Positions that turn any sparsity level's mask into one comparison.

    Unstructured: ``rank[i, j]`` = position of column j in row i's stable ascending sort of the scores
    (int16 when the row fits, else int32); the level-s mask is ``rank >= prune_count(cols, s)``.
    N:M (fixed or mixed M): position of each weight inside its group of M in stable *descending* order
    (int8); the mask keeping N per group is ``rank < N``. Both equal :func:`msp.masks.mask_from_scores`.
    """
    rows, cols = scores.shape
    if pattern.is_nm:
        m = pattern.m
        groups = scores.reshape(rows, cols // m, m)
        order = torch.sort(groups, dim=-1, stable=True, descending=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m, device=scores.device).expand_as(order))
        return rank.reshape(rows, cols).to(torch.int8)
    order = torch.sort(scores, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=scores.device).expand_as(order))
    return rank.to(torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32)


def mask_from_ranking(rank: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of one layer at ``sparsity`` from its :func:`ranking_of` (True = keep)."""
    if pattern.is_nm:
        return rank < pattern.for_layer(sparsity).n
    return rank >= prune_count(rank.shape[1], sparsity)


# ---------------------------------------------------------------------------------------------------- variants


class LayerVariants:
    """The weight of every prunable layer at any level it may take, plus its dense weight."""

    def __init__(self, dense: dict[str, torch.Tensor]):
        self.dense = dense

    def weight(self, name: str, sparsity: float) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release memory / temporary files."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    def on_device(self, device: torch.device) -> "DeviceSource":
        """A source of weights on ``device`` for one visit of a block (:meth:`ModelFitness.many`): here each
        (layer, level) weight is built on the host and moved (its bytes counted once per visit)."""
        return DeviceSource(self, device)


class DeviceSource:
    """Weights of some layers at some levels, on ``device``, for one visit of a block; ``moved``: the bytes that
    went to the device for them (each (layer, level) once)."""

    def __init__(self, variants: LayerVariants, device: torch.device):
        self.variants, self.device = variants, device
        self.moved = 0
        self._built: dict[tuple[str, str], torch.Tensor] = {}

    def weight(self, name: str, sparsity: float) -> torch.Tensor:
        key = (name, level_key(sparsity))
        if key not in self._built:
            self._built[key] = self._build(name, sparsity)
        return self._built[key]

    def _build(self, name: str, sparsity: float) -> torch.Tensor:
        w = self.variants.weight(name, sparsity)
        self.moved += w.numel() * w.element_size()
        return w.to(self.device)

    def write(self, name: str, sparsity: float, out: torch.Tensor, current: float | None = None) -> None:
        """``out`` (the layer's weight on the device) := the layer's weight at ``sparsity``; ``current``: the sparsity
        whose weight ``out`` holds now (0: the dense weight; None: unknown)."""
        out.copy_(self.weight(name, sparsity))


class RankingVariants(LayerVariants):
    """Each layer's dense weight and its score ranking (:func:`ranking_of`): any level's mask is one comparison."""

    def __init__(self, dense: dict[str, torch.Tensor], ranks: dict[str, torch.Tensor], pattern: Pattern):
        super().__init__(dense)
        self.ranks = ranks
        self.pattern = pattern
        self.orders: dict[str, torch.Tensor] = {}  # built by order() (the blockwise fitness's level steps)

    def weight(self, name: str, sparsity: float) -> torch.Tensor:
        mask = mask_from_ranking(self.ranks[name], sparsity, self.pattern)
        return torch.where(mask, self.dense[name], torch.zeros((), dtype=self.dense[name].dtype))

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in [*self.ranks.values(), *self.orders.values()])

    def close(self) -> None:
        self.ranks.clear()
        self.orders.clear()

    def on_device(self, device: torch.device) -> "DeviceSource":
        return _RankingSource(self, device)

    def order(self, name: str) -> torch.Tensor:
        """Row i's columns in the stable ascending score order (the inverse of :func:`ranking_of`'s positions; built on
        first use and kept: as many bytes as the ranking): the weights a level step changes are a slice of it."""
        if name not in self.orders:
            rank = self.ranks[name]
            cols = torch.arange(rank.shape[1], dtype=rank.dtype).expand_as(rank)
            self.orders[name] = torch.empty_like(rank).scatter_(1, rank.long(), cols)
        return self.orders[name]


class _RankingSource(DeviceSource):
    """Ranking variants on the device: a layer's dense weight and its ranking go there once per visit, and every
    level's weight is one comparison there (the same values as :meth:`RankingVariants.weight`)."""

    def __init__(self, variants: RankingVariants, device: torch.device):
        super().__init__(variants, device)
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._layers:
            dense, rank = self.variants.dense[name], self.variants.ranks[name]
            self.moved += dense.numel() * dense.element_size() + rank.numel() * rank.element_size()
            self._layers[name] = (dense.to(self.device), rank.to(self.device))
        return self._layers[name]

    def _build(self, name: str, sparsity: float) -> torch.Tensor:
        dense, rank = self._layer(name)
        mask = mask_from_ranking(rank, sparsity, self.variants.pattern)
        return torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))

    def write(self, name: str, sparsity: float, out: torch.Tensor, current: float | None = None) -> None:
        """Unstructured, from a known ``current`` level: only the weights whose rank lies between the two levels'
        prune counts change (one level step: a few percent of each row), found as a slice of the row's sorted order
        (:meth:`RankingVariants.order`) and scattered into ``out``; otherwise one comparison and one select into
        ``out``. Both leave ``where(rank >= k, dense, 0)``, bit for bit."""
        v = self.variants
        if current is not None and not v.pattern.is_nm:
            cols = out.shape[1]
            old, new = prune_count(cols, current), prune_count(cols, sparsity)
            if old != new:
                dense, order = self._sorted(name)
                index = order[:, min(old, new) : max(old, new)].long()
                if new > old:
                    out.scatter_(1, index, torch.zeros((), dtype=out.dtype, device=out.device).expand(index.shape))
                else:
                    out.scatter_(1, index, dense.gather(1, index))
            return
        dense, rank = self._layer(name)
        torch.where(mask_from_ranking(rank, sparsity, v.pattern), dense,
                    torch.zeros((), dtype=dense.dtype, device=dense.device), out=out)

    def _sorted(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = "sorted:" + name
        if key not in self._layers:
            dense, order = self.variants.dense[name], self.variants.order(name)
            self.moved += dense.numel() * dense.element_size() + order.numel() * order.element_size()
            self._layers[key] = (dense.to(self.device), order.to(self.device))
        return self._layers[key]


def level_key(sparsity: float) -> str:
    return f"{float(sparsity):.10f}"


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size → integer view


def packed_nbytes(numel: int, kept: int, element_size: int) -> int:
    """Bytes of one :func:`pack_weight`: the kept values, plus a bitmask (numel/8 bytes) or int32 flat indices
    (4 per kept value), whichever is smaller (indices win above 31/32 sparsity)."""
    return kept * element_size + min((numel + 7) // 8, 4 * kept)


def pack_weight(weight: torch.Tensor) -> dict:
    """A pruned weight as its kept values and where they are: ``{"shape", "values", "mask" | "index"}``.

    "Kept" is every element whose bit pattern is not +0.0 (so a kept −0.0 or a pruned −0.0 survive), which makes
    :func:`unpack_weight` bit-identical to ``weight``. ``mask``: the keep-mask of the flattened weight, packed 8
    per uint8 (:func:`numpy.packbits`); ``index``: the int32 flat positions when they are smaller."""
    flat = weight.detach().reshape(-1).contiguous()
    keep = flat.view(_BITS[flat.element_size()]) != 0
    kept = int(keep.sum())
    packed = {"shape": list(weight.shape), "values": flat[keep].clone()}
    if 4 * kept < (flat.numel() + 7) // 8:
        packed["index"] = torch.nonzero(keep).reshape(-1).to(torch.int32)
    else:
        packed["mask"] = torch.from_numpy(np.packbits(keep.cpu().numpy()))
    return packed


def unpack_weight(packed: dict) -> torch.Tensor:
    """The dense tensor of :func:`pack_weight` (zeros where nothing was kept)."""
    values = packed["values"]
    numel = math.prod(packed["shape"])
    out = torch.zeros(numel, dtype=values.dtype)
    if "index" in packed:
        out[packed["index"].long()] = values
    else:
        out[torch.from_numpy(np.unpackbits(packed["mask"].numpy(), count=numel).astype(bool))] = values
    return out.reshape(packed["shape"])


def store_estimate(layer_params: Sequence[int], layer_levels: Sequence[Sequence[float]], element_size: int) -> int:
    """Bytes of a variant store holding layer i (``layer_params[i]`` weights) at each sparsity of ``layer_levels[i]``:
    Σ_i Σ_s :func:`packed_nbytes` (n_i, round((1−s)·n_i), element_size) — exact up to kept weights that are exactly 0."""
    return sum(packed_nbytes(n, round((1.0 - s) * n), element_size) for n, levels in zip(layer_params, layer_levels) for s in levels)


def _packed_size(packed: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in packed.items() if k != "shape")


class StoredVariants(LayerVariants):
    """Pruned weights per (layer, level), each packed (:func:`pack_weight`: kept values + bitmask, ≈ (1−s)·2 + 1/8
    bytes per weight in float16 instead of 2), in memory or as files in ``folder`` (deleted by :meth:`close`)."""

    def __init__(self, dense: dict[str, torch.Tensor], folder: Path | None = None):
        super().__init__(dense)
        self.memory: dict[tuple[str, str], dict] = {}
        self.files: dict[tuple[str, str], Path] = {}
        self.folder = folder
        self._bytes = 0

    def put(self, name: str, sparsity: float, weight: torch.Tensor) -> None:
        key = (name, level_key(sparsity))
        packed = pack_weight(weight)
        self._bytes += _packed_size(packed)
        if self.folder is None:
            self.memory[key] = packed
            return
        path = self.folder / f"{len(self.files):06d}.pt"
        torch.save(packed, path)
        self.files[key] = path

    def weight(self, name: str, sparsity: float) -> torch.Tensor:
        key = (name, level_key(sparsity))
        if key in self.memory:
            stored = self.memory[key]
        elif key in self.files:
            stored = torch.load(self.files[key], map_location="cpu", weights_only=True)
        else:
            raise SearchError(f"no stored variant of {name} at sparsity {sparsity:.4f} (the grid and the store disagree)")
        return unpack_weight(stored).to(self.dense[name].dtype)

    def store_bytes(self) -> int:
        """Bytes of the packed levels (in memory or on disk), without the dense weights."""
        return self._bytes

    def nbytes(self) -> int:
        return super().nbytes() + (self._bytes if self.folder is None else 0)

    def close(self) -> None:
        self.memory.clear()
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)


_STORE_DTYPES = {name: getattr(torch, name) for name in STORE_DTYPES}


def resolve_mode(mode: str, pruner: Pruner) -> str:
    """``auto`` → ``ranking`` for score-based pruners (magnitude, Wanda), ``store`` for the others (SparseGPT)."""
    if mode not in MODES:
        raise SearchError(f"allocation.candidates={mode!r} is unknown; valid: {', '.join(MODES)}")
    if mode == "auto":
        return "ranking" if pruner.score_based else "store"
    if mode == "ranking" and not pruner.score_based:
        raise SearchError(
            f"allocation.candidates=ranking needs a score-based pruner (magnitude, wanda); pruner={pruner.name} reconstructs "
            f"weights, use allocation.candidates=store (or auto)"
        )
    return mode


@torch.no_grad()
def precompute_variants(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    pruner: Pruner,
    pattern: Pattern,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    *,
    mode: str = "auto",
    levels: dict[str, Sequence[float]] | None = None,
    store: str = "memory",
    store_dir: Path | None = None,
    store_dtype: str = "float16",
    max_levels: int = 8,
    batch_size: int = 4,
    inputs_at: dict[str, float] | None = None,
) -> LayerVariants:
    """One calibration pass that records, for every prunable layer, what any level needs.

    ``levels[name]``: the sparsities the layer can take (only used, and required, by ``store`` mode).
    ``inputs_at``: None (default): the dense outputs of every block feed the next (the callback returns False);
    else each block, once recorded, is set to its variants at these sparsities (``allocation.store_inputs=start``)
    and its outputs recomputed, so the next block is calibrated on the inputs of that pruned model. The dense
    weights are back in the model on return either way.
    """
    mode = resolve_mode(mode, pruner)
    _check_store(mode, store, store_dtype, levels, max_levels)
    needs_data = pruner.needs_calibration
    if needs_data and (calibration_ids is None or calibration_ids.numel() == 0):
        raise SearchError(f"pruner={pruner.name} needs calibration data for the search's variants (data.nsamples >= 1)")
    names_by_id = {id(lin): name for name, lin in layers.items()}
    variants = _empty_variants(mode, pattern, store, store_dir)
    sdtype = _STORE_DTYPES[store_dtype]

    def on_block(index, prefix, block, linears, stats):
        named = {names_by_id.get(id(lin), f"{prefix}.{index}.{local}"): (local, lin) for local, lin in linears.items()}
        for name, (local, lin) in named.items():
            _record_layer(variants, name, lin.weight.data, stats.get(local), pruner, pattern, levels, sdtype)
        if inputs_at is None:
            return False  # weights untouched: the dense outputs feed the next block
        for name, (_, lin) in named.items():
            if name in inputs_at:
                lin.weight.data.copy_(variants.weight(name, inputs_at[name]).to(lin.weight.device, lin.weight.dtype))
        return True  # the pruned block's outputs feed the next

    try:
        sequential_pass(
            model,
            calibration_ids if needs_data else torch.empty(0, 1, dtype=torch.long),
            device,
            on_block,
            collect_stats=needs_data,
            need_hessian=pruner.needs_hessian and mode == "store",
            propagate=needs_data,
            batch_size=batch_size,
            desc=f"search variants ({pruner.name}, {mode})",
        )
    except BaseException:
        put_dense(layers, variants)
        variants.close()
        raise
    put_dense(layers, variants)
    missing = [n for n in layers if n not in variants.dense]
    if missing:
        variants.close()
        raise SearchError(f"the variant pass did not visit {len(missing)} layer(s), e.g. {missing[0]}")
    log.info("search variants (%s, %s): %d layers, %.1f MiB held", pruner.name, mode, len(variants.dense), variants.nbytes() / 2**20)
    return variants


@torch.no_grad()
def put_dense(layers: dict[str, nn.Linear], variants: LayerVariants) -> None:
    """The dense weights recorded by the variant pass back into the model (after ``inputs_at`` or a candidate)."""
    for name, lin in layers.items():
        if name in variants.dense:
            lin.weight.data.copy_(variants.dense[name].to(lin.weight.device, lin.weight.dtype))


def _check_store(mode: str, store: str, store_dtype: str, levels: dict[str, Sequence[float]] | None, max_levels: int) -> None:
    if store not in STORES:
        raise SearchError(f"allocation.store={store!r} is unknown; valid: {', '.join(STORES)}")
    if store_dtype not in _STORE_DTYPES:
        raise SearchError(f"allocation.store_dtype={store_dtype!r} is unknown; valid: {', '.join(_STORE_DTYPES)}")
    if mode != "store":
        return
    if levels is None:
        raise SearchError("store mode needs the levels of every layer")
    most = max(len(v) for v in levels.values())
    if most > max_levels:
        raise SearchError(
            f"the grid gives a layer {most} levels but allocation.max_levels={max_levels} bounds the variant store; "
            f"raise allocation.step, narrow allocation.min/max, use allocation.granularity=block, or raise allocation.max_levels"
        )


def _empty_variants(mode: str, pattern: Pattern, store: str, store_dir: Path | None) -> LayerVariants:
    """Rankings (ranking mode), or a store in memory or in a fresh temporary folder under ``store_dir``."""
    if mode == "ranking":
        return RankingVariants({}, {}, pattern)
    folder = None
    if store == "disk":
        root = Path(store_dir) if store_dir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="search_store_", dir=root))
    return StoredVariants({}, folder)


def _record_layer(variants: LayerVariants, name: str, weight: torch.Tensor, stats, pruner: Pruner, pattern: Pattern,
                  levels: dict[str, Sequence[float]] | None, dtype: torch.dtype) -> None:
    """One layer's dense weight (on the CPU) and its ranking or its pruned weight at every level it may take."""
    cpu = torch.device("cpu")
    variants.dense[name] = weight.detach().to(cpu, copy=True)
    if isinstance(variants, RankingVariants):
        variants.ranks[name] = ranking_of(pruner.scores(weight, stats), pattern).to(cpu)
        return
    wanted = [float(s) for s in levels[name]]
    for s, pruned in zip(wanted, pruner.prune_weight_levels(weight, stats, wanted, pattern)):
        variants.put(name, s, pruned.to(cpu, dtype))


# ---------------------------------------------------------------------------------------------------- candidates


#: ``CandidateModel.current[u]`` of a unit whose dense weights are in place (no level is this low)
DENSE = int(np.iinfo(np.int64).min)


class CandidateModel:
    """Puts a genome's weights into the model, touching only the units whose level changed."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        variants: LayerVariants,
        unit_layers: Sequence[Sequence[str]],
        sparsity_of: Callable[[int, int], float],
    ):
        self.layers = layers
        self.variants = variants
        self.unit_layers = [list(u) for u in unit_layers]
        self.sparsity_of = sparsity_of
        self.current: np.ndarray | None = None  # the level in place per unit (DENSE: dense); None = all dense
        self.swaps = 0
        self.bytes_written = 0  # bytes of host-side variant weights written into the model by apply()

    @torch.no_grad()
    def apply(self, genome: np.ndarray) -> None:
        genome = np.asarray(genome, np.int64)
        changed = range(len(genome)) if self.current is None else np.flatnonzero(genome != self.current)
        for u in changed:
            s = self.sparsity_of(int(u), int(genome[u]))
            for name in self.unit_layers[u]:
                lin = self.layers[name]
                weight = self.variants.weight(name, s)
                lin.weight.data.copy_(weight.to(lin.weight.device))
                self.bytes_written += weight.numel() * weight.element_size()
                self.swaps += 1
        self.current = genome.copy()

    @torch.no_grad()
    def set_units(self, units: Sequence[int], levels: Sequence[int], source: "DeviceSource") -> None:
        """Units ``units`` at ``levels``, their weights from ``source`` (on the device of their block); only the
        units whose level in place differs are written."""
        if self.current is None:
            self.current = np.full(len(self.unit_layers), DENSE, np.int64)
        for u, level in zip(units, levels):
            u, level = int(u), int(level)
            if self.current[u] == level:
                continue
            s = self.sparsity_of(u, level)
            now = 0.0 if self.current[u] == DENSE else self.sparsity_of(u, int(self.current[u]))  # DENSE: all kept
            for name in self.unit_layers[u]:
                source.write(name, s, self.layers[name].weight.data, now)
                self.swaps += 1
            self.current[u] = level

    def restore(self) -> None:
        """Put every layer's dense weight back."""
        put_dense(self.layers, self.variants)
        self.current = None


#: vocabularies above this size keep the cached dense probabilities in bfloat16: Gemma-3's 262,144 words cost 512 MiB
#: per 512-token window in float32 (256 MiB in bfloat16); SmolLM2 (49,152), LLaMA-2 (32,000) and LLaMA-3 (128,256)
#: stay float32, so their fitness values do not change. Σ p log p is computed from the stored probabilities, so
#: the KL stays Σ p̃ (log p − log q) with the same p̃ on both sides.
BF16_PROBS_VOCAB = 131_072

#: what the fitness moves to the compute device, by kind (:class:`FitnessCost`)
BYTE_KINDS = ("weights", "variants", "activations", "reference")


@dataclass
class FitnessCost:
    """What the fitness spent (``results.json["search"]["fitness_cost"]``).

    ``tokens``: Σ over evaluations of the tokens scored; ``block_windows``: decoder-block forwards over one fitness
    window actually run, ``block_windows_full``: what one full forward per evaluation runs (windows × blocks), so
    their ratio is the mean fraction of blocks run per candidate. ``bytes_to_device``: bytes copied into the compute
    device's working set, counted as a GPU run moves them (a CPU run copies in place or not at all): ``weights`` the
    decoder blocks of a streamed model, ``variants`` the variant sources (a level's weight, or a layer's dense weight
    and ranking), ``activations`` stored hidden states (when they live off the device), ``reference`` the dense
    model's cached probabilities."""

    evaluations: int = 0
    tokens: int = 0
    block_windows: int = 0
    block_windows_full: int = 0
    passes: int = 0  # passes over the decoder blocks (a forward, or a stage group of ModelFitness.many)
    bytes_to_device: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KINDS, 0))

    def to_json(self) -> dict:
        out = asdict(self)
        out["bytes_to_device_total"] = sum(self.bytes_to_device.values())
        out["blocks_fraction"] = self.block_windows / self.block_windows_full if self.block_windows_full else None
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ModelFitness:
    """``fitness(genome, stage)``: the candidate's KL to the dense model (or its perplexity) on the first
    ``stage_windows[stage]`` held-out windows. Build it while the dense weights are in place: the dense
    log-probabilities are cached at construction.

    ``plan``: the run's :class:`msp.streaming.StreamingPlan`; when it streams, the model stays where it is (the
    CPU) and each candidate's forward visits ``device`` one decoder block at a time (:func:`msp.pipeline.batch_logits`)
    — the search of a model bigger than the GPU. Same numbers as the resident forward.

    :meth:`many` scores a stage's genomes together, block by block, starting each candidate's forward at the
    longest prefix of blocks whose hidden states are cached (``blockwise``; ``memory_gb`` bounds its memory);
    ``__call__`` is one candidate's forward. ``cost`` counts what both spend (:class:`FitnessCost`).
    """

    def __init__(
        self,
        model: nn.Module,
        candidate: CandidateModel,
        windows: torch.Tensor,
        stage_windows: Sequence[int],
        device: torch.device,
        metric: str = "kl",
        batch_size: int = 4,
        *,
        plan: StreamingPlan | None = None,
        blockwise: bool = True,
        memory_gb: float = 2.0,
    ):
        if metric not in METRICS:
            raise SearchError(f"allocation.fitness={metric!r} is unknown; valid: {', '.join(METRICS)}")
        if candidate.current is not None:
            raise SearchError("build the fitness before any candidate is applied (the dense reference is cached first)")
        if not memory_gb > 0:
            raise SearchError(f"allocation.fitness_memory_gb={memory_gb} must be > 0 (GB of hidden states), e.g. allocation.fitness_memory_gb=2")
        self.model, self.candidate, self.device = model, candidate, device
        self.plan = plan
        self.windows = windows
        self.stage_windows = [int(n) for n in stage_windows]
        if max(self.stage_windows) > windows.shape[0]:
            raise SearchError(f"the stages need {max(self.stage_windows)} fitness windows but only {windows.shape[0]} were given")
        self.metric = metric
        self.batch_size = max(1, int(batch_size))
        self.cost = FitnessCost()
        # KL(p‖q) per token = Σ_v p_v log p_v − Σ_v p_v log q_v: the dense p and its Σ p log p are cached once, so a
        # candidate costs its log-softmax and one product-sum per token (no exp of the reference, no elementwise difference)
        self.dense_p: list[torch.Tensor] = []
        self.dense_plogp: list[torch.Tensor] = []
        if metric == "kl":
            n = max(self.stage_windows)
            for _, batch, logits in self._batches(n, desc="search: dense reference"):
                logp = F.log_softmax(logits, dim=-1)
                p = logp.exp()
                if logits.shape[-1] > BF16_PROBS_VOCAB:
                    p = p.to(torch.bfloat16)
                    self.dense_plogp.append((p.float() * logp).sum(dim=-1).to("cpu"))
                else:
                    self.dense_plogp.append((p * logp).sum(dim=-1).to("cpu"))
                self.dense_p.append(p.to("cpu"))
                del logp, p
        self._blockwise_setup(blockwise, memory_gb)

    def __call__(self, genome: np.ndarray, stage: int) -> float:
        written = self.candidate.bytes_written
        self.candidate.apply(genome)
        n = self.stage_windows[stage]
        value = self._kl(n) if self.metric == "kl" else self._ppl(n)
        self._count_forward(n, self.candidate.bytes_written - written)
        return value

    def of_model(self, stage: int) -> float:
        """The fitness of the weights in place now (a model pruned by hand, no candidate applied) on the stage's windows."""
        n = self.stage_windows[stage]
        return self._kl(n) if self.metric == "kl" else self._ppl(n)

    @torch.no_grad()
    def _batches(self, n: int, desc: str | None = None):
        """(batch index, token ids on the device, float32 logits) for the first ``n`` windows, in batches."""
        batches = batch_logits(self.model, self.windows[:n], self.device, plan=self.plan, batch_size=self.batch_size, desc=desc)
        for b, (batch, logits) in enumerate(batches):
            yield b, batch, logits.float()

    @torch.no_grad()
    def _kl(self, n: int) -> float:
        total, count = 0.0, 0
        for b, batch, logits in self._batches(n):
            rows = batch.shape[0]
            p = self.dense_p[b][:rows].to(logits.device, torch.float32)
            plogp = self.dense_plogp[b][:rows].to(logits.device)
            # Σ_v p_v log q_v with torch.sum's pairwise float32 summation: a dot product (bmm) over the 50k-word vocabulary
            # accumulates ~1e-3 of rounding error on SmolLM2, this ~1e-6 (checked against float64)
            pq = (p * F.log_softmax(logits, dim=-1)).sum(dim=-1)
            kl = plogp - pq  # (batch, seqlen): KL(dense ‖ candidate) per token
            total += float(kl.sum())
            count += kl.numel()
        return total / count

    @torch.no_grad()
    def _ppl(self, n: int) -> float:
        total, count = 0.0, 0
        for _, batch, logits in self._batches(n):
            nll, tokens = batch_nll(logits, batch)
            total += nll
            count += tokens
        return math.exp(total / count)

    def _count_forward(self, n: int, variant_bytes: int) -> None:
        """The cost of one candidate's forward over the first ``n`` windows (``__call__``)."""
        c, seqlen = self.cost, self.windows.shape[1]
        passes = len(list(window_passes(self.windows[:n], self.plan.windows_per_pass, self.batch_size))) if is_streamed(self.plan) else 1
        c.evaluations += 1
        c.tokens += n * seqlen
        c.block_windows += n * self.n_blocks
        c.block_windows_full += n * self.n_blocks
        c.passes += passes
        c.bytes_to_device["variants"] += variant_bytes
        if is_streamed(self.plan):
            c.bytes_to_device["weights"] += passes * sum(self._block_bytes)
            if self.plan.store != self.device:
                c.bytes_to_device["activations"] += n * self.n_blocks * self._window_state_bytes()
        c.bytes_to_device["reference"] += sum(self._reference_bytes(w) for w in range(n))

    # -------------------------------------------------------------------------------- many: block by block

    def _blockwise_setup(self, blockwise: bool, memory_gb: float) -> None:
        """The block of every unit, the units before every block boundary, the byte counts and the caches."""
        prefix, self.blocks = find_blocks(self.model)
        self.n_blocks = len(self.blocks)
        self._captured = None  # BlockInputs of every fitness window, one window per "batch" (captured on first use)
        self.stride = 1  # keep the hidden states at every stride-th block boundary (raised when over the budget)
        self._block_bytes = [sum(_nbytes(t) for t in list(b.parameters()) + list(b.buffers())) for b in self.blocks]
        unit_block = []
        for names in self.candidate.unit_layers:
            blocks = {layer_block_index(name, prefix) for name in names}
            unit_block.append(blocks.pop() if len(blocks) == 1 else None)
        self.blockwise = bool(blockwise)
        if None in unit_block:
            log.info("search fitness: a unit spans several decoder blocks; candidates are scored one forward each")
            self.blockwise = False
            return
        ub = np.asarray(unit_block, np.int64)
        self._units_in = [np.flatnonzero(ub == b) for b in range(self.n_blocks)]
        self._before = [np.flatnonzero(ub < b) for b in range(self.n_blocks + 1)]
        self.memory_bytes = float(memory_gb) * 1e9
        self._store = self.plan.store if is_streamed(self.plan) else self.device
        self._tuple_out: bool | None = None
        self._hidden: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (window, boundary, prefix key) → hidden states
        self._hidden_bytes = 0
        self._rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (window, genome key) → KL per token (1, seqlen)

    def _window_state_bytes(self) -> int:
        """Bytes of one window's hidden states at one block boundary: seqlen × hidden × element size."""
        if self._captured is not None:
            return _nbytes(self._captured.hidden[0])
        hidden = int(getattr(getattr(self.model, "config", None), "hidden_size", 0) or 0)
        return self.windows.shape[1] * hidden * next(self.model.parameters()).element_size()

    def _reference_bytes(self, window: int) -> int:
        if self.metric != "kl":
            return 0
        b, r = divmod(window, self.batch_size)
        p, plogp = self.dense_p[b], self.dense_plogp[b]
        return (_nbytes(p) // p.shape[0]) + (_nbytes(plogp) // plogp.shape[0])

    def _keys(self, genome: np.ndarray) -> list[bytes]:
        """The genome's prefix key at every block boundary b = 0 … blocks: the levels of the units before block b."""
        return [genome[idx].tobytes() for idx in self._before]

    def _lookup(self, window: int, keys: list[bytes]) -> tuple[int, torch.Tensor]:
        """The last block boundary whose hidden states are cached for this prefix, and those states (0: the embeddings)."""
        for b in range(self.n_blocks, 0, -1):
            key = (window, b, keys[b])
            hit = self._hidden.get(key)
            if hit is not None:
                self._hidden.move_to_end(key)
                return b, hit
        return 0, self._captured.hidden[window]

    def _keep(self, key: tuple, hidden: torch.Tensor, budget: float) -> None:
        """Cache ``hidden`` under ``key``, least recently used entries out beyond ``budget`` bytes."""
        if key in self._hidden:
            self._hidden.move_to_end(key)
            return
        size = _nbytes(hidden)
        if size > budget:
            return
        self._hidden[key] = hidden
        self._hidden_bytes += size
        while self._hidden_bytes > budget:
            _, old = self._hidden.popitem(last=False)
            self._hidden_bytes -= _nbytes(old)

    def _keep_row(self, key: tuple, row: torch.Tensor, budget: float) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) * _nbytes(row) > budget:
            self._rows.popitem(last=False)

    @torch.no_grad()
    def many(self, genomes: Sequence[np.ndarray], stage: int) -> list[float]:
        """The fitness of every genome at ``stage`` (the same values as ``[self(g, stage) for g in genomes]``),
        scored together block by block.

        Every decoder block visits the device once per group of candidates (:func:`msp.pipeline.block_on`), with
        its variant source (:meth:`LayerVariants.on_device`); inside, each distinct level of the block's units is
        swapped in once and the hidden states of every candidate at that level pass through it, one fitness window
        at a time. A candidate's forward starts at the last block boundary whose hidden states are cached for its
        prefix (the levels of the units before it): its parent's, a sibling's or its own at an earlier stage, so
        the blocks before its first changed unit are not run again. Then the final norm and lm_head, and the KL (or
        perplexity) assembled batch by batch exactly as :meth:`_kl` / :meth:`_ppl` do.

        Memory (``memory_gb`` = M): the hidden states of a group of candidates at one block boundary, in and out,
        2 × candidates × windows × seqlen × hidden × bytes, stay within M/2 (smaller groups otherwise: each group is
        one more pass over the blocks); the cache of boundary states keeps at most M/2, least recently used out, and
        only every k-th boundary, k = ⌈2 × candidates × windows × (blocks − 1) × seqlen × hidden × bytes / (M/2)⌉.
        """
        if not self.blockwise:
            return [self(g, stage) for g in genomes]
        n = self.stage_windows[stage]
        if self._captured is None:
            self._captured = capture_block_inputs(self.model, self.windows, 1, self.device, self._store)
        genomes = [np.asarray(g, np.int64) for g in genomes]
        keys = [self._keys(g) for g in genomes]
        full = self.n_blocks
        state = self._window_state_bytes()
        # (candidate, window) pairs that need a forward: the KL of a window this genome was scored on before is kept
        todo = {c: [w for w in range(n) if not (self.metric == "kl" and (w, keys[c][full]) in self._rows)] for c in range(len(genomes))}
        per_candidate = max([len(ws) for ws in todo.values()] + [1])
        group = max(1, int(self.memory_bytes / 2 // (2 * per_candidate * state)))
        cache_budget = self.memory_bytes / 2
        self.stride = max(1, math.ceil(2 * len(genomes) * per_candidate * max(1, full - 1) * state / cache_budget))
        rows = {(w, keys[c][full]): self._rows[(w, keys[c][full])] for c in range(len(genomes)) for w in range(n) if w not in todo[c]}
        finals: dict[tuple, torch.Tensor] = {}
        needing = [c for c in range(len(genomes)) if todo[c]]
        for start in range(0, len(needing), group):
            items = [(c, w) for c in needing[start : start + group] for w in todo[c]]
            live = self._run_group(genomes, keys, items, cache_budget)
            self._heads(keys, items, live, rows, finals, cache_budget)
        values = []
        for c, genome in enumerate(genomes):
            values.append(self._value(keys[c][full], n, rows, finals))
        self.cost.evaluations += len(genomes)
        self.cost.tokens += len(genomes) * n * self.windows.shape[1]
        self.cost.block_windows_full += len(genomes) * n * full
        return values

    def _run_group(self, genomes: list[np.ndarray], keys: list[list[bytes]], items: list[tuple[int, int]],
                   cache_budget: float) -> dict[tuple, torch.Tensor]:
        """One pass over the blocks for the (candidate, window) ``items``: the final hidden states by (window, genome key)."""
        full, cost = self.n_blocks, self.cost
        starts: dict[int, list[tuple[int, int]]] = {}
        entry: dict[tuple, torch.Tensor] = {}
        for c, w in items:
            b, hidden = self._lookup(w, keys[c])
            starts.setdefault(b, []).append((c, w))
            entry[(w, b, keys[c][b])] = hidden
        finished = {(w, keys[c][full]): entry[(w, full, keys[c][full])] for c, w in starts.pop(full, [])}
        live: dict[tuple, torch.Tensor] = {}  # hidden states at the current block boundary, by (window, prefix key)
        active: list[tuple[int, int]] = []
        first = min(starts) if starts else full
        if first < full:
            cost.passes += 1
        for b in range(first, full):
            for c, w in starts.get(b, []):
                active.append((c, w))
                live.setdefault((w, keys[c][b]), entry[(w, b, keys[c][b])])
            work: dict[tuple, dict[tuple, tuple]] = {}  # levels of the block's units → out key → in key
            for c, w in active:
                levels = tuple(int(x) for x in genomes[c][self._units_in[b]])
                work.setdefault(levels, {}).setdefault((w, keys[c][b + 1]), (w, keys[c][b]))
            out: dict[tuple, torch.Tensor] = {}
            with block_on(self.blocks[b], self.device) as block:
                if is_streamed(self.plan):
                    cost.bytes_to_device["weights"] += self._block_bytes[b]
                source = self.candidate.variants.on_device(self.device)
                for levels in sorted(work, key=lambda lv: (not self._in_place(b, lv), lv)):  # the levels in place first
                    self.candidate.set_units(self._units_in[b], levels, source)
                    for out_key, in_key in work[levels].items():
                        out[out_key] = self._block_forward(block, b, out_key[0], live[in_key])
                cost.bytes_to_device["variants"] += source.moved
                del source
            if (b + 1 < full and (b + 1) % self.stride == 0) or (b + 1 == full and self.metric == "ppl"):
                for (w, key), hidden in out.items():
                    self._keep((w, b + 1, key), hidden, cache_budget)
            live = out
        live.update(finished)
        return live

    def _in_place(self, b: int, levels: tuple) -> bool:
        current = self.candidate.current
        return current is not None and tuple(int(x) for x in current[self._units_in[b]]) == levels

    def _block_forward(self, block: nn.Module, b: int, window: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``b``'s output for one window's hidden states (the same call as :func:`msp.pipeline.block_forward`)."""
        captured, cost = self._captured, self.cost
        kwargs = captured.per_block[b][window] if captured.per_block else captured.kwargs[window]
        if hidden.device != self.device:
            cost.bytes_to_device["activations"] += _nbytes(hidden)
        raw = block(hidden.to(self.device), **to_device(kwargs, self.device))
        self._tuple_out = isinstance(raw, (tuple, list))
        cost.block_windows += 1
        return block_output(raw).detach().to(self._store)

    def _heads(self, keys, items, live, rows, finals, cache_budget) -> None:
        """The final norm and lm_head of every item's last hidden states: KL rows (``rows``), or the final hidden
        states themselves for the perplexity (``finals``)."""
        full = self.n_blocks
        if self.metric == "ppl":
            for c, w in items:
                finals[(w, keys[c][full])] = live[(w, keys[c][full])]
            return
        by_window: dict[int, list[bytes]] = {}
        for c, w in items:
            if keys[c][full] not in by_window.setdefault(w, []):
                by_window[w].append(keys[c][full])
        with head_from_hidden(self.model, bool(self._tuple_out)) as logits_fn:
            for w, genome_keys in sorted(by_window.items()):
                b, r = divmod(w, self.batch_size)
                p = self.dense_p[b][r : r + 1].to(self.device, torch.float32)
                plogp = self.dense_plogp[b][r : r + 1].to(self.device)
                self.cost.bytes_to_device["reference"] += self._reference_bytes(w)
                ids = self.windows[w : w + 1].to(self.device)
                for key in genome_keys:
                    logits = logits_fn(ids, live[(w, key)].to(self.device)).float()
                    logq = F.log_softmax(logits, dim=-1)
                    row = plogp - logq.mul_(p).sum(dim=-1)  # = plogp − (p · log q).sum(−1) of _kl, without a third vocab-sized tensor
                    rows[(w, key)] = row
                    self._keep_row((w, key), row, cache_budget / 16)
                    del logits

    def _value(self, key: bytes, n: int, rows: dict, finals: dict) -> float:
        """The fitness over the first ``n`` windows from the per-window results, batch by batch as :meth:`_kl` / :meth:`_ppl`."""
        total, count = 0.0, 0
        if self.metric == "kl":
            for start in range(0, n, self.batch_size):
                parts = [rows[(w, key)] for w in range(start, min(n, start + self.batch_size))]
                kl = parts[0] if len(parts) == 1 else torch.cat(parts)
                total += float(kl.sum())
                count += kl.numel()
            return total / count
        with head_from_hidden(self.model, bool(self._tuple_out)) as logits_fn:
            for start in range(0, n, self.batch_size):
                ws = range(start, min(n, start + self.batch_size))
                parts = [finals[(w, key)] for w in ws]
                batch = self.windows[start : ws[-1] + 1].to(self.device)
                hidden = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)
                nll, tokens = batch_nll(logits_fn(batch, hidden).float(), batch)
                total += nll
                count += tokens
        return math.exp(total / count)


__all__ = ["ranking_of", "mask_from_ranking", "LayerVariants", "RankingVariants", "StoredVariants", "pack_weight",
           "unpack_weight", "packed_nbytes", "store_estimate", "precompute_variants",
           "resolve_mode", "CandidateModel", "ModelFitness", "FitnessCost", "DeviceSource", "METRICS", "MODES", "STORES"]
