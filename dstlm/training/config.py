"""Typed run configuration: one source of truth for YAML recipes, the CLI and the saved run config.

Field docstrings are the documentation: `dstlm fit --help` shows them.
"""

from __future__ import annotations

import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from dstlm.build import check_transformable
from dstlm.config_types import check_field_types
from dstlm.data.examples import FORMATS as DATA_FORMATS
from dstlm.hf.peft_config import PeftConfig
from dstlm.hf.source import HFModelConfig
from dstlm.models.gpt import GPTConfig
from dstlm.models.lm_loss import CHUNK_TOKENS
from dstlm.sparse.config import SparsityConfig
from dstlm.transforms.ift_spec import SparseIFTConfig


def _ordered_union(*members):
    """Union[members] in exactly this order. typing caches unions by a key that compares equal whatever the
    order (Union[A, B] == Union[B, A]), so `Union[...]` may hand back an earlier union in the other order;
    jsonargparse tries the members in order, so the order matters here (see RunConfigHFFirst)."""
    return typing._UnionGenericAlias(Union, tuple(members))  # noqa: SLF001 (the uncached constructor)


@dataclass
class _GPTConfigAfterHF(GPTConfig):
    """GPTConfig as the second member of HF_FIRST: a distinct class keeps the two unions from comparing equal
    (typing and jsonargparse cache by equality, which ignores the order)."""


GPT_FIRST = _ordered_union(GPTConfig, HFModelConfig, type(None))
HF_FIRST = _ordered_union(HFModelConfig, _GPTConfigAfterHF, type(None))


@dataclass
class DataConfig:
    """Corpus, tokenizer, packing and batching."""

    files: list[str] = field(default_factory=list)
    """Local .txt (one document each) or .jsonl files; empty = the corpus shipped with dstlm."""
    hf_dataset: Optional[str] = None
    """A Hugging Face dataset name to load instead of files (needs network or a local HF cache)."""
    hf_split: str = "train"
    """Split of hf_dataset to read."""
    text_field: str = "text"
    """Field holding the text in .jsonl rows / HF datasets."""
    format: str = "auto"
    """What the rows are: 'text' (documents, every token trained on), 'prompt_completion' or 'messages'
    (fine-tuning examples, the loss on the completion / assistant turns only), or 'auto' (rows with a
    messages_field, or a prompt_field and a completion_field, are examples; anything else is text)."""
    chat_template: str = "auto"
    """How conversation rows become text: 'auto' (the tokenizer's own chat template), 'none' (refuse them), or
    a .jinja template file."""
    pack_examples: bool = False
    """Fine-tuning examples: whole examples one after another in each row (faster; attention then crosses
    examples) instead of one example per row, padded."""
    prompt_field: str = "prompt"
    """Field of the prompt in prompt/completion rows (a string or a list of messages)."""
    completion_field: str = "completion"
    """Field of the completion in prompt/completion rows."""
    messages_field: str = "messages"
    """Field of the conversation (a list of {role, content}) in messages rows."""
    tokenizer: Optional[str] = None
    """'bpe' (byte-level BPE trained on the corpus and cached), 'gpt2' (shipped GPT-2 BPE) or a path. Unset: a
    Hugging Face model folder's own tokenizer, else 'bpe'; a value that is set is used as given."""
    vocab_size: int = 4096
    """Vocabulary of the trained 'bpe' tokenizer (ignored for others)."""
    block_size: int = 256
    """Tokens per training sequence; must not exceed model.block_size."""
    batch_size: int = 16
    """Sequences per micro-batch per rank."""
    val_fraction: float = 0.05
    """Fraction of every document (its tail) held out for validation."""
    val_batches: int = 8
    """Validation micro-batches per rank each time validation runs (0 = all)."""
    num_workers: int = 0
    """DataLoader worker processes (0 is fastest for memory-mapped blocks on small machines)."""

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"data.batch_size={self.batch_size!r} must be a positive integer")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"data.block_size={self.block_size!r} must be a positive integer")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.val_batches < 0:
            raise ValueError(f"data.val_batches={self.val_batches} must be >= 0 (0 = all)")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0 (0 = load in the training process)")
        if self.vocab_size <= 0:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be a positive integer")
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {', '.join(DATA_FORMATS)}")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup then cosine (or constant) decay."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine schedule)."""
    weight_decay: float = 0.1
    """Applied to matrices only (not to norms, biases or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Optimizer steps of linear warmup from 0."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw, or sgd with Nesterov momentum (momentum = betas[0])."""
    fused: bool = False
    """One fused kernel per optimizer step (torch's fused=True; a GPU speed-up). Under bf16-mixed, where
    Lightning refuses to clip for a fused optimizer, dstlm clips itself (exact: bf16 has no loss scaler);
    16-mixed is refused."""

    def __post_init__(self) -> None:
        check_field_types(self, "optim")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must both be in [0, 1), e.g. [0.9, 0.95]")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be positive, e.g. 1e-8")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0 (0 = none)")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def signal_number(name: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or '12' -> the signal; a one-line error otherwise."""
    key = name.upper().removeprefix("SIG")
    try:
        return signal.Signals(int(key)) if key.isdigit() else signal.Signals[f"SIG{key}"]
    except (KeyError, ValueError):
        raise ValueError(f"trainer.preempt_signal={name!r} is not a signal name; use e.g. USR2 (USR1 is also "
                         f"caught by NCCL, TERM is SLURM's final kill)") from None


@dataclass
class TrainerConfig:
    """Lightning Trainer settings that dstlm exposes."""

    max_steps: int = 600
    """Optimizer steps to train."""
    accelerator: str = "auto"
    """cpu, gpu or auto."""
    devices: int = 1
    """Processes (ranks) per node; >1 uses the strategy below."""
    num_nodes: int = 1
    """Nodes."""
    strategy: str = "auto"
    """auto, ddp, ddp_spawn, or DeepSpeed ZeRO: deepspeed_stage_0|1|2|3 (CPU and CUDA)."""
    precision: str = "32-true"
    """32-true, bf16-mixed, bf16-true, 16-mixed."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: Optional[float] = 1.0
    """Clip the global gradient norm to this value (None = off)."""
    val_every_n_steps: int = 100
    """Run validation every N optimizer steps (and at the end)."""
    log_every_n_steps: int = 10
    """Logging interval in optimizer steps."""
    ckpt_every_n_steps: int = 200
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last_k: int = 2
    """Checkpoints kept in out_dir/checkpoints (plus last.ckpt)."""
    progress_bar: bool = True
    """Show the progress bar."""
    deterministic: bool = True
    """Ask torch for deterministic algorithms (bit-reproducible CPU runs)."""
    compile: bool = False
    """torch.compile the model's forward in place (checkpoint keys unchanged); a GPU speed-up."""
    loss_chunk_tokens: int = CHUNK_TOKENS
    """The LM head and cross-entropy run fused, this many tokens at a time, so the (tokens x vocab) logits
    are never held whole (less memory, faster); 0 = plain cross-entropy over the full logits."""
    offload_optimizer: bool = False
    """DeepSpeed ZeRO-1/2/3: keep the optimizer state and fp32 master weights in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3 only: keep the partitioned parameters in CPU memory between uses."""
    zero_init: bool = False
    """DeepSpeed ZeRO-3 only: build the model partitioned, so no rank ever holds it whole (for models whose fp32
    weights do not fit one rank); bit-identical to the whole build (docs/distributed.md)."""
    deepspeed_config: Optional[str] = None
    """Path to a raw DeepSpeed JSON config; its keys win over the ones dstlm derives (stage, batch, clipping)."""
    collective_timeout_s: Optional[int] = None
    """Seconds a rank waits in a collective before failing (DDP and DeepSpeed process groups); a dead rank then
    ends the others within this bound instead of hanging. None: torch's default (30 min)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: 'stop' the run (naming the step and the last good checkpoint), or 'skip' the
    optimizer step (weights, optimizer state and masks unchanged; the step counter and LR schedule move on), at most
    max_skipped_steps times per run, then stop. Single process and DDP (docs/faults.md)."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: the most steps a run may skip (resumes included) before a non-finite one stops it."""
    preempt_signal: str = "USR2"
    """The signal that asks a run to stop at the next step, checkpointed (SLURM: --signal=USR2@LEAD); every rank
    stops at the same step and the run exits with code 75 (requeue me)."""

    def __post_init__(self) -> None:
        check_field_types(self, "trainer")
        self._check_counts()
        self._check_choices()
        self._check_deepspeed()

    def _check_counts(self) -> None:
        """Step counts, sizes and limits: positive or non-negative integers."""
        for name in ("max_steps", "devices", "num_nodes", "accumulate_grad_batches", "val_every_n_steps",
                     "log_every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"trainer.{name}={value!r} must be a positive integer")
        for name in ("ckpt_every_n_steps", "keep_last_k", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 0")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"trainer.gradient_clip_val={self.gradient_clip_val} must be positive (or null: no "
                             f"clipping)")
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            raise ValueError(f"trainer.loss_chunk_tokens={self.loss_chunk_tokens!r} must be an integer >= 0 "
                             f"(tokens per chunk of the fused loss; 0 turns fusing off)")
        if self.collective_timeout_s is not None and (not isinstance(self.collective_timeout_s, int)
                                                      or self.collective_timeout_s <= 0):
            raise ValueError(f"trainer.collective_timeout_s={self.collective_timeout_s!r} must be a positive number "
                             f"of seconds (or null for torch's default)")

    def _check_choices(self) -> None:
        """Named choices: accelerator, precision, strategy, the preemption signal."""
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"trainer.accelerator={self.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.strategy not in ("auto", "ddp", "ddp_spawn", "deepspeed") and not self.strategy.startswith("deepspeed"):
            raise ValueError(f"trainer.strategy={self.strategy!r} is not one of auto, ddp, ddp_spawn, "
                             f"deepspeed_stage_0|1|2|3 (docs/distributed.md)")
        signal_number(self.preempt_signal)

    def _check_deepspeed(self) -> None:
        """Options that need DeepSpeed, or a given ZeRO stage."""
        stage = self.zero_stage
        if self.on_nonfinite == "skip" and stage is not None:
            raise ValueError(f"trainer.on_nonfinite=skip with trainer.strategy={self.strategy!r}: DeepSpeed keeps the "
                             f"gradients in its own buffers, where a step cannot be dropped; use on_nonfinite=stop "
                             f"(or a ddp/auto strategy)")
        if self.strategy.startswith("deepspeed") and stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.strategy={self.strategy!r}: the ZeRO stage must be 0, 1, 2 or 3 "
                             f"(deepspeed_stage_0 ... deepspeed_stage_3)")
        for option, stages, what in (("offload_params", (3,), "ZeRO-3"), ("zero_init", (3,), "ZeRO-3"),
                                     ("offload_optimizer", (1, 2, 3), "ZeRO stage 1, 2 or 3")):
            if getattr(self, option) and stage not in stages:
                use = "deepspeed_stage_3" if stages == (3,) else "deepspeed_stage_1|2|3"
                raise ValueError(f"trainer.{option}=true needs {what} but trainer.strategy={self.strategy!r}; use "
                                 f"strategy {use} or drop {option}")
        if self.deepspeed_config is not None:
            if stage is None:
                raise ValueError(f"trainer.deepspeed_config is set but trainer.strategy={self.strategy!r}; "
                                 f"use a deepspeed_stage_N strategy with it")
            if not Path(self.deepspeed_config).is_file():
                raise ValueError(f"trainer.deepspeed_config={self.deepspeed_config!r} does not exist; "
                                 f"give the path of a DeepSpeed JSON file")

    @property
    def zero_stage(self) -> Optional[int]:
        """The DeepSpeed ZeRO stage named by the strategy (deepspeed_stage_N), None for other strategies."""
        if not self.strategy.startswith("deepspeed"):
            return None
        tail = self.strategy.rsplit("_", 1)[-1]
        if self.strategy == "deepspeed":
            return 2  # Lightning's default stage for plain "deepspeed"
        return int(tail) if tail.isdigit() and self.strategy.startswith("deepspeed_stage_") else -1


@dataclass
class EvalConfig:
    """lm-eval tasks scored during training (rank 0, on the live model)."""

    tasks: list[str] = field(default_factory=lambda: ["lambada_openai", "hellaswag", "wikitext"])
    """Task names (the shipped offline tasks, or any lm-eval task)."""
    every_n_steps: int = 0
    """Evaluate every N optimizer steps (0 = only at the end of fit)."""
    limit: Optional[int] = 100
    """Documents per task (None = all)."""
    batch_size: int = 16
    """Sequences per scoring batch."""
    stderr_bootstrap: int = 0
    """> 0: also report lm-eval's standard errors (closed-form for accuracies; perplexities bootstrapped with
    this many resamples, about 1 s per 1000 on 2 CPU cores). 0: scores only."""

    def __post_init__(self) -> None:
        check_field_types(self, "eval")
        # names outside the shipped tasks are checked against lm-eval's registry when first run
        if not self.tasks:
            raise ValueError("eval.tasks is empty; name at least one task, e.g. [hellaswag]")
        if self.every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps={self.every_n_steps} must be >= 0")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit={self.limit} must be positive (or null for all documents)")
        if self.batch_size <= 0:
            raise ValueError(f"eval.batch_size={self.batch_size} must be positive")
        if self.stderr_bootstrap < 0:
            raise ValueError(f"eval.stderr_bootstrap={self.stderr_bootstrap} must be >= 0 (0 = no standard errors)")


@dataclass
class RunConfig:
    """A complete training run."""

    name: str = "run"
    """Run name; outputs go to out_dir/name."""
    out_dir: str = "runs"
    """Directory of run folders."""
    seed: int = 1337
    """Seed for model init, data order and everything random."""
    model: GPT_FIRST = None
    """dstlm's GPT / MoE (configs/model/*.yaml; unset: the GPTConfig defaults), or a Hugging Face causal LM:
    {hf: DIR} (dstlm/hf/source.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sparsity: Optional[SparsityConfig] = None
    """Dynamic sparse training (configs/sparsity/*.yaml); None = dense."""
    eval: Optional[EvalConfig] = None
    """lm-eval tasks scored during/after training (configs/eval/*.yaml); None = none."""
    ift: Optional[SparseIFTConfig] = None
    """Sparse-IFT transformation (configs/ift/*.yaml); needs a sparsity method to train its sparse weights."""
    peft: Optional[PeftConfig] = None
    """LoRA adapters on a frozen Hugging Face model (configs/peft/*.yaml; docs/hf-lora.md); with a sparsity
    section, that section is the one-shot pruning step and its first masks stay fixed."""

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = GPTConfig()
        check_field_types(self, "")
        if not 0 <= self.seed < 2**32:  # what numpy's and Lightning's seeding accept
            raise ValueError(f"seed={self.seed} must be in [0, 2^32 - 1]; e.g. seed: 1337")
        if not self.name or self.name in (".", "..") or "/" in self.name or self.name.startswith("-"):
            raise ValueError(f"name={self.name!r} must name one folder under out_dir (no '/', not empty); e.g. "
                             f"name: rigl-90")
        check_transformable(self.model, self.ift)
        if self.data.tokenizer is None:  # the model's own tokenizer, unless another is named
            own = isinstance(self.model, HFModelConfig) and self.model.local is not None
            self.data.tokenizer = self.model.hf if own else "bpe"
        if self.optim.fused and self.trainer.precision.startswith("16"):
            raise ValueError(f"optim.fused=true with trainer.precision={self.trainer.precision!r}: a fused optimizer "
                             f"unscales fp16 gradients itself, so they cannot be clipped; use bf16-mixed or "
                             f"optim.fused=false")
        if self.ift is not None and self.sparsity is None:
            raise ValueError(f"ift.family={self.ift.family!r} needs a DST method for its sparse weights; add "
                             f"--sparsity configs/sparsity/rigl.yaml (or static/set/srigl)")
        if self.trainer.zero_init:
            self._check_zero_init()
        if self.sparsity is not None and self.sparsity.partition_masks and self.trainer.zero_stage != 3:
            raise ValueError(f"sparsity.partition_masks=true partitions masks like ZeRO-3 partitions the weights, but "
                             f"trainer.strategy={self.trainer.strategy!r}; use deepspeed_stage_3 or drop "
                             f"partition_masks (other strategies hold every weight whole, and its mask with it)")
        if self.peft is not None:
            self._check_peft()
        if self.model.block_size is not None and self.data.block_size > self.model.block_size:
            raise ValueError(
                f"data.block_size={self.data.block_size} exceeds model.block_size={self.model.block_size}; "
                f"lower data.block_size or raise model.block_size"
            )

    def _check_peft(self) -> None:
        """What adapters on a frozen base cannot do."""
        if not isinstance(self.model, HFModelConfig):
            raise ValueError("peft adapters train on a Hugging Face model source; set model.hf to a model folder "
                             "(dstlm's own models train all their weights: drop peft)")
        if self.trainer.zero_stage == 3 or self.trainer.zero_init:
            raise ValueError(f"peft with trainer.strategy={self.trainer.strategy!r}: ZeRO-3 partitions the frozen "
                             f"base weights, which the adapters' masked merge reads whole; use ddp or "
                             f"deepspeed_stage_2")
        sp = self.sparsity
        if sp is not None and (sp.partition_masks or sp.condensed or sp.reclaim_dead_units):
            raise ValueError("peft with sparsity.partition_masks, condensed or reclaim_dead_units: with adapters the "
                             "sparsity section is a one-shot pruning step of the frozen base; drop those options")

    def _check_zero_init(self) -> None:
        """What a partitioned build cannot do: read whole weights while the model is built."""
        if isinstance(self.model, HFModelConfig) and self.model.local is None:
            raise ValueError(f"model.hf={self.model.hf!r} with trainer.zero_init=true: a partitioned build reads the "
                             f"weights slice by slice from a local folder; download it first (save_pretrained) and "
                             f"give its path, or drop zero_init")
        if self.sparsity is not None and self.sparsity.mask_init == "wanda":
            raise ValueError(f"sparsity.mask_init={self.sparsity.mask_init!r} calibrates on the whole model, which "
                             f"trainer.zero_init=true never holds; use mask_init magnitude or random, or drop "
                             f"zero_init")
        if self.sparsity is not None and self.sparsity.method_class.init_reads_weights:
            raise ValueError(f"sparsity.method={self.sparsity.method!r} picks its first mask by the whole weights, "
                             f"which trainer.zero_init=true never holds; use another method or drop zero_init")
        moe = self.model.moe
        if moe is not None and moe.expert_parallel_size > 1:
            raise ValueError(f"model.moe.expert_parallel_size={moe.expert_parallel_size} with trainer.zero_init=true: "
                             f"expert parallelism splits the experts of a whole build; drop one of the two")


@dataclass
class RunConfigHFFirst(RunConfig):
    """RunConfig with the model union's members in the other order (the CLI parses a Hugging Face source with
    it: jsonargparse merges repeated `model.*` values only into the union member listed first)."""

    model: HF_FIRST = None
    """A Hugging Face causal LM: {hf: DIR} (dstlm/hf/source.py), or dstlm's GPT / MoE."""
