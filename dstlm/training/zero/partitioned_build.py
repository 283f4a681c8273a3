"""Building a model for ZeRO-3 without a whole copy on any rank (`trainer.zero_init`).

The usual ZeRO-3 start (docs/distributed.md) builds the whole fp32 model on every rank and lets
`deepspeed.initialize` partition it: 4 bytes per parameter per rank at start-up, 28 GB for 7B. Here the
model is built so that each rank only ever holds its own partition of each parameter (plus, transiently,
one parameter whole), and the result is bit-identical to the whole build:

- every parameter a module registers while the model is built becomes a placeholder on the meta device
  (the full shape, no storage); the rank keeps its DeepSpeed partition of the values on the side;
- every write to a placeholder (the modules' own construction-time init, `GPT.reset_parameters`, a
  transform's re-init, the sparse engine's masking and rescale) is run on a scratch tensor of the full
  shape, on the CPU generator exactly as the whole build runs it, and only the rank's slice is kept.
  Writes that read the old values (`mul_`, `copy_`, ...) are applied to the slice alone, their tensor
  operands sliced the same way; anything else that would read a placeholder's values stops with the
  operation named (it could not be answered without the whole tensor);
- at the end each placeholder becomes a DeepSpeed ZeRO-3 parameter holding that slice (`ds_tensor`),
  which `deepspeed.initialize` then adopts as it would a `deepspeed.zero.Init` build.

Random draws are those of the whole build because the same init function runs on a tensor of the same
shape, dtype and device: the generator advances identically. Peak memory is one parameter whole (the
scratch) on top of the rank's partitions and the model's buffers (masks included).

Pretrained weights (a Hugging Face source) are read into the slices by `load_slices`, each rank reading only
the rows that hold its entries. First masks that rank weights (mask_init=magnitude) are decided on the
slices by the sparse engine's sharded selection (`local_values` and the build's `all_reduce`), the same masks
as the whole build's.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# in-place element-wise operations a slice can answer alone (tensor operands are sliced alike)
_ELEMENTWISE = {"mul_", "div_", "add_", "sub_", "copy_", "clamp_", "masked_fill_", "__imul__", "__iadd__",
                "__isub__", "__itruediv__"}
# in-place Tensor methods that overwrite every entry without reading it
_OVERWRITE = {"normal_", "uniform_", "zero_", "fill_", "random_", "bernoulli_", "exponential_", "cauchy_",
              "log_normal_", "geometric_"}
# what may be asked of a placeholder without its values: metadata, and views (whose values are never read:
# a write to a view of a placeholder is refused below)
_METADATA = {"__get__", "__set__", "size", "dim", "numel", "stride", "is_contiguous", "requires_grad_",
             "__hash__", "__len__", "t", "view", "reshape", "contiguous", "__getitem__",
             "detach", "transpose", "permute", "unsqueeze", "squeeze", "expand", "data_ptr", "element_size",
             "type", "__repr__", "__format__", "__reduce_ex__", "__setstate__", "_is_view", "untyped_storage",
             "storage_offset", "is_floating_point", "is_complex", "get_device", "dtype", "device", "shape",
             "__deepcopy__"}


def partition_range(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(partition size, start, length) of rank's entries of a flat parameter under DeepSpeed ZeRO-3:
    every rank holds ceil(numel / world) slots; the last ranks' slots run past the end (padding)."""
    size = -(-numel // world)
    start = min(numel, rank * size)
    return size, start, min(numel, start + size) - start


class _Held:
    """The rank's slice of one placeholder parameter."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, rank: int, world: int) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        numel = math.prod(shape)
        self.size, self.start, self.length = partition_range(numel, rank, world)
        self.values = torch.zeros(self.size, dtype=dtype, device=device)  # padding stays zero

    def local(self) -> torch.Tensor:
        return self.values[: self.length]

    def slice_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a tensor broadcastable to the parameter's shape (copied only as needed)."""
        whole = whole.to(self.device)
        if tuple(whole.shape) != tuple(self.shape):
            whole = whole.expand(self.shape)
        return whole.reshape(-1)[self.start: self.start + self.length]


class PartitionedBuild(TorchFunctionMode):
    """Active while a model is built: parameters become placeholders and writes to them keep only the slice
    of rank `rank` of `world` (see the module docstring). Use `building()`, then `to_zero3(ctx)`."""

    _active: Optional["PartitionedBuild"] = None

    def __init__(self, rank: int, world: int,
                 all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """`all_reduce`: an in-place sum over the `world` ranks building together (decisions that rank the
        weights, e.g. magnitude masks, need it; without one they are refused)."""
        super().__init__()
        self.rank, self.world = rank, world
        self.all_reduce = all_reduce
        self.held: dict[int, tuple[weakref.ref, _Held]] = {}
        self.peak_scratch = 0  # bytes of the largest parameter held whole at once (the scratch)

    @classmethod
    def active(cls) -> Optional["PartitionedBuild"]:
        """The build a model is being built under right now (inside `building()`), else None."""
        return cls._active

    # -- placeholders ---------------------------------------------------------------------------------
    def _placeholder(self, param: nn.Parameter) -> nn.Parameter:
        if param is None or param.is_meta or id(param) in self.held:
            return param
        meta = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                            requires_grad=param.requires_grad)
        key = id(meta)
        # held by a weak reference: a parameter the model drops while it is built (e.g. a head's own weight
        # replaced by the tied embedding) frees its slice with it
        self.held[key] = (weakref.ref(meta), _Held(param.shape, param.dtype, param.device, self.rank, self.world))
        weakref.finalize(meta, self.held.pop, key, None)
        return meta

    @contextmanager
    def building(self) -> Iterator["PartitionedBuild"]:
        """Parameters registered inside become placeholders; writes to them are partitioned."""
        original = nn.Module.register_parameter
        build = self

        def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
            original(module, name, build._placeholder(param) if isinstance(param, nn.Parameter) else param)

        nn.Module.register_parameter = register_parameter
        PartitionedBuild._active = self
        try:
            with self:
                yield self
        finally:
            nn.Module.register_parameter = original
            PartitionedBuild._active = None

    def _find(self, t: Any) -> Optional[_Held]:
        entry = self.held.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def local_values(self, param: torch.Tensor) -> Optional[tuple[int, torch.Tensor]]:
        """(start, values) of this rank's slice of a placeholder: its entries start..start+len(values) of the
        parameter's flat index, as currently built; None for anything else."""
        held = self._find(param)
        return None if held is None else (held.start, held.local())

    @torch.no_grad()
    def load_slices(self, model: nn.Module, read: Callable[[str, int, int], Optional[torch.Tensor]],
                    source: str) -> None:
        """Overwrite the slice of every placeholder of `model` with stored values: `read(name, start, length)`
        returns entries start..start+length of the stored tensor `name` (flat), or None when it has no such
        tensor. A parameter under several names (tied weights) is read under the first name stored. Every
        placeholder must be found: one missing stops with its name (a model built whole would have kept the
        fresh initialisation there, silently)."""
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if self._find(p) is not None:
                names.setdefault(id(p), []).append(name)
        for _, p, held in self.parameters(model):
            for name in names[id(p)]:
                values = read(name, held.start, held.length)
                if values is not None:
                    held.local().copy_(values.reshape(-1))
                    break
            else:
                raise ValueError(f"{source} holds no weights for {' / '.join(names[id(p)])}; trainer.zero_init reads "
                                 f"every parameter from the stored weights (build whole with trainer.zero_init=false)")

    # -- the interception -----------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        held = self._find(target)
        name = getattr(func, "__name__", str(func))
        if held is None:
            self._refuse_lost_access(name, args, kwargs)
            return func(*args, **kwargs)
        module = getattr(func, "__module__", "") or ""
        if module.startswith("torch.nn.init") or name in _OVERWRITE:
            return self._overwrite(func, target, held, args, kwargs)
        if name in _ELEMENTWISE:
            operands = [held.slice_of(a) if isinstance(a, torch.Tensor) else a for a in args[1:]]
            kw = {k: held.slice_of(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.no_grad():
                getattr(held.local(), name)(*operands, **kw)
            return target
        if name in _METADATA:
            return func(*args, **kwargs)
        raise NotImplementedError(
            f"trainer.zero_init: {name} reads a parameter of shape {tuple(held.shape)} while the model is built, "
            f"and only this rank's partition of it exists; build this model whole (trainer.zero_init=false)")

    def _overwrite(self, func, target, held: _Held, args, kwargs):
        scratch = torch.empty(held.shape, dtype=held.dtype, device=held.device)
        self.peak_scratch = max(self.peak_scratch, scratch.numel() * scratch.element_size())
        if args:
            args = (scratch,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, "tensor": scratch}
        with torch.no_grad():
            func(*args, **kwargs)
            held.local().copy_(held.slice_of(scratch))
        del scratch
        return target

    def _refuse_lost_access(self, name: str, args, kwargs) -> None:
        """A placeholder passed as an operand would be read as meta (no values), and a write to a view of
        one would be lost: both are refused by name."""
        operands = list(args[1:]) + list(kwargs.values())
        read = next((self._find(a) for a in operands if self._find(a) is not None), None)
        if read is not None and name not in _METADATA:
            raise NotImplementedError(
                f"trainer.zero_init: {name} reads a parameter of shape {tuple(read.shape)} while the model is "
                f"built, and only this rank's partition of it exists; build this model whole (trainer.zero_init=false)")
        first = args[0] if args else None
        in_place = (name.endswith("_") and not name.startswith("__")) or name in _ELEMENTWISE
        if in_place and isinstance(first, torch.Tensor) and first.is_meta and first._base is not None \
                and self._find(first._base) is not None:
            raise NotImplementedError(
                f"trainer.zero_init: {name} writes to a view of a parameter while the model is built, which a "
                f"partitioned build cannot do; write to the parameter itself or set trainer.zero_init=false")

    # -- the end: DeepSpeed ZeRO-3 parameters ---------------------------------------------------------
    def parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter, _Held]]:
        out, seen = [], set()
        for name, p in model.named_parameters(remove_duplicate=False):
            held = self._find(p)
            if held is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p, held))
        return out

    @torch.no_grad()
    def to_zero3(self, model: nn.Module, convert: Callable[[nn.Parameter], None],
                 fragment: Callable[[nn.Parameter], tuple[int, int]]) -> None:
        """Make every placeholder of `model` a ZeRO-3 parameter holding this rank's slice. `convert(param)`
        turns a parameter holding (at least) the rank's entries into a partitioned one; `fragment(param)`
        reads back (start, length) of the partition it made, which must be the slice kept here."""
        real: dict[int, nn.Parameter] = {}
        for name, p, held in self.parameters(model):
            whole = torch.empty(held.shape, dtype=held.dtype, device=held.device)  # untouched pages stay unmapped
            whole.reshape(-1)[held.start: held.start + held.length].copy_(held.local())
            param = nn.Parameter(whole, requires_grad=p.requires_grad)  # a meta tensor cannot take data in place
            del whole
            convert(param)
            start, length = fragment(param)
            if (start, length) != (held.start, held.length) or param.ds_tensor.ds_numel != held.size:
                raise RuntimeError(f"trainer.zero_init: DeepSpeed partitioned {name} as ({start}, {length}) of "
                                   f"{param.ds_tensor.ds_numel}, not ({held.start}, {held.length}) of {held.size}")
            param.ds_tensor.copy_(held.values.to(param.ds_tensor.device, param.ds_tensor.dtype))
            held.values = held.values.new_empty(0)  # the partition now lives in ds_tensor: never hold both at once
            real[id(p)] = param
        for module in model.modules():  # every place a placeholder sits (tied weights: several)
            for key, p in module._parameters.items():
                if p is not None and id(p) in real and self._find(p) is not None:
                    module._parameters[key] = real[id(p)]
        self.held.clear()
