"""In-training evaluation with lm-eval: a small task subset every N steps and at the end of fit."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from dstlm.models.moe import experts_alone
from dstlm.training.config import EvalConfig


class EvalCallback(L.Callback):
    def __init__(self, cfg: EvalConfig, tokenizer_fn) -> None:
        self.cfg = cfg
        self.tokenizer_fn = tokenizer_fn  # () -> TextTokenizer (the run's tokenizer)
        self.last: dict[str, dict[str, float]] = {}
        self._done_step = -1

    def _run(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step == self._done_step:
            return
        self._done_step = trainer.global_step
        model = self._whole_model(trainer, pl_module)
        if trainer.is_global_zero:
            from dstlm.eval.harness import evaluate, format_table, scores
            from dstlm.eval.lm import DstlmLM

            was_training = model.training
            with torch.no_grad(), experts_alone(model):  # rank 0 scores alone: no expert-parallel all-to-all
                lm = DstlmLM(model=model, tokenizer=self.tokenizer_fn(), batch_size=self.cfg.batch_size, quiet=True)
                self.last = scores(evaluate(lm, self.cfg.tasks, self.cfg.limit, self.cfg.stderr_bootstrap),
                                   stderr=self.cfg.stderr_bootstrap > 0)
            model.train(was_training)
            metrics = {f"eval/{task}/{m}": v for task, ms in self.last.items() for m, v in ms.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            rank_zero_info(f"lm-eval at step {trainer.global_step} (limit {self.cfg.limit}):\n"
                           + format_table(self.last))
        if trainer.world_size > 1:
            trainer.strategy.barrier("dstlm-eval")

    @staticmethod
    @torch.no_grad()
    def _whole_model(trainer, pl_module):
        """The model rank 0 scores. Under ZeRO-3 its weights are partitioned and a forward on one rank alone
        would wait forever for the others: gather them (every rank takes part) into a copy on rank 0."""
        model = pl_module.model
        if not hasattr(next(model.parameters()), "ds_id"):
            return model
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            if not trainer.is_global_zero:
                return None
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.random.fork_rng():  # building draws an init: keep the training RNG as it was
            whole = pl_module.build_fresh_model()
        for name, buf in model.named_buffers():  # mask buffers too (partitioned masks: none; weights are 0 there)
            if name not in state:  # not saved with the module (partitioned masks' empty placeholders)
                continue
            module_name, _, attr = name.rpartition(".")
            target = whole.get_submodule(module_name) if module_name else whole
            if attr not in dict(target.named_buffers(recurse=False)):
                target.register_buffer(attr, buf.clone())
        whole.load_state_dict(state)
        return whole.to(next(iter(state.values())).device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.cfg.every_n_steps
        if n and trainer.global_step and trainer.global_step % n == 0 and \
                not trainer.fit_loop.epoch_loop._should_accumulate():
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module)

    finish_training = on_train_end  # a run resumed at max_steps (dstlm.training.assembly.run)

    def summary(self) -> dict:
        return {"eval": self.last} if self.last else {}
