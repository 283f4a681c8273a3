"""Model transforms: converters applied around the model build (dstlm.build.build_model), never inside the
model files. A transform may rewrite the model config before the build (`transform_config`) and swap modules
after it (`transform_model`); the model is initialised after all transforms ran.

    Sparse-IFT (dstlm/transforms/ift.py): Sparse Wide rewrites the widths; Parallel, Factorized and Doped swap
    linear layers and MoE expert projections for their sparse families.
"""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn


class ModelTransform(Protocol):
    name: str

    def transform_config(self, cfg):
        """The model config to build (unchanged if the transform only swaps modules)."""
        ...

    def transform_model(self, model: nn.Module) -> None:
        """Swap modules of the freshly built, not yet initialised model, in place."""
        ...
