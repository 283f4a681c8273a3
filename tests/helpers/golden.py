"""Golden runs: tiny trainings of every DST method (dense GPT, MoE, every Sparse-IFT family) whose final
masks, weights and validation loss are recorded as checksums in tests/golden/dst_runs.json.

The file was written by the code *before* a refactor; tests/test_golden.py re-runs each case and demands
the same checksums, so a change that claims "behaviour unchanged" is held to bit equality.

Float kernels round differently on different CPUs (the same torch build and AVX512 kernels give other last bits on
an AMD EPYC than on the Intel machine that first recorded the file; the masks agree), so the file holds one record
per machine: `--write` replaces this machine's record, or adds one, from the code it runs.

    python tests/helpers/golden.py --write [CASE ...]   # (re)record, only when a change is meant to alter results
    python tests/helpers/golden.py [CASE ...]           # print the current checksums
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
GOLDEN = HERE.parent / "golden" / "dst_runs.json"

# name -> (method, model kind, Sparse-IFT family or None)
CASES: dict[str, tuple[str, str, str | None]] = {
    "static": ("static", "gpt", None),
    "set": ("set", "gpt", None),
    "rigl": ("rigl", "gpt", None),
    "srigl": ("srigl", "gpt", None),
    "gmp": ("gmp", "gpt", None),
    "nm": ("nm", "gpt", None),
    "ift-wide-rigl": ("rigl", "gpt", "wide"),
    "ift-parallel-rigl": ("rigl", "gpt", "parallel"),
    "ift-factorized-srigl": ("srigl", "gpt", "factorized"),
    "ift-doped-rigl": ("rigl", "gpt", "doped"),
    "moe-rigl": ("rigl", "moe", None),
    "moe-srigl": ("srigl", "moe", None),
    "moe-ift-wide-srigl": ("srigl", "moe", "wide"),
    "moe-ift-parallel-rigl": ("rigl", "moe", "parallel"),
    "moe-ift-factorized-rigl": ("rigl", "moe", "factorized"),
    "moe-ift-doped-srigl": ("srigl", "moe", "doped"),
}


def corpus(tmp: Path) -> list[str]:
    from dstlm.paths import CORPUS_DIR

    a, b = tmp / "shakespeare.txt", tmp / "austen.txt"
    a.write_text((CORPUS_DIR / "tinyshakespeare.txt").read_text()[:100_000])
    b.write_text((CORPUS_DIR / "austen-persuasion.txt").read_text()[:50_000])
    return [str(a), str(b)]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:24]


def run_case(name: str, tmp: Path, files: list[str]) -> dict:
    from conftest import tiny_run
    from dstlm.models.moe import MoEConfig
    from dstlm.sparse.config import SparsityConfig
    from dstlm.transforms.ift import SparseIFTConfig
    from dstlm.training.assembly.build import build

    method, kind, family = CASES[name]
    cfg = tiny_run(tmp / name, files, trainer=dict(max_steps=8, val_every_n_steps=8))
    if kind == "moe":
        cfg.model.moe = MoEConfig(num_experts=4, top_k=2, every=2)
    sparsity = dict(method=method, sparsity=0.8, delta_t=2, t_end=1.0, drop_fraction=0.3)
    if method == "nm":
        sparsity.update(n=2, m=4, sparsity=0.5, distribution="uniform")
    cfg.sparsity = SparsityConfig(**sparsity)
    if family is not None:
        cfg.ift = SparseIFTConfig(family=family, sparsity=0.5,
                                  factorized_mid="layernorm" if kind == "moe" else "none")
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    state = module.model.state_dict()
    masks = {k: v for k, v in state.items() if k.endswith("_mask")}
    weights = {k: v for k, v in state.items() if not k.endswith("_mask")}
    return {"masks": digest(masks), "weights": digest(weights), "n_masks": len(masks),
            "density": round(module.sparse_engine.density(), 6), "n_updates": module.sparse_engine.n_updates,
            "val_loss": repr(float(trainer.callback_metrics["val/loss"]))}


def run_cases(names: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = corpus(tmp)
        return {n: run_case(n, tmp, files) for n in names}


def cpu_name() -> str:
    """Vendor, family, model and name of this CPU (Linux /proc/cpuinfo; the platform's processor elsewhere)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return " ".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "model name"))


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_name()}


def read_records() -> list[dict]:
    """[{"machine": {...}, "cases": {...}}, ...] from the golden file."""
    return json.loads(GOLDEN.read_text())["records"] if GOLDEN.exists() else []


def write_record(results: dict) -> None:
    """Update this machine's record with `results` (a new record if the machine has none)."""
    records, here = read_records(), machine()
    mine = next((r for r in records if r["machine"] == here), None)
    if mine is None:
        mine = {"machine": here, "cases": {}}
        records.append(mine)
    mine["cases"].update(results)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    write = "--write" in argv
    names = [a for a in argv if not a.startswith("--")] or list(CASES)
    torch.set_num_threads(2)
    results = run_cases(names)
    if write:
        write_record(results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
