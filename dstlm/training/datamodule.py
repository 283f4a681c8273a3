"""LightningDataModule: shipped/local/HF corpus -> tokenizer -> packed blocks -> resumable batches."""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import torch

from dstlm.data.packing import BlockDataset, build_packed, load_documents
from dstlm.data.sampler import ResumableBatchSampler
from dstlm.data.tokenizer import TextTokenizer, load_tokenizer
from dstlm.paths import default_corpus_files
from dstlm.training.config import DataConfig


class LMDataModule(L.LightningDataModule):
    """Its state (epoch, micro-batches consumed) is saved in every checkpoint, so a resumed run
    continues with the next batch instead of repeating or skipping any."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.files = list(cfg.files) or default_corpus_files()
        self._tokenizer: Optional[TextTokenizer] = None
        self.train_sampler: Optional[ResumableBatchSampler] = None
        self._pending_resume: Optional[int] = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """The run's tokenizer: the named one, or a BPE trained on the corpus (cached on disk), loaded once."""
        if self._tokenizer is None:
            files = [] if self.cfg.hf_dataset else self.files
            if not self.cfg.hf_dataset:
                missing = [f for f in self.files if not os.path.isfile(f)]
                if missing:
                    raise FileNotFoundError(f"corpus file {missing[0]!r} does not exist; fix data.files "
                                            f"(or leave it empty for the shipped corpus)")
            self._tokenizer = load_tokenizer(self.cfg.tokenizer, files, self.cfg.vocab_size)
        return self._tokenizer

    def _packed(self):
        cfg = self.cfg
        docs_key = f"hf:{cfg.hf_dataset}:{cfg.hf_split}" if cfg.hf_dataset else "|".join(self.files)
        return build_packed(
            docs_key + f"|{cfg.text_field}",
            lambda: load_documents(self.files if not cfg.hf_dataset else (), cfg.hf_dataset, cfg.hf_split,
                                   cfg.text_field),
            self.tokenizer, cfg.block_size, cfg.val_fraction,
        )

    def prepare_data(self) -> None:
        # runs on local rank 0 only: trains/caches the tokenizer and the packed blocks
        self._packed()

    def setup(self, stage: str) -> None:
        packed = self._packed()
        self.train_set, self.val_set = BlockDataset(packed.train), BlockDataset(packed.val)
        self.stats = packed.n_tokens
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # one Lightning epoch = the whole run (micro-batches), crossing data epochs inside the sampler
        total = None
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps * self.trainer.accumulate_grad_batches
        self.train_sampler = ResumableBatchSampler(len(self.train_set), self.cfg.batch_size, self.seed, rank, world,
                                                   total_batches=total)
        if self._pending_resume is not None:
            self.train_sampler.resume(self._pending_resume)
            self._pending_resume = None
        # validation: the first val_batches global batches, in order, split across ranks
        G = self.cfg.batch_size * world
        n_val = len(self.val_set) // G
        if self.cfg.val_batches:
            n_val = min(self.cfg.val_batches, n_val)
        if n_val == 0:
            raise ValueError(f"validation split has {len(self.val_set)} blocks, fewer than one global batch "
                             f"({G}); raise data.val_fraction or lower data.batch_size/block_size")
        self.val_sampler = ResumableBatchSampler(n_val * G, self.cfg.batch_size, self.seed, rank, world, shuffle=False)

    def _loader(self, dataset, sampler) -> torch.utils.data.DataLoader:
        # A private generator: otherwise every iter() draws a worker seed from the global RNG, and a resumed
        # run (which calls iter() at a different moment) would see different dropout masks afterwards.
        g = torch.Generator()
        g.manual_seed(self.seed)
        # page-locked batches on a GPU, so Lightning's non-blocking copy to the device is truly asynchronous
        trainer = getattr(self, "trainer", None)
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                                           generator=g, pin_memory=pin)

    def calibration_batches(self, n: int) -> list:
        """The first n micro-batches of training blocks in corpus order: the same on every rank (so Wanda's
        input norms, and the masks decided from them, agree everywhere) and outside the training stream."""
        if not hasattr(self, "train_set"):
            packed = self._packed()
            self.train_set = BlockDataset(packed.train)
        B = self.cfg.batch_size
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.train_set, range(min(len(self.train_set),
                                                                                               n * B))),
                                             batch_size=B, shuffle=False)
        return list(loader)

    def train_dataloader(self):
        return self._loader(self.train_set, self.train_sampler)

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_sampler)

    # -- resumable position -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        # Saved from inside on_train_batch_end: the current batch counts as processed already.
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return {"batches_consumed": int(consumed), "seed": self.seed,
                "global_batch": self.cfg.batch_size * self.trainer.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.trainer is not None and state["global_batch"] != self.cfg.batch_size * self.trainer.world_size:
            raise ValueError(
                f"checkpoint was trained with a global batch of {state['global_batch']} sequences, this run has "
                f"{self.cfg.batch_size * self.trainer.world_size}; set data.batch_size so that batch_size x devices "
                f"matches to resume the data stream"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint seed={state['seed']} differs from seed={self.seed}; "
                             f"resume with the same seed")
        if self.train_sampler is not None:
            self.train_sampler.resume(state["batches_consumed"])
        else:
            self._pending_resume = state["batches_consumed"]
