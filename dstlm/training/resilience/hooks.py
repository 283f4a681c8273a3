"""Named points of a training run where a plug-in may step in: fault drills (the fault tests fill these points
to kill a rank mid-save, make a loss NaN or flip a mask bit), instrumentation, chaos runs on a cluster. Nothing
happens at a point unless a handler is registered for it.

The points, and what a handler receives as keyword arguments (`value` is what it may replace by returning
something other than None):

- `loss`: after the forward of each micro-batch. `value` (the loss tensor), `rank`, `step`, `model`.
- `checkpoint_written`: this rank has written its part of a checkpoint, before the checkpoint is swapped in.
  `path` (the `.tmp` file or folder written), `folder` (the checkpoint folder), `rank`, `step`. An `OSError`
  raised here fails the save as a failed write does (the last good checkpoint stays).
- `masks_updated`: after the sparse engine's work of an optimizer step. `engine`, `rank`, `step`.

Handlers come from plug-ins: modules named in the environment variable DSTLM_PLUGINS (comma-separated, importable
on every rank), imported when a run first reaches a point; each calls `register(point, handler)` when imported.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

ENV = "DSTLM_PLUGINS"
POINTS = ("loss", "checkpoint_written", "masks_updated")

_handlers: dict[str, list[Callable[..., Any]]] = {p: [] for p in POINTS}
_imported: set[str] = set()
_plugins_env: str | None = None  # the DSTLM_PLUGINS value whose modules are imported


def register(point: str, handler: Callable[..., Any]) -> Callable[[], None]:
    """Call `handler(value=..., **context)` at `point` from now on; returns a function that unregisters it."""
    if point not in _handlers:
        raise ValueError(f"hooks.register: no point {point!r}; the points are {', '.join(POINTS)}")
    _handlers[point].append(handler)
    return lambda: _handlers[point].remove(handler)


def _import_plugins() -> None:
    global _plugins_env
    value = os.environ.get(ENV, "")
    if value == _plugins_env:  # the common case, every step: nothing new to import
        return
    for name in filter(None, (n.strip() for n in value.split(","))):
        if name in _imported:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise RuntimeError(f"{ENV} names {name!r}, which cannot be imported ({e}); put its folder on "
                               f"PYTHONPATH or remove it from {ENV}") from None
        _imported.add(name)
    _plugins_env = value


def fire(point: str, value: Any = None, **context: Any) -> Any:
    """Run the handlers of `point` in the order they registered; returns `value`, replaced by each handler
    that returns something other than None."""
    _import_plugins()
    for handler in _handlers[point]:
        out = handler(value=value, **context)
        if out is not None:
            value = out
    return value
