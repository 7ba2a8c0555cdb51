from msp.eval.perplexity import perplexity

__all__ = ["perplexity"]
