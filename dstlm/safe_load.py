"""Loading checkpoint files without running code: torch.load(weights_only=True) with the few data classes
DeepSpeed pickles allowed, and a scan of what a file would need before anything unpickles it."""

from __future__ import annotations

from pathlib import Path

import torch

# What DeepSpeed pickles into its checkpoint files besides tensors and plain containers: small data classes. A
# file that needs any other global to unpickle is not loaded (unpickling can run code).
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum")


def unsafe_globals(f: Path) -> list[str]:
    """The globals unpickling `f` would call beyond torch's weights-only set and DeepSpeed's data classes (read
    from the archive's pickle, nothing is executed)."""
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(f)) if g not in DEEPSPEED_GLOBALS]


def load_states(f: str | Path) -> dict:
    """torch.load of a checkpoint file with weights_only=True, DeepSpeed's data classes allowed."""
    import importlib

    allowed = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(f, map_location="cpu", weights_only=True)
