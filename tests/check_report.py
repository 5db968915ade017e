"""
check_report.py: checks the numbers of a report card written by `bash run_all.sh tiny`.

    python tests/check_report.py $SLIMCHAT_HOME/report/report.json

Every stage must have trained and been evaluated, and each must have helped, by margins a tiny
model on the mirror reliably shows (measured in tests/bench/RESULTS.md):
- pretraining takes val bits-per-byte from about 3 to well under 1, and CORE well above 0 (the
  mirror's CORE tasks are drawn from the same world);
- midtraining teaches the chat format and the calculator: GSM8K rises above the base model's
  (the base is evaluated on the chat tasks too, as the "before" column);
- SFT rises further above the base on GSM8K, and on multiple choice (the mean accuracy over
  ARC-Easy, ARC-Challenge and MMLU; chance is 0.25, where the base model sits);
- RL raises GSM8K pass@1 on its held-out questions between its first and last evaluation.
Exits non-zero naming what is off; prints the gains when all is well.
"""
import json
import sys

# smallest gains that count: about half of what the tiny preset measured (tests/bench/RESULTS.md):
# GSM8K on 100 problems, mid +0.07 and sft +0.35 over the base; multiple choice (the mean of three
# tasks, 600 questions) sft +0.12; rl pass@1 over 100 held-out questions x 8 samples +0.08
MID_OVER_BASE = 0.03
SFT_OVER_BASE = 0.15
SFT_MC_OVER_BASE = 0.06
RL_PASS1_GAIN = 0.04
MC_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")


def mc_mean(scores):
    """Mean accuracy over MC_TASKS; None unless all three were measured."""
    if any(task not in scores for task in MC_TASKS):
        return None
    return sum(scores[task] for task in MC_TASKS) / len(MC_TASKS)


def gains(report):
    """The stage-over-stage numbers the check is about, as (name, before, after, margin)."""
    evals, rl_curve = report["evals"], report["stages"]["rl"]["curves"].get("pass@1", [])
    base_gsm8k = evals["base"].get("GSM8K")
    rl_first, rl_last = (rl_curve[0][1], rl_curve[-1][1]) if len(rl_curve) >= 2 else (None, None)
    return [("mid GSM8K over base", base_gsm8k, evals["mid"].get("GSM8K"), MID_OVER_BASE),
            ("sft GSM8K over base", base_gsm8k, evals["sft"].get("GSM8K"), SFT_OVER_BASE),
            ("sft multiple choice over base", mc_mean(evals["base"]), mc_mean(evals["sft"]), SFT_MC_OVER_BASE),
            ("rl held-out pass@1, first to last eval", rl_first, rl_last, RL_PASS1_GAIN)]


def problems(report):
    found = []
    for stage in ("base", "mid", "sft", "rl"):
        if not report["stages"].get(stage):
            found.append(f"stage {stage}: no training log")
        if not report["evals"].get(stage):
            found.append(f"stage {stage}: no evaluation")
    if found:
        return found
    base_curve = report["stages"]["base"]
    base = report["evals"]["base"]
    if not base.get("val_bpb", 99) < 1.0:
        found.append(f"base val bpb {base.get('val_bpb')} is not below 1.0 (untrained is about 3)")
    if not base.get("CORE", -1) > 0.05:
        found.append(f"base CORE {base.get('CORE')} is not above 0.05")
    if "final" in base_curve and not base_curve["final"].get("loss", 99) < 1.0:
        found.append(f"base final train loss {base_curve['final'].get('loss')} is not below 1.0")
    for name, before, after, margin in gains(report):
        if before is None or after is None:
            found.append(f"{name}: not measured (before {before}, after {after})")
        elif not after >= before + margin:
            found.append(f"{name}: {before:.3f} -> {after:.3f}, less than the +{margin} a tiny run shows")
    return found


if __name__ == "__main__":
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(__doc__.strip())
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/check_report.py PATH/report.json")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    bad = problems(report)
    for line in bad:
        print("report check FAILED:", line)
    if bad:
        sys.exit(1)
    base = report["evals"]["base"]
    print(f"report check passed: base val bpb {base['val_bpb']:.3f}, CORE {base['CORE']:.3f}; "
          + "; ".join(f"{name} {before:.3f} -> {after:.3f}" for name, before, after, _ in gains(report)))
