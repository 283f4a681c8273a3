"""LightningModule for causal-LM training of dstlm models."""

from __future__ import annotations

import dataclasses

import math
from dataclasses import asdict

import lightning as L
import torch
import torch.nn as nn

from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn

from dstlm.build import ModelSource, build_model, model_transforms
from dstlm.checkpoint import check_resume_compatible
from dstlm.data.tokenizer import EOS
from dstlm.models.gpt import GPT
from dstlm.models.lm_loss import CHUNK_TOKENS, IGNORE_INDEX, share_of_step
from dstlm.models.moe import ExpertParallel, set_expert_parallel
from dstlm.sparse import SparseEngine, SparsityConfig
from dstlm.sparse.condensed_train import enable_condensed_compute
from dstlm.hf.peft_config import PeftConfig
from dstlm.training.loop.adapter import AdapterRun
from dstlm.training.config import OptimConfig
from dstlm.training.resilience import hooks
from dstlm.training.resilience.nonfinite import NonFiniteError  # noqa: F401 (re-exported)
from dstlm.training.zero.partitioned_build import PartitionedBuild
from dstlm.transforms.ift import SparseIFT, SparseIFTConfig


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the peak LR at optimizer step t: linear warmup, then cosine to min_lr_ratio."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear layers; never norms, biases or embeddings (tied LM head included)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's own shape is (0,)
        (no_decay if (ndim < 2 or id(p) in no_decay_ids) else decay).append(p)
    # an empty group is left out (adapters are all matrices): DeepSpeed drops it, and the LR scheduler would
    # then count one group more than the optimizer has
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or Nesterov SGD) over the decay / no-decay groups, fused or multi-tensor (foreach)."""
    groups = param_groups(model, cfg.weight_decay)
    kernel = {"fused": True} if cfg.fused else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], nesterov=True, **kernel)


class LMModule(L.LightningModule):
    """Trains a GPT on (inputs, targets) token blocks; logs loss and perplexity (tokens/s: ThroughputMeter)."""

    def __init__(self, model: ModelSource, optim: OptimConfig, max_steps: int,
                 sparsity: SparsityConfig | None = None, seed: int = 0, ift: SparseIFTConfig | None = None,
                 seq_len: int | None = None, compile_model: bool = False,
                 loss_chunk_tokens: int = CHUNK_TOKENS, peft: PeftConfig | None = None) -> None:
        super().__init__()
        self.model_config = model
        self.optim_config = optim
        self.sparsity_config = sparsity
        self.ift_config = ift
        self.peft_config = peft
        self.seq_len = seq_len or model.block_size  # context the FLOPs are matched at (ift.match=total)
        self.seed = seed
        self.max_steps = max_steps
        self.save_hyperparameters({"model": asdict(model), "optim": asdict(optim), "max_steps": max_steps,
                                   "sparsity": asdict(sparsity) if sparsity else None, "seed": seed,
                                   "ift": asdict(ift) if ift else None,
                                   **({"peft": asdict(peft)} if peft else {})})
        self.model: GPT | None = None
        self.sparse_engine: SparseEngine | None = None
        self.effective_sparsity: SparsityConfig | None = None  # what the engine runs (Sparse-IFT rewrites it)
        self.tokenizer_json: str | None = None  # set by the run builder; saved in checkpoints
        self.tokenizer_eos: str = EOS
        self.tokenizer_chat: dict = {}  # its chat template and named special tokens (Hugging Face folders)
        self.calibration = None  # set by the run builder: () -> training micro-batches (mask_init=wanda)
        self.adapter = None  # peft runs: the frozen base's masks and fingerprint (AdapterRun)
        # peft runs save the adapter only: the base is rebuilt from its folder, so its weights are not loaded
        self.strict_loading = peft is None
        # how the model runs, not what it is: not hyper-parameters, free to change on resume
        self.compile_model = compile_model
        self.loss_chunk_tokens = loss_chunk_tokens

    def build_fresh_model(self) -> GPT:
        """A new, initialised model of this run's structure (no masks): what configure_model starts from."""
        return build_model(self.model_config, model_transforms(self.model_config, self.ift_config))

    def configure_model(self) -> None:
        # Built here (not in __init__) so strategies that shard at construction time can wrap it, and so
        # model transforms (sparsity, Sparse-IFT) run the same on every rank before wrapping.
        if self.model is None:
            transforms = model_transforms(self.model_config, self.ift_config)
            partitioned = PartitionedBuild.active()  # trainer.zero_init: this rank's slices only
            self.model = build_model(self.model_config, transforms, partitioned=partitioned)
            sparsity = self.sparsity_config
            for t in transforms:
                if isinstance(t, SparseIFT):
                    # the transformed weights, each at the density that keeps its layer at the dense FLOPs
                    sparsity = t.sparsity_config(self.model, sparsity, self.seq_len)
                    ignored = t.overridden(self.sparsity_config)
                    if ignored:
                        rank_zero_warn(f"Sparse-IFT sets which weights are sparse and their densities itself; "
                                       f"ignored: {', '.join(ignored)}")
            if sparsity is not None and sparsity.partition_masks is None:  # unset: partitioned under ZeRO-3 (the
                # resolved value is the engine's config, which runs/<name>/sparsity.yaml records)
                strategy = self._trainer.strategy if self._trainer is not None else None
                sparsity = dataclasses.replace(sparsity, partition_masks=bool(getattr(strategy, "zero_stage_3", False)))
            self.effective_sparsity = sparsity
            if sparsity is not None:
                # masks become persistent buffers on the modules, before any strategy wraps the model
                norms = self._input_norms(sparsity) if sparsity.mask_init == "wanda" else None
                self.sparse_engine = SparseEngine(self.model, sparsity, self.seed, self.max_steps, input_norms=norms,
                                                  partitioned=partitioned)
                if sparsity.condensed:  # the same parameters and masks, condensed matmuls
                    enable_condensed_compute(self.sparse_engine.params, sparsity.method)
            if self.peft_config is not None:
                # the first masks (if any) are the one-shot step: the base is frozen from here, its masks fixed
                self.sparse_engine = None
                self.adapter = AdapterRun(self.model, self.peft_config)
            self._setup_expert_parallel()
            if isinstance(self.model, GPT):
                self.model.lm_head.chunk_tokens = self.loss_chunk_tokens
            if self.compile_model:  # in place, so parameter and buffer names (checkpoints) do not change
                self.model.compile()

    def _input_norms(self, sparsity: SparsityConfig) -> dict[str, torch.Tensor]:
        """||X_j|| per input of every candidate sparse matrix over `sparsity.wanda_batches` training batches."""
        if self.calibration is None:
            raise ValueError("sparsity.mask_init=wanda needs calibration batches from the training data; train "
                             "through `dstlm fit` (or set LMModule.calibration)")
        from dstlm.sparse.calibration import input_norms
        from dstlm.sparse.masks import sparse_params_of

        return input_norms(self.model, sparse_params_of(self.model, sparsity), self.calibration(sparsity.wanda_batches))

    def _setup_expert_parallel(self) -> None:
        moe = self.model_config.moe
        if moe is None or moe.expert_parallel_size == 1:
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            rank_zero_warn(f"model.moe.expert_parallel_size={moe.expert_parallel_size} has no effect in one "
                           f"process: it computes every expert itself")
            return
        set_expert_parallel(self.model, ExpertParallel.create(moe.expert_parallel_size))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dstlm"] = {"format": 1, "tokenizer": self.tokenizer_json, "eos": self.tokenizer_eos,
                               **self.tokenizer_chat}
        hf = getattr(self.model, "hf", None)
        if hf is not None:  # the architecture, so a checkpoint loads without the source directory
            checkpoint["dstlm"]["hf_config"] = hf.config.to_dict()
        if self.adapter is not None:  # the adapter only; the frozen base by reference
            self.adapter.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model shape or sparsity setup with a one-line reason."""
        check_resume_compatible(checkpoint.get("hyper_parameters", {}), self.model_config,
                                asdict(self.sparsity_config) if self.sparsity_config else None,
                                asdict(self.ift_config) if self.ift_config else None)
        saved = checkpoint.get("hyper_parameters", {}).get("peft")
        if saved != (asdict(self.peft_config) if self.peft_config else None):
            raise ValueError(f"checkpoint has peft={saved!r} but this run has peft="
                             f"{asdict(self.peft_config) if self.peft_config else None!r}; resume with the same peft "
                             f"config")
        if self.adapter is not None:
            self.adapter.check(checkpoint, "checkpoint")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = self.model.loss(x, y)
        loss = hooks.fire("loss", loss, rank=self.global_rank, step=self.global_step, model=self.model)
        # a non-finite loss is caught before backward by NonFiniteGuard (dstlm/training/resilience/nonfinite.py)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        if self.model_config.moe is not None:
            self._log_moe()
        if len(batch) == 3:
            loss = loss * self._share_of_step(y, batch[2])
        return loss

    def _share_of_step(self, y: torch.Tensor, step_counted: torch.Tensor) -> torch.Tensor:
        """Fine-tuning examples count only some targets (completions), so micro-batches differ in how many.
        The loss must be the mean over the optimizer step's counted targets, on all ranks and accumulated
        micro-batches together, for 1 rank x batch 16, 2 ranks x 8 and 1 rank x 8 x 2 accumulated to agree.
        Each micro-batch's mean is scaled by counted_here x ranks x accumulate / counted_in_step (the sampler
        sends counted_in_step with every item): DDP's averaging over ranks and Lightning's division by the
        accumulation then give exactly that mean (plain text, where every target counts, gets factor 1)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return share_of_step(y, step_counted[0], world * accumulate)

    def _log_moe(self) -> None:
        """Router health: aux losses, dropped-assignment fraction, per-expert load (mean over MoE layers)."""
        layers = self.model.moe_layers()
        aux, z = self.model.moe_losses()
        load = torch.stack([m.stats["load"] for m in layers]).mean(0)
        metrics = {"moe/aux_loss": aux.detach(), "moe/z_loss": z.detach(),
                   "moe/dropped": torch.stack([m.stats["dropped"] for m in layers]).mean(),
                   "moe/load_max": load.max() * load.numel()}  # 1.0 = perfectly balanced
        metrics.update({f"moe/load/e{i}": v for i, v in enumerate(load)})
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_n = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model.loss(x, y, with_aux=False)  # validation reports the language-model loss only
        counted = (y != IGNORE_INDEX).sum()  # every target of plain text; the answers of fine-tuning examples
        self._val_sum += loss.detach().double() * counted
        self._val_n += counted

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_n]), reduce_op="sum")
        val_loss = (total[0] / total[1].clamp_min(1)).float()
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer, which would unscale fp16
        gradients inside its step. Under bf16-mixed there is no loss scaler (16-mixed + fused is refused by
        the config), so the gradients are final: clip them here, as Lightning would. Everything else (fp32,
        DeepSpeed, which clips inside its engine) goes Lightning's way."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused") \
                and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optim_config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim_config, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
