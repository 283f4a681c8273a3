"""lm-evaluation-harness integration. Importing this package registers the "dstlm" model in lm-eval."""

from dstlm.eval.lm import DstlmLM

__all__ = ["DstlmLM"]
