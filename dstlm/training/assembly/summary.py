"""What a run reports: FLOPs against the dense baseline, the config and sparsity layout that ran (config.yaml,
sparsity.yaml), peak memory, and the end-of-run table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import torch
import yaml

from dstlm.models.gpt import GPTConfig
from dstlm.training.config import RunConfig
from dstlm.training.loop.module import LMModule


def config_yaml(cfg: RunConfig) -> str:
    """The run config as YAML, every value as it ran (method defaults filled in); `dstlm fit --config` re-runs it."""
    return yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class RunRecord(L.Callback):
    """Rank 0 writes <run>/config.yaml (the built RunConfig) when fit starts, and <run>/sparsity.yaml (the
    sparsity config the engine runs, after Sparse-IFT's rewrite, and per sparse matrix its shape, target
    density, budget and fan-in) at the start and again at the end with the final masks."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_atomic(self.out / "config.yaml", config_yaml(self.cfg))
            self._sparsity(pl_module, final=False)
            self._manifest(pl_module)

    def _manifest(self, pl_module) -> None:
        """A Hugging Face model's manifest (which weights are sparse, which stay dense and why): printed
        before training and written to <run>/manifest.txt."""
        model, engine, sp_cfg = pl_module.model, pl_module.sparse_engine, pl_module.effective_sparsity
        if not hasattr(model, "manifest") or engine is None:
            return
        from dstlm.hf.model import format_manifest
        from dstlm.sparse.masks import include_of

        text = format_manifest(model.manifest(include_of(model, sp_cfg), sp_cfg.exclude), engine.densities)
        kept = f"kept from the model for {engine.kept_masks} of {len(engine.params)} matrices, else " \
            if engine.kept_masks else ""
        text += f"\nfirst masks: {kept}{engine.mask_init}" + (
            f" (magnitude for {engine.wanda_unseen} matrices no calibration token reached: experts nothing was "
            f"routed to; raise sparsity.wanda_batches)" if engine.wanda_unseen else "")
        print(text)
        write_atomic(self.out / "manifest.txt", text + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._sparsity(pl_module, final=True)

    finish_training = on_train_end  # a run resumed at max_steps (dstlm.training.assembly.run)

    def _sparsity(self, pl_module, final: bool) -> None:
        engine = pl_module.sparse_engine
        if engine is None:
            return
        layers = {}
        counts = engine.counts() if final else {}  # whole masks, or partitioned masks' cached all-reduced counts
        for sp in engine.params:
            la = engine.layers[sp.name]
            entry = {"shape": list(la.shape), "target_density": round(la.density, 6), "budget": la.budget}
            if la.fan_in is not None:
                entry["fan_in"] = la.fan_in
            if final:
                entry["final_active"] = counts[sp.name].active
                entry["final_ablated_rows"] = int((counts[sp.name].rows == 0).sum())
            layers[sp.name] = entry
        record = {"method": engine.cfg.method, "effective_config": dataclasses.asdict(engine.cfg),
                  "density": round(engine.density(), 6), "mask_updates": engine.n_updates, "layers": layers}
        if self.cfg.ift is not None:
            record["note"] = ("Sparse-IFT chose include, overrides and sparsity: every transformed weight at its "
                              "iso-FLOP density")
        write_atomic(self.out / "sparsity.yaml", yaml.safe_dump(_plain(record), sort_keys=False))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class FlopsLog(L.Callback):
    """At the start of training: FLOPs per token against the dense baseline, printed, logged, and written
    to <run>/flops.json."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        text, summary = flops_report(self.cfg, pl_module.model, getattr(pl_module, "sparse_engine", None))
        print(text)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "flops.json").write_text(json.dumps(summary, indent=2))
        for logger in trainer.loggers:
            logger.log_metrics({f"flops/{k}": float(v) for k, v in summary.items() if not isinstance(v, dict)}, step=0)


def flops_report(cfg: RunConfig, model=None, engine=None) -> tuple[str, dict]:
    """Forward/training FLOPs per token of this run's model (masks included) against the dense baseline.
    `model`: the built model (with masks) and its sparse engine, whose counts give the non-zeros (partitioned
    masks leave none on the modules); built here when not given."""
    from dstlm.models.gpt import dense_layer_shapes, linear_layer_names
    from dstlm.sparse.flops import count_flops, dense_count, report

    if model is None:
        module = LMModule(cfg.model, cfg.optim, cfg.trainer.max_steps, sparsity=cfg.sparsity, seed=cfg.seed,
                          ift=cfg.ift, seq_len=cfg.data.block_size)
        module.configure_model()
        model, engine = module.model, module.sparse_engine
    active = engine.active_entries() if engine is not None else None
    T = cfg.data.block_size
    if isinstance(cfg.model, GPTConfig):
        base = dense_count(cfg.model, dense_layer_shapes(cfg.model), T)
        mine = count_flops(model, linear_layer_names(cfg.model), T, active)
    else:  # a Hugging Face source: every matrix a token multiplies, read from its modules
        from dstlm.hf.flops import hf_flop_counts

        base, mine = hf_flop_counts(model, T, active)
    method = cfg.sparsity.method if cfg.sparsity is not None else None
    return report(base, mine, method, cfg.sparsity.delta_t if cfg.sparsity else 1, T)


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


def format_summary(summary: dict) -> str:
    head = (f" dstlm run stopped at step {summary['preempted_at_step']} (preemption signal), checkpointed: "
            if summary.get("preempted") else " dstlm run finished: ")
    lines = ["", "=" * 64, head + summary["run"]]
    if summary.get("val_loss") is not None:
        lines.append(f"   val loss {summary['val_loss']:.4f}   val perplexity {summary['val_ppl']:.2f}")
    for key, label in (("steps", "optimizer steps"), ("train_tokens_seen", "tokens trained"),
                       ("tokens_per_s", "tokens/s (run average)"), ("wall_s", "wall time (s)"),
                       ("params", "parameters"), ("sparsity", "sparsity (sparsified layers)"),
                       ("checkpoint_save_s_max", "longest checkpoint save (s)"),
                       ("peak_memory_gib", "peak memory (GiB)")):
        if summary.get(key) is not None:
            value = summary[key]
            lines.append(f"   {label:<28} {value:,.3f}" if isinstance(value, float) else f"   {label:<28} {value:,}")
    peft = summary.get("peft")
    if peft:
        lines.append(f"   {'LoRA adapter':<28} r {peft['r']}, merge {peft['merge']}: {peft['trainable_params']:,} "
                     f"trainable of {peft['total_params']:,}; base sparsity {peft['base_sparsity']:.4f}")
    census = summary.get("unit_census")
    if census:
        lines.append(f"   {'dead hidden units':<28} {census['dead']:,} of {census['units']:,}")
    spread = summary.get("mask_spread")
    if spread:
        lines.append(f"   {'fan-in / fan-out CV':<28} {spread['fan_in_cv']:.3f} / {spread['fan_out_cv']:.3f}")
    for task, metrics in (summary.get("eval") or {}).items():
        shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items() if not m.endswith("stderr"))
        lines.append(f"   lm-eval {task:<14} {shown}")
    lines += [f"   loss curve   {summary['loss_png']}", f"   logs         {summary['logs']} (CSV + TensorBoard)",
              f"   checkpoint   {summary['checkpoint']}", "=" * 64]
    return "\n".join(lines)
