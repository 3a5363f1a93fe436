"""What ``report.html`` adds to ``pyramidflow eval``'s time on the demo (the closing figure of issue 29).

Run: ``python benchmarks/report_cost.py --demo demo_out --rounds 5`` on a finished ``pyramidflow demo
--out demo_out`` (without ``--demo`` it runs the demo first, into a temporary folder). Each round runs
``pyramidflow eval`` on each of the demo's categories twice, with the report and with ``--no-report``,
each in a fresh process as a user runs it (matplotlib's import is part of the page's cost), the two
alternating which goes first so that a change in the machine's load hits both alike. Printed per
category and for the three together: the median wall time and CPU time (user + system of the child
and its threads) of each, and what the report adds as a fraction of eval without it.

Wall time is what a user waits; the report draws its plots on a second thread
(:class:`pyramidflow.inference.report.EvalPlots`), which shortens the wait only where a core is
spare. CPU time is what the page costs in work. On a machine other jobs load, the wall times say
little (and a second runnable thread gets the process a larger share of the CPU): label such
figures so, and read the CPU column.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyramidflow.data import synthetic

# The console script `pyramidflow`, run by this interpreter (the checkout on PYTHONPATH, not an install).
_CLI = "import sys; from pyramidflow.cli import main; sys.exit(main(sys.argv[1:]))"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed_eval(demo: Path, category: str, out: Path, report: bool) -> tuple[float, float]:
    """``(wall s, CPU s)`` of one ``pyramidflow eval`` in a fresh process."""
    command = [sys.executable, "-c", _CLI, "eval", "--checkpoint", str(demo / category / "checkpoint.pt"),
               "--data", str(demo / "data"), "--category", category, "--out", str(out), "--device", "cpu"]
    if not report:
        command.append("--no-report")
    cpu, start = _children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def _added(with_report: list[float], without: list[float]) -> str:
    a, b = statistics.median(with_report), statistics.median(without)
    return f"{b:7.2f} s {a:7.2f} s {100 * (a - b) / b:+6.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="a finished `pyramidflow demo --out DIR` (default: run one)")
    parser.add_argument("--rounds", type=int, default=5, help="evals per category and arm (5)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pyramidflow-report-cost-"))
    demo = args.demo
    if demo is None:
        demo = scratch / "demo"
        subprocess.run([sys.executable, "-c", _CLI, "demo", "--out", str(demo), "--device", "cpu"], check=True)
    missing = [c for c in synthetic.CATEGORIES if not (demo / c / "checkpoint.pt").is_file()]
    if missing:
        sys.exit(f"report_cost: {demo} holds no checkpoint of {', '.join(missing)}; give the folder of a finished "
                 "`pyramidflow demo --out DIR`.")
    times: dict = {(c, report): ([], []) for c in synthetic.CATEGORIES for report in (True, False)}
    for round_ in range(args.rounds):
        for category in synthetic.CATEGORIES:
            for report in (True, False) if round_ % 2 == 0 else (False, True):
                wall, cpu = _timed_eval(demo, category, scratch / f"{category}-{int(report)}", report)
                times[category, report][0].append(wall)
                times[category, report][1].append(cpu)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    settings = json.loads((demo / "demo.json").read_text()) if (demo / "demo.json").is_file() else {}
    print(f"pyramidflow eval on the demo {settings} in {demo}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; medians of {args.rounds}:")
    print(f"{'category':<10} {'wall: no report':>15} {'report':>9} {'added':>7}   "
          f"{'CPU: no report':>14} {'report':>9} {'added':>7}")
    total = {(report, i): [] for report in (True, False) for i in (0, 1)}
    for category in synthetic.CATEGORIES:
        on, off = times[category, True], times[category, False]
        print(f"{category:<10} {_added(on[0], off[0]):>34}   {_added(on[1], off[1]):>33}")
        for report, arm in ((True, on), (False, off)):
            for i in (0, 1):
                total[report, i].append(statistics.median(arm[i]))
    print(f"{'all three':<10} {_added([sum(total[True, 0])], [sum(total[False, 0])]):>34}   "
          f"{_added([sum(total[True, 1])], [sum(total[False, 1])]):>33}")


if __name__ == "__main__":
    main()
