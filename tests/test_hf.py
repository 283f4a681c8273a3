"""Hugging Face causal LMs as the model source: the sparse adapter (Linear, GPT-2's Conv1D, fused experts),
its manifest, first masks for pretrained weights (magnitude, Wanda), export back to a plain HF folder and
resume from it, bad input, and DST invariants on 2 ranks (DDP, ZeRO-2/3)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_run

from dstlm.hf.model import load_hf_model
from dstlm.hf.source import MASKS_FILE, HFModelConfig
from dstlm.sparse import SparseEngine, SparsityConfig


def _engine(model, **kw) -> SparseEngine:
    return SparseEngine(model, SparsityConfig(**kw), seed=0, max_steps=10)


def _mask_buffers(model) -> set[str]:
    return {n.removesuffix("_mask") for n, b in model.hf.named_buffers() if n.endswith("_mask")}


EXPECTED = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "mixtral": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mixtral"])
def test_masks_on_exactly_the_manifest_weights(hf_dirs, kind):
    model = load_hf_model(HFModelConfig(str(hf_dirs[kind])))
    prefix = "transformer.h" if kind == "gpt2" else "model.layers"
    want = {f"{prefix}.{i}.{m}.weight" for i in range(2) for m in EXPECTED[kind]}
    if kind == "mixtral":
        want |= {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    rows = model.manifest(["*"], [])
    assert {r.name for r in rows if r.sparse} == want
    why = {r.name: r.why for r in rows if not r.sparse}
    emb = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    assert why[emb].startswith("embedding")
    assert any("norm" in w for w in why.values())
    if kind == "llama":
        assert why["lm_head.weight"] == "embedding / LM head"  # untied: still dense
    if kind == "gpt2":
        assert why["transformer.h.0.attn.c_attn.bias"] == "bias"
    if kind == "mixtral":
        assert why["model.layers.0.mlp.gate.weight"] == "router / gate"
    engine = _engine(model, method="rigl", sparsity=0.5)
    assert _mask_buffers(model) == want  # masks exist on these and on nothing else
    if kind == "mixtral":
        assert sum(sp.index is not None for sp in engine.params) == 2 * 2 * 4  # per expert
    # an exclude pattern takes a weight out of the manifest's sparse list, with the reason
    rows = model.manifest(["*"], ["*mlp*"])
    assert all(not r.sparse for r in rows if ".mlp." in r.name)
    assert any(r.why == "not selected by sparsity.include / exclude" for r in rows)


def test_conv1d_orientation_known_weights(hf_dirs):
    """GPT-2's Conv1D stores [in, out]. With SRigL's constant fan-in the kept entries of every *output* unit
    (a storage column) are its largest |W|; with 2:4 the groups run along the input (storage rows)."""
    model = load_hf_model(HFModelConfig(str(hf_dirs["gpt2"])))
    fc = model.hf.transformer.h[0].mlp.c_fc
    n_in, n_out = fc.weight.shape  # [32, 64]
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, (n_in, n_out), generator=g).float() * 2 - 1
    known = (torch.randperm(n_in * n_out, generator=g).float().reshape(n_in, n_out) + 1) * sign  # |W| distinct
    with torch.no_grad():
        fc.weight.copy_(known)
    engine = _engine(model, method="srigl", sparsity=0.75, distribution="uniform", include=["*.0.mlp.c_fc*"])
    mask = fc.weight_mask  # storage layout [in, out]
    k = engine.layers["transformer.h.0.mlp.c_fc.weight"].fan_in
    assert k == n_in // 4
    top = known.abs().topk(k, dim=0).indices  # per output column
    expect = torch.zeros_like(mask).scatter_(0, top, True)
    assert torch.equal(mask, expect)
    assert (fc.weight[~mask] == 0).all()  # the sparse-aware rescale never touches pretrained weights
    assert torch.equal(fc.weight[mask], known[mask])

    model = load_hf_model(HFModelConfig(str(hf_dirs["gpt2"])))
    fc = model.hf.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight.copy_(known)
    _engine(model, method="nm", include=["*.0.mlp.c_fc*"])
    groups = fc.weight_mask.reshape(n_in // 4, 4, n_out)  # 4 consecutive inputs of one output unit
    assert (groups.sum(1) == 2).all()
    best = known.abs().reshape(n_in // 4, 4, n_out).topk(2, dim=1).indices
    assert torch.equal(groups, torch.zeros_like(groups).scatter_(1, best, True))


def test_fused_expert_masks_have_one_budget_per_expert(hf_dirs):
    """Expert 0's weights scaled x10: a whole-tensor magnitude cut would give it everything; per expert, each
    keeps exactly its own half, masked in place in the fused [E, out, in] tensor."""
    model = load_hf_model(HFModelConfig(str(hf_dirs["mixtral"])))
    experts = model.hf.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[0].mul_(10)
    engine = _engine(model, method="rigl", sparsity=0.5, distribution="uniform", include=["*experts*"])
    mask = experts.gate_up_proj_mask
    assert mask.shape == experts.gate_up_proj.shape
    per_expert = mask.flatten(1).sum(1)
    assert per_expert.tolist() == [mask[0].numel() // 2] * mask.shape[0]
    for e in range(mask.shape[0]):  # each the largest half of its own expert
        w = experts.gate_up_proj[e].detach().abs()
        assert torch.equal(mask[e], w >= w.flatten().kthvalue(w.numel() // 2 + 1).values)
    assert engine.layers["model.layers.0.mlp.experts.gate_up_proj.0"].budget == mask[0].numel() // 2


def test_magnitude_init_keeps_the_largest_weights_of_each_layer(hf_dirs):
    model = load_hf_model(HFModelConfig(str(hf_dirs["llama"])))
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    engine = _engine(model, method="rigl", sparsity=0.6, distribution="uniform")
    assert engine.mask_init == "magnitude"  # the default for pretrained weights
    for sp in engine.params:
        w, mask = before[sp.name].abs(), sp.mask
        k = engine.layers[sp.name].budget
        assert int(mask.sum()) == k
        assert torch.equal(mask, w >= w.flatten().topk(k).values[-1]), sp.name
        assert torch.equal(sp.weight[mask], before[sp.name][mask])  # kept weights untouched


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_wanda_init_equals_a_hand_computation():
    """score_ij = |W_ij| * ||X_j||_2 over the calibration tokens; each output row keeps its top half."""
    from dstlm.sparse.calibration import input_norms
    from dstlm.sparse.masks import sparse_params_of

    torch.manual_seed(0)
    model = _Two()
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[1., -2, 3, -4, 5, -6, 7, -8]] * 4) * torch.tensor([[1.], [2], [3], [4]]))
    x = torch.tensor([[[8., 7, 6, 5, 4, 3, 2, 1]], [[0., 0, 0, 0, 0, 0, 0, 1]]])  # 2 batches of one token
    cfg = SparsityConfig(method="static", sparsity=0.5, distribution="uniform", include=["*"], mask_init="wanda")
    norms = input_norms(model, sparse_params_of(model, cfg), [(x[0], None), (x[1], None)])
    hand = torch.tensor([8., 7, 6, 5, 4, 3, 2, (1 + 1) ** 0.5])
    torch.testing.assert_close(norms["lin.weight"], hand)
    w = model.lin.weight.detach().clone()
    SparseEngine(model, cfg, 0, 10, input_norms=norms)
    score = w.abs() * hand[None, :]  # row r: |j+1| * r * norm_j -> 8,14,18,20,20,18,14,11.3 (x r)
    expect = torch.zeros(4, 8, dtype=torch.bool)
    expect[:, [2, 3, 4, 5]] = True
    assert torch.equal(expect, score >= score.sort(dim=1, descending=True).values[:, 3:4])
    assert torch.equal(model.lin.weight_mask, expect)


def _fit(cfg):
    from dstlm.training.assembly.run import fit

    return fit(cfg)


def _hf_run(tmp_path, corpus, hf_dir, name, sparsity, steps=4, **over):
    cfg = tiny_run(tmp_path, corpus, name=name, trainer=dict(max_steps=steps, val_every_n_steps=steps), **over)
    cfg.model = HFModelConfig(hf=str(hf_dir))
    cfg.data.tokenizer = str(hf_dir)
    cfg.sparsity = sparsity
    return cfg


def test_fit_export_reload_and_resume_from_the_export(tmp_path, small_corpus, hf_dirs):
    """2:4 RigL-style fine-tuning of GPT-2 through `dstlm fit`, export: vanilla transformers reloads the folder
    with exact zeros (2:4 along the input), a sparsity block and a card, and the same logits as the trained
    checkpoint; a run started from the folder keeps its masks bit for bit."""
    from transformers import AutoModelForCausalLM

    from dstlm.checkpoint import load_checkpoint, read_checkpoint
    from dstlm.hf.export import export
    from dstlm.sparse.bits import unpack_bits

    cfg = _hf_run(tmp_path, small_corpus, hf_dirs["gpt2"], "nm", SparsityConfig(method="nm", delta_t=2))
    summary = _fit(cfg)
    assert summary["sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "nm" / "manifest.txt").read_text().startswith("sparse weights (8):")
    out = export(str(tmp_path / "nm"), str(tmp_path / "exported"))
    block = json.loads((out / "config.json").read_text())["sparsity"]
    assert block["method"] == "nm" and block["achieved_sparsity"] == 0.5
    assert "transformer.wte.weight" in block["ignored"] and len(block["sparse_weights"]) == 8
    assert "| transformer.h.0.mlp.c_fc.weight | 32x64 | 0.5000 | 2:4 along the input dimension |" in \
        (out / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    from safetensors.torch import load_file

    packed = load_file(str(out / MASKS_FILE))
    params = dict(hf.named_parameters())
    for key, bits in packed.items():
        name = key.removesuffix(".packed")
        mask = unpack_bits(bits, params[name].numel()).reshape(params[name].shape)
        assert (params[name][~mask] == 0).all()
        nz = (params[name] != 0).t()  # Conv1D [in, out] -> [out, in]: groups of 4 consecutive inputs
        assert (nz.reshape(-1, 4).sum(1) <= 2).all()
    trained = load_checkpoint(str(tmp_path / "nm")).model.hf.eval()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf(input_ids=ids).logits, trained(input_ids=ids).logits)

    again = _hf_run(tmp_path, small_corpus, out, "again", SparsityConfig(method="nm", delta_t=100), steps=1)
    _fit(again)
    a = read_checkpoint(str(tmp_path / "nm"))["state_dict"]
    b = read_checkpoint(str(tmp_path / "again"))["state_dict"]
    keys = [k for k in a if k.endswith("_mask")]
    assert len(keys) == 8 and all(torch.equal(a[k], b[k]) for k in keys)
    assert "first masks: kept from the model for 8 of 8" in (tmp_path / "again" / "manifest.txt").read_text()


def test_bad_input_one_line_each(tmp_path, small_corpus, hf_dirs):
    from transformers import ViTConfig

    from dstlm.training.config import DataConfig, RunConfig

    with pytest.raises(ValueError, match="has no config.json; it is not a Hugging Face model directory"):
        HFModelConfig(hf=str(tmp_path))
    ViTConfig(image_size=32, patch_size=8).save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="is a 'vit' model .* no causal-LM head"):
        load_hf_model(HFModelConfig(hf=str(tmp_path / "vit")))
    model = load_hf_model(HFModelConfig(str(hf_dirs["llama"])))
    with pytest.raises(ValueError, match=r"include=\['nothing\*'\] .* matches no sparsifiable weight"):
        _engine(model, method="rigl", include=["nothing*"])
    with pytest.raises(ValueError, match="context length 64"):
        HFModelConfig(hf=str(hf_dirs["llama"]), block_size=65)
    with pytest.raises(ValueError, match="ift.family='wide' rewrites dstlm's GPT layers"):
        from dstlm.transforms.ift import SparseIFTConfig

        RunConfig(model=HFModelConfig(str(hf_dirs["llama"])), sparsity=SparsityConfig(),
                  ift=SparseIFTConfig(family="wide", sparsity=0.5))
    cfg = RunConfig(model=HFModelConfig(str(hf_dirs["llama"])), out_dir=str(tmp_path),
                    data=DataConfig(files=small_corpus, tokenizer="gpt2", block_size=32))
    from dstlm.training.assembly.build import build

    with pytest.raises(ValueError, match="has 50257 tokens but the model .* embeds only 512"):
        build(cfg, logger=False)


def test_nm_on_a_width_it_does_not_divide_names_the_layer(tmp_path, small_corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=66, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=64, max_position_embeddings=32)).save_pretrained(str(tmp_path / "m"))
    model = load_hf_model(HFModelConfig(str(tmp_path / "m")))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight: N:M needs its input dimension \(66\)"):
        _engine(model, method="nm")


@pytest.mark.dist
@pytest.mark.parametrize("kind,strategy,method", [
    ("gpt2", "deepspeed_stage_3", "srigl"),
    ("mixtral", "deepspeed_stage_2", "rigl"),
    pytest.param("gpt2", "ddp", "nm", marks=pytest.mark.slow),
    pytest.param("llama", "deepspeed_stage_3", "rigl", marks=pytest.mark.slow),
    pytest.param("mixtral", "deepspeed_stage_3", "srigl", marks=pytest.mark.slow),
])
def test_dst_on_two_ranks_equals_the_whole_tensor_reference(tmp_path, small_corpus, hf_dirs, kind, strategy, method):
    """2 ranks (CPU, gloo) fine-tuning an HF model: every rank decides its fragment of each weight (Conv1D's
    transposed storage and fused experts included); at every update the run also decides whole from gathered
    weights and scores and stops on any difference, and the DST callback stops on any non-zero weight or
    optimizer moment at a pruned entry. Masks agree on both ranks; the final weights are 0 off the mask."""
    from test_dist import _dst_job

    dumps = _dst_job(method, 2, small_corpus, nproc=2,
                     extra_env={"DSTLM_STRATEGY": strategy, "DSTLM_HF": str(hf_dirs[kind])})
    n = len(dumps[0]["masks"])
    assert n >= 3 and all(d["sharded"] == [1.0] * n for d in dumps)
    for a, b in zip(dumps[0]["masks"], dumps[1]["masks"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    final = dumps[0]["final_masks"]
    experts = sorted({k.rsplit(".", 1)[0] for k in final if k.rsplit(".", 1)[-1].isdigit()})
    assert bool(experts) == (kind == "mixtral")
    weights = {k.removeprefix("hf."): v for k, v in dumps[0]["weights"].items()}
    for name, w in weights.items():
        if name.endswith("_mask"):
            assert (weights[name.removesuffix("_mask")][~w] == 0).all(), name
    # FLOPs per token counted at the start on rank 0, from partitioned weights under ZeRO-3 too
    flops = json.loads(next(dumps.dir.rglob("flops.json")).read_text())
    density = 0.5 if method == "nm" else 0.2  # SRigL's whole fan-in per row rounds down at these widths
    assert density - 0.03 <= flops["block_projection_ratio"] <= density + (0.05 if kind == "mixtral" else 0.0)


def test_one_shot_prune_exports_the_step_zero_masks(tmp_path, small_corpus, hf_dirs):
    """`dstlm prune` (no training): Wanda 2:4 on Llama — the exported weights are the pretrained ones with the
    n:m groups chosen by |W|·||X|| (2 of every 4 inputs), checked against the engine's own step-0 decision."""
    from transformers import AutoModelForCausalLM

    from dstlm.hf.oneshot import one_shot

    cfg = _hf_run(tmp_path, small_corpus, hf_dirs["llama"], "prune", SparsityConfig(method="nm", mask_init="wanda",
                                                                                     wanda_batches=2))
    out = one_shot(cfg, str(tmp_path / "pruned"))
    pruned = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    dense = dict(AutoModelForCausalLM.from_pretrained(str(hf_dirs["llama"])).named_parameters())
    block = json.loads((out / "config.json").read_text())["sparsity"]
    assert block["method"] == "nm" and block["achieved_sparsity"] == 0.5 and block["step"] == 0
    for name in block["sparse_weights"]:
        w, d = pruned[name], dense[name]
        kept = w != 0
        assert (kept.reshape(-1, 4).sum(1) == 2).all(), name
        assert torch.equal(w[kept], d[kept]), name  # pretrained values, untouched
    assert torch.equal(pruned["lm_head.weight"], dense["lm_head.weight"])
    # magnitude would keep other entries somewhere: the activation norms mattered
    mag = dense["model.layers.0.self_attn.q_proj.weight"].abs().reshape(-1, 4)
    by_mag = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, mag.topk(2, dim=1).indices, True)
    assert not torch.equal(by_mag, (pruned["model.layers.0.self_attn.q_proj.weight"] != 0).reshape(-1, 4))


def test_command_line_merges_every_model_field_of_either_source(hf_dirs, monkeypatch):
    """`--model.hf D --model.from_config true --model.block_size 32` keeps all three (jsonargparse merges repeated
    union values only into the member it lists first), and GPT fields still merge afterwards in the same process."""
    from conftest import REPO

    from dstlm.cli import parse_run

    monkeypatch.chdir(REPO)
    d = str(hf_dirs["llama"])
    cfg, _ = parse_run("dstlm fit", ["--model.hf", d, "--model.from_config", "true", "--model.block_size", "32",
                                     "--data.block_size", "32"])
    assert (cfg.model.hf, cfg.model.from_config, cfg.model.block_size) == (d, True, 32)
    assert cfg.data.tokenizer == d  # the model's own tokenizer
    cfg, _ = parse_run("dstlm fit", ["--model.hf", d, "--data.tokenizer", "bpe", "--data.block_size", "32"])
    assert cfg.data.tokenizer == "bpe"  # a tokenizer named, even the default one, is used as given
    cfg, _ = parse_run("dstlm fit", ["--config", "recipes/hf-rigl.yaml", "--model.hf", d, "--data.block_size", "32"])
    assert cfg.data.tokenizer == d  # a recipe's data section that names no tokenizer: the model's
    cfg, _ = parse_run("dstlm fit", ["--config", "recipes/tiny-rigl.yaml"])
    assert cfg.data.tokenizer == "bpe"
    cfg, _ = parse_run("dstlm fit", ["--config", "recipes/tiny-rigl.yaml", "--model.n_layer", "3"])
    assert (cfg.model.n_layer, cfg.model.n_embd) == (3, 192)
    cfg, _ = parse_run("dstlm fit", ["--config", "recipes/hf-rigl.yaml", "--model.hf", d, "--model.block_size", "48",
                                     "--data.block_size", "48"])
    assert (cfg.model.hf, cfg.model.block_size, cfg.sparsity.method) == (d, 48, "rigl")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mixtral"])
def test_flops_per_token_equal_torchs_flop_counter_and_count_the_masks(hf_dirs, kind):
    """Dense: the per-token forward FLOPs dstlm counts from the modules (projections, routers, top-k of the
    fused experts, LM head, attention scores) equal torch.utils.flop_counter on a forward of T tokens. Sparse
    (RigL 50 %): each sparse weight counts 2 x its mask's non-zeros, dense weights are unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    from dstlm.hf.flops import hf_flop_counts

    T = 32
    model = load_hf_model(HFModelConfig(hf=str(hf_dirs[kind]), attn_implementation="eager")).eval()
    base, this = hf_flop_counts(model, T)
    assert this.forward == base.forward and this.forward_all_dense == base.forward
    if kind == "mixtral":  # the default grouped_mm kernel is invisible to the FLOP counter; eager loops F.linear
        model.hf.set_experts_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 500, (1, T)))
    # eager attention: Q K^T and A V as two batched matmuls over the full T x T (no causal discount)
    assert counter.get_total_flops() == T * base.forward, (counter.get_total_flops() / T, base.forward)
    if kind == "mixtral":
        assert any(".experts." in n for n in base.layers) and any(n.endswith("gate.weight") for n in base.layers)

    engine = _engine(model, method="rigl", sparsity=0.5, distribution="uniform")
    _, sparse = hf_flop_counts(model, T)
    params = dict(model.hf.named_parameters())
    masked = {sp.name.rsplit(".", 1)[0] if sp.index is not None else sp.name for sp in engine.params}
    for name, flops in sparse.layers.items():
        module, attr = model.hf.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        mask = getattr(module, f"{attr}_mask", None)
        assert (mask is not None) == (name in masked), name
        if mask is None:
            assert flops == base.layers[name]
        elif params[name].ndim == 3:  # top-2 of 4 experts per token
            assert flops == 2 * 2 * int(mask.sum()) // 4
        else:
            assert flops == 2 * int(mask.sum()) and sparse.density[name] == pytest.approx(0.5, abs=0.02)
    assert sparse.forward < base.forward and sparse.lm_head == base.lm_head


def test_wanda_norms_of_fused_experts_equal_each_experts_routed_inputs(hf_dirs):
    """Mixtral's fused experts under its default grouped_mm kernel: every expert matrix gets ||X_j|| over the
    tokens routed to that expert only, equal to a hand computation from the experts module's own inputs
    (gate_up_proj[e]: the routed hidden states; down_proj[e]: act(gate) * up of them); the kernel is restored."""
    from dstlm.sparse.calibration import input_norms
    from dstlm.sparse.masks import sparse_params_of

    model = load_hf_model(HFModelConfig(hf=str(hf_dirs["mixtral"])))
    assert model.hf.config._experts_implementation == "grouped_mm"
    cfg = SparsityConfig(method="static", sparsity=0.5, include=["*experts*"], mask_init="wanda")
    params = sparse_params_of(model, cfg)
    batches = [(torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(k)), None) for k in range(2)]
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append((args[0].detach().clone(), args[1].detach().clone()))
        return hook

    experts = {n: m for n, m in model.hf.named_modules() if n.endswith("mlp.experts")}
    hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True) for n, m in experts.items()]
    norms = input_norms(model, params, batches)
    for h in hooks:
        h.remove()
    assert model.hf.config._experts_implementation == "grouped_mm"
    assert len(experts) == 2 and len(params) == 2 * 2 * 4
    for name, module in experts.items():
        for e in range(4):
            x = torch.cat([h[idx.eq(e).any(-1)] for h, idx in seen[name]])
            gate, up = (x @ module.gate_up_proj[e].detach().t()).chunk(2, dim=-1)
            inner = module.act_fn(gate) * up
            torch.testing.assert_close(norms[f"{name}.gate_up_proj.{e}"], x.norm(dim=0))
            torch.testing.assert_close(norms[f"{name}.down_proj.{e}"], inner.norm(dim=0))
