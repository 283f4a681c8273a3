"""`dstlm report`: pictures of a checkpoint's sparsity — per-layer density and one layer's mask — and the
census of dead and orphan hidden units (dstlm/sparse/connectivity.py).

Reads the mask buffers (`*.weight_mask`) straight from a Lightning checkpoint file, so it needs neither
the run config nor the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def load_masks(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """{weight name: bool [out, in] mask} from a checkpoint (Lightning .ckpt, DeepSpeed checkpoint directory,
    run folder, or a plain state_dict file). Batched expert masks [E, out, in] become `<name>.<e>` entries."""
    return _read(checkpoint)[0]


def unit_pairs(ckpt: dict) -> list[tuple[str, str]]:
    """The model's (producer, consumer) matrix pairs (GPT.unit_links), from the checkpoint's model and
    Sparse-IFT config (built on the meta device: no memory, no weights); [] for a checkpoint without them."""
    import dataclasses

    from dstlm.build import build_model, model_transforms
    from dstlm.models.gpt import GPTConfig
    from dstlm.transforms.ift import SparseIFTConfig

    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp:
        return []
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = GPTConfig(**{k: v for k, v in hp["model"].items() if k in known})
    ift = SparseIFTConfig(**hp["ift"]) if hp.get("ift") else None
    with torch.device("meta"):
        return build_model(cfg, model_transforms(cfg, ift)).unit_links()


def _read(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from dstlm.checkpoint import read_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = read_checkpoint(path) if path.is_dir() or path.suffix == ".ckpt" else \
        torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    masks = {}
    for key, value in state.items():
        if key.endswith("_mask") and torch.is_tensor(value) and value.dtype == torch.bool:
            name = key[: -len("_mask")]
            name = name[len("model."):] if name.startswith("model.") else name
            if value.ndim == 3:
                masks.update({f"{name}.{e}": value[e] for e in range(value.shape[0])})
            else:
                masks[name] = value
    if not masks:
        raise ValueError(f"checkpoint {str(path)!r} holds no sparsity masks (was it trained with a sparsity config?)")
    return masks, ckpt


def report(checkpoint: str | Path, out_dir: str | Path, layer: Optional[str] = None) -> dict:
    """Write density.png (per-layer density), mask_<layer>.png (heat-map) and sparsity.json to out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dstlm.sparse.connectivity import links_between, spread, unit_census

    masks, ckpt = _read(checkpoint)
    census = unit_census(masks, links_between(unit_pairs(ckpt), {n: tuple(m.shape) for n, m in masks.items()}))
    if layer is None:
        layer = next(iter(masks))
    if layer not in masks:
        raise ValueError(f"layer {layer!r} has no mask; choose one of: {', '.join(masks)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(masks)
    dens = [float(masks[n].float().mean()) for n in names]
    total = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(names) + 1)), dpi=110)
    ax.barh(range(len(names)), dens, color="tab:blue")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(total, color="tab:red", ls="--", label=f"global density {total:.3f}")
    ax.set_xlabel("density (fraction of non-zero weights)")
    ax.set_title(f"per-layer density: {Path(checkpoint).name}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    density_png = out / "density.png"
    fig.savefig(density_png)
    plt.close(fig)

    m = masks[layer].float()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=110, gridspec_kw={"width_ratios": [4, 1]})
    ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
    ax.set_title(f"{layer} mask {tuple(m.shape)} (black = active)")
    ax.set_xlabel("input")
    ax.set_ylabel("output (row)")
    rows = m.sum(1).numpy()
    ax2.barh(range(len(rows)), rows, color="tab:green")
    ax2.invert_yaxis()
    ax2.set_title("fan-in per row")
    fig.tight_layout()
    safe = layer.replace("/", "_")
    mask_png = out / f"mask_{safe}.png"
    fig.savefig(mask_png)
    plt.close(fig)

    summary = {"checkpoint": str(checkpoint), "global_density": total, "global_sparsity": 1 - total,
               "layers": {n: {"density": d, "shape": list(masks[n].shape),
                              "ablated_rows": int((~masks[n].any(1)).sum())} for n, d in zip(names, dens)},
               "unit_census": census, "mask_spread": spread(masks), "density_png": str(density_png),
               "mask_png": str(mask_png)}
    (out / "sparsity.json").write_text(json.dumps(summary, indent=2))
    return summary
