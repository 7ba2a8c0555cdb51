"""An :class:`Allocation` maps every prunable Linear layer to its sparsity.

It is validated against the model's layers (every layer present, values within bounds, parameter-weighted
mean equal to the target) and round-trips through ``allocation.json``. Pruners only ever read it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from msp.errors import MspError
from msp.io import write_json_atomic


class AllocationError(MspError):
    """An allocation that does not fit the model or the budget; the message says how to fix it."""


@dataclass
class Allocation:
    sparsities: dict[str, float]
    target: float
    method: str = "uniform"
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.sparsities[name]

    def weighted_mean(self, params: dict[str, int]) -> float:
        total = sum(params[n] for n in self.sparsities)
        return sum(self.sparsities[n] * params[n] for n in self.sparsities) / total

    def validate(
        self,
        params: dict[str, int],
        *,
        bounds: tuple[float, float] = (0.0, 1.0),
        tolerance: float | None = None,
        rows: dict[str, int] | None = None,
    ) -> None:
        """Check layer names, bounds, and that the weighted mean meets the target.

        ``tolerance`` defaults to one weight per row of every layer (the rounding of per-row top-k).
        """
        missing = [n for n in params if n not in self.sparsities]  # in model order
        extra = [n for n in self.sparsities if n not in params]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} layer(s) missing (e.g. {', '.join(missing[:5])})")
            if extra:
                parts.append(f"{len(extra)} unknown layer(s) (e.g. {', '.join(extra[:5])})")
            raise AllocationError(
                "allocation does not match the model: " + "; ".join(parts) + ". Was it made for another model? "
                "Recompute it for this model or pass the allocation.json of a run on the same model"
            )
        lo, hi = bounds
        bad = {n: s for n, s in self.sparsities.items() if not (lo - 1e-9 <= s <= hi + 1e-9) or not (0 <= s < 1) or math.isnan(s)}
        if bad:
            name, value = next(iter(bad.items()))
            raise AllocationError(
                f"{len(bad)} layer sparsities outside [{lo}, {min(hi, 1.0)}) (e.g. {name}={value:.4f}); widen allocation.min/max or lower the target"
            )
        mean = self.weighted_mean(params)
        if tolerance is None:
            total = sum(params.values())
            row_total = sum(rows.values()) if rows else len(params)
            tolerance = max(row_total / total, 1e-9)
        if abs(mean - self.target) > tolerance + 1e-9:
            raise AllocationError(
                f"allocation's parameter-weighted mean sparsity is {mean:.6f}, off the target {self.target:.6f} by "
                f"{mean - self.target:+.6f} (tolerance {tolerance:.2e}); rescale it onto the budget"
            )

    def to_json(self) -> dict:
        return {"method": self.method, "target": self.target, "sparsities": self.sparsities, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> "Allocation":
        try:
            return cls({k: float(v) for k, v in data["sparsities"].items()}, float(data["target"]), data.get("method", "file"), data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise AllocationError(f"not an msp allocation.json (needs 'target' and 'sparsities'): {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Allocation":
        path = Path(path)
        if path.is_dir():
            path = path / "allocation.json"
        if not path.exists():
            raise AllocationError(f"allocation file {path} does not exist; pass allocation.path=<run dir>/allocation.json of a finished run")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AllocationError(f"allocation file {path} is not valid JSON ({exc})") from exc
        return cls.from_json(data)


def uniform_allocation(layers: dict[str, int], target: float) -> Allocation:
    return Allocation({name: float(target) for name in layers}, float(target), "uniform")
