"""The LM head and its cross-entropy, fused and computed chunk by chunk.

A GPT-2-sized model trained on 16 x 1024 tokens holds a (16384 x 50257) logits matrix: 1.6 GB in bf16, and
the usual `F.cross_entropy(logits.float(), ...)` adds an fp32 copy, the fp32 log-softmax kept for backward
and an fp32 gradient of the same size (about 10 GB of memory traffic per step and most of the activation
memory of the whole model). `linear_cross_entropy` never holds more than one chunk of logits: for each
chunk of tokens it computes the logits, the loss and, at once, the gradients for the hidden states and the
head weight (softmax minus one-hot is all the backward needs), then drops the logits. The backward pass
only scales the stored gradients by the incoming gradient. The matrix products are the same as the
unfused path (forward, grad-input and grad-weight per chunk), so the FLOPs do not change.

Precision follows the caller: under autocast the products run in the autocast dtype and the softmax in
fp32, as autocast does for the unfused path; without autocast everything runs in the inputs' dtype. The
head-weight gradient is accumulated over chunks in fp32. Targets equal to `ignore_index` do not count,
and the loss is their mean over the counted tokens (0 when none count, where the unfused loss is nan).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_TOKENS = 4096
"""Default tokens per chunk: about 0.8 GB of fp32 logits at GPT-2's vocabulary."""


def share_of_step(targets: torch.Tensor, counted_in_step, micro_batches: int) -> torch.Tensor:
    """The factor that turns one micro-batch's mean loss (over its counted targets) into its part of the mean
    over all `counted_in_step` targets of the optimizer step, when the step's gradient is the average over
    `micro_batches` (ranks x accumulated micro-batches) of the micro-batches' gradients."""
    here = (targets != IGNORE_INDEX).sum()
    return here * micro_batches / torch.as_tensor(counted_in_step).clamp_min(1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _chunks(n: int, chunk: int):
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """One chunk: its fp32 logits, their log-sum-exp, the safe target ids, the counted-token mask and the
    summed loss of the counted tokens."""
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    counted = t != IGNORE_INDEX
    safe = torch.where(counted, t, torch.zeros_like(t))
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(counted, lse - picked, torch.zeros_like(lse)).sum()
    return logits, lse, safe, counted, loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab: int, chunk: int, dtype: torch.dtype, need_h: bool, need_w: bool):
        w = weight[:vocab].to(dtype)  # rows past `vocab` are padding and are never a target
        hc = h.to(dtype)
        counted_total = (targets != IGNORE_INDEX).sum()
        inv = 1.0 / counted_total.clamp_min(1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s, e in _chunks(h.shape[0], chunk):
            logits, lse, safe, counted, chunk_loss = _chunk_logits(hc[s:e], w, targets[s:e])
            loss += chunk_loss
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / counted, zero for ignored tokens
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
            g.mul_((counted.to(torch.float32) * inv)[:, None])
            g = g.to(dtype)
            if need_h:
                grad_h[s:e] = (g @ w).to(h.dtype)
            if need_w:
                grad_w[:vocab] += (g.t() @ hc[s:e]).float()
            del logits, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss * inv

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int | None = None,
                         chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight[:vocab].T` against `targets` without materialising all logits.

    h: (N, C) hidden states; weight: (V_padded, C); targets: (N,) int64 with IGNORE_INDEX (-100) ignored;
    vocab: the real vocabulary (rows of `weight` past it are padding; default all rows); chunk: tokens per
    chunk (the peak extra memory is about chunk x vocab x 8 bytes).
    """
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be a positive number of tokens")
    vocab = weight.shape[0] if vocab is None else vocab
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        grad = torch.is_grad_enabled()
        need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
        if not (need_h or need_w):  # evaluation: the loss alone, still one chunk at a time
            w, hc = weight[:vocab].to(dtype), h.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s, e in _chunks(h.shape[0], chunk):
                total += _chunk_logits(hc[s:e], w, targets[s:e])[-1]
            return total / (targets != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        return _LinearCrossEntropy.apply(h, weight, targets, vocab, chunk, dtype, need_h, need_w)


class LMHead(nn.Linear):
    """The output projection over the padded vocabulary. `head(x)` gives logits over the real vocabulary;
    `head(x, targets)` gives the mean cross-entropy, fused and chunked when `chunk_tokens` > 0 (the plain
    full-logits path otherwise). The loss goes through this module's own forward so that strategies which
    gather parameters around a module's call (DeepSpeed ZeRO-3) see the head weight gathered."""

    def __init__(self, n_embd: int, padded_vocab: int, vocab: int) -> None:
        super().__init__(n_embd, padded_vocab, bias=False)
        self.vocab = vocab
        self.chunk_tokens = CHUNK_TOKENS

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)[..., : self.vocab]
        if self.chunk_tokens > 0:
            return linear_cross_entropy(x.flatten(0, -2), self.weight, targets.flatten(), self.vocab,
                                        self.chunk_tokens)
        logits = F.linear(x, self.weight)[..., : self.vocab]
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
