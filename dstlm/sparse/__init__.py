"""Plain-torch sparse core: masks, densities, DST rules, schedules (no Lightning/DeepSpeed imports)."""

from dstlm.sparse.config import SparsityConfig
from dstlm.sparse.distributed import SparseBackend, TorchBackend
from dstlm.sparse.engine import MaskMismatchError, SparseEngine

__all__ = ["MaskMismatchError", "SparseBackend", "SparseEngine", "SparsityConfig", "TorchBackend"]
