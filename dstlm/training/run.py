"""Build a Trainer, module and data from a RunConfig, and run fit / validate."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dstlm.checkpoint import consolidate_checkpoint, is_deepspeed_checkpoint
from dstlm.training.callbacks import LossPlot, RNGState, StepCheckpoint
from dstlm.training.config import RunConfig
from dstlm.training.datamodule import LMDataModule
from dstlm.training.dst_callback import DSTCallback
from dstlm.training.eval_callback import EvalCallback
from dstlm.training.module import LMModule

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
    log_dir = out / "logs"
    loggers = []
    if logger:
        # version numbers agree on all ranks because rank 0 creates the folder only after all have looked
        version = _next_version(log_dir)
        loggers = [CSVLogger(out, name="logs", version=version),
                   TensorBoardLogger(out, name="logs", version=version, default_hp_metric=False)]
    callbacks = [
        StepCheckpoint(out / "checkpoints", cfg.trainer.ckpt_every_n_steps, cfg.trainer.keep_last_k),
        LossPlot(log_dir, out / "loss.png"),
        RNGState(),
    ]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if cfg.sparsity is not None:
        callbacks.append(DSTCallback())
    if cfg.sparsity is not None or cfg.ift is not None:
        callbacks.append(FlopsLog(cfg, out))
    data = LMDataModule(cfg.data, cfg.seed)
    if cfg.eval is not None:
        callbacks.append(EvalCallback(cfg.eval, data._tokenizer))
    callbacks += extra_callbacks or []
    t = cfg.trainer
    strategy = t.strategy
    if strategy.startswith("deepspeed"):
        from dstlm.training.strategies import DeepSpeedZeRO

        cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
        strategy = DeepSpeedZeRO(stage=t.zero_stage, cpu=cpu, offload_optimizer=t.offload_optimizer,
                                 offload_parameters=t.offload_params, config=t.deepspeed_config)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val, val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, log_every_n_steps=t.log_every_n_steps, logger=loggers or False,
        callbacks=callbacks, enable_progress_bar=t.progress_bar, enable_model_summary=False,
        deterministic=t.deterministic, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    module = LMModule(cfg.model, cfg.optim, t.max_steps, sparsity=cfg.sparsity, seed=cfg.seed, ift=cfg.ift,
                      seq_len=cfg.data.block_size, compile_model=t.compile, loss_chunk_tokens=t.loss_chunk_tokens)
    check_vocab(cfg, data)
    # the tokenizer travels inside every checkpoint, so eval/export need nothing but the .ckpt file
    module.tokenizer_json = data._tokenizer().tokenizer.to_str()
    return trainer, module, data


class FlopsLog(L.Callback):
    """At the start of training: FLOPs per token against the dense baseline, printed, logged, and written
    to <run>/flops.json."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        text, summary = flops_report(self.cfg, pl_module.model)
        print(text)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "flops.json").write_text(json.dumps(summary, indent=2))
        for logger in trainer.loggers:
            logger.log_metrics({f"flops/{k}": float(v) for k, v in summary.items() if not isinstance(v, dict)}, step=0)


def flops_report(cfg: RunConfig, model=None) -> tuple[str, dict]:
    """Forward/training FLOPs per token of this run's model (masks included) against the dense baseline.
    `model`: the built model (with masks); built here when not given."""
    from dstlm.models.gpt import dense_layer_shapes, linear_layer_names
    from dstlm.sparse.flops import count_flops, dense_count, report

    if model is None:
        module = LMModule(cfg.model, cfg.optim, cfg.trainer.max_steps, sparsity=cfg.sparsity, seed=cfg.seed,
                          ift=cfg.ift, seq_len=cfg.data.block_size)
        module.configure_model()
        model = module.model
    T = cfg.data.block_size
    base = dense_count(cfg.model, dense_layer_shapes(cfg.model), T)
    mine = count_flops(model, linear_layer_names(cfg.model), T)
    method = cfg.sparsity.method if cfg.sparsity is not None else None
    return report(base, mine, method, cfg.sparsity.delta_t if cfg.sparsity else 1, T)


def check_vocab(cfg: RunConfig, data: LMDataModule) -> None:
    vocab = data._tokenizer().vocab_size
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} has {vocab} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab}")


def save_config(cfg_yaml: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(cfg_yaml)
    tmp.replace(out / "config.yaml")


def _reshard_if_needed(cfg: RunConfig, trainer: L.Trainer, ckpt_path: str) -> str:
    """A ZeRO checkpoint written by another number of ranks resumes through DeepSpeed's universal format."""
    if not is_deepspeed_checkpoint(ckpt_path):
        return ckpt_path
    from dstlm.training.strategies import DeepSpeedZeRO, saved_world_size, universal_checkpoint

    if not isinstance(trainer.strategy, DeepSpeedZeRO):
        raise ValueError(f"{ckpt_path} is a DeepSpeed ZeRO checkpoint but trainer.strategy={cfg.trainer.strategy!r}; "
                         f"resume it with a deepspeed_stage_N strategy (any number of ranks)")
    saved, now = saved_world_size(ckpt_path), cfg.trainer.devices * cfg.trainer.num_nodes
    if saved == now:
        return ckpt_path
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        print(f"dstlm: {ckpt_path} was written by {saved} rank(s), resuming on {now}: "
              f"loading it through DeepSpeed's universal checkpoint format")
    universal = universal_checkpoint(ckpt_path, rank)
    trainer.strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    return str(universal)


def fit(cfg: RunConfig, ckpt_path: Optional[str] = None, config_yaml: Optional[str] = None,
        extra_callbacks: Optional[list] = None) -> dict:
    """Train; returns (and writes to out_dir/name/summary.json) the final metrics."""
    trainer, module, data = build(cfg, extra_callbacks)
    out = run_dir(cfg)
    if config_yaml is not None and trainer.is_global_zero:
        save_config(config_yaml, out)
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint at {last}; train first or give a path")
        ckpt_path = str(last)
    elif ckpt_path is not None and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    if ckpt_path is not None:
        ckpt_path = _reshard_if_needed(cfg, trainer, ckpt_path)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    summary = {
        "run": str(out), "steps": trainer.global_step, "wall_s": round(wall, 1),
        "val_loss": metrics.get("val/loss"), "val_ppl": metrics.get("val/ppl"),
        "train_loss": metrics.get("train/loss"), "tokens_per_s": round(module.average_tokens_per_s, 1),
        "params": module.model.num_params(non_embedding=False),
        "train_tokens_seen": trainer.global_step * cfg.trainer.accumulate_grad_batches * cfg.data.batch_size
        * cfg.data.block_size * trainer.world_size,
        "corpus_tokens": getattr(data, "stats", {}),
        **peak_memory(trainer.strategy.root_device),
        "loss_png": str(out / "loss.png"), "logs": str(out / "logs"), "checkpoint": str(out / "checkpoints" / "last.ckpt"),
    }
    for cb in trainer.callbacks:
        if hasattr(cb, "summary"):
            summary.update(cb.summary())
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: what torch allocated on its GPU, or the peak resident set on a CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                "peak_memory_kind": "GPU, allocated by torch (rank 0)"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    return {"peak_memory_gib": round(rss / 2**30, 3),
            "peak_memory_kind": "process peak resident set (rank 0)"}


def validate(cfg: RunConfig, ckpt_path: Optional[str]) -> dict:
    """Validation loss/perplexity of a checkpoint (a .ckpt file, a DeepSpeed directory or a run folder)."""
    if ckpt_path == "last":
        ckpt_path = str(run_dir(cfg) / "checkpoints" / "last.ckpt")
    if ckpt_path is not None and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    if cfg.trainer.strategy.startswith("deepspeed") or (ckpt_path and is_deepspeed_checkpoint(ckpt_path)):
        # Validation needs no sharding of the optimizer: consolidate a ZeRO checkpoint to one fp32 file (any
        # stage, any world size) and validate it data-parallel. (Lightning cannot validate from a ZeRO-3
        # directory itself, and a DeepSpeed engine without an optimizer is not needed here.)
        cfg = replace(cfg, trainer=replace(cfg.trainer, strategy="ddp" if cfg.trainer.devices > 1 else "auto",
                                           offload_optimizer=False, offload_params=False, deepspeed_config=None))
        if ckpt_path and is_deepspeed_checkpoint(ckpt_path):
            # one file per process: no rank waits for another (there is no process group yet)
            rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
            ckpt_path = str(consolidate_checkpoint(ckpt_path, run_dir(cfg) / f".consolidated-rank{rank}.ckpt"))
    trainer, module, data = build(cfg, logger=False)
    results = trainer.validate(module, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]
    results = {k: float(v) for k, v in results.items()}
    if "val/loss" in results and "val/ppl" not in results:
        results["val/ppl"] = math.exp(results["val/loss"])
    return results


def format_summary(summary: dict) -> str:
    lines = ["", "=" * 64, f" dstlm run finished: {summary['run']}"]
    if summary.get("val_loss") is not None:
        lines.append(f"   val loss {summary['val_loss']:.4f}   val perplexity {summary['val_ppl']:.2f}")
    for key, label in (("steps", "optimizer steps"), ("train_tokens_seen", "tokens trained"),
                       ("tokens_per_s", "tokens/s (run average)"), ("wall_s", "wall time (s)"),
                       ("params", "parameters"), ("sparsity", "sparsity (sparsified layers)"),
                       ("peak_memory_gib", "peak memory (GiB)")):
        if summary.get(key) is not None:
            value = summary[key]
            lines.append(f"   {label:<28} {value:,.3f}" if isinstance(value, float) else f"   {label:<28} {value:,}")
    for task, metrics in (summary.get("eval") or {}).items():
        shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items() if not m.endswith("stderr"))
        lines.append(f"   lm-eval {task:<14} {shown}")
    lines += [f"   loss curve   {summary['loss_png']}", f"   logs         {summary['logs']} (CSV + TensorBoard)",
              f"   checkpoint   {summary['checkpoint']}", "=" * 64]
    return "\n".join(lines)
