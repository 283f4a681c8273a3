"""dstlm: dynamic sparse training and Sparse-IFT for GPT-style language models."""

__version__ = "0.1.0"
