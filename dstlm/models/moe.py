"""Mixture-of-Experts MLP: token-choice top-k routing, capacity with token dropping (or dropless), Switch
load-balancing loss, router z-loss, optional shared expert; experts as batched [E, out, in] weights.

Shapes: N tokens (B*T flattened), C = n_embd, H = expert hidden width, E experts, k experts per token.
Routing (GShard/Switch order): a token's 1st choices are served before anyone's 2nd choices; within a
choice rank, tokens are served in sequence order; an expert takes at most
capacity = ceil(capacity_factor * N * k / E) assignments and drops the rest (dropless: no limit).
Dropped assignments contribute 0 (the residual connection carries the token on).

Expert parallelism (`expert_parallel_size` P > 1): routing stays local (so capacity, dropping and the aux
losses are exactly those of P = 1), then each rank sends every kept assignment to the rank of its group that
owns the expert (all-to-all), that rank runs its E/P experts on the tokens of the whole group, and a second
all-to-all brings the outputs back, where they are combined in expert order as without parallelism. The
all-to-alls are autograd functions, so each expert's gradient lands, whole, on its owner rank (zero on the
others); the strategy's ordinary data-parallel average of the full [E, out, in] gradient is then exactly
the gradient of P = 1. Parameters are stored and sharded by the strategy as without parallelism, so
checkpoints, masks and the sparse engine do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd

from dstlm.config_types import check_field_types


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings of a GPT (model.moe)."""

    num_experts: int = 4
    """Experts per MoE layer."""
    top_k: int = 1
    """Experts each token is routed to."""
    every: int = 2
    """Every n-th block is MoE (blocks n-1, 2n-1, ...; 1 = all blocks)."""
    capacity_factor: float = 1.25
    """Expert capacity = ceil(capacity_factor * tokens * top_k / num_experts); excess assignments dropped."""
    dropless: bool = False
    """No capacity limit: every assignment is computed."""
    aux_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss E * sum_e f_e P_e."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    shared_expert: bool = False
    """Add a dense MLP that every token passes through."""
    expert_hidden: Optional[int] = None
    """Hidden width of each expert (default: the dense MLP's)."""
    expert_parallel_size: int = 1
    """Ranks that split the expert computation (must divide num_experts and the world size): each rank of a
    group of this many computes num_experts/size experts for the tokens of the whole group (all-to-all
    dispatch). Storage stays with the strategy: replicated under DDP, sharded under ZeRO. 1 = every rank
    computes every expert for its own tokens."""

    def __post_init__(self) -> None:
        check_field_types(self, "model.moe")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts={self.num_experts!r} must be a positive integer")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"model.moe.every={self.every} must be >= 1")
        if not self.dropless and not self.capacity_factor > 0:
            raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0 (or set dropless: true)")
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError("model.moe.aux_loss_weight and z_loss_weight must be >= 0")
        if self.expert_parallel_size < 1 or self.num_experts % self.expert_parallel_size:
            raise ValueError(f"model.moe.num_experts={self.num_experts} is not divisible by "
                             f"expert_parallel_size={self.expert_parallel_size}; pick a divisor")

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.every == 0


def without_placement(value):
    """A model-config value (a MoEConfig or its dict) without expert_parallel_size: who computes which
    expert does not change the weights, so checkpoints compare equal across it. Other values unchanged."""
    if isinstance(value, MoEConfig):
        return dataclasses.replace(value, expert_parallel_size=1)
    if isinstance(value, dict) and "expert_parallel_size" in value:
        return {**value, "expert_parallel_size": 1}
    return value


@dataclass
class Routing:
    expert: torch.Tensor   # (N, k) expert index of each assignment
    gate: torch.Tensor     # (N, k) combine weight
    kept: torch.Tensor     # (N, k) bool: within capacity
    probs: torch.Tensor    # (N, E) router softmax
    capacity: int


def route(logits: torch.Tensor, top_k: int, capacity_factor: float, dropless: bool) -> Routing:
    """Top-k token-choice routing with capacity; logits (N, E) -> Routing (see the module docstring)."""
    N, E = logits.shape
    probs = logits.float().softmax(dim=-1)
    gate, expert = probs.topk(top_k, dim=-1)  # (N, k), ties -> lower expert index
    if top_k > 1:
        gate = gate / gate.sum(dim=-1, keepdim=True)  # renormalised over the chosen experts
    capacity = N * top_k if dropless else int(math.ceil(capacity_factor * N * top_k / E))
    # position of each assignment in its expert's queue: choice rank first, then sequence order
    onehot = F.one_hot(expert.t().reshape(-1), E)  # (k*N, E), rank-major
    position = (onehot.cumsum(dim=0) - 1).mul(onehot).sum(dim=-1).reshape(top_k, N).t()  # (N, k)
    kept = position < capacity
    return Routing(expert, gate.to(logits.dtype), kept, probs, capacity)


def load_balancing_loss(r: Routing, num_experts: int) -> torch.Tensor:
    """Switch Transformer: E * sum_e f_e * P_e, f_e the fraction of the N*k assignments that chose expert e
    (before dropping), P_e the mean router probability of e. 1.0 when perfectly balanced."""
    f = F.one_hot(r.expert.reshape(-1), num_experts).float().mean(dim=0)
    p = r.probs.mean(dim=0)
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class ExpertParallel:
    """This rank's place in its expert-parallel group: ranks [g*size, (g+1)*size) form group g, and the
    rank at position `rank` of a group computes experts [rank*E/size, (rank+1)*E/size)."""

    def __init__(self, group, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def __deepcopy__(self, memo):  # a copy of the model (e.g. for evaluation on one rank) computes alone
        return None

    @classmethod
    def create(cls, size: int) -> "ExpertParallel":
        """Create the process groups (a collective: every rank calls it, in the same order)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world % size:
            raise ValueError(f"model.moe.expert_parallel_size={size} does not divide the world size {world}; "
                             f"use a divisor of {world} (or 1)")
        me = dist.get_rank()
        mine = None
        for g in range(world // size):
            ranks = list(range(g * size, (g + 1) * size))
            group = dist.new_group(ranks)
            if me in ranks:
                mine = cls(group, ranks.index(me), size)
        return mine


def set_expert_parallel(model: nn.Module, ep: Optional[ExpertParallel]) -> int:
    """Attach (or with None detach) expert parallelism to every MoE layer of model; returns their number."""
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    for m in layers:
        m.ep = ep
    return len(layers)


@contextlib.contextmanager
def experts_alone(model: nn.Module):
    """Within: this process computes every expert itself (one rank evaluating or generating alone)."""
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    saved = [m.ep for m in layers]
    try:
        for m in layers:
            m.ep = None
        yield model
    finally:
        for m, ep in zip(layers, saved):
            m.ep = ep


class ExpertProjection:
    """The layout of one expert projection (`w_in`: C -> H, `w_out`: H -> C) stored as one plain
    [E, n_out, n_in] parameter on the MoE layer (no tensors here: they live on the layer). A model transform
    may store a projection otherwise by substituting a subclass (`MoEMLP.set_projection`), e.g. Sparse-IFT's
    branches or factors (dstlm/transforms/ift_experts.py)."""

    family: Optional[str] = None  # None: plain; else the transform's name for this layout

    def __init__(self, name: str, n_out: int, n_in: int) -> None:
        self.name, self.n_out, self.n_in = name, n_out, n_in

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Batched [E, ...] matrices of this projection: name -> per-expert [rows, cols]."""
        return {self.name: (self.n_out, self.n_in)}

    def sparse(self) -> list[str]:
        """The matrices DST may sparsify."""
        return list(self.shapes())

    def names(self) -> list[str]:
        """Every parameter this projection owns on the layer (matrices first)."""
        return list(self.shapes())

    def create(self, layer: nn.Module, E: int) -> None:
        for n, shape in self.shapes().items():
            layer.register_parameter(n, nn.Parameter(torch.empty(E, *shape)))

    @torch.no_grad()
    def reset(self, layer: nn.Module, std: float) -> None:
        nn.init.normal_(getattr(layer, self.name), 0.0, std)

    def apply(self, layer: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, n_in] -> expert e's projection [n, n_out]."""
        return x @ getattr(layer, self.name)[e].t()

    @torch.no_grad()
    def folded(self, layer: nn.Module) -> torch.Tensor:
        """The [E, n_out, n_in] dense weights this projection computes."""
        return getattr(layer, self.name).detach().clone()


class MoEMLP(nn.Module):
    """Drop-in for the dense MLP: router + E experts (GELU MLPs) with batched weights."""

    def __init__(self, n_embd: int, hidden: int, cfg: MoEConfig, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        E = cfg.num_experts
        self.cfg = cfg
        self.router = nn.Linear(n_embd, E, bias=False)
        self.router.dstlm_dense = True  # routers are never sparsified
        self.projections = [ExpertProjection("w_in", hidden, n_embd), ExpertProjection("w_out", n_embd, hidden)]
        for proj in self.projections:
            proj.create(self, E)
        self._index_params()
        self.b_in = nn.Parameter(torch.zeros(E, hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(E, n_embd)) if bias else None
        self.shared = None
        if cfg.shared_expert:
            self.shared = nn.Sequential(nn.Linear(n_embd, hidden, bias=bias), nn.GELU(approximate="tanh"),
                                        nn.Linear(hidden, n_embd, bias=bias))
        self.drop = nn.Dropout(dropout)
        self.ep: Optional[ExpertParallel] = None  # set by set_expert_parallel once processes are up
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.stats: dict[str, torch.Tensor] = {}

    def _index_params(self) -> None:
        # [E, ...] tensors: all (FLOP counts), the sparse ones (the engine sees each as E separate matrices),
        # and per-expert parameters that are never sparsified (factorized LayerNorms)
        self.batched_params = tuple(n for p in self.projections for n in p.shapes())
        self.sparse_batched = tuple(n for p in self.projections for n in p.sparse())
        self.dense_params = tuple(n for p in self.projections for n in p.names() if n not in p.shapes())

    @property
    def transformed(self) -> bool:
        return any(p.family is not None for p in self.projections)

    def set_projection(self, i: int, proj: ExpertProjection) -> None:
        """Store projection i in another layout: its parameters (and masks) are replaced by uninitialised
        ones of the new layout, kept in the canonical order (projections first, then biases)."""
        for n in self.projections[i].names():
            delattr(self, n)
            if f"{n}_mask" in self._buffers:
                delattr(self, f"{n}_mask")
        self.projections[i] = proj
        proj.create(self, self.cfg.num_experts)
        for n in [n for p in self.projections for n in p.names()] + [n for n in ("b_in", "b_out") if n in
                                                                      self._parameters]:
            self._parameters[n] = self._parameters.pop(n)  # re-insert in canonical order
        self._index_params()

    @torch.no_grad()
    def fold_experts(self) -> None:
        """Replace transformed expert projections by the plain [E, out, in] weights they compute (in place)."""
        for i, p in enumerate(self.projections):
            if p.family is None:
                continue
            folded = p.folded(self)
            self.set_projection(i, ExpertProjection(p.name, p.n_out, p.n_in))
            getattr(self, p.name).copy_(folded)

    def reset_experts(self, std: float, out_std: float) -> None:
        """GPT-2 init per expert: N(0, std) in, N(0, out_std) out (the residual-scaled std); transformed
        projections keep each expert's product at that scale."""
        self.projections[0].reset(self, std)
        self.projections[1].reset(self, out_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)
        if self.shared is not None:
            nn.init.normal_(self.shared[2].weight, 0.0, out_std)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.projections[0].apply(self, e, x)
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.projections[1].apply(self, e, F.gelu(h, approximate="tanh"))
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        logits = self.router(flat)
        r = route(logits, self.cfg.top_k, self.cfg.capacity_factor, self.cfg.dropless)
        out = torch.zeros_like(flat)
        if self.ep is not None and self.ep.size > 1:
            self._experts_parallel(flat, r, out)
        else:
            for e in range(self.cfg.num_experts):
                token, slot = torch.nonzero((r.expert == e) & r.kept, as_tuple=True)
                if token.numel():
                    y = self.expert_forward(e, flat[token]) * r.gate[token, slot].unsqueeze(-1)
                    out.index_add_(0, token, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_loss = load_balancing_loss(r, self.cfg.num_experts)
        self.z_loss = z_loss(logits)
        with torch.no_grad():
            self.stats = {"load": F.one_hot(r.expert[r.kept], self.cfg.num_experts).float().sum(0) / r.kept.numel(),
                          "dropped": 1.0 - r.kept.float().mean()}
        return self.drop(out.reshape(B, T, C))

    def _experts_parallel(self, flat: torch.Tensor, r: Routing, out: torch.Tensor) -> None:
        """Expert outputs through the expert-parallel group (see the module docstring); adds into out."""
        ep, E = self.ep, self.cfg.num_experts
        P, L = ep.size, E // ep.size
        picks = [torch.nonzero((r.expert == e) & r.kept, as_tuple=True) for e in range(E)]
        counts = torch.tensor([t.numel() for t, _ in picks], dtype=torch.int64, device=flat.device)
        recv_counts = torch.empty_like(counts)  # [source, my local expert] rows to receive
        dist.all_to_all_single(recv_counts, counts, group=ep.group)
        send_splits = counts.view(P, L).sum(1).tolist()
        recv_counts = recv_counts.view(P, L)
        recv_splits = recv_counts.sum(1).tolist()
        send = flat[torch.cat([t for t, _ in picks])]  # rows ordered by expert = by destination rank
        recv = all_to_all_autograd(send.new_empty(sum(recv_splits), flat.shape[1]), send,
                                   recv_splits, send_splits, group=ep.group)
        chunks = recv.split(recv_counts.flatten().tolist())  # chunk s*L + l: source s, local expert l
        results: list[Optional[torch.Tensor]] = [None] * (P * L)
        for j in range(L):  # one batch per local expert over the tokens of the whole group (possibly none)
            y = self.expert_forward(ep.rank * L + j, torch.cat([chunks[s * L + j] for s in range(P)]))
            for s, part in enumerate(y.split(recv_counts[:, j].tolist())):
                results[s * L + j] = part
        back = all_to_all_autograd(send.new_empty(send.shape[0], flat.shape[1]), torch.cat(results),
                                   send_splits, recv_splits, group=ep.group)
        for (token, slot), y in zip(picks, back.split(counts.tolist())):
            if token.numel():
                out.index_add_(0, token, (y * r.gate[token, slot].unsqueeze(-1)).to(out.dtype))
