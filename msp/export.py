"""Exports of a pruned model: the 2:4 semi-structured conversion, llm-compressor recipes, the quantized sparse model.

The hand-off from pruning is a dense weight with zeros (``save_model=true`` writes it with ``save_pretrained``).

**2:4 semi-structured (GPU speed).** In memory, on a CUDA GPU, :func:`to_semi_structured_` swaps every 2:4 Linear
weight for a ``torch.sparse.to_sparse_semi_structured`` tensor, whose matmuls run on the sparse tensor cores (Ampere
and newer); ``export.semi_structured=true`` does it at the end of a run and records how far the logits move
(:func:`export_run`), and ``bench/sparse24_speed.py`` measures the speed-up. On a CPU the conversion does not exist;
it is skipped with one clear log line and the dense-with-zeros weights stay in place. A layer qualifies when every
group of 4 consecutive inputs of every row holds at most 2 non-zeros (:func:`check_24`). (msp's own packed 2:4 disk
format, ``model-2of4/``, is retired: nothing read it, and deployment goes through the formats below.)

**llm-compressor recipe.** ``python -m msp.export recipe <run dir> [--out recipe.yaml] [--pruner sparsegpt|wanda] [--granularity block|layer]``
writes a recipe for llm-compressor's ``oneshot`` that applies the run's allocation (see :func:`build_recipe`);
llm-compressor is not imported (nor a dependency): the recipe is plain YAML.

**Quantized sparse model.** ``python -m msp.export quantized <model dir> <out> --dense <dense model> [--bits 4] [--dtype float16]``
writes a model pruned with ``pruner.bits`` as a compressed-tensors ``pack-quantized`` checkpoint that
transformers and vLLM load (see :mod:`msp.quantized_export`).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from msp.device import is_gpu
from msp.errors import MspError
from msp.io import atomic_dir, write_text_atomic
from msp.models import prunable_layers

log = logging.getLogger(__name__)

class ExportError(MspError):
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
        log.warning("%s: kept dense-with-zeros weights", reason)
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


def check_export_pattern(pattern) -> None:
    """``export.semi_structured=true`` needs a pattern that guarantees ≤ 2 non-zeros per group of 4."""
    if not (pattern.kind == "nm" and pattern.m == 4 and pattern.n <= 2):
        raise ExportError(
            f"export.semi_structured=true needs pattern=2:4 (or 1:4) so that every layer is 2:4; got pattern={pattern}. "
            "Use pattern=2:4, or export.semi_structured=false"
        )


@torch.no_grad()
def export_run(model: nn.Module, check_ids: torch.Tensor | None = None) -> dict:
    """The run's export step (``export.semi_structured=true``): when the model sits on a CUDA GPU, convert its 2:4
    layers in place to semi-structured weights and report how far its logits on ``check_ids`` move from the
    dense-with-zeros model's (they should agree to the kernels' rounding). Call it last: the model is changed.
    Nothing is written to disk (``save_model=true`` saves the dense-with-zeros model)."""
    layers = prunable_layers(model)
    check_24(layers)
    device = next(model.parameters()).device
    if not all(is_gpu(l.weight.device) for l in layers.values()):
        out = {"converted": 0, "note": "semi-structured conversion needs every layer on a CUDA GPU; nothing converted"}
        log.warning("export: %s", out["note"])
        return out
    reference = model(input_ids=check_ids.to(device), use_cache=False).logits.float() if check_ids is not None else None
    report = to_semi_structured_(model, layers)
    out = report.to_json()
    if reference is not None:
        logits = model(input_ids=check_ids.to(device), use_cache=False).logits.float()
        diff = (logits - reference).abs().max().item()
        out.update(max_abs_logit_diff=diff, max_abs_logit=reference.abs().max().item())
        log.info("export: semi-structured logits differ from dense-with-zeros by at most %.3g (max |logit| %.3g)", diff, out["max_abs_logit"])
    return out


# ---------------------------------------------------------------------------------------- llm-compressor recipe
#
# Checked against llm-compressor's source (vllm-project/llm-compressor, src/llmcompressor/modifiers/pruning/):
# ``SparsityModifierBase`` (sparsegpt/sgpt_base.py) has ``sparsity: float | list[float] | dict``,
# ``mask_structure: str = "0:0"``, ``targets = ["Linear"]``, ``sequential_targets = None`` (the decoder layer class)
# and ``ignore: list[str]``; ``SparseGPTModifier`` adds ``block_size = 128`` and ``dampening_frac = 0.01``.
# A list gives one sparsity per module matched by ``targets`` in ``model.named_modules()`` order (its length must
# equal the number of matches), and every Linear inside a matched module gets that module's value; ``targets`` and
# ``ignore`` entries are exact names, class names or ``re:<regex>`` (``re.match``). In ``mask_structure`` "N:M",
# N is the number of weights *pruned* in each group of M (``topk(..., prune_n, largest=False)`` picks the zeros;
# with N:M the sparsity value is not used) while msp's ``pattern=N:M`` *keeps* N: msp 1:4 is llm-compressor "3:4".

RECIPE_MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


class RecipeError(MspError):
    """A run whose allocation cannot be written as an llm-compressor recipe; the message says why and what to do."""


@dataclass
class Recipe:
    """An llm-compressor recipe (``recipe`` is what the YAML holds) and the comment lines that go above it."""

    recipe: dict
    comments: list[str]
    sparsities: list[float]  # the modifier's list: one per decoder block (granularity=block) or per layer (layer)
    prefix: str  # the decoder blocks' module path, e.g. ``model.layers``

    def to_yaml(self) -> str:
        import yaml

        head = "".join(f"# {line}\n" if line else "#\n" for line in self.comments)
        return head + yaml.safe_dump(self.recipe, sort_keys=False, default_flow_style=None, width=100)


def _read_run_json(run_dir: Path, name: str) -> dict:
    path = run_dir / name
    if not path.is_file():
        raise RecipeError(f"{run_dir} has no {name}; give the folder of a finished msp run (it holds results.json and allocation.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc})") from None


def block_prefix(names: list[str]) -> str:
    """The decoder blocks' module path shared by every layer name ``<prefix>.<block>.<rest>`` (e.g. ``model.layers``)."""
    split = [n.split(".") for n in names]
    for k in range(min(len(p) for p in split)):
        if all(p[k].isdigit() for p in split) and len({tuple(p[:k]) for p in split}) == 1:
            return ".".join(split[0][:k])
    raise RecipeError(f"layer names do not share one '<blocks>.<index>.<layer>' path (e.g. {names[0]!r}); cannot map them to decoder blocks")


def block_means(sparsities: dict[str, float], params: dict[str, int], prefix: str) -> tuple[list[float], list[tuple[float, float]], list[str]]:
    """Per decoder block: the parameter-weighted mean sparsity over its pruned layers, the (min, max) of its layer
    sparsities, and the layers at sparsity 0 (left dense: they go to ``ignore`` and out of the mean, so the block
    still loses exactly the allocation's weight count)."""
    blocks: dict[int, list[str]] = {}
    for name in sparsities:
        blocks.setdefault(int(name[len(prefix) + 1 :].split(".", 1)[0]), []).append(name)
    if sorted(blocks) != list(range(len(blocks))):
        raise RecipeError(f"decoder blocks {sorted(blocks)} are not numbered 0..{len(blocks) - 1}; the allocation does not cover every block")
    means, ranges, dense = [], [], []
    for b in range(len(blocks)):
        names = blocks[b]
        pruned = [n for n in names if sparsities[n] > 0]
        dense += [n for n in names if sparsities[n] <= 0]
        weight = sum(params[n] for n in pruned)
        means.append(sum(sparsities[n] * params[n] for n in pruned) / weight if weight else 0.0)
        values = [sparsities[n] for n in names]
        ranges.append((min(values), max(values)))
    return means, ranges, dense


def _mask_structure(results: dict) -> tuple[str, str | None]:
    """(llm-compressor mask_structure, note) from the run's pattern; mixed N:M with unequal N is refused."""
    patterns = {str(l.get("pattern", results.get("pattern"))) for l in results.get("layers", [])} or {str(results.get("pattern"))}
    if patterns == {"unstructured"}:
        return "0:0", None
    if len(patterns) > 1:
        shown = ", ".join(sorted(patterns)[:4])
        raise RecipeError(
            f"pattern={results.get('pattern')} pruned layers with different N:M ({shown}); an llm-compressor modifier has one "
            "mask_structure, so mixed N:M cannot be expressed: export a run with pattern=unstructured or a fixed N:M such as 2:4"
        )
    from msp.masks import Pattern, PatternError

    try:
        pattern = Pattern.parse(next(iter(patterns)))
    except PatternError as exc:
        raise RecipeError(f"results.json: {exc}") from None
    if pattern.kind != "nm":
        raise RecipeError(f"results.json: pattern {pattern} has no concrete N:M per layer; re-run with a fixed pattern")
    note = None
    if str(results.get("pattern")) != str(pattern):
        note = f"pattern={results.get('pattern')} chose {pattern} for every layer, so one mask_structure expresses it"
    return f"{pattern.m - pattern.n}:{pattern.m}", note


GRANULARITIES = ("block", "layer")


def build_recipe(run_dir: str | Path, pruner: str | None = None, granularity: str = "block") -> Recipe:
    """The llm-compressor recipe that applies a finished run's allocation with ``SparseGPTModifier`` or
    ``WandaPruningModifier`` (``pruner``; default: the run's own pruner).

    ``granularity="block"``: one sparsity per decoder block (``targets`` = the blocks, in order): the
    parameter-weighted mean of the block's layer sparsities in ``allocation.json``, so each block loses the same
    number of weights as in the run. An allocation that gives the layers of a block different sparsities loses
    that split; the comments say how much. ``granularity="layer"``: one target per Linear layer (its exact name)
    and one sparsity each, in model order, which keeps a layer-granularity allocation exactly.
    """
    if granularity not in GRANULARITIES:
        raise RecipeError(f"granularity={granularity!r}; valid: {' | '.join(GRANULARITIES)}")
    run = _read_run(Path(run_dir), pruner)
    mask, mask_note = _mask_structure(run.results)
    prefix = block_prefix(list(run.sparsities))
    means, ranges, dense = block_means(run.sparsities, run.params, prefix)
    if mask != "0:0":  # N:M: the pattern alone decides which weights go; state the sparsity it implies
        n_pruned, m = (int(x) for x in mask.split(":"))
        means = [n_pruned / m] * len(means)
    targets, values = _recipe_targets(run, granularity, prefix, means, mask)
    modifier: dict = {"sparsity": values, "mask_structure": mask, "targets": targets, "ignore": ["re:.*lm_head", *dense]}
    notes = _pruner_options(modifier, run, pruner)
    comments = _recipe_comments(run, granularity, prefix, means, ranges, len(targets), dense)
    if mask != "0:0":
        comments += [f"mask_structure {mask!r} = msp pattern {run.results.get('pattern')}: llm-compressor's N counts pruned weights",
                     "(msp's N counts kept ones); under N:M llm-compressor does not use the sparsity values."]
    if mask_note:
        comments.append(mask_note)
    comments += notes
    data = run.results.get("data") or {}
    comments.append(f"msp calibrated on {data.get('calibration')}: {data.get('nsamples')} windows of {data.get('seqlen')} tokens "
                    f"(oneshot: num_calibration_samples={data.get('nsamples')}, max_seq_length={data.get('seqlen')}).")
    recipe = {"sparsity_stage": {"sparsity_modifiers": {RECIPE_MODIFIERS[run.modifier]: modifier}}}
    return Recipe(recipe, comments, values, prefix)


@dataclass
class _RunFiles:
    """What a recipe is built from: a finished run's results and allocation, and the modifier chosen for it."""

    run_dir: Path
    results: dict
    modifier: str  # a key of RECIPE_MODIFIERS
    sparsities: dict[str, float]  # allocation.json, per Linear layer
    params: dict[str, int]  # results.json's layers: weights per Linear layer


def _read_run(run_dir: Path, pruner: str | None) -> _RunFiles:
    """The run's results and allocation, checked to describe the same layers, and the chosen modifier."""
    if not run_dir.is_dir():
        raise RecipeError(f"run dir {run_dir} does not exist; give the folder of a finished msp run")
    results = _read_run_json(run_dir, "results.json")
    allocation = _read_run_json(run_dir, "allocation.json")
    chosen = (pruner or str(results.get("pruner", ""))).lower()
    if chosen not in RECIPE_MODIFIERS:
        given = f"--pruner {pruner}" if pruner else f"the run's pruner={results.get('pruner')}"
        raise RecipeError(f"{given} has no llm-compressor one-shot modifier; valid: --pruner {' | '.join(RECIPE_MODIFIERS)}")
    sparsities = {k: float(v) for k, v in (allocation.get("sparsities") or {}).items()}
    params = {l["name"]: int(l["params"]) for l in results.get("layers", []) if "params" in l}
    if not sparsities or set(sparsities) - set(params):
        missing = sorted(set(sparsities) - set(params))[:3]
        raise RecipeError(f"allocation.json and results.json of {run_dir} do not describe the same layers (e.g. {missing}); were they copied from different runs?")
    return _RunFiles(run_dir, results, chosen, sparsities, params)


def _recipe_targets(run: _RunFiles, granularity: str, prefix: str, means: list[float], mask: str) -> tuple[list[str], list[float]]:
    """The modifier's ``targets`` and its ``sparsity`` list, one value per target."""
    if granularity == "block":
        return [rf"re:{re.escape(prefix)}\.\d+$"], [float(s) for s in means]
    # every pruned Linear by its exact name; model order, which is the order llm-compressor assigns the list in
    order = sorted(run.params, key=lambda n: int(n[len(prefix) + 1 :].split(".", 1)[0]))  # stable: keeps in-block order
    targets = [n for n in order if run.sparsities[n] > 0]
    return targets, [float(run.sparsities[n]) if mask == "0:0" else means[0] for n in targets]


def _pruner_options(modifier: dict, run: _RunFiles, pruner: str | None) -> list[str]:
    """Add SparseGPTModifier's options from the run's pruner config to ``modifier``; the notes on what differs."""
    results, chosen = run.results, run.modifier
    cfg = results.get("pruner_config") or {}
    notes: list[str] = []
    if chosen == "sparsegpt":
        run_is_sgpt = str(results.get("pruner")) == "sparsegpt"
        modifier["block_size"] = int(cfg.get("blocksize", 128)) if run_is_sgpt else 128
        modifier["dampening_frac"] = float(cfg.get("percdamp", 0.01)) if run_is_sgpt else 0.01
        if run_is_sgpt and cfg.get("saliency", "obs") != "obs":
            notes.append(f"the run used pruner.saliency={cfg.get('saliency')}; SparseGPTModifier has only the OBS saliency (w^2/[H^-1]^2)")
        if run_is_sgpt and cfg.get("bits"):
            notes.append(f"the run quantized the kept weights jointly (pruner.bits={cfg.get('bits')}); this recipe only prunes: add a quantization stage (GPTQModifier) after it")
    if pruner and chosen != str(results.get("pruner")):
        notes.append(f"the run pruned with {results.get('pruner')}; this recipe uses {chosen} (--pruner) with the run's allocation")
    return notes


def _recipe_comments(run: _RunFiles, granularity: str, prefix: str, means: list[float], ranges: list[tuple[float, float]],
                     n_targets: int, dense: list[str]) -> list[str]:
    """The comment lines above the recipe: where it comes from, what its sparsity list means, what it loses."""
    results = run.results
    comments = [
        f"llm-compressor recipe written by msp (python -m msp.export recipe) from {run.run_dir}",
        f"model={results.get('model')} pruner={results.get('pruner')} pattern={results.get('pattern')} "
        f"allocation={results.get('allocation')} target sparsity={results.get('target_sparsity')} measured={float(results.get('sparsity', float('nan'))):.4f}",
    ]
    spread = [(b, lo, hi) for b, (lo, hi) in enumerate(ranges) if hi - lo > 1e-9]
    if granularity == "layer":
        comments += [
            f"sparsity: one value per Linear layer of the decoder blocks, targeted by exact name ({n_targets} layers);",
            "llm-compressor assigns the list in model.named_modules() order, which is the order of `targets` here.",
            "The allocation is kept exactly (granularity=layer).",
        ]
    else:
        comments += [
            f"sparsity: one value per decoder block {prefix}.<i> (i = 0..{len(means) - 1}, the order of `targets` matches),",
            "the parameter-weighted mean of the block's layer sparsities in allocation.json; every Linear of a block gets it.",
        ]
    if spread and granularity == "block":
        b, lo, hi = max(spread, key=lambda t: t[2] - t[1])
        comments += [
            f"LOST: this is a layer-granularity allocation: in {len(spread)} of {len(means)} blocks the layers had different",
            f"sparsities (largest spread: block {b}, {lo:.4f} to {hi:.4f}, now {means[b]:.4f} for all). Each block still loses",
            "the same number of weights; which of its layers lose them is left to the pruner's uniform split.",
            "python -m msp.export recipe --granularity layer targets every Linear by name and keeps the split.",
        ]
    elif granularity == "block":
        comments.append("block-granularity allocation: every layer of a block had the same sparsity, so nothing is lost.")
    if dense:
        comments.append(f"{len(dense)} layer(s) at sparsity 0 stay dense (in `ignore`" + (", left out of their block's mean)." if granularity == "block" else ")."))
    comments.append("Linear layers outside the decoder blocks (lm_head) are not targeted; lm_head is also ignored explicitly.")
    return comments


def write_recipe(run_dir: str | Path, out: str | Path, pruner: str | None = None, granularity: str = "block") -> Path:
    """Write :func:`build_recipe`'s YAML to ``out`` atomically. Returns the path."""
    text = build_recipe(run_dir, pruner, granularity).to_yaml()
    out = Path(out)
    write_text_atomic(out, text)
    log.info("wrote llm-compressor recipe to %s", out)
    return out


def recipe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m msp.export recipe", description="Write an llm-compressor recipe that applies a run's allocation.")
    parser.add_argument("run_dir", help="folder of a finished run (results.json, allocation.json)")
    parser.add_argument("--out", default=None, help="recipe file to write (default: <run dir>/recipe.yaml)")
    parser.add_argument("--pruner", choices=sorted(RECIPE_MODIFIERS), default=None, help="modifier to use (default: the run's pruner)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="block",
                        help="block: one sparsity per decoder block (default); layer: one target and sparsity per Linear layer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = write_recipe(args.run_dir, args.out or Path(args.run_dir) / "recipe.yaml", args.pruner, args.granularity)
    except RecipeError as exc:
        print(f"msp.export recipe: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["recipe"]:
        return recipe_main(argv[1:])
    if argv[:1] == ["quantized"]:
        from msp.quantized_export import quantized_main

        return quantized_main(argv[1:])
    usage = ("usage: python -m msp.export recipe <run dir> [--out recipe.yaml] [--pruner sparsegpt|wanda] [--granularity block|layer]\n"
             "   or: python -m msp.export quantized <model dir> <out> --dense <dense model> [--bits 4] [--dtype float16]")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    # the packed 2:4 format (python -m msp.export <model> <out>) is retired: say so rather than a bare usage error
    print(f"{usage}\nmsp.export: error: give a subcommand, recipe or quantized (the packed 2:4 export is retired; "
          "a run's model/ folder, save_model=true, is the dense-with-zeros model)", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
