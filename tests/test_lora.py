"""LoRA through peft on sparse Hugging Face models (tiny GPT-2 with Conv1D weights, Llama, Mixtral): the masked
update keeps the base's zeros exactly, merged logits equal the adapter model's, post_mask and plain merges
measured, adapter-only checkpoints resume bit-exactly, 2 ranks equal 1, the `none` export loads through peft, and
bad input is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run

from dstlm.hf.peft_config import PeftConfig
from dstlm.hf.source import HFModelConfig
from dstlm.sparse import SparsityConfig


def _run(tmp_path, corpus, hf_dir, name, peft, sparsity=None, steps=6, **over):
    trainer = dict(max_steps=steps, val_every_n_steps=steps, ckpt_every_n_steps=3, **over.pop("trainer", {}))
    cfg = tiny_run(tmp_path, corpus, name=name, trainer=trainer, optim=dict(lr=1e-2, warmup_steps=0), **over)
    cfg.model = HFModelConfig(hf=str(hf_dir))
    cfg.data.tokenizer = str(hf_dir)
    cfg.sparsity = sparsity
    cfg.peft = peft
    cfg.__post_init__()
    return cfg


def _fit(cfg, ckpt_path=None):
    from dstlm.training.assembly.run import fit

    return fit(cfg, ckpt_path=ckpt_path)


ONE_SHOT = SparsityConfig(method="static", sparsity=0.5, mask_init="magnitude", distribution="uniform")
IDS = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf.eval()(input_ids=IDS, use_cache=False).logits


def _zeros(weights: dict, masks: dict) -> dict:
    """name -> (zeros of the weight, zeros of its mask)."""
    return {n: (int((weights[n] == 0).sum()), int((~m).sum())) for n, m in masks.items()}


@pytest.mark.parametrize("kind,targets", [("gpt2", "all-linear"), ("llama", "all-linear"), ("mixtral", None)])
def test_masked_merge_keeps_every_zero_and_the_logits(tmp_path, small_corpus, hf_dirs, kind, targets):
    """One-shot magnitude 50 % then LoRA (masked) on every linear layer: the export reloads with vanilla
    transformers, zero exactly where the base mask is zero (counted per weight), with the logits of the unmerged
    adapter model; peft's own merge of the same adapter fills the zeros in."""
    from transformers import AutoModelForCausalLM

    from dstlm.checkpoint import load_checkpoint
    from dstlm.hf import lora
    from dstlm.hf.export import export
    from dstlm.hf.model import mask_buffers

    cfg = _run(tmp_path, small_corpus, hf_dirs[kind], "masked", PeftConfig(r=4, target_modules=targets), ONE_SHOT)
    summary = _fit(cfg)
    assert summary["peft"]["merge"] == "masked" and summary["peft"]["base_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert 0 < summary["peft"]["trainable_params"] < summary["peft"]["total_params"] / 5
    loaded = load_checkpoint(str(tmp_path / "masked"))
    masks = {lora.base_name(n): m for n, m in mask_buffers(loaded.model).items()}
    adapted = _logits(loaded.model.hf)
    out = export(str(tmp_path / "masked"), str(tmp_path / "exported"))
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    weights = dict(merged.named_parameters())
    counts = _zeros(weights, masks)
    assert len(counts) >= 4 and all(z == m > 0 for z, m in counts.values()), counts
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-5, atol=1e-5)
    block = json.loads((out / "config.json").read_text())["sparsity"]
    assert block["adapter"] == {"method": "lora", "r": 4, "alpha": 16.0, "merge": "masked", "target_modules": targets}
    assert "merge **masked**" in (out / "README.md").read_text()
    # peft's plain merge of the same adapter: the zeros of every adapted weight fill in
    plain = load_checkpoint(str(tmp_path / "masked")).model
    adapted_weights = {lora.base_name(f"{n}.weight") for n, _ in lora.lora_layers(plain)}
    lora.merge(plain, masked=False)
    filled = _zeros(dict(plain.hf.named_parameters()), {n: masks[n] for n in adapted_weights})
    assert filled and all(z < m for z, m in filled.values()), filled


def test_adapter_only_checkpoints_resume_bit_exactly_and_refuse_another_base(tmp_path, small_corpus, hf_dirs):
    """Checkpoints hold the adapter and its optimizer state (no base weight); a run resumed from step 3 ends with
    the adapter of the uninterrupted 6-step run, bit for bit (dropout on); a changed base folder is refused."""
    import shutil

    from dstlm.checkpoint import read_checkpoint

    peft = PeftConfig(r=4, dropout=0.1)
    whole = _run(tmp_path, small_corpus, hf_dirs["llama"], "whole", peft, ONE_SHOT)
    _fit(whole)
    ckpt = read_checkpoint(str(tmp_path / "whole" / "checkpoints" / "step0000003.ckpt"))
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == len(ckpt["state_dict"])  # Adam moments of the adapter only
    step3 = str(tmp_path / "whole" / "checkpoints" / "step0000003.ckpt")
    _fit(_run(tmp_path, small_corpus, hf_dirs["llama"], "part", peft, ONE_SHOT), ckpt_path=step3)
    a = read_checkpoint(str(tmp_path / "whole"))["state_dict"]
    b = read_checkpoint(str(tmp_path / "part"))["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.default.weight") and bool(a[k].abs().sum() > 0) for k in a)  # it trained
    # another base under the same folder name: refused in one line, naming the weight
    moved = tmp_path / "base"
    shutil.copytree(hf_dirs["llama"], moved)
    _fit(_run(tmp_path, small_corpus, moved, "other", peft, ONE_SHOT, steps=3))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(moved / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] *= 1.5
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the base weight model.layers.0.mlp.up_proj.weight differs from the one its "
                                         r"adapter was trained on"):
        _fit(_run(tmp_path, small_corpus, moved, "other", peft, ONE_SHOT), ckpt_path="last")


def test_post_mask_keeps_the_zeros_and_none_exports_a_peft_adapter(tmp_path, small_corpus, hf_dirs):
    """From a `dstlm prune` export (its masks file is the base mask): post_mask merges with exactly the base's zeros
    (the logits move: plain training did not see the mask); `none` exports the sparse base untouched plus an
    adapter folder that peft loads onto it with the adapter model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dstlm.checkpoint import load_checkpoint
    from dstlm.hf.export import export
    from dstlm.hf.oneshot import one_shot

    prune = _run(tmp_path, small_corpus, hf_dirs["gpt2"], "prune", None, ONE_SHOT)
    base = one_shot(prune, str(tmp_path / "pruned"))
    base_weights = dict(AutoModelForCausalLM.from_pretrained(str(base)).named_parameters())
    for policy in ("post_mask", "none"):
        cfg = _run(tmp_path, small_corpus, base, policy, PeftConfig(r=4, merge=policy))
        summary = _fit(cfg)
        assert summary["peft"]["base_masks"] == "kept from the model"
        adapted = _logits(load_checkpoint(str(tmp_path / policy)).model.hf)
        out = export(str(tmp_path / policy), str(tmp_path / f"{policy}-out"))
        merged = AutoModelForCausalLM.from_pretrained(str(out))
        weights = dict(merged.named_parameters())
        block = json.loads((out / "config.json").read_text())["sparsity"]
        assert block["adapter"]["merge"] == policy and block["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
        for name in block["sparse_weights"]:
            assert torch.equal(weights[name] == 0, base_weights[name] == 0), name
        if policy == "post_mask":
            assert float((_logits(merged) - adapted).abs().max()) > 1e-3
        else:
            assert all(torch.equal(weights[n], base_weights[n]) for n in weights)  # the base, untouched
            again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)), str(out / "adapter"))
            torch.testing.assert_close(_logits(again), adapted, rtol=1e-5, atol=1e-5)


def test_bad_input_one_line_each(tmp_path, small_corpus, hf_dirs):
    from dstlm.training.config import RunConfig, TrainerConfig

    def fails(match, hf_dir=hf_dirs["llama"], peft=None, sparsity=ONE_SHOT, **over):
        cfg = _run(tmp_path, small_corpus, hf_dir, "bad", peft or PeftConfig(r=4), sparsity, steps=1, **over)
        with pytest.raises(ValueError, match=match) as e:
            _fit(cfg)
        assert "\n" not in str(e.value)

    fails(r"peft.target_modules=\['nothing'\]: .*name linear layers, e.g. \[",
          peft=PeftConfig(target_modules=["nothing"]))
    fails(r"peft.r=64 exceeds the smaller dimension of model.layers.0.self_attn.k_proj \(32 in, 16 out\); use "
          r"peft.r <= 16", peft=PeftConfig(r=64, target_modules=["k_proj"]))
    fails(r"peft.merge=masked keeps a sparse base's zeros, but .* has no mask and no zeros", sparsity=None)
    fails(r"peft.target_modules=\[.experts.\]: matches model.layers.0.mlp.experts \(MixtralExperts\), which LoRA "
          r"here does not adapt",
          hf_dir=hf_dirs["mixtral"], peft=PeftConfig(r=2, target_modules=["experts"]))
    with pytest.raises(ValueError, match="peft adapters train on a Hugging Face model source"):
        RunConfig(peft=PeftConfig())
    with pytest.raises(ValueError, match="peft with trainer.strategy='deepspeed_stage_3'"):
        RunConfig(model=HFModelConfig(str(hf_dirs["llama"])), peft=PeftConfig(),
                  trainer=TrainerConfig(strategy="deepspeed_stage_3", devices=2))
    for field, value in (("r", 0), ("alpha", -1.0), ("dropout", 1.0), ("merge", "sometimes"), ("target_modules", [])):
        with pytest.raises(ValueError, match=f"peft.{field}="):
            PeftConfig(**{field: value})


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow)])
def test_two_ranks_train_the_adapter_of_one_process(tmp_path, small_corpus, hf_dirs, strategy):
    """2 ranks x batch 4 (launch/torchrun.sh, gloo) end with the adapter of 1 process x batch 8, the base frozen
    and its zeros kept; the ZeRO-2 checkpoint holds no base weight either."""
    import subprocess
    import sys

    from conftest import REPO

    from dstlm.checkpoint import read_checkpoint
    from dstlm.training.assembly.summary import config_yaml

    peft = PeftConfig(r=4, target_modules=["c_attn", "c_fc"])
    two = _run(tmp_path, small_corpus, hf_dirs["gpt2"], "two", peft, ONE_SHOT, data=dict(batch_size=4))
    (tmp_path / "two.yaml").write_text(config_yaml(two))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
           "PYTHON": sys.executable, "STRATEGY": strategy}
    r = subprocess.run(["bash", "launch/torchrun.sh", "2", str(tmp_path / "two.yaml")], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    _fit(_run(tmp_path, small_corpus, hf_dirs["gpt2"], "one", peft, ONE_SHOT))
    a, b = (read_checkpoint(str(tmp_path / n))["state_dict"] for n in ("one", "two"))
    adapter = [k for k in a if ".lora_" in k]
    assert adapter and {k for k in b if not k.endswith("_mask")} == set(adapter)  # no base weight saved
    for k in adapter:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_the_adapter_optimizer_has_no_empty_group(hf_dirs):
    """Adapters are all matrices, so the no-decay group is empty and left out: DeepSpeed (ZeRO-2, the slow case of
    the test above) drops empty groups, after which the LR scheduler counted one group more than the optimizer."""
    from dstlm.hf.lora import add_adapters
    from dstlm.hf.model import load_hf_model
    from dstlm.training.config import OptimConfig
    from dstlm.training.loop.module import build_optimizer

    model = load_hf_model(HFModelConfig(str(hf_dirs["gpt2"])))
    add_adapters(model, PeftConfig(r=2), masked=False)
    groups = build_optimizer(model, OptimConfig()).param_groups
    assert len(groups) == 1 and all(".lora_" in n for n, p in model.named_parameters()
                                    if any(p is q for q in groups[0]["params"]))


def test_a_folder_pruned_elsewhere_gives_its_zeros_as_the_base_mask(tmp_path, small_corpus, hf_dirs):
    """A sparse folder without dstlm's masks file (pruned by another tool): its own zeros are the base mask; the
    masked export has exactly those zeros, and the sparsity block says where the mask came from."""
    from transformers import AutoModelForCausalLM

    from dstlm.hf.export import export
    from dstlm.hf.oneshot import one_shot
    from dstlm.hf.source import MASKS_FILE

    base = one_shot(_run(tmp_path, small_corpus, hf_dirs["llama"], "prune", None, ONE_SHOT), str(tmp_path / "other"))
    (base / MASKS_FILE).unlink()  # no masks file: only zeros in the weights
    zeros = {n: w == 0 for n, w in AutoModelForCausalLM.from_pretrained(str(base)).named_parameters()}
    summary = _fit(_run(tmp_path, small_corpus, base, "zeros", PeftConfig(r=4, target_modules="all-linear")))
    assert summary["peft"]["base_masks"] == "the source's zeros"
    assert summary["peft"]["base_sparsity"] == pytest.approx(0.5, abs=0.01)
    out = export(str(tmp_path / "zeros"), str(tmp_path / "out"))
    weights = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    block = json.loads((out / "config.json").read_text())["sparsity"]
    assert len(block["sparse_weights"]) == 14
    for name in block["sparse_weights"]:
        assert torch.equal(weights[name] == 0, zeros[name]), name
