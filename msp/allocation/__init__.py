"""Allocations: per-layer sparsities whose parameter-weighted mean equals the target."""
from msp.allocation.base import Allocation, AllocationError, uniform_allocation

__all__ = ["Allocation", "AllocationError", "uniform_allocation"]
