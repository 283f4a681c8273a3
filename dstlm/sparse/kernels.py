"""dstlm's compiled CPU ops (the condensed constant-fan-in layer), built at first use into the project's
cache like DeepSpeed's ops: `torch.utils.cpp_extension.load` with the instruction set this CPU offers.

When the build cannot run (no C++ compiler, no ninja) the condensed layer falls back to a PyTorch path and
says so once; `DSTLM_CONDENSED_KERNEL=0` chooses the fallback without trying.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from dstlm.paths import extensions_dir

SOURCE = Path(__file__).resolve().parent / "csrc" / "condensed.cpp"
# compile for the vector ISA torch itself dispatches to here, named so (not -march=native: a cache shared
# between machines of one ISA level must run on all of them)
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
_state: dict[str, Optional[ModuleType]] = {}


def isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def condensed_ops() -> Optional[ModuleType]:
    """The compiled module (forward, backward, csc), or None when it is switched off or did not build."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
    return _state["ops"]


def _build() -> Optional[ModuleType]:
    if os.environ.get("DSTLM_CONDENSED_KERNEL", "1") == "0":
        return None
    level = isa()
    name = f"dstlm_condensed_{level.lower()}"
    build_dir = extensions_dir() / name
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        return load(name=name, sources=[str(SOURCE)], build_directory=str(build_dir), verbose=False,
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast", *ISA_FLAGS.get(level, [])],
                    extra_ldflags=["-fopenmp"])
    except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback, and say why
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        warnings.warn(f"dstlm: the condensed CPU kernel did not build ({first[:200]}); condensed layers use the "
                      f"slower PyTorch path. Fix: install a C++ compiler and ninja (apt-get install g++ ninja-build), "
                      f"or set DSTLM_CONDENSED_KERNEL=0 to choose the fallback quietly", stacklevel=3)
        return None
