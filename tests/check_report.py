"""
check_report.py: checks the numbers of a report card written by `bash run_all.sh tiny`.

    python tests/check_report.py $SLIMCHAT_HOME/report/report.json

Every stage must have trained and been evaluated, and the numbers must show learning that a
tiny model on the mirror reliably shows: pretraining takes val bits-per-byte from about 3 to
well under 1 and CORE well above 0 (the mirror's CORE tasks are drawn from the same world),
and every chat stage produces graded GSM8K answers. Exits non-zero naming what is off.
"""
import json
import sys


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
    if not base["val_bpb"] < 1.0:
        found.append(f"base val bpb {base['val_bpb']:.3f} is not below 1.0 (untrained is about 3)")
    if not base["CORE"] > 0.05:
        found.append(f"base CORE {base['CORE']:.3f} is not above 0.05")
    for stage in ("mid", "sft", "rl"):
        if "GSM8K" not in report["evals"][stage]:
            found.append(f"stage {stage}: no GSM8K result")
    if "final" in base_curve and not base_curve["final"].get("loss", 99) < 1.0:
        found.append(f"base final train loss {base_curve['final'].get('loss')} is not below 1.0")
    return found


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/check_report.py PATH/report.json")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    bad = problems(report)
    for line in bad:
        print("report check FAILED:", line)
    if bad:
        sys.exit(1)
    evals = report["evals"]
    print(f"report check passed: base val bpb {evals['base']['val_bpb']:.3f}, CORE {evals['base']['CORE']:.3f}; "
          + ", ".join(f"{s} GSM8K {evals[s]['GSM8K']:.3f}" for s in ("mid", "sft", "rl")))
