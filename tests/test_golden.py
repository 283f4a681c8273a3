"""Behaviour is unchanged by refactors: every DST method (dense GPT, MoE, every Sparse-IFT family) trains
to the masks, weights and validation loss recorded in tests/golden/dst_runs.json by the code before the
refactor (sha256 over every mask buffer / every weight, bit for bit).

Float kernels round differently on different CPUs, so the file holds one record per machine (tests/helpers/golden.py).
On a machine with its own record the run must equal that record; on another machine with the same torch build and
CPU kernels it must equal one of the records made with them (each is the recorded code's exact result somewhere).

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

from conftest import shared_result  # noqa: E402
from golden import CASES, machine, read_records, run_cases  # noqa: E402

RECORDS = read_records()


def candidates() -> list[dict]:
    """The records this machine's run must match: its own record alone, else every record of the same kernels."""
    here = machine()
    own = [r for r in RECORDS if r["machine"] == here]
    if own:
        return own
    return [r for r in RECORDS if r["machine"]["torch"] == here["torch"]
            and r["machine"]["cpu_capability"] == here["cpu_capability"]]


@pytest.fixture(scope="module")
def current():
    if not candidates():
        kernels = sorted({(r["machine"]["torch"], r["machine"]["cpu_capability"]) for r in RECORDS})
        pytest.skip(f"checksums were recorded with torch and CPU kernels {kernels}, this machine has "
                    f"{(machine()['torch'], machine()['cpu_capability'])}: float results may differ in the last bit")

    def make(folder: Path) -> None:  # once per pytest run, whichever worker asks first
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # as recorded
        try:
            (folder / "checksums.json").write_text(json.dumps(run_cases(list(CASES))))
        finally:
            torch.set_num_threads(threads)

    return json.loads((shared_result("golden runs", make) / "checksums.json").read_text())


def test_every_case_is_recorded():
    assert RECORDS and all(set(r["cases"]) == set(CASES) for r in RECORDS)


def test_records_of_different_machines_agree_on_the_masks():
    """Another CPU rounds the weights' last bits differently; the decisions recorded are the same everywhere."""
    for case in CASES:
        assert len({(r["cases"][case]["masks"], r["cases"][case]["n_updates"]) for r in RECORDS}) == 1, case


@pytest.mark.parametrize("case", list(CASES))
def test_same_masks_weights_and_loss(current, case):
    got = current[case]
    wants = [r["cases"][case] for r in candidates()]
    for field in ("n_updates", "n_masks", "masks"):
        assert any(got[field] == w[field] for w in wants), f"{case}: {field} differs from the recorded run"
    matched = [w for w in wants if w["masks"] == got["masks"] and w["weights"] == got["weights"]]
    assert matched, (f"{case}: weights differ from the recorded run on every machine recorded with these kernels "
                     f"({[r['machine']['cpu'] for r in candidates()]}; this one: {machine()['cpu']})")
    assert got["val_loss"] == matched[0]["val_loss"] and got["density"] == matched[0]["density"]


OLD = Path(__file__).resolve().parent / "golden" / "ckpt-844ea02"


def test_a_checkpoint_written_by_an_older_dstlm_resumes_to_the_end_of_its_run(tmp_path, monkeypatch):
    """A RigL checkpoint written by dstlm at 844ea02 (before the sparse core became one rule stack: whole-matrix
    and fragment rules, the 847-line engine), at step 4 of 10 with mask updates at steps 2, 4 and 6: today's code
    resumes it and ends at that run's own final masks (exactly) and weights (bit for bit on the machine that wrote
    it; within float rounding on another CPU)."""
    from conftest import run_cli
    from dstlm.paths import CORPUS_DIR
    from golden import machine

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "shakespeare.txt").write_text((CORPUS_DIR / "tinyshakespeare.txt").read_text()[:100_000])
    (tmp_path / "corpus" / "austen.txt").write_text((CORPUS_DIR / "austen-persuasion.txt").read_text()[:50_000])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded (another thread count sums in another order)
    try:
        code, stderr = run_cli(["fit", "--config", str(OLD / "recipe.yaml"), "--ckpt_path",
                                str(OLD / "step0000004.ckpt")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr[-3000:]
    now = torch.load(tmp_path / "runs" / "old" / "checkpoints" / "step0000010.ckpt", weights_only=True)
    then = torch.load(OLD / "final_state.pt", weights_only=True)
    assert now["global_step"] == then["global_step"] == 10 and now["state_dict"].keys() == then["state_dict"].keys()
    masks = [k for k in then["state_dict"] if k.endswith("_mask")]
    assert len(masks) == 12 and all(torch.equal(now["state_dict"][k], then["state_dict"][k]) for k in masks)
    same_machine = json.loads((OLD / "made_on.json").read_text())["machine"] == machine()
    for k, w in then["state_dict"].items():
        if same_machine:
            assert torch.equal(now["state_dict"][k], w), k
        else:
            torch.testing.assert_close(now["state_dict"][k], w, rtol=1e-5, atol=1e-6, msg=k)
