"""Behaviour is unchanged by refactors: every DST method (dense GPT, MoE, every Sparse-IFT family) trains
to the masks, weights and validation loss recorded in tests/golden/dst_runs.json by the code before the
refactor of the model-building path (sha256 over every mask buffer / every weight, bit for bit).

A change that is *meant* to alter results re-records the file (`python tests/helpers/golden.py --write`)
and says why in its commit message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from golden import CASES, GOLDEN, machine, run_cases  # noqa: E402

RECORDED = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def current():
    if RECORDED["machine"]["cpu_capability"] != machine()["cpu_capability"]:
        pytest.skip(f"checksums were recorded with CPU kernels {RECORDED['machine']['cpu_capability']!r}, this "
                    f"machine uses {machine()['cpu_capability']!r}: float results may differ in the last bit")
    torch.set_num_threads(2)
    return run_cases(list(CASES))


def test_every_case_is_recorded():
    assert set(RECORDED["cases"]) == set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_same_masks_weights_and_loss(current, case):
    want, got = RECORDED["cases"][case], current[case]
    assert got["n_updates"] == want["n_updates"] and got["n_masks"] == want["n_masks"]
    assert got["masks"] == want["masks"], f"{case}: masks differ from the recorded run"
    assert got["weights"] == want["weights"], f"{case}: weights differ from the recorded run"
    assert got["val_loss"] == want["val_loss"] and got["density"] == want["density"]
