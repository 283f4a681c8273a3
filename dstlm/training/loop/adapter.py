"""A peft run's frozen base as training sees it: built once in `LMModule.configure_model`, it holds the base
masks and the base's fingerprint, keeps checkpoints to the adapter (plus the bit-packed masks and the
fingerprint), and refuses to resume onto another base."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from dstlm.hf.model import HFCausalLM
from dstlm.hf.peft_config import PeftConfig


class AdapterRun:
    def __init__(self, model, cfg: PeftConfig) -> None:
        from dstlm.hf.lora import fingerprint, prepare  # peft is imported by adapter runs only

        if not isinstance(model, HFCausalLM):
            raise ValueError("peft adapters train on a Hugging Face model source; set model.hf to a model folder")
        self.cfg = cfg
        self.source = model.config.hf
        self.masks, self.origin = prepare(model, cfg)
        self.prints = fingerprint(model)
        self.names = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
        """The adapter's keys in LMModule's state dict: all a checkpoint's state_dict holds."""
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())

    def save(self, checkpoint: dict) -> None:
        from dstlm.hf.lora import base_record

        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self.names}
        checkpoint.setdefault("dstlm", {})["peft"] = base_record(self.masks, self.prints)

    def check(self, checkpoint: dict, where: str) -> None:
        """The checkpoint's adapter fits this run's and its base is this run's base (weights and masks)."""
        from dstlm.hf.lora import check_base
        from dstlm.sparse.bits import pack_mask

        record = (checkpoint.get("dstlm") or {}).get("peft")
        if record is None:
            raise ValueError(f"{where} holds no peft adapter (a run without peft wrote it); resume it without peft, "
                             f"or start this run from its export")
        check_base(self.prints, record, self.source, where)
        if record["masks"].keys() != self.masks.keys() or not all(
                torch.equal(pack_mask(m), record["masks"][n]) for n, m in self.masks.items()):
            raise ValueError(f"{where}: its base masks differ from this run's ({self.origin}); resume with the same "
                             f"model folder and sparsity config")
        state = checkpoint.get("state_dict")
        if state is not None and set(state) != self.names:
            missing = sorted(self.names - set(state))[:2]
            raise ValueError(f"{where}: its adapter does not fit this run's (missing {missing}, unexpected "
                             f"{sorted(set(state) - self.names)[:2]}); resume with the same peft config")

    def describe(self) -> str:
        sparsity = _sparsity(self.masks)
        return (f"peft: {self.cfg.describe()}; trainable {self.trainable:,} of {self.total:,} parameters "
                f"({100 * self.trainable / self.total:.2f} %); base masks: {self.origin}, {len(self.masks)} weights "
                f"at sparsity {sparsity:.4f}")


def _sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum(int((~m).sum()) for m in masks.values()) / total) if total else 0.0


class AdapterReport(L.Callback):
    """A peft run's adapter at the start (printed, and <run>/adapter.txt) and in the summary."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.adapter: Optional[AdapterRun] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.adapter = pl_module.adapter
        if trainer.is_global_zero and self.adapter is not None:
            text = self.adapter.describe()
            print(text)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "adapter.txt").write_text(text + "\n")

    def summary(self) -> dict:
        a = self.adapter
        if a is None:
            return {}
        return {"peft": {"method": a.cfg.method, "r": a.cfg.r, "merge": a.cfg.merge, "trainable_params": a.trainable,
                         "total_params": a.total, "base_masks": a.origin,
                         "base_sparsity": round(_sparsity(a.masks), 6)}}
