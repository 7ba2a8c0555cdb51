"""2:4 export: make 2:4-pruned Linear layers fast with PyTorch semi-structured sparse tensors.

The hand-off from pruning is a dense weight with zeros. Here it becomes

* on disk, device-independent: each 2:4 weight (out, in) is packed as its kept values (out, in/2) and, per group
  of 4 inputs, the two kept positions in 4 bits (uint8 (out, in/4), ``p0 | p1 << 2`` with p0 < p1) — about
  56% of the dense fp16 size; the other tensors are stored as they are (``sparse24.safetensors`` +
  ``sparse24.json`` + the model's ``config.json``);
* in memory, on a CUDA GPU: ``torch.sparse.to_sparse_semi_structured`` weights, whose matmuls run on the
  sparse tensor cores (Ampere and newer). On a CPU that conversion does not exist; it is skipped with one
  clear log line and the dense-with-zeros weights stay in place.

A layer qualifies when every group of 4 consecutive inputs of every row holds at most 2 non-zeros
(:func:`check_24`); a model that does not is refused in one line before any file is written.

Command line, for a model saved by a run with ``save_model=true``::

    python -m msp.export outputs/runs/<date>/<time>/model outputs/model-2of4
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from msp.device import is_gpu
from msp.models import prunable_layers

log = logging.getLogger(__name__)

FORMAT = "msp-2of4-v1"
TENSORS_FILE = "sparse24.safetensors"
MANIFEST_FILE = "sparse24.json"


class ExportError(ValueError):
    """The model cannot be exported as 2:4 (a layer is not 2:4); the message names the fix."""


def groups_over_24(weight: torch.Tensor) -> int:
    """Number of groups of 4 consecutive inputs (per row) with more than 2 non-zeros; -1 if in_features % 4."""
    rows, cols = weight.shape
    if cols % 4:
        return -1
    nonzero = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=-1)
    return int((nonzero > 2).sum())


def is_24(weight: torch.Tensor) -> bool:
    return groups_over_24(weight) == 0


def check_24(layers: dict[str, nn.Linear]) -> None:
    """Raise :class:`ExportError` naming the first layer that is not 2:4 (checked for every layer, nothing written)."""
    bad = []
    for name, lin in layers.items():
        over = groups_over_24(lin.weight)
        if over:
            bad.append((name, over, lin.weight.numel() // 4))
    if bad:
        name, over, total = bad[0]
        what = f"in_features={layers[name].in_features} is not a multiple of 4" if over < 0 else f"{over} of {total} groups of 4 hold more than 2 non-zeros"
        raise ExportError(
            f"cannot export as 2:4: layer {name} is not 2:4 ({what}; {len(bad)} of {len(layers)} layers fail); "
            "prune with pattern=2:4 (or 1:4), or set export.semi_structured=false"
        )


def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), positions uint8 (out, in/4)) of a 2:4 weight. Groups with fewer than 2 non-zeros
    keep zero entries at the lowest free positions, so unpacking is exact."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    nonzero = (groups != 0).to(torch.int8)
    # the 2 kept positions of each group: non-zeros first (stable → lowest index first), then sorted ascending
    keep = torch.sort(nonzero, dim=-1, descending=True, stable=True).indices[..., :2]
    keep = torch.sort(keep, dim=-1).values
    values = torch.gather(groups, -1, keep).reshape(rows, cols // 2)
    meta = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight with zeros from :func:`pack_24`'s output."""
    rows, half = values.shape
    pos = torch.stack([meta & 3, (meta >> 2) & 3], dim=-1).to(torch.int64)  # (out, in/4, 2)
    dense = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(rows, half // 2, 2))
    return dense.reshape(rows, half * 2)


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer → why it stayed dense

    def to_json(self) -> dict:
        return {"converted": len(self.converted), "skipped": self.skipped}


def to_semi_structured_(model: nn.Module, layers: dict[str, nn.Linear] | None = None) -> ConversionReport:
    """Swap every 2:4 Linear weight of ``model`` for a ``torch.sparse`` semi-structured tensor, in place.

    Needs the weights on a CUDA GPU (sparse tensor cores); on a CPU nothing is converted and every layer is
    reported as skipped with the reason. Layers whose shape or dtype the kernels cannot take stay dense.
    """
    from torch.sparse import to_sparse_semi_structured

    layers = layers if layers is not None else prunable_layers(model)
    check_24(layers)
    report = ConversionReport()
    first = next(iter(layers.values()), None)
    if first is None:
        return report
    if not is_gpu(first.weight.device):
        reason = f"2:4 semi-structured kernels need a CUDA GPU; the weights are on {first.weight.device}"
        log.warning("%s: kept dense-with-zeros weights (the packed 2:4 export on disk is still written)", reason)
        report.skipped = {name: reason for name in layers}
        return report
    for name, lin in layers.items():
        try:
            sparse = to_sparse_semi_structured(lin.weight.detach())
        except (RuntimeError, ValueError) as exc:  # shape/dtype the kernels do not take
            report.skipped[name] = str(exc).splitlines()[0]
            continue
        lin.weight = nn.Parameter(sparse, requires_grad=False)
        report.converted.append(name)
    if report.skipped:
        log.warning("2:4 conversion kept %d layer(s) dense, e.g. %s: %s", len(report.skipped), *next(iter(report.skipped.items())))
    log.info("2:4 semi-structured: %d Linear layers converted", len(report.converted))
    return report


def save_24(model: nn.Module, folder: Path, tokenizer=None) -> dict:
    """Write the packed 2:4 model to ``folder`` (see the module docstring). Refuses a model that is not 2:4
    before writing anything. Returns the manifest."""
    from safetensors.torch import save_file

    layers = prunable_layers(model)
    check_24(layers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    packed_names = {f"{name}.weight" for name in layers}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    dense_bytes = packed_bytes = 0
    for key, t in model.state_dict().items():
        t = t.detach()
        dense_bytes += t.numel() * t.element_size()
        if key in packed_names:
            values, meta = pack_24(t.to("cpu"))
            tensors[f"{key}.values"], tensors[f"{key}.meta"] = values, meta
            packed_bytes += values.numel() * values.element_size() + meta.numel()
            continue
        ptr = t.data_ptr()
        if ptr in seen and t.numel():  # tied weights (lm_head = embeddings): stored once
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        tensors[key] = t.to("cpu").contiguous()
        packed_bytes += t.numel() * t.element_size()
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT, "layers": sorted(packed_names), "aliases": aliases,
        "dense_bytes": dense_bytes, "packed_bytes": packed_bytes,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    log.info("wrote packed 2:4 model to %s: %.1f MiB (dense %.1f MiB)", folder, packed_bytes / 2**20, dense_bytes / 2**20)
    return manifest


def load_24_state_dict(folder: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """The dense-with-zeros state dict (tied aliases filled in) and the manifest of a packed 2:4 folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        raise ExportError(f"{folder} has no {MANIFEST_FILE}; give a folder written by msp.export.save_24 (export.semi_structured=true)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-export with this msp version")
    raw = load_file(str(folder / TENSORS_FILE), device=str(device))
    state: dict[str, torch.Tensor] = {}
    for key in manifest["layers"]:
        state[key] = unpack_24(raw.pop(f"{key}.values"), raw.pop(f"{key}.meta"))
    state.update(raw)
    for key, source in manifest["aliases"].items():
        state[key] = state[source]
    return state, manifest


def load_24(folder: Path, device: torch.device, dtype: torch.dtype | None = None, semi_structured: bool = True) -> nn.Module:
    """Rebuild the model from a packed 2:4 folder on ``device``; with ``semi_structured`` convert its 2:4 layers
    (CUDA only; on a CPU the dense-with-zeros weights are kept, see :func:`to_semi_structured_`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state, _ = load_24_state_dict(folder)
    config = AutoConfig.from_pretrained(folder)
    first = next(iter(state.values()))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or first.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ExportError(f"{folder} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval().to(device)
    if semi_structured:
        to_semi_structured_(model)
    return model


def check_export_pattern(pattern) -> None:
    """``export.semi_structured=true`` needs a pattern that guarantees ≤ 2 non-zeros per group of 4."""
    if not (pattern.kind == "nm" and pattern.m == 4 and pattern.n <= 2):
        raise ExportError(
            f"export.semi_structured=true needs pattern=2:4 (or 1:4) so that every layer is 2:4; got pattern={pattern}. "
            "Use pattern=2:4, or export.semi_structured=false"
        )


@torch.no_grad()
def export_run(model: nn.Module, tokenizer, folder: Path, check_ids: torch.Tensor | None = None) -> dict:
    """The run's export step: write the packed 2:4 model to ``folder``; when the model sits on a CUDA GPU,
    convert it in place to semi-structured weights and report how far its logits on ``check_ids`` move from
    the dense-with-zeros model's (they should agree to the kernels' rounding). Call it last: the model is changed."""
    manifest = save_24(model, folder, tokenizer)
    out = {"path": str(folder), "dense_bytes": manifest["dense_bytes"], "packed_bytes": manifest["packed_bytes"]}
    device = next(model.parameters()).device
    layers = prunable_layers(model)
    if not all(is_gpu(l.weight.device) for l in layers.values()):
        out.update(converted=0, note="semi-structured conversion needs every layer on a CUDA GPU; packed export only")
        log.warning("export: %s", out["note"])
        return out
    reference = model(input_ids=check_ids.to(device), use_cache=False).logits.float() if check_ids is not None else None
    report = to_semi_structured_(model, layers)
    out.update(report.to_json())
    if reference is not None:
        logits = model(input_ids=check_ids.to(device), use_cache=False).logits.float()
        diff = (logits - reference).abs().max().item()
        out.update(max_abs_logit_diff=diff, max_abs_logit=reference.abs().max().item())
        log.info("export: semi-structured logits differ from dense-with-zeros by at most %.3g (max |logit| %.3g)", diff, out["max_abs_logit"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msp.export", description="Pack a 2:4-pruned model (saved with save_model=true).")
    parser.add_argument("model", help="folder written by save_pretrained (a run's model/ folder)")
    parser.add_argument("out", help="output folder for the packed 2:4 model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from msp.models import ModelError, load_model

    try:
        loaded = load_model(args.model)
        save_24(loaded.model, Path(args.out), loaded.tokenizer)
    except (ExportError, ModelError) as exc:
        print(f"msp.export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
