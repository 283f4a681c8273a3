"""Fault injection for the fault tests: kill this process at a named point, once per run folder.

`DSTLM_FAULT=kill:rank=R:point=P:step=S` makes global rank R SIGKILL itself when it reaches point P at
optimizer step S (points: `save`, after this rank wrote its part of a checkpoint and before the checkpoint
is swapped in). It fires once: a marker in the run's checkpoint folder keeps a requeued or resumed run from
dying again at the same place. Unset (always, outside tests), nothing happens.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "DSTLM_FAULT"


def _spec() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    if not raw:
        return {}
    kind, *fields = raw.split(":")
    spec = dict(f.split("=", 1) for f in fields if "=" in f)
    if kind != "kill" or not {"rank", "point", "step"} <= spec.keys():
        raise ValueError(f"{ENV}={raw!r}: expected kill:rank=R:point=save:step=S")
    return spec


def fault_point(point: str, rank: int, step: int, folder: Path) -> None:
    """Die here if DSTLM_FAULT names this point, rank and step and has not fired for `folder` yet."""
    spec = _spec()
    if not spec or spec["point"] != point or int(spec["rank"]) != rank or int(spec["step"]) != step:
        return
    marker = Path(folder) / f".fault-fired-{point}-{rank}-{step}"
    if marker.exists():
        return
    marker.touch()
    print(f"dstlm: {ENV}: rank {rank} kills itself at {point} of step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
