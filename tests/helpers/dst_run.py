"""Run a tiny RigL/SRigL job on 1 or N ranks (under torchrun) and save every rank's masks after every
mask update to OUT/rank<r>.pt. Used by tests/test_dist.py.

    python tests/helpers/dst_run.py OUT METHOD BATCH_PER_RANK FILE [FILE ...]

Environment: DSTLM_STRATEGY (default ddp / auto), DSTLM_STEPS (8), DSTLM_CKPT_EVERY (0), DSTLM_CHECK_REFERENCE
(stop at an update where a sharded decision differs from the whole-tensor reference),
DSTLM_STEP_SLEEP (seconds per step, to give a test time to kill a rank), DSTLM_IFT (a Sparse-IFT family),
DSTLM_MOE (a MoE model), DSTLM_HF (a Hugging Face model folder as the model source),
DSTLM_EP (its expert_parallel_size), DSTLM_ZERO_INIT (build partitioned: trainer.zero_init),
DSTLM_RESUME (a checkpoint to resume from, through dstlm.training.assembly.run.fit),
DSTLM_CONDENSED (sparsity.condensed),
DSTLM_PARTITION_MASKS (1/0: sparsity.partition_masks true/false; unset: the default, true under ZeRO-3; masks
are joined whole for the dumps), DSTLM_SCORE_STEPS (sparsity.grad_accumulation: steps whose gradients feed a score),
DSTLM_METHOD_MODULE (a module to import first, e.g. helpers.custom_method: it registers the METHOD).
Each rank saves masks after every update, the masks at train start (after a restore), the final masks and the
final (gathered) weights.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_run  # noqa: E402
from dstlm.sparse import SparsityConfig  # noqa: E402
from dstlm.training.assembly.build import build  # noqa: E402
from dstlm.training.assembly.run import fit  # noqa: E402


class Sleep(L.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(self.seconds)


class MaskDump(L.Callback):
    def __init__(self, out: Path):
        self.out, self.snapshots, self.start, self.losses, self.sharded = out, [], {}, {}, []

    def on_train_start(self, trainer, pl_module):  # after a checkpoint was restored
        self.start = {k: m.clone() for k, m in pl_module.sparse_engine.whole_masks().items()}
        # sharded decisions also decided whole by the sort-based reference; any difference stops the run
        if os.environ.get("DSTLM_CHECK_REFERENCE"):
            from helpers.reference_selection import check_decisions

            check_decisions(pl_module.sparse_engine)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        engine = pl_module.sparse_engine
        if engine.n_updates > len(self.snapshots):
            self.snapshots.append({k: m.clone() for k, m in engine.whole_masks().items()})
            self.sharded.append(engine.last_stats["sharded"])

    def on_train_end(self, trainer, pl_module):
        params = list(pl_module.model.parameters())
        if hasattr(params[0], "ds_id"):  # ZeRO-3: gather the partitioned weights first (a collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        else:
            weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save({"masks": self.snapshots, "start_masks": self.start, "weights": weights, "losses": self.losses,
                    "sharded": self.sharded,
                    "final_masks": {k: m.clone() for k, m in pl_module.sparse_engine.whole_masks().items()}},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, method, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if os.environ.get("DSTLM_METHOD_MODULE"):  # a method of the user's own, registered on import
        import importlib

        importlib.import_module(os.environ["DSTLM_METHOD_MODULE"])
    files = sys.argv[4:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = os.environ.get("DSTLM_STRATEGY", "ddp" if world > 1 else "auto")
    out.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("DSTLM_STEPS", "8"))
    cfg = tiny_run(out / "run", files, data=dict(batch_size=batch),
                   trainer=dict(max_steps=steps, val_every_n_steps=steps, devices=world, strategy=strategy,
                                ckpt_every_n_steps=int(os.environ.get("DSTLM_CKPT_EVERY", "0")), keep_last_k=10))
    cfg.trainer.zero_init = bool(os.environ.get("DSTLM_ZERO_INIT"))
    extra = dict(sparsity=0.5, n=2, m=4) if method == "nm" else dict(sparsity=0.8)
    cfg.sparsity = SparsityConfig(method=method, delta_t=2, t_end=1.0, drop_fraction=0.3,
                                  condensed=bool(os.environ.get("DSTLM_CONDENSED")),
                                  partition_masks={"1": True, "0": False}.get(os.environ.get("DSTLM_PARTITION_MASKS")),
                                  grad_accumulation=int(os.environ.get("DSTLM_SCORE_STEPS", "1")),
                                  **extra)
    if os.environ.get("DSTLM_MOE"):  # 4 experts, top-2, in every 2nd block
        from dstlm.models.moe import MoEConfig

        cfg.model.moe = MoEConfig(num_experts=4, top_k=2, every=2,
                                  expert_parallel_size=int(os.environ.get("DSTLM_EP", "1")))
    if os.environ.get("DSTLM_IFT"):  # a Sparse-IFT family at s = 0.5 on every block projection
        from dstlm.transforms.ift import SparseIFTConfig

        cfg.ift = SparseIFTConfig(family=os.environ["DSTLM_IFT"], sparsity=0.5)
    if os.environ.get("DSTLM_HF"):  # a Hugging Face model folder (tests/helpers/hf_models.py) as the source
        from dstlm.hf.source import HFModelConfig

        cfg.model = HFModelConfig(hf=os.environ["DSTLM_HF"])
        cfg.data.tokenizer = os.environ["DSTLM_HF"]
    callbacks = [MaskDump(out)]
    if os.environ.get("DSTLM_STEP_SLEEP"):
        callbacks.append(Sleep(float(os.environ["DSTLM_STEP_SLEEP"])))
    if os.environ.get("DSTLM_RESUME"):  # through dstlm's fit: resharding of ZeRO checkpoints included
        fit(cfg, ckpt_path=os.environ["DSTLM_RESUME"], extra_callbacks=callbacks)
    else:
        trainer, module, data = build(cfg, callbacks, logger=False)
        trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
    from dstlm.cli import close_process_group

    close_process_group()  # as `dstlm` does: a rank exiting with gloo alive can abort at interpreter shutdown
