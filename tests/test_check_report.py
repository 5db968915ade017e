"""tests/check_report.py, the CI's check of the tiny report card: passes a card where every stage
helped, and names the stage when one did not (or was not measured)."""
import copy

import pytest

import check_report


def card():
    """The shape evaluate.write_report writes, with the numbers of a real tiny run."""
    stage = {"config": {}, "step": 1, "steps_logged": 1, "train_time_s": 1.0, "final": {}, "curves": {}}
    stages = {name: copy.deepcopy(stage) for name in ("base", "mid", "sft", "rl")}
    stages["base"]["final"] = {"loss": 0.45}
    stages["rl"]["curves"]["pass@1"] = [[0, 0.2475], [15, 0.2925], [30, 0.3287]]
    evals = {"base": {"val_bpb": 0.458, "CORE": 0.445, "GSM8K": 0.0, "ARC-Easy": 0.215, "ARC-Challenge": 0.305,
                      "MMLU": 0.235},
             "mid": {"GSM8K": 0.07}, "rl": {"GSM8K": 0.40},
             "sft": {"GSM8K": 0.35, "ARC-Easy": 0.36, "ARC-Challenge": 0.41, "MMLU": 0.355}}
    return {"stages": stages, "evals": evals}


def test_a_card_where_every_stage_helped_passes():
    assert check_report.problems(card()) == []


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["evals"]["mid"].update(GSM8K=0.01), "mid GSM8K over base"),
    (lambda c: c["evals"]["sft"].update(GSM8K=0.03), "sft GSM8K over base"),
    (lambda c: c["stages"]["rl"]["curves"].update({"pass@1": [[0, 0.2], [30, 0.2]]}), "rl held-out pass@1"),
    (lambda c: c["evals"]["sft"].update(MMLU=0.25, **{"ARC-Easy": 0.25}), "sft multiple choice over base"),
    (lambda c: c["evals"]["base"].pop("GSM8K"), "not measured"),
    (lambda c: c["evals"]["sft"].pop("MMLU"), "sft multiple choice over base: not measured"),
    (lambda c: c["evals"]["base"].update(CORE=0.01), "base CORE"),
    (lambda c: c["evals"].pop("sft"), "stage sft: no evaluation"),
])
def test_a_stage_that_did_not_help_is_named(edit, named):
    c = card()
    edit(c)
    found = check_report.problems(c)
    assert any(named in line for line in found), found
