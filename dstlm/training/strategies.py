"""DeepSpeed ZeRO under Lightning, on CUDA and on the CPU.

Lightning's DeepSpeedStrategy refuses the CPU in three places: a CUDA-only check in setup_environment,
the device-index validation in setup_distributed (CPU devices have no index), and the `device_rank`
it hands to deepspeed.initialize (root_device.index, None on the CPU). `DeepSpeedZeRO` lifts exactly
those three on the CPU (DeepSpeed's CPU accelerator, gloo collectives) and changes nothing on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Generator, Optional

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from dstlm.paths import REPO_DIR


def prepare_deepspeed_env(cpu: bool) -> None:
    """Must run before deepspeed is imported: CPU accelerator, op builds cached in the project."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_DIR / ".cache" / "torch_extensions"))


class DeepSpeedZeRO(DeepSpeedStrategy):
    strategy_name = "dstlm_deepspeed"

    def __init__(self, stage: int = 2, cpu: bool = False, **kwargs: Any) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage={stage} must be 0, 1, 2 or 3")
        prepare_deepspeed_env(cpu)
        if cpu:
            try:  # skip DeepSpeed's shared-memory comm op build on the CPU (gloo is used instead)
                import deepspeed.ops

                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            except (ImportError, AttributeError, TypeError):
                pass
        super().__init__(stage=stage, **kwargs)
        self._on_cpu = cpu
        if isinstance(self.config, dict):
            zero = self.config.setdefault("zero_optimization", {})
            if zero.get("offload_optimizer") or zero.get("offload_param"):
                # dstlm hands DeepSpeed a client torch AdamW (no op build); DeepSpeed refuses it under offload
                # unless told that the (slower) client optimizer is intended
                self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # No deepspeed.zero.Init: the model is built whole on every rank (same init as one process, masks
        # applied to full weights by the sparse engine) and ZeRO-3 partitions it in deepspeed.initialize.
        # Costs one full copy of the fp32 weights per rank at start-up, which models that fit on one
        # device can afford; it keeps ZeRO-3 runs bit-comparable with DDP.
        self._init_config_if_needed()
        yield

    @property
    def _cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._cpu:
            DDPStrategy.setup_environment(self)  # skip the CUDA-only check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # deepspeed.initialize is given root_device.index as device_rank; on the CPU that must be an int
        return torch.device("cpu", 0) if device.type == "cpu" else device
