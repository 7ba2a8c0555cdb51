"""The ``allocation=msp`` options and their defaults (one place): the schema of ``conf/allocation/msp.yaml``.

Placeholder of the config branch, identical in name and fields to what the search branch provides; on merge,
take the search branch's file. ``stages`` stays a list of plain mappings (not a typed dataclass) so that the
composed config, and with it the config hash of earlier runs, is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class SearchConfig:
    method: str = "msp"
    granularity: str = "block"
    init: str = "fisher"
    init_options: Dict[str, Any] = field(default_factory=dict)
    extra: List[str] = field(default_factory=lambda: ["uniform"])
    min: Optional[float] = None
    max: Optional[float] = None
    spread: float = 0.2
    step: float = 0.025
    population: int = 4
    offspring: int = 8
    generations: int = 40
    stages: List[Dict[str, int]] = field(default_factory=lambda: [{"tokens": 256, "survivors": 2}, {"tokens": 512}])
    crossover: float = 0.25
    max_swaps: int = 3
    init_swaps: int = 2
    fitness: str = "kl"
    fitness_seqlen: int = 256
    fitness_batch_size: int = 4
    candidates: str = "auto"
    store: str = "memory"
    store_dtype: str = "float16"
    max_levels: int = 6
    variant_nsamples: Optional[int] = 8
    seed: Optional[int] = None
    resume: bool = False
    resume_from: Optional[str] = None
