"""Long runs (minutes): excluded from `make test`, run by `make test-all`."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_default_recipe_learns_on_shipped_corpus(tmp_path):
    """200 steps of the default (SET 90 %) recipe on the shipped corpus: val loss falls far below the
    uniform-guess level ln(4096) = 8.3."""
    r = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", "recipes/default.yaml",
                        "--trainer.max_steps=200", "--trainer.progress_bar=false", f"--out_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["val_loss"] < 5.2
    assert abs(summary["sparsity"] - 0.9) < 0.01 and summary["mask_updates"] >= 1
