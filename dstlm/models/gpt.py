"""A decoder-only GPT in plain torch, readable top to bottom.

Shapes in comments: B batch, T time (tokens), C = n_embd, nh = n_head, hs = C // nh, V vocab.
Pre-norm blocks, causal scaled-dot-product attention, RoPE or learned positions, optional biases,
optional tied input/output embeddings, GPT-2 style initialisation (residual projections scaled by
1/sqrt(2 * n_layer)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.config_types import check_field_types
from dstlm.models.lm_loss import LMHead
from dstlm.models.moe import MoEConfig, MoEMLP


@dataclass
class GPTConfig:
    """Shape and behaviour of the GPT. Presets live in configs/model/*.yaml."""

    vocab_size: int = 4096
    """Number of token ids the embedding accepts (padded up to a multiple of 64 internally)."""
    block_size: int = 256
    """Longest context (tokens) the model supports; the data block size must not exceed it."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; n_embd must be divisible by it."""
    n_embd: int = 256
    """Residual stream width."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of n_embd."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""
    bias: bool = False
    """Biases in linear layers and LayerNorms."""
    pos_emb: Literal["rope", "learned"] = "rope"
    """Rotary position embedding in attention, or a learned absolute position table."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    moe: Optional[MoEConfig] = None
    """Mixture-of-Experts MLPs in every `moe.every`-th block (configs/model/tiny-moe.yaml); None = dense."""

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"pick n_embd as a multiple of n_head"
            )
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd/n_head={self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.mlp_ratio <= 0 or int(self.mlp_ratio * self.n_embd) < 1:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must give at least one MLP hidden unit "
                             f"(mlp_ratio x n_embd >= 1); GPT-2 uses 4.0")
        if self.rope_base <= 0:
            raise ValueError(f"model.rope_base={self.rope_base} must be positive (10000 is usual)")
        if not 0 < self.init_std <= 1:
            raise ValueError(f"model.init_std={self.init_std} must be in (0, 1] (GPT-2 uses 0.02)")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not any(self.moe.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(f"model.moe.every={self.moe.every} with model.n_layer={self.n_layer} makes no layer a "
                             f"mixture of experts (every N-th layer is one); lower moe.every or raise n_layer")

    @property
    def padded_vocab_size(self) -> int:
        return ((self.vocab_size + 63) // 64) * 64

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.n_embd)

    def to_dict(self) -> dict:
        return asdict(self)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotary position embedding (rotate-half convention)."""

    def __init__(self, head_size: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hs/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
        # not persistent: derived from the config, so checkpoints stay small and portable
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # x: (B, nh, T, hs) at positions start .. start + T - 1
        T = x.size(-2)
        cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_size = cfg.n_embd // cfg.n_head
        # separate q/k/v projections so each is its own [out, in] weight for sparsification
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.rope = (
            RotaryEmbedding(self.head_size, cfg.block_size, cfg.rope_base) if cfg.pos_emb == "rope" else None
        )

    def forward(self, x: torch.Tensor, cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        start = cache.length if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # new tokens attend to every cached one: causal among themselves, which for one token is no mask
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.out_proj(y))


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding (`GPT.generate`). Filled by a
    first forward of the prompt, then one token per forward."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0  # tokens cached (the position of the next one)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)  # (C -> 4C)
        self.fc_out = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)  # (4C -> C)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig, moe: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        if moe:
            hidden = cfg.moe.expert_hidden or cfg.mlp_hidden
            self.mlp = MoEMLP(cfg.n_embd, hidden, cfg.moe, bias=cfg.bias, dropout=cfg.dropout)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def linear_layer_names(cfg: GPTConfig) -> list[str]:
    """Names of the dense block projections (the layers Sparse-IFT acts on; MoE blocks have no dense MLP)."""
    attn = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj")
    names = []
    for i in range(cfg.n_layer):
        moe = cfg.moe is not None and cfg.moe.is_moe_layer(i)
        names += [f"blocks.{i}.{n}" for n in attn + (() if moe else ("mlp.fc_in", "mlp.fc_out"))]
    return names


def expert_layer_names(cfg: GPTConfig) -> dict[str, tuple[int, str]]:
    """Sparse-IFT selects MoE experts with the MLP's names: `blocks.<i>.mlp.fc_in` (fc_out) of a MoE block
    stands for its experts' w_in (w_out). Name -> (block index, expert projection)."""
    if cfg.moe is None:
        return {}
    return {f"blocks.{i}.mlp.{fc}": (i, w) for i in range(cfg.n_layer) if cfg.moe.is_moe_layer(i)
            for fc, w in (("fc_in", "w_in"), ("fc_out", "w_out"))}


def dense_layer_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of every block projection of a dense GPT with this config."""
    C, H = cfg.n_embd, cfg.mlp_hidden
    shapes = {"attn.q_proj": (C, C), "attn.k_proj": (C, C), "attn.v_proj": (C, C), "attn.out_proj": (C, C),
              "mlp.fc_in": (H, C), "mlp.fc_out": (C, H)}
    return {n: shapes[n.split(".", 2)[2]] for n in linear_layer_names(cfg)}


class GPT(nn.Module):
    """The model of `cfg`. Model transforms (dstlm/transforms, e.g. Sparse-IFT) are applied by
    dstlm.build.build_model, which builds with init=False, swaps modules, then calls reset_parameters()."""

    def __init__(self, cfg: GPTConfig, init: bool = True) -> None:
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.wte = nn.Embedding(V, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, moe=cfg.moe is not None and cfg.moe.is_moe_layer(i))
                                    for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = LMHead(cfg.n_embd, V, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std) for linears/embeddings, residual projections scaled by 1/sqrt(2L). A module
        that stands in for a dense linear (e.g. a Sparse-IFT family) provides `init_as_dense(std)`: it then
        computes outputs at the scale of a dense linear initialised with that std."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if hasattr(module, "init_as_dense"):
                module.init_as_dense(std)
        for block in self.blocks:
            scaled = std / math.sqrt(2 * self.config.n_layer)
            if isinstance(block.mlp, MoEMLP):
                block.mlp.reset_experts(std, scaled)
            for proj in (block.attn.out_proj, getattr(block.mlp, "fc_out", None)):
                if proj is None:
                    continue
                if hasattr(proj, "init_as_dense"):
                    proj.init_as_dense(scaled)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=scaled)

    def unit_links(self) -> list[tuple[str, str]]:
        """(producer, consumer) weight-matrix names whose producer row i and consumer column i meet in one hidden
        unit: MLP fc_in / fc_out, attention v_proj / out_proj (attention mixes positions, not channels), and each
        expert's w_in.e / w_out.e (a batched [E, out, in] parameter's matrix e is named `<param>.e`). Layers a
        transform replaced (other names, or expert projections in another layout) are not listed."""
        pairs = []
        for i, block in enumerate(self.blocks):
            b = f"blocks.{i}"
            pairs.append((f"{b}.attn.v_proj.weight", f"{b}.attn.out_proj.weight"))
            if isinstance(block.mlp, MoEMLP):
                if all(p.family is None for p in block.mlp.projections):
                    pairs += [(f"{b}.mlp.w_in.{e}", f"{b}.mlp.w_out.{e}") for e in range(block.mlp.cfg.num_experts)]
            else:
                pairs.append((f"{b}.mlp.fc_in.weight", f"{b}.mlp.fc_out.weight"))
        return pairs

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """idx: (B, T) int64 token ids -> logits (B, T, V) over the real (unpadded) vocabulary; with targets
        (B, T) (-100 ignored) -> the mean next-token cross-entropy instead, through the LM head's fused,
        chunked loss (`lm_head.chunk_tokens`), so the full logits are never held. With a `cache`, idx are the
        tokens after the cached ones (the whole prompt first, then one at a time), and the cache grows."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds model.block_size={self.config.block_size}")
        if cache is not None and start and T > 1:
            raise ValueError("a KVCache takes the prompt in its first forward, then one token per forward")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.ln_f(x), targets)  # (B, T, V) logits, or the loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, with_aux: bool = True) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T) with -100 ignored. MoE models add their weighted
        load-balancing and z-losses (averaged over MoE layers) unless with_aux is False."""
        ce = self(idx, targets)
        if not with_aux or self.config.moe is None:
            return ce
        aux, z = self.moe_losses()
        return ce + self.config.moe.aux_loss_weight * aux + self.config.moe.z_loss_weight * z

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEMLP)]

    def moe_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Load-balancing and z-loss of the last forward, averaged over the MoE layers."""
        layers = self.moe_layers()
        return (torch.stack([m.aux_loss for m in layers]).mean(), torch.stack([m.z_loss for m in layers]).mean())

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(param_numel(p) for p in self.parameters())  # ZeRO-3: a partitioned parameter's whole size
        if non_embedding:
            n -= param_numel(self.wte.weight)
            if self.wpe is not None:
                n -= param_numel(self.wpe.weight)
            if not self.config.tie_embeddings:
                n -= param_numel(self.lm_head.weight)
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6N + 12·L·H·Q·T (nanoGPT/PaLM convention, N = non-embedding
        matmul parameters plus the LM head)."""
        cfg = self.config
        n = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        hs = cfg.n_embd // cfg.n_head
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * hs * cfg.block_size

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: Optional[KVCache]) -> tuple[torch.Tensor, Optional[KVCache]]:
        """Logits (B, V) of the token after idx (B, T), and the cache to pass with the next call: idx must be the
        previous call's idx plus one token. The cache (None: no caching) takes the prompt, then one token per
        call; once the context fills model.block_size the window slides and the last block_size tokens are
        recomputed each call."""
        n = self.config.block_size
        if cache is not None and cache.length and cache.length < n:
            return self(idx[:, -1:], cache=cache)[:, -1, :], cache
        ctx = idx[:, -n:]
        if cache is not None and ctx.size(1) < n:
            cache = KVCache()  # the prompt, into a fresh cache
            return self(ctx, cache=cache)[:, -1, :], cache
        return self(ctx)[:, -1, :], cache

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Sample continuation tokens; idx (B, T) -> (B, T + max_new_tokens). temperature 0 = greedy. With
        `use_cache` (default) the keys and values of past tokens are kept (a KVCache), so each new token runs
        one row through the layers; once the context fills model.block_size the window slides and every token
        is recomputed over the last block_size tokens (as without a cache). Capacity-limited MoE layers then
        route one token at a time, so they drop none (a whole-context forward may drop some: dropless MoE
        gives the same tokens either way)."""
        cache = KVCache() if use_cache else None
        for _ in range(max_new_tokens):
            logits, cache = self.next_logits(idx, cache)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def param_numel(p) -> int:
    """A parameter's number of entries, also when ZeRO-3 holds only a partition of it (ds_numel)."""
    return getattr(p, "ds_numel", None) or p.numel()
