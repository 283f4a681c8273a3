"""Build a run: (Trainer, LMModule, LMDataModule) from a RunConfig, with the callbacks every run has."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from dstlm.hf.source import HFModelConfig
from dstlm.training.assembly.summary import FlopsLog, RunRecord
from dstlm.training.config import RunConfig, signal_number
from dstlm.training.loop.adapter import AdapterReport
from dstlm.training.loop.callbacks import LossPlot, RNGState, StepCheckpoint, ThroughputMeter
from dstlm.training.loop.datamodule import LMDataModule
from dstlm.training.loop.dst_callback import DSTCallback
from dstlm.training.loop.eval_callback import EvalCallback
from dstlm.training.loop.module import LMModule
from dstlm.training.resilience.liveness import RankLiveness
from dstlm.training.resilience.nonfinite import NonFiniteGuard
from dstlm.training.resilience.preemption import PREEMPTED, Preemption

# Messages that are expected on CPU runs and only distract users.
for _msg in (".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*",
             ".*GPU available but not used.*", ".*is supported for historical reasons but its usage is discouraged.*",
             ".*Experiment logs directory .* exists and is not empty.*", ".*srun.*", ".*LeafSpec.*",
             ".*when logging on epoch level in distributed setting.*",
             # LMModule overrides the clipping hook for fused optimizers under bf16 and defers to DeepSpeed's
             # own clipping under DeepSpeed, where Lightning warns about any override
             ".*Since DeepSpeed handles gradient clipping internally.*"):
    warnings.filterwarnings("ignore", message=_msg)


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def _next_version(log_dir: Path) -> int:
    versions = [int(p.name.split("_")[1]) for p in log_dir.glob("version_*") if p.name.split("_")[1].isdigit()]
    return max(versions, default=-1) + 1


def build(cfg: RunConfig, extra_callbacks: Optional[list] = None, logger: bool = True):
    """(trainer, module, datamodule) for `cfg`; the run folder is out_dir/name."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    out = run_dir(cfg)
    check_machine(cfg, out)
    loggers = _loggers(out) if logger else []
    data = LMDataModule(cfg.data, cfg.seed)
    callbacks = run_callbacks(cfg, out, data, bool(loggers)) + (extra_callbacks or [])
    t = cfg.trainer
    # Under SLURM: ranks from SLURM's variables, but not Lightning's own requeue (it saves inside the signal
    # handler, on SIGUSR1, which NCCL also catches): dstlm.training.resilience.preemption stops at a step
    # boundary instead
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    trainer = L.Trainer(
        plugins=plugins, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(cfg),
        precision=t.precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val, val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, log_every_n_steps=t.log_every_n_steps, logger=loggers or False,
        callbacks=callbacks, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        deterministic=t.deterministic, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    return trainer, _module(cfg, data), data


def _loggers(out: Path) -> list:
    """CSV and TensorBoard under <run>/logs/version_N. Version numbers agree on all ranks because rank 0 creates
    the folder only after all have looked."""
    version = _next_version(out / "logs")
    return [CSVLogger(out, name="logs", version=version),
            TensorBoardLogger(out, name="logs", version=version, default_hp_metric=False)]


def run_callbacks(cfg: RunConfig, out: Path, data: LMDataModule, logging: bool) -> list:
    """The callbacks every run has, in the order they run."""
    t = cfg.trainer
    callbacks = [
        StepCheckpoint(out / "checkpoints", t.ckpt_every_n_steps, t.keep_last_k),
        LossPlot(out / "logs", out / "loss.png"),
        RNGState(),
        ThroughputMeter(),
        RunRecord(cfg, out),
        Preemption(signal_number(t.preempt_signal), out / PREEMPTED),
    ]
    if logging:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    # before DSTCallback, which asks it whether a step is skipped
    callbacks.append(NonFiniteGuard(t.on_nonfinite, t.max_skipped_steps))
    callbacks.append(RankLiveness(t.collective_timeout_s))
    if cfg.peft is not None:  # the base is frozen: its masks (the sparsity section's first ones) stay fixed
        callbacks.append(AdapterReport(out))
    elif cfg.sparsity is not None:
        callbacks.append(DSTCallback())
    callbacks.append(FlopsLog(cfg, out))  # dense runs too: the baseline every FLOPs comparison divides by
    if cfg.eval is not None:
        callbacks.append(EvalCallback(cfg.eval, lambda: data.tokenizer))
    return callbacks


def _strategy(cfg: RunConfig):
    """Lightning's strategy object for trainer.strategy (a name Lightning resolves, or dstlm's own)."""
    from dstlm.training.zero.strategies import pin_gloo_interface

    t = cfg.trainer
    pin_gloo_interface(t.num_nodes)
    timeout = {"timeout": timedelta(seconds=t.collective_timeout_s)} if t.collective_timeout_s else {}
    if t.strategy.startswith("deepspeed"):
        from dstlm.training.zero.strategies import DeepSpeedZeRO

        cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
        return DeepSpeedZeRO(stage=t.zero_stage, cpu=cpu, offload_optimizer=t.offload_optimizer,
                             offload_parameters=t.offload_params, config=t.deepspeed_config, zero_init=t.zero_init,
                             exclude_frozen_parameters=cfg.peft is not None, **timeout)
    if t.strategy in ("ddp", "ddp_spawn") or (t.strategy == "auto" and t.devices * t.num_nodes > 1):
        # What Lightning's "ddp" is, but without broadcasting the module buffers from rank 0 before every forward:
        # the masks are buffers, identical on every rank by construction and compared across ranks at each mask
        # update (a broadcast would hide a rank whose masks drifted, and moves every mask every step)
        return DDPStrategy(start_method="spawn" if t.strategy == "ddp_spawn" else "popen", broadcast_buffers=False,
                           **timeout)
    return t.strategy


def _module(cfg: RunConfig, data: LMDataModule) -> LMModule:
    """The LightningModule, with what it takes from the data: the tokenizer travels inside every checkpoint (eval
    and export need nothing but the checkpoint), and Wanda's calibration batches."""
    t = cfg.trainer
    module = LMModule(cfg.model, cfg.optim, t.max_steps, sparsity=cfg.sparsity, seed=cfg.seed, ift=cfg.ift,
                      seq_len=cfg.data.block_size, compile_model=t.compile, loss_chunk_tokens=t.loss_chunk_tokens,
                      peft=cfg.peft)
    check_vocab(cfg, data)
    module.tokenizer_json = data.tokenizer.tokenizer.to_str()
    module.tokenizer_eos = data.tokenizer.eos
    module.tokenizer_chat = {"chat_template": data.tokenizer.chat_template,
                             "special_tokens": data.tokenizer.special_tokens}
    module.calibration = data.calibration_batches
    return module


def check_machine(cfg: RunConfig, out: Path) -> None:
    """What a config cannot know where it is written (a login node prepares GPU jobs): is there a GPU, and can
    the run folder be created here."""
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={cfg.trainer.accelerator!r} but this machine has no CUDA GPU that "
                         f"torch can use; use accelerator cpu (or auto)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir={cfg.out_dir!r}: cannot create the run folder {out} ({e.strerror}); choose a "
                         f"writable folder") from None


def check_vocab(cfg: RunConfig, data: LMDataModule) -> None:
    vocab = data.tokenizer.vocab_size
    if isinstance(cfg.model, HFModelConfig):
        if cfg.model.vocab_size is not None and vocab > cfg.model.vocab_size:
            raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but the model {cfg.model.hf!r} "
                             f"embeds only {cfg.model.vocab_size}; use the model's own tokenizer (leave "
                             f"data.tokenizer unset) or one whose vocabulary fits")
        return
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab} or use a smaller tokenizer")
