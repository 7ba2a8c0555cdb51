from msp.eval.perplexity import perplexity, streamed_perplexity, window_nll

__all__ = ["perplexity", "streamed_perplexity", "window_nll"]
