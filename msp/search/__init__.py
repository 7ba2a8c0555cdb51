"""Evolutionary search over per-unit sparsities (``allocation=msp``).

:mod:`msp.search.settings` holds the options' schema and checks, :mod:`msp.search.grid` the level grid and
budget, :mod:`msp.search.evolution` the pure search (no model), :mod:`msp.search.fitness` the cheap candidates on
the real model, and :mod:`msp.search.allocator` puts them together as the ``msp`` allocator (the registry points
at :func:`msp.search.allocator.msp_allocator` and :func:`msp.search.allocator.check_options`).
"""
