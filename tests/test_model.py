import math

import pytest
import torch

from dstlm.models import GPT, GPTConfig, available_presets, load_preset
from dstlm.training.loop.module import lr_lambda, param_groups
from dstlm.training.config import OptimConfig


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes(pos_emb, tie):
    torch.manual_seed(0)
    m = GPT(tiny(pos_emb=pos_emb, tie_embeddings=tie, bias=True))
    idx = torch.randint(0, 100, (3, 16))
    logits = m(idx)
    assert logits.shape == (3, 16, 100)  # padded vocab (128) is sliced back to the real vocab
    assert (m.lm_head.weight is m.wte.weight) == tie
    loss = m.loss(idx, idx)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # at init the loss is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(100)) < 0.5


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_causality(pos_emb):
    """Changing token t+1 never changes the logits at positions <= t."""
    torch.manual_seed(0)
    m = GPT(tiny(pos_emb=pos_emb)).eval()
    idx = torch.randint(0, 100, (1, 16))
    base = m(idx)
    for t in range(15):
        changed = idx.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 100
        out = m(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = tiny(n_embd=64, n_layer=8, n_head=4)
    m = GPT(cfg)
    assert m.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].mlp.fc_out.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)


def test_weight_decay_groups_exclude_norms_biases_embeddings():
    m = GPT(tiny(bias=True, tie_embeddings=True))
    decay, no_decay = param_groups(m, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(m.wte.weight) not in decay_ids and id(m.lm_head.weight) not in decay_ids
    assert id(m.blocks[0].ln_1.weight) not in decay_ids and id(m.blocks[0].attn.q_proj.bias) not in decay_ids
    assert id(m.blocks[0].attn.q_proj.weight) in decay_ids
    n = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n == sum(p.numel() for p in m.parameters())  # every parameter exactly once
    assert no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)


def test_presets_load_and_sizes():
    names = available_presets()
    assert {"nano", "tiny", "small", "gpt2-124m", "gpt-1b"} <= set(names)
    with torch.device("meta"):
        n_tiny = GPT(load_preset("tiny")).num_params(non_embedding=False)
        n_124 = GPT(load_preset("gpt2-124m")).num_params(non_embedding=False)
        n_1b = GPT(load_preset("gpt-1b")).num_params(non_embedding=False)
    assert 1e6 <= n_tiny <= 5e6
    assert 123e6 <= n_124 <= 126e6  # GPT-2 small: 124.4 M with the padded vocabulary
    assert 0.9e9 <= n_1b <= 1.5e9


def test_bad_model_config():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        load_preset("huge")
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by model.n_head=4"):
        tiny(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer=0"):
        tiny(n_layer=0)
    m = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds model.block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_decoding_equals_full_forward(pos_emb, moe):
    """Prompt into a KVCache, then one token per forward: the logits of every position equal one forward of the
    whole sequence; generate() gives the same tokens with and without the cache, also past block_size (where
    the window slides and the cache is dropped)."""
    from dstlm.models.gpt import KVCache
    from dstlm.models.moe import MoEConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, pos_emb=pos_emb, bias=True,
                    moe=MoEConfig(num_experts=4, top_k=2, every=2, dropless=True) if moe else None)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache()
        steps = [model(idx[:, :8], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20
    with pytest.raises(ValueError, match="one token per forward"):
        model(idx[:, :2], cache=cache)
    a = model.generate(idx[:, :10], 30, temperature=0)  # 40 tokens: past block_size 24
    b = model.generate(idx[:, :10], 30, temperature=0, use_cache=False)
    assert torch.equal(a, b)
