"""LightningDataModule: shipped/local/HF corpus or fine-tuning examples -> tokenizer -> token rows -> resumable
batches."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from dstlm.data.examples import (ChatTemplate, ExampleFields, dataset_rows, describe, example_arrays, file_kind,
                                 first_row_columns, read_rows)
from dstlm.data.text_files import corpus_file
from dstlm.data.packing import BlockDataset, build_packed, cached_splits, load_documents, token_dtype
from dstlm.data.sampler import ResumableBatchSampler
from dstlm.data.tokenizer import TextTokenizer, load_tokenizer, tokenizer_fingerprint
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
            for f in files:
                corpus_file(f)  # missing, or a directory: named before anything reads the files
            self._tokenizer = load_tokenizer(self.cfg.tokenizer or "bpe", files, self.cfg.vocab_size)
        return self._tokenizer

    @property
    def fields(self) -> ExampleFields:
        c = self.cfg
        return ExampleFields(c.prompt_field, c.completion_field, c.messages_field, c.text_field)

    def kinds(self) -> dict[str, str]:
        """{source: 'text' | 'prompt_completion' | 'messages'} for every file (or the HF dataset)."""
        cfg = self.cfg
        if cfg.hf_dataset:
            return {cfg.hf_dataset: file_kind(self._hf_dataset().column_names, cfg.format, self.fields,
                                              cfg.hf_dataset)}
        out = {}
        for f in self.files:
            path = Path(f)
            if path.suffix in (".jsonl", ".json") and path.is_file():
                out[f] = file_kind(first_row_columns(path), cfg.format, self.fields, f)
            elif cfg.format in ("auto", "text"):
                out[f] = "text"
            else:
                raise ValueError(f"{f}: data.format={cfg.format!r} needs .jsonl/.json rows; give such files "
                                 f"or set data.format=text")
        return out

    def _hf_dataset(self):
        import datasets

        from dstlm.paths import cache_dir

        datasets.disable_progress_bars()
        return datasets.load_dataset(self.cfg.hf_dataset, split=self.cfg.hf_split,
                                     cache_dir=str(cache_dir() / "datasets"))

    def chat_template(self) -> Optional[ChatTemplate]:
        spec, tok = self.cfg.chat_template, self.tokenizer
        if spec == "none":
            return None
        if spec == "auto":
            return ChatTemplate(tok.chat_template, tok.special_tokens, f"the chat template of {tok.name}") \
                if tok.chat_template else None
        return ChatTemplate.from_file(spec, tok.special_tokens)

    def _packed(self):
        cfg = self.cfg
        docs_key = f"hf:{cfg.hf_dataset}:{cfg.hf_split}" if cfg.hf_dataset else "|".join(self.files)
        kinds = self.kinds()
        if all(k == "text" for k in kinds.values()):
            return build_packed(
                docs_key + f"|{cfg.text_field}",
                lambda: load_documents(self.files if not cfg.hf_dataset else (), cfg.hf_dataset, cfg.hf_split,
                                       cfg.text_field),
                self.tokenizer, cfg.block_size, cfg.val_fraction,
            )
        text = [f for f, k in kinds.items() if k == "text"]
        if text:
            raise ValueError(f"data.files mixes plain text ({text[0]}) with fine-tuning examples "
                             f"({next(f for f, k in kinds.items() if k != 'text')}); train on one kind at a time")
        template = self.chat_template()
        tok = self.tokenizer

        def sources():
            if cfg.hf_dataset:
                return [(cfg.hf_dataset, kinds[cfg.hf_dataset], dataset_rows(self._hf_dataset()))]
            return [(f, kinds[f], read_rows(Path(f))) for f in self.files]

        key = ["examples-v1", docs_key, kinds, asdict(self.fields), template.source if template else None,
               template.special_tokens if template else None, cfg.pack_examples, tokenizer_fingerprint(tok),
               cfg.block_size, cfg.val_fraction]
        return cached_splits(key, lambda: example_arrays(sources(), tok, template, self.fields, cfg.block_size,
                                                         cfg.val_fraction, cfg.pack_examples,
                                                         token_dtype(tok.vocab_size)))

    def prepare_data(self) -> None:
        # runs on local rank 0 only: trains/caches the tokenizer and the packed blocks
        self._packed()

    def setup(self, stage: str) -> None:
        packed = self._packed()
        self.train_set = BlockDataset(packed.train, packed.train_counted)
        self.val_set = BlockDataset(packed.val, packed.val_counted)
        self.stats = packed.n_tokens
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if "examples" in self.stats and rank == 0:  # what the examples became: the user must see it
            print(describe(self.stats, self.cfg.block_size), flush=True)
        # one Lightning epoch = the whole run (micro-batches), crossing data epochs inside the sampler
        total = None
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps * accumulate
        self.train_sampler = ResumableBatchSampler(len(self.train_set), self.cfg.batch_size, self.seed, rank, world,
                                                   total_batches=total, item_weights=self.train_set.targets_counted(),
                                                   accumulate=accumulate)
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
            self.train_set = BlockDataset(packed.train, packed.train_counted)
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
