"""Pruners: magnitude, Wanda, SparseGPT behind one interface (:class:`msp.pruners.base.Pruner`)."""
from __future__ import annotations

from msp.pruners.base import Pruner, ScorePruner
from msp.pruners.magnitude import MagnitudePruner
from msp.pruners.sparsegpt import SparseGPTPruner
from msp.pruners.stats import LayerStats
from msp.pruners.wanda import WandaPruner

PRUNERS: dict[str, type[Pruner]] = {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


def make_pruner(name: str, **options) -> Pruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; valid: {', '.join(PRUNERS)}")
    return PRUNERS[name](**options)


__all__ = ["Pruner", "ScorePruner", "LayerStats", "MagnitudePruner", "WandaPruner", "SparseGPTPruner", "PRUNERS", "make_pruner"]
