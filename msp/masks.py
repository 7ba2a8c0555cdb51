"""Sparsity patterns and masks.

The hand-off format between pruning and everything after it is a *dense weight with zeros*; masks are
boolean tensors of the weight's shape where ``True`` means *keep*. Scores are "higher = more important".
All selection is per output row (or per group of M inputs for N:M) so counts are exact even when many
scores tie, as they do in weights dequantised from 4-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from msp.errors import MspError


class PatternError(MspError):
    """A sparsity pattern that cannot be used (bad syntax, N ≥ M, M not dividing a layer)."""


@dataclass(frozen=True)
class Pattern:
    """``unstructured``; ``N:M`` (keep N of every M consecutive inputs); or ``N:M`` with N = ``"N"`` (mixed:
    fixed M, N chosen per layer from the allocation)."""

    kind: str  # "unstructured" | "nm" | "mixed_nm"
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str | "Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        s = str(text).strip()
        if s.lower() == "unstructured":
            return cls("unstructured")
        if ":" in s:
            n_text, m_text = (p.strip() for p in s.split(":", 1))
            try:
                m = int(m_text)
            except ValueError:
                raise PatternError(f"pattern={s!r}: M must be an integer, e.g. pattern=2:4") from None
            if m < 2:
                raise PatternError(f"pattern={s!r}: M must be at least 2")
            if n_text.upper() == "N":
                return cls("mixed_nm", 0, m)
            try:
                n = int(n_text)
            except ValueError:
                raise PatternError(f"pattern={s!r}: N must be an integer or the letter N, e.g. 2:4 or N:8") from None
            if not 0 < n < m:
                raise PatternError(f"pattern={s!r}: need 0 < N < M (N={n}, M={m}), e.g. pattern=2:4")
            return cls("nm", n, m)
        raise PatternError(f"unknown pattern {s!r}; valid: unstructured, N:M (e.g. 2:4, 4:8) or N:M with a literal N (e.g. N:8)")

    def __str__(self) -> str:
        if self.kind == "unstructured":
            return "unstructured"
        return f"{'N' if self.kind == 'mixed_nm' else self.n}:{self.m}"

    @property
    def is_nm(self) -> bool:
        return self.kind in ("nm", "mixed_nm")

    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern imposes (None when the allocation decides)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def for_layer(self, sparsity: float) -> "Pattern":
        """The concrete pattern one layer is pruned with: mixed N:M picks N = round((1-s)·M)."""
        if self.kind != "mixed_nm":
            return self
        n = int(round((1.0 - sparsity) * self.m))
        n = min(max(n, 0), self.m)
        if n in (0, self.m):
            return Pattern("nm", n, self.m)  # degenerate levels (all pruned / dense) are allowed per layer
        return Pattern("nm", n, self.m)

    def check_divides(self, name: str, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise PatternError(
                f"pattern={self} does not divide layer {name}: in_features={in_features} is not a multiple of M={self.m}; "
                f"choose M among the divisors of {in_features} or use pattern=unstructured"
            )


def prune_count(numel_per_row: int, sparsity: float) -> int:
    """Weights removed from a row of ``numel_per_row`` weights at ``sparsity`` (round half to even avoided)."""
    return int(math.floor(sparsity * numel_per_row + 0.5))


def topk_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly ``prune_count(cols, sparsity)`` lowest scores of every row.

    Ties are broken by column index (lowest index pruned first), so counts stay exact under ties. This is the
    mask a stable sort would give, found with a selection instead of a full sort (O(cols) per row):
    t = the k-th smallest score of the row; prune every score < t, then the first (k − #{< t}) scores == t.
    """
    return ~lowest_k_mask(scores, prune_count(scores.shape[1], sparsity))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest scores of every row (ties: lowest column index first), i.e. the first k
    indices of a stable ascending sort, without sorting. scores: (rows, cols)."""
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < threshold
    at = scores == threshold
    room = k - below.sum(dim=1, keepdim=True)  # how many of the ties at the threshold are pruned
    return below | (at & (torch.cumsum(at, dim=1) <= room))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in each group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise PatternError(f"N:M with M={m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if n > 0:
        keep = torch.sort(groups, dim=-1, stable=True, descending=True).indices[..., :n]
        mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """The keep-mask of one layer: per-row top-k for unstructured, per-group for N:M."""
    pattern = pattern.for_layer(sparsity)
    if pattern.kind == "unstructured":
        return topk_row_mask(scores, sparsity)
    return nm_mask(scores, pattern.n, pattern.m)


def sparsity_of(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
