"""A quantized sparse model that transformers and vLLM load: the compressed-tensors ``pack-quantized`` format.

``pruner.bits=4`` (joint SparseGPT + quantization, :mod:`msp.pruners.sparsegpt`) leaves every pruned Linear weight
as floats on a per-row grid ``w = scale · (q − zero)``, q an integer in ``[0, 2^bits − 1]`` (asymmetric min-max of
the *dense* row, :func:`~msp.pruners.sparsegpt.minmax_quant_params`). Here that grid is written as it is:

* **scheme**: weight-only ``int<bits>``, asymmetric, per channel (``strategy: channel``; per group when the
  qparams hold one column per group), activations in float — transformers' compressed-tensors quantizer reads it
  (tested), and so does vLLM's ``CompressedTensorsWNA16`` with zero points (``uint4``; read in its source). msp's zero point is an integer
  (``round(-min/scale)``, and ``min ≤ 0 ≤ max``), so a pruned 0 is exactly ``q = zero`` and dequantises to exactly
  0: **pruned zeros stay zeros under the asymmetric scheme**, no need to re-quantize symmetric (which would throw
  away SparseGPT's joint error compensation and change the logits). When every zero point is the middle of the
  range the qparams are symmetric and are written ``symmetric: true`` (no zero points stored).
* **format**: compressed-tensors' own :class:`~compressed_tensors.compressors.PackedQuantizationCompressor`
  packs each layer (``weight_packed`` int32, ``weight_scale``, ``weight_zero_point`` packed int32,
  ``weight_shape``); the ``quantization_config`` in ``config.json`` is its
  :class:`~compressed_tensors.quantization.QuantizationConfig`, written by
  :meth:`~compressed_tensors.compressors.ModelCompressor.update_config`. compressed-tensors stores q and the zero
  point signed (``[-2^(bits-1), 2^(bits-1) − 1]``): ``q_ct = q − 2^(bits-1)``, ``zp_ct = zero − 2^(bits-1)``, the
  same ``scale · (q_ct − zp_ct)``.
* **check first**: every layer's weight must lie on its grid (within float rounding, in units of one grid step)
  before anything is written; a model pruned without ``pruner.bits`` is refused in one line. Each packed layer is
  also unpacked again with the package's ``decompress`` and compared with the in-memory weight.

Layers with no qparams (``lm_head``, embeddings, Linear layers outside the decoder blocks) stay in the model's
float dtype and are listed in the config's ``ignore``.

Loading (CPU or GPU)::

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("<run dir>/model-quantized")   # needs `pip install compressed-tensors`

transformers turns the int4 weights back into float (the dense-with-zeros model msp had in memory, bit for bit
in float32): it has no int4 kernels. vLLM (``vllm serve <folder>``) runs them with its WNA16 kernels (Marlin/Machete
take 4-bit zero points; not run here). An asymmetric checkpoint carries ``dequantize: true`` in its ``quantization_config`` so
that transformers takes its dequantize-at-load path (see :func:`save_pack_quantized` for the bug it avoids).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from msp.errors import MspError
from msp.io import atomic_dir
from msp.pruners.sparsegpt import minmax_quant_params

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BITS = (2, 3, 4, 8)  # the widths msp's pruner quantizes to (pruner.bits); vLLM's WNA16 kernels take 4 and 8


class QuantizedExportError(MspError):
    """The model cannot be written as ``pack-quantized`` (weights off their grid, qparams that do not fit)."""


class LayerQParams(NamedTuple):
    """One Linear layer's grid, as msp's quantizer makes it: ``w = scale · (q − zero)``, q in ``[0, 2^bits − 1]``.

    scale, zero: (out,) per channel or (out, in / group_size) per group; zero holds integers (any dtype).
    """

    scale: torch.Tensor
    zero: torch.Tensor


@torch.no_grad()
def qparams_from_dense(
    dense_weights: Mapping[str, torch.Tensor],
    bits: int,
    *,
    group_size: int | None = None,
    dead_inputs: Mapping[str, torch.Tensor] | None = None,
    symmetric: bool = False,
) -> dict[str, LayerQParams]:
    """msp's per-row asymmetric min-max grid of every dense weight (exactly :func:`minmax_quant_params`).

    Call it with the dense weights (out, in) *before* pruning: SparseGPT's joint quantization takes its grid from
    the dense row. ``dead_inputs``: per layer, the (in,) bool mask of inputs whose Hessian diagonal is 0; SparseGPT
    zeroes those columns before taking the min/max (:func:`~msp.pruners.sparsegpt.sparsegpt_prune_levels`), so give
    them when a layer has dead inputs, or the grid can differ and the export is refused. ``group_size``: one grid per
    group of consecutive inputs (msp's pruner quantizes per row only; this is for weights quantized per group).
    """
    _check_bits(bits)
    out: dict[str, LayerQParams] = {}
    for name, weight in dense_weights.items():
        w = weight.detach().to(torch.float32).clone()
        if dead_inputs is not None and name in dead_inputs:
            w[:, dead_inputs[name].to(w.device)] = 0
        rows, cols = w.shape
        groups = 1
        if group_size is not None:
            if group_size <= 0 or cols % group_size:
                raise QuantizedExportError(f"group_size={group_size} does not divide layer {name}'s in_features={cols}")
            groups = cols // group_size
            w = w.reshape(rows * groups, cols // groups)
        if symmetric:  # GPTQ's sym: the range [-max|w|, max|w|], zero in the middle (not round(7.5), which ties)
            amax = w.abs().max(dim=1).values
            amax[amax == 0] = 1.0
            scale = 2 * amax / (2**bits - 1)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            scale, zero, _ = minmax_quant_params(w, bits)
        if group_size is not None:
            scale, zero = scale.reshape(rows, groups), zero.reshape(rows, groups)
        out[name] = LayerQParams(scale, zero)
    return out


def _compressors():
    try:
        from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
    except ImportError as exc:
        raise QuantizedExportError(
            f"the quantized export needs compressed-tensors>=0.20.1 ({exc}); pip install 'compressed-tensors>=0.20.1,<0.21' "
            "(Python>=3.11, torch>=2.10), or set export.quantized=false"
        ) from exc
    return ModelCompressor, PackedQuantizationCompressor


def check_available() -> None:
    """Raise :class:`QuantizedExportError` in one line when compressed-tensors is not installed."""
    _compressors()


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizedExportError(f"bits={bits} is not supported; valid: {', '.join(map(str, SUPPORTED_BITS))} (as pruner.bits)")


def _as_grid(qp: LayerQParams, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """scale and zero as float32 (out, groups) on the weight's device, and the group size."""
    rows, cols = weight.shape
    scale = qp.scale.detach().to(weight.device, torch.float32)
    zero = qp.zero.detach().to(weight.device, torch.float32)
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != rows or cols % scale.shape[1]:
        raise QuantizedExportError(
            f"qparams of layer {name} do not fit its weight {tuple(weight.shape)}: scale {tuple(qp.scale.shape)}, "
            f"zero {tuple(qp.zero.shape)}; expected ({rows},) per channel or ({rows}, in/group_size) per group"
        )
    if not torch.all(scale > 0) or not torch.equal(zero, torch.round(zero)):
        raise QuantizedExportError(f"qparams of layer {name}: scales must be > 0 and zero points integers (as minmax_quant_params makes them)")
    return scale, zero, cols // scale.shape[1]


def grid_tolerance(dtype: torch.dtype, bits: int) -> float:
    """How far from an integer ``w / scale + zero`` may be, in grid steps, for a weight stored in ``dtype``.

    The pruner computes ``scale · (q − zero)`` in float32 and casts to the model's dtype: a relative rounding of
    ``eps/2`` on a value up to ``maxq`` steps from 0. Never above 0.25 (the nearest grid point stays unambiguous).
    """
    maxq = 2**bits - 1
    return min(0.25, max(1e-3, maxq * torch.finfo(dtype).eps))


@dataclass
class GridCheck:
    layer: str
    max_offset: float  # largest |w/scale + zero − round(·)| in grid steps
    out_of_range: int  # weights whose q falls outside [0, maxq]

    def ok(self, tol: float) -> bool:
        return self.max_offset <= tol and self.out_of_range == 0


@torch.no_grad()
def check_grid(weight: torch.Tensor, qp: LayerQParams, bits: int, name: str = "weight") -> GridCheck:
    """How well ``weight`` (out, in) lies on the grid ``qp``; see :func:`grid_tolerance` for the pass mark."""
    scale, zero, group = _as_grid(LayerQParams(*qp), weight, name)
    rows, cols = weight.shape
    t = weight.detach().to(torch.float32).reshape(rows, cols // group, group) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    r = torch.round(t)
    maxq = 2**bits - 1
    return GridCheck(name, float((t - r).abs().max()) if t.numel() else 0.0, int(((r < 0) | (r > maxq)).sum()))


@torch.no_grad()
def check_on_grid(layers: Mapping[str, nn.Linear], qparams: Mapping[str, LayerQParams], bits: int) -> list[GridCheck]:
    """Raise :class:`QuantizedExportError` in one line if some layer's weight is off its grid; else the checks."""
    missing = [n for n in qparams if n not in layers]
    if missing:
        raise QuantizedExportError(f"qparams name {len(missing)} layer(s) the model has no Linear for, e.g. {missing[0]}")
    checks, bad = [], []
    for name, qp in qparams.items():
        weight = layers[name].weight
        check = check_grid(weight, qp, bits, name)
        checks.append(check)
        if not check.ok(grid_tolerance(weight.dtype, bits)):
            bad.append(check)
    if bad:
        worst = max(bad, key=lambda c: c.max_offset)
        raise QuantizedExportError(
            f"cannot export as {bits}-bit {FORMAT}: {len(bad)} of {len(checks)} layers are not on their quantization grid "
            f"(worst: {worst.layer}, {worst.max_offset:.3f} grid steps off, {worst.out_of_range} values out of range; "
            f"tolerance {grid_tolerance(layers[worst.layer].weight.dtype, bits):.3g}); prune with pruner=sparsegpt "
            f"pruner.bits={bits} and take the qparams from the dense weights (qparams_from_dense) before pruning"
        )
    return checks


def build_quantization_config(bits: int, group_size: int | None, symmetric: bool, ignore: list[str]):
    """compressed-tensors' config for weight-only int<bits> on every targeted Linear (status: compressed)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
        strategy="group" if group_size else "channel", group_size=group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    return QuantizationConfig(
        config_groups={"group_0": scheme}, format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore,
    )


@dataclass
class QuantizedExport:
    """What :func:`save_pack_quantized` wrote (``folder``) and how large its weights are on disk."""

    folder: str
    bits: int
    strategy: str  # channel | group
    group_size: int | None
    symmetric: bool
    layers: int  # Linear layers packed
    ignored: list[str] = field(default_factory=list)  # Linear layers kept in float
    weights_bytes: int = 0  # *.safetensors in the folder
    max_grid_offset: float = 0.0  # worst |w/scale + zero − q| over all layers, in grid steps
    dequantize_on_load: bool = False  # the config asks transformers to dequantize at load

    def to_json(self) -> dict:
        return asdict(self)


def safetensors_bytes(folder: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``folder`` (the weights, without config and tokenizer)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@torch.no_grad()
def save_pack_quantized(
    model: nn.Module,
    tokenizer,
    folder: str | Path,
    qparams: Mapping[str, LayerQParams | tuple[torch.Tensor, torch.Tensor]],
    *,
    bits: int = 4,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    dequantize_on_load: bool | None = None,
) -> QuantizedExport:
    """Write ``model`` to ``folder`` as a compressed-tensors ``pack-quantized`` checkpoint (see the module docstring).

    ``qparams``: per Linear layer name (as :func:`msp.models.prunable_layers` names them), the ``(scale, zero)``
    its weight was quantized with (:func:`qparams_from_dense`). ``group_size``: None for per-channel qparams (out,),
    else the group size the (out, in/group_size) qparams were made for. The model is not changed; every layer is
    checked to be on its grid before anything is written. ``dtype``: the float dtype of the scales and of the
    tensors that are not packed (embeddings, norms, ``lm_head``), e.g. ``torch.float16`` as deployed; default: the
    model's (float32 keeps the in-memory logits bit for bit). Returns a :class:`QuantizedExport`.

    ``dequantize_on_load`` (default: True for an asymmetric grid) adds transformers' own ``dequantize: true`` to
    the ``quantization_config``. With compressed-tensors 0.20.1 and transformers 5.24, transformers' default
    load path builds each asymmetric layer's zero point unpacked, ``(out, groups)``, while the compressor writes
    it packed, ``(out·bits/32, groups)`` (what vLLM reads), and ``from_pretrained`` stops on the size mismatch;
    its dequantize-at-load path unpacks it correctly. transformers has no int4 kernels and decompresses the whole
    model on the first forward anyway, so nothing is lost. compressed-tensors' own ``QuantizationConfig`` ignores
    the key (``extra="ignore"``); vLLM builds its config from the keys it knows (read in its source, not run here).
    """
    _check_bits(bits)
    ModelCompressor, _ = _compressors()
    qparams = _checked_qparams(qparams, dtype)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    checks = check_on_grid(linears, qparams, bits)
    grids = {name: _as_grid(qp, linears[name].weight, name) for name, qp in qparams.items()}
    symmetric = _grid_layout(grids, linears, group_size, bits)
    ignore = sorted(name for name in linears if name not in qparams)
    qconfig = build_quantization_config(bits, group_size, symmetric, ignore)
    packed = {name: _pack_layer(name, linears[name].weight.detach(), grid, qconfig.config_groups["group_0"], bits, dtype)
              for name, grid in grids.items()}
    folder = Path(folder)
    dequantize_on_load = (not symmetric) if dequantize_on_load is None else bool(dequantize_on_load)
    with atomic_dir(folder) as out:  # written beside, renamed into place: a kill leaves no half-written folder
        model.save_pretrained(out, state_dict=_export_state(model, packed, dtype), safe_serialization=True)
        ModelCompressor(quantization_config=qconfig).update_config(str(out))
        _patch_config(out, dequantize_on_load, dtype)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
    result = QuantizedExport(
        str(folder), bits, "group" if group_size else "channel", group_size, symmetric, len(qparams), ignore,
        safetensors_bytes(folder), max((c.max_offset for c in checks), default=0.0), dequantize_on_load,
    )
    log.info(
        "wrote %d-bit %s %s model to %s: %d layers packed, %d kept in float, %.2f MiB of weights",
        bits, "symmetric" if symmetric else "asymmetric", FORMAT, folder, result.layers, len(ignore), result.weights_bytes / 2**20,
    )
    return result


def _checked_qparams(qparams: Mapping, dtype: torch.dtype | None) -> dict[str, LayerQParams]:
    """The qparams as :class:`LayerQParams`; no qparams or a non-float ``dtype``: refused in one line."""
    if not qparams:
        raise QuantizedExportError("no qparams given: nothing to quantize (qparams_from_dense(dense weights, bits) before pruning)")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise QuantizedExportError(f"dtype={dtype} is not a float dtype for the saved tensors; valid: {', '.join(map(str, FLOAT_DTYPES))}")
    return {name: LayerQParams(*qp) for name, qp in qparams.items()}


def _grid_layout(grids: Mapping[str, tuple], linears: Mapping[str, nn.Linear], group_size: int | None, bits: int) -> bool:
    """Check that the grids' group sizes match ``group_size`` (None: per channel); return whether they are symmetric
    (every zero point the middle of the range)."""
    groups = {g for _, _, g in grids.values()}
    in_features = {linears[n].in_features for n in grids}
    per_channel = all(g == linears[n].in_features for n, (_, _, g) in grids.items())
    if group_size is None and not per_channel:
        raise QuantizedExportError(f"qparams hold per-group grids (group sizes {sorted(groups)}); pass group_size=")
    if group_size is not None and groups != {group_size}:
        raise QuantizedExportError(f"group_size={group_size} but the qparams' grids have group sizes {sorted(groups)} (in_features {sorted(in_features)})")
    mid = 2 ** (bits - 1)
    return all(bool(torch.all(zero == mid)) for _, zero, _ in grids.values())


def _pack_layer(name: str, weight: torch.Tensor, grid: tuple, scheme, bits: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One layer's compressed tensors (local names), packed by compressed-tensors and unpacked again to check them."""
    _, PackedQuantizationCompressor = _compressors()
    scale, zero, _ = grid
    scale_dtype = dtype or (weight.dtype if weight.dtype in FLOAT_DTYPES else torch.float16)
    local = {  # q is found in float32 (a bfloat16 w / scale can sit ~0.03 steps off), the scale stored in scale_dtype
        "weight": weight.to(torch.float32),
        "weight_scale": scale,
        "weight_zero_point": (zero - 2 ** (bits - 1)).to(torch.int8),  # compressed-tensors' signed zero point
    }
    compressed = dict(PackedQuantizationCompressor.compress(local, scheme))
    compressed["weight_scale"] = compressed["weight_scale"].to(scale_dtype)
    restored = PackedQuantizationCompressor.decompress(compressed, scheme)["weight"]
    # exact up to the scale's rounding to scale_dtype: (q − zp) · scale moves by at most maxq · |Δscale|
    atol = float(scale.max()) * (1e-3 + (2**bits - 1) * torch.finfo(scale_dtype).eps)
    if not torch.allclose(restored.float(), weight.float(), rtol=0, atol=atol):
        diff = float((restored.float() - weight.float()).abs().max())
        raise QuantizedExportError(f"layer {name}: compressed-tensors' pack/unpack moves the weight by {diff:.3g}; not exported")
    return {key: tensor.contiguous() for key, tensor in compressed.items()}


def _export_state(model: nn.Module, packed: Mapping[str, dict[str, torch.Tensor]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict to save: packed layers' tensors in place of their weights, the rest cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}  # one cast per storage: tied weights (lm_head = embeddings) stay one tensor
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in packed:
            state.update({f"{module}.{local}": t for local, t in packed[module].items()})
        elif dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            source = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            state[key] = cast[source] if source in cast else cast.setdefault(source, tensor.to(dtype))
        else:
            state[key] = tensor
    return state


def _patch_config(folder: Path, dequantize_on_load: bool, dtype: torch.dtype | None) -> None:
    """Add ``dequantize: true`` (see :func:`save_pack_quantized`) and the float dtype to the saved ``config.json``."""
    if not (dequantize_on_load or dtype is not None):
        return
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if dequantize_on_load:
        config["quantization_config"]["dequantize"] = True
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")  # what from_pretrained loads the floats as
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _load_pruned(folder: str):
    """The pruned model as saved (its dtype kept) and its tokenizer when the folder has one (tiny models have none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msp.models import ModelError

    path = Path(folder)
    if not (path / "config.json").exists():
        raise ModelError(f"{folder} has no config.json; give the model/ folder a run wrote with save_model=true")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        log.info("%s holds no tokenizer; the quantized folder gets none either", folder)
        tokenizer = None
    return model, tokenizer


def quantized_main(argv: list[str]) -> int:
    """``python -m msp.export quantized <pruned model> <out> --dense <dense model> [--bits 4] [--dtype float16]``:
    write a model pruned with ``pruner=sparsegpt pruner.bits=<bits>`` and saved by the run (``save_model=true``) as
    ``pack-quantized``, taking the grid from the dense model it was pruned from."""
    import argparse
    import sys

    from msp.models import ModelError, load_model, prunable_layers

    parser = argparse.ArgumentParser(
        prog="python -m msp.export quantized",
        description="Write a model pruned with pruner.bits as a compressed-tensors pack-quantized checkpoint.",
    )
    parser.add_argument("model", help="the pruned model's folder (a run's model/ with save_model=true)")
    parser.add_argument("out", help="output folder, e.g. <run dir>/model-quantized")
    parser.add_argument("--dense", required=True, help="the dense model it was pruned from (its model= value, e.g. smollm2-135m)")
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS, help="the run's pruner.bits (default: 4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="float dtype of scales and unpacked tensors (default: the model's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dense = load_model(args.dense)
        qparams = qparams_from_dense({n: l.weight for n, l in prunable_layers(dense.model).items()}, args.bits)
        del dense
        model, tokenizer = _load_pruned(args.model)
        result = save_pack_quantized(model, tokenizer, args.out, qparams, bits=args.bits, dtype=DTYPES[args.dtype] if args.dtype else None)
    except (QuantizedExportError, ModelError) as exc:
        print(f"msp.export quantized: error: {exc}", file=sys.stderr)
        return 2
    print(result.folder)
    return 0


__all__ = [
    "LayerQParams", "QuantizedExport", "QuantizedExportError", "GridCheck", "build_quantization_config", "check_grid",
    "check_on_grid", "grid_tolerance", "qparams_from_dense", "quantized_main", "safetensors_bytes", "save_pack_quantized",
]
