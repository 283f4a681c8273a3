"""The fault tests' plug-in: fault injection through dstlm's hook points (dstlm/training/resilience/hooks.py).
Rank processes load it with DSTLM_PLUGINS=helpers.faults (tests/ on PYTHONPATH); importing it registers the
handlers, which do nothing unless DSTLM_FAULT names a fault:

- `DSTLM_FAULT=kill:rank=R:point=save:step=S`: global rank R SIGKILLs itself after writing its part of the
  step-S checkpoint, before the checkpoint is swapped in. It fires once: a marker in the run's checkpoint
  folder keeps a requeued or resumed run from dying again at the same place.
- `DSTLM_FAULT=nan:rank=R:point=loss:step=S`: rank R's training loss at optimizer step S becomes NaN.
- `DSTLM_FAULT=nan:rank=R:point=grad:step=S`: rank R's gradient of the first weight at step S becomes NaN (the
  loss stays finite). S may list several steps: step=12,14.
- `DSTLM_FAULT=enospc:rank=R:point=save:step=S`: rank R's write of the step-S checkpoint stops halfway with
  "No space left on device" (what a full disk does; the tests use a real small filesystem where they may mount).
- `DSTLM_FAULT=flip:rank=R:point=mask:step=S`: after optimizer step S, rank R flips the first entry of its first
  sparse mask (a bit error, or a rank that ran other code): the masks of the ranks no longer agree.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from dstlm.training.resilience import hooks

ENV = "DSTLM_FAULT"
PLUGIN_ENV = {hooks.ENV: "helpers.faults", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _spec() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    if not raw:
        return {}
    kind, *fields = raw.split(":")
    spec = dict(f.split("=", 1) for f in fields if "=" in f)
    if kind not in ("kill", "nan", "flip", "enospc") or not {"rank", "point", "step"} <= spec.keys():
        raise ValueError(f"{ENV}={raw!r}: expected kill:rank=R:point=save:step=S, nan:rank=R:point=loss:step=S, "
                         f"enospc:rank=R:point=save:step=S or flip:rank=R:point=mask:step=S")
    return {"kind": kind, **spec}


def _matches(kind: str, point: str, rank: int, step: int) -> bool:
    spec = _spec()
    return bool(spec) and spec["kind"] == kind and spec["point"] == point and int(spec["rank"]) == rank \
        and str(step) in spec["step"].split(",")


def fault_value(point: str, rank: int, step: int, value):
    """`value` made NaN if DSTLM_FAULT names this point, rank and step."""
    return value * float("nan") if _matches("nan", point, rank, step) else value


def fault_grad(point: str, rank: int, step: int, module) -> None:
    """If DSTLM_FAULT names this point, rank and step: the next backward gives the module's first trainable
    parameter a NaN gradient (a hook that removes itself on the next call)."""
    old = getattr(module, "_dstlm_fault_hook", None)
    if old is not None:
        old.remove()
        module._dstlm_fault_hook = None
    if _matches("nan", point, rank, step):
        param = next(p for p in module.parameters() if p.requires_grad)
        module._dstlm_fault_hook = param.register_hook(lambda g: g * float("nan"))


def fault_disk_full(point: str, rank: int, step: int, written: str) -> None:
    """If DSTLM_FAULT names this point, rank and step: cut what was just written to half and fail as a full
    disk does."""
    if not _matches("enospc", point, rank, step):
        return
    path = Path(written)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        os.truncate(f, f.stat().st_size // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fault_point(point: str, rank: int, step: int, folder: Path) -> None:
    """Die here if DSTLM_FAULT names this point, rank and step and has not fired for `folder` yet."""
    if not _matches("kill", point, rank, step):
        return
    marker = Path(folder) / f".fault-fired-{point}-{rank}-{step}"
    if marker.exists():
        return
    marker.touch()
    print(f"dstlm: {ENV}: rank {rank} kills itself at {point} of step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _on_loss(value, rank: int, step: int, model, **_):
    fault_grad("grad", rank, step, model)
    return fault_value("loss", rank, step, value)


def _on_checkpoint_written(value, path: str, folder: Path, rank: int, step: int, **_) -> None:
    fault_disk_full("save", rank, step, path)
    fault_point("save", rank, step, folder)


def _on_masks_updated(value, engine, rank: int, step: int, **_) -> None:
    """Flip the first entry of the first whole sparse mask (partitioned masks are left alone)."""
    if _matches("flip", "mask", rank, step) and not engine.partitioned:
        flat = engine.params[0].full_mask.view(-1)
        flat[0] = ~flat[0]
        print(f"dstlm: {ENV}: rank {rank} flips an entry of its mask after step {step}", flush=True)


hooks.register("loss", _on_loss)  # on import: Python imports a module once per process
hooks.register("checkpoint_written", _on_checkpoint_written)
hooks.register("masks_updated", _on_masks_updated)
