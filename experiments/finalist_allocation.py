#!/usr/bin/env python3
"""The allocation of one finalist of a verified search (``allocation.verify_tokens``), as an ``allocation=file`` input.

    python experiments/finalist_allocation.py <run dir> --finalist population[0] --out pick.json
    msp <the run's overrides> allocation=file allocation.path=pick.json

``population[0]`` is the search's own best on its fitness tokens, the allocation an unverified run delivers: pruning
with it next to the verified run compares the two picks of the very same search (the verification's effect, free of
the search's run-to-run spread). Each layer gets its unit's sparsity (a block's or its own); the finalists' genomes
are recorded to three decimals, so ``allocation=file`` fits the result onto the budget again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from msp.io import write_json_atomic  # noqa: E402


def finalist_allocation(run_dir: Path, finalist: str = "population[0]") -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    layers = json.loads((run_dir / "allocation.json").read_text())["sparsities"]
    verify = (results.get("search") or {}).get("verify")
    if not verify:
        raise SystemExit(f"finalist_allocation: {run_dir} has no verification (run it with allocation.verify_tokens=4096)")
    names = [f["name"] for f in verify["finalists"]]
    if finalist not in names:
        raise SystemExit(f"finalist_allocation: no finalist {finalist!r} in {run_dir}; valid: {', '.join(names)}")
    genome = [float(x) for x in verify["finalists"][names.index(finalist)]["genome"].split()]
    units = list(results["search"]["units"])
    if len(units) != len(genome):
        raise SystemExit(f"finalist_allocation: {len(genome)} genome values for {len(units)} units in {run_dir}")

    def unit_of(layer: str) -> int:
        for i, u in enumerate(units):
            if layer == u or layer.startswith(u + "."):
                return i
        raise SystemExit(f"finalist_allocation: layer {layer} belongs to no unit of {run_dir}")

    return {"method": "msp", "target": results["target_sparsity"], "sparsities": {n: genome[unit_of(n)] for n in layers},
            "meta": {"source": str(run_dir), "finalist": finalist, "chosen_by_verification": verify["chosen"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One finalist of a verified msp search as an allocation file.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--finalist", default="population[0]", help="start, population[0] (the search's own pick), population[1], ...")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    alloc = finalist_allocation(args.run_dir, args.finalist)
    write_json_atomic(args.out, alloc)
    print(f"{args.finalist} of {args.run_dir} ({len(alloc['sparsities'])} layers) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
