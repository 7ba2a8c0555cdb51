"""msp: mixed-sparsity pruning of large language models.

``import msp`` stays lean: no CUDA initialisation, no transformers import. The main entry points::

    from msp.prune import prune_            # prune a model in place with a pruner and an allocation
    from msp.run import run, RunSpec        # one full run (what the `msp` command does)
"""
__version__ = "0.1.0"
