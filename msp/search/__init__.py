"""Evolutionary search over per-unit sparsities (``allocation=msp``).

:mod:`msp.search.evolution` is the pure search (no model), :mod:`msp.search.fitness` builds cheap candidates on
the real model, :mod:`msp.search.allocator` registers the ``msp`` allocator (imported lazily by the registry).
"""
