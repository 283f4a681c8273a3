"""DeepSpeed ZeRO under Lightning, on CUDA and on the CPU.

Lightning's DeepSpeedStrategy refuses the CPU in three places: a CUDA-only check in setup_environment,
the device-index validation in setup_distributed (CPU devices have no index), and the `device_rank`
it hands to deepspeed.initialize (root_device.index, None on the CPU). `DeepSpeedZeRO` lifts exactly
those three on the CPU (DeepSpeed's CPU accelerator, gloo collectives) and changes nothing on CUDA.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Generator, Optional

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from dstlm.paths import prepare_deepspeed_env


class DeepSpeedZeRO(DeepSpeedStrategy):
    strategy_name = "dstlm_deepspeed"

    def __init__(self, stage: int = 2, cpu: bool = False, zero_init: bool = False, **kwargs: Any) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage={stage} must be 0, 1, 2 or 3")
        prepare_deepspeed_env(cpu)
        if cpu:
            try:  # skip DeepSpeed's shared-memory comm op build on the CPU (gloo is used instead)
                import deepspeed.ops

                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            except (ImportError, AttributeError, TypeError):
                pass
        user_config = kwargs.get("config") is not None or self.DEEPSPEED_ENV_VAR in os.environ
        super().__init__(stage=stage, **kwargs)
        self._on_cpu = cpu
        self.zero_init = zero_init
        self.partitioned_build = None  # the PartitionedBuild of a zero_init start (its figures), once built
        self.mask_fragment_files: list[Path] = []  # the restored checkpoint's partitioned masks (partition_masks)
        self.build_peak_bytes: Optional[int] = None  # resident memory the model build added on this rank (Linux)
        # bucket sizes a raw DeepSpeed JSON sets are the user's; the others are sized to the model at setup
        self._user_zero_keys = set((self.config or {}).get("zero_optimization", {}) or {}) if user_config else set()
        if isinstance(self.config, dict):
            zero = self.config.setdefault("zero_optimization", {})
            if zero.get("offload_optimizer") or zero.get("offload_param"):
                # dstlm hands DeepSpeed a client torch AdamW (no op build); DeepSpeed refuses it under offload
                # unless told that the (slower) client optimizer is intended
                self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # By default no deepspeed.zero.Init: the model is built whole on every rank and ZeRO-3 partitions it in
        # deepspeed.initialize (one full fp32 copy per rank at start-up). With zero_init (ZeRO-3 only) the model
        # is built partitioned from the start, bit-identical to the whole build
        # (dstlm/training/zero/partitioned_build.py).
        self._init_config_if_needed()
        base = reset_peak_rss()
        if not (self.zero_init and self.zero_stage_3):
            yield
            self._report_build(base, "whole")
            return
        import deepspeed
        import torch.distributed as dist

        from dstlm.sparse.selectors import torch_all_reduce
        from dstlm.training.zero.partitioned_build import PartitionedBuild
        from dstlm.training.zero.backend import z3_fragment

        build = PartitionedBuild(dist.get_rank(), dist.get_world_size(), all_reduce=torch_all_reduce())
        with build.building():
            yield
        init = deepspeed.zero.Init(config_dict_or_path=self.config, remote_device=self.remote_device)

        def convert(param) -> None:
            init._convert_to_deepspeed_param(param)
            param.partition()

        build.to_zero3(self.lightning_module, convert, z3_fragment)
        self.partitioned_build = build
        self._report_build(base, "partitioned")

    def _report_build(self, base: Optional[int], how: str) -> None:
        """Peak resident memory the model build added on this rank (Linux), kept and printed by rank 0."""
        peak = peak_rss()
        if base is None or peak is None:
            return
        self.build_peak_bytes = peak - base
        if self.global_rank == 0:
            print(f"model build ({how}, ZeRO-{self.config['zero_optimization'].get('stage')}): peak "
                  f"+{self.build_peak_bytes / 2**20:.0f} MiB resident on rank 0", flush=True)

    def init_deepspeed(self) -> None:
        self._fit_buckets_to_model()
        super().init_deepspeed()

    def _fit_buckets_to_model(self) -> None:
        """ZeRO-1/2 allocate their gradient-reduction buckets (two with overlap_comm) anew at every step, at
        Lightning's default of 2e8 elements (DeepSpeed's own: 5e8) whatever the model's size. On the CPU each
        step then maps and unmaps 1.6 GB (0.43x the tokens/s of plain training on the tiny GPT in one
        process); on a GPU it is only memory held. A bucket never needs more elements than the model has
        trainable: cap both bucket sizes there, unless a raw DeepSpeed JSON sets them."""
        zero = self.config.setdefault("zero_optimization", {})
        # a partitioned (zero_init) parameter holds no data: its size is ds_numel
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.lightning_module.parameters() if p.requires_grad)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key not in self._user_zero_keys and n > 0:
                zero[key] = int(min(float(zero.get(key, 5e8)), n))

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """DeepSpeed's checkpoint, and with partitioned masks (sparsity.partition_masks) each rank's mask
        fragments beside its optimizer partition (`checkpoint/dstlm_masks_rank_<r>.pt`)."""
        super().save_checkpoint(checkpoint, filepath, storage_options)
        engine = getattr(self.lightning_module, "sparse_engine", None)
        if engine is not None and engine.partitioned:
            from dstlm.sparse.fragments import fragment_file, write_marker

            folder = Path(self.broadcast(filepath)) / "checkpoint"
            torch.save(engine.fragment_state(), folder / fragment_file(self.global_rank))
            if self.global_rank == 0:  # how many files a whole checkpoint holds (checkpoint_problem reads it)
                write_marker(folder, self.world_size)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from dstlm.sparse.fragments import saved_files

        source = Path(checkpoint_path)  # a universal conversion sits beside the checkpoint it was made from
        if source.name.endswith("-universal"):
            source = source.with_name(source.name[:-len("-universal")])
        self.mask_fragment_files = saved_files(source / "checkpoint")
        engine = getattr(self.lightning_module, "sparse_engine", None)
        if engine is not None and bool(self.mask_fragment_files) != bool(engine.cfg.partition_masks):
            saved = "true" if self.mask_fragment_files else "false"
            raise ValueError(f"checkpoint {source} was written with sparsity.partition_masks={saved} (masks "
                             f"{'in per-rank fragment files' if saved == 'true' else 'in the module state'}); resume "
                             f"it with --sparsity.partition_masks {saved}")
        universal = bool((self.config or {}).get("checkpoint", {}).get("load_universal"))
        optimizer = getattr(self.deepspeed_engine, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) or []
        # DeepSpeed's ZeRO-3 universal load copies the hyper-parameters of the first param group onto every
        # group (weight decay 0.1 on norms and embeddings too): keep each group's own, except the LR, which
        # is the saved one (the scheduler's value at the checkpoint)
        own = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        if universal:
            self._restore_buffers(Path(checkpoint_path))
            for group, saved in zip(groups, own):
                group.update(saved)
            # ...and it gives every parameter partition the *same* `step` tensor object, which torch's AdamW
            # increments in place once per partition stepped: the bias correction would then run ahead
            inner = getattr(optimizer, "optimizer", optimizer)
            for state in getattr(inner, "state", {}).values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        return client_state

    @torch.no_grad()
    def _restore_buffers(self, ckpt_dir: Path) -> None:
        """DeepSpeed's universal load restores parameters and optimizer state but not module buffers (it skips
        the module state dict); dstlm's masks are buffers, so copy them from the saved model states."""
        files = sorted((ckpt_dir / "checkpoint").glob("*mp_rank_00_model_states.pt"))
        from dstlm.safe_load import load_states

        saved = load_states(files[0])
        module_state, names = saved["module"], saved.get("buffer_names") or []
        buffers = dict(self.lightning_module.named_buffers())
        for name in names:
            if name in buffers and name in module_state:
                buffers[name].copy_(module_state[name].to(buffers[name].device))

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
            super().setup_distributed()
        else:
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
        bound_new_groups(self._timeout)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # deepspeed.initialize is given root_device.index as device_rank; on the CPU that must be an int
        return torch.device("cpu", 0) if device.type == "cpu" else device


def bound_new_groups(timeout: Optional[timedelta]) -> None:
    """Give every process group made from now on `timeout` (trainer.collective_timeout_s) where its maker passes
    none. DeepSpeed runs ZeRO's reductions on groups of its own (`dist.new_group(ranks)`, no timeout), which torch
    then gives its backend default (30 min for gloo and for NCCL), not the world group's: a rank waiting there for
    a dead peer would outlive the configured timeout by half an hour."""
    if timeout is None:
        return
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def reset_peak_rss() -> Optional[int]:
    """Restart the process's resident-memory high-water mark (Linux: /proc/self/clear_refs) and return the
    resident size now; None where this cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_rss() -> Optional[int]:
    """Resident-memory high-water mark of this process since the last `reset_peak_rss` (bytes), or None."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return None


def _status_bytes(key: str) -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def saved_world_size(ckpt_dir: str | Path) -> int:
    """Data-parallel ranks that wrote a DeepSpeed ZeRO checkpoint (one optimizer-state shard each)."""
    files = (Path(ckpt_dir) / "checkpoint").glob("*_optim_states.pt")
    shards = {p.name.split("_pp_rank_")[1].split("_")[0] for p in files}
    return len(shards)


def universal_checkpoint(ckpt_dir: str | Path, rank: int, timeout_s: float = 1800.0) -> Path:
    """DeepSpeed's universal (world-size independent) form of a ZeRO checkpoint, converted once and cached
    next to it as `<ckpt>-universal/`. Rank 0 converts (ds_to_universal, in a subprocess) into a temporary
    folder renamed into place; the other ranks wait for it. A cached conversion of an older checkpoint
    under the same name (last.ckpt is rewritten) is detected by the source's timestamp and redone."""
    import subprocess
    import sys
    import time

    src = Path(ckpt_dir)
    out = src.with_name(src.name + "-universal")
    stamp = str(max(p.stat().st_mtime_ns for p in (src / "checkpoint").iterdir()))

    def ready() -> bool:
        return (out / "latest_universal").is_file() and (out / "source").is_file() and \
            (out / "source").read_text() == stamp

    if rank == 0 and not ready():
        import shutil

        tmp = src.with_name(src.name + "-universal.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(src / "checkpoint"), "--output_folder", str(tmp / "checkpoint"),
                            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"converting {src} to a universal checkpoint failed: "
                               f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        (tmp / "latest").write_text("checkpoint")
        (tmp / "source").write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout_s:.0f} s for rank 0 to convert {src} to {out}")
        time.sleep(0.5)
    return out


def pin_gloo_interface(num_nodes: int) -> None:
    """On several nodes gloo advertises the address its host name resolves to, which is often a loopback
    (127.0.1.1 in /etc/hosts): the other nodes then cannot connect. Unless GLOO_SOCKET_IFNAME is set, pin it to
    the interface that reaches MASTER_ADDR (the one holding it, on the first node). Linux `ip` needed; without
    it, or on one node, nothing changes."""
    addr = os.environ.get("MASTER_ADDR")
    if num_nodes <= 1 or not addr or "GLOO_SOCKET_IFNAME" in os.environ:
        return
    import shutil
    import subprocess

    if shutil.which("ip") is None:
        return
    try:
        own = subprocess.run(["ip", "-o", "addr", "show", "to", addr], capture_output=True, text=True, timeout=10)
        fields = own.stdout.split()
        if own.returncode == 0 and len(fields) > 1 and fields[1] != "lo":
            os.environ["GLOO_SOCKET_IFNAME"] = fields[1]
            return
        route = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True, timeout=10)
        words = route.stdout.split()
        if route.returncode == 0 and "dev" in words and words[words.index("dev") + 1] != "lo":
            os.environ["GLOO_SOCKET_IFNAME"] = words[words.index("dev") + 1]
    except (OSError, subprocess.SubprocessError):
        return
