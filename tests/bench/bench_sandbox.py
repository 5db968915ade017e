"""
Time per program in evaluate.py's code sandbox, with bubblewrap and without (the fallback), one
program at a time, so the figure is the overhead a HumanEval evaluation pays per sample (wall time;
the CPU time of the children is not reported: bwrap's own children are not reaped into ours).

python tests/bench/bench_sandbox.py --runs=30
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import evaluate as ev  # noqa: E402

PROMPT = ("import random\nfrom typing import List\n\n"
          "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\"Any two closer than threshold?\"\"\"\n")
SOLUTION = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
TEST = ("def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0], 0.3)\n"
        "    assert not candidate([1.0, 2.0, 3.0], 0.5)\n"
        "    for _ in range(100):\n"
        "        xs = [random.random() for _ in range(20)]\n"
        "        assert candidate(xs, 1.0)\n")
JUDGE = {"prompt": PROMPT, "test": TEST, "entry_point": "has_close_elements"}
PROGRAMS = {   # name: (code, judge)
    "empty program": ("pass\n", None),
    "HumanEval-like, whole program": (PROMPT + SOLUTION + "\n" + TEST + "\ncheck(has_close_elements)\n", None),
    "HumanEval-like, as HumanEval runs it (tests apart, 102 calls)": (PROMPT + SOLUTION, JUDGE),
}

if __name__ == "__main__":
    runs = int(sys.argv[1].split("=")[1]) if len(sys.argv) > 1 else 30
    print(f"bubblewrap: {'yes' if ev.bwrap_command() else 'NO (both columns are the fallback)'}; "
          f"{runs} runs each; load average {os.getloadavg()[0]:.1f}")
    print("| program | bwrap ms (median / p90) | fallback ms (median / p90) |")
    print("|---|---|---|")
    for name, (code, judge) in PROGRAMS.items():
        times = {True: [], False: []}
        for _ in range(runs):   # interleaved, so drifting load hits both alike
            for isolated in (True, False):
                t0 = time.perf_counter()
                result = ev.run_sandboxed(code, isolated=isolated, judge=judge)
                times[isolated].append(1000 * (time.perf_counter() - t0))
                assert result.passed, result.reason
        p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
        print(f"| {name} | {statistics.median(times[True]):.0f} / {p90[True]:.0f} "
              f"| {statistics.median(times[False]):.0f} / {p90[False]:.0f} |")
