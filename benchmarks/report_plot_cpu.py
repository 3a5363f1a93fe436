"""The CPU seconds of ``report.html``'s plot process in ``pyramidflow eval``, and how long eval waited for it.

Run: ``python benchmarks/report_plot_cpu.py --demo demo_out --rounds 4`` on a finished ``pyramidflow
demo --out demo_out``. Each round runs ``pyramidflow eval`` with the report on each category in a fresh
process and prints the medians of: the plot process's CPU time (importing matplotlib and drawing the
four plots: :class:`pyramidflow.inference.plot_worker.PlotWorker`'s child, which eval reaps, so its
time is eval's children's), and the wall time eval's own thread spent in
:meth:`pyramidflow.inference.report.EvalPlots.figures`, waiting for plots not drawn yet (0 where the
process kept ahead). Other jobs on the machine hardly move the first figure; the second grows with
them. What the whole page adds to eval is ``benchmarks/report_cost.py``'s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pyramidflow.data import synthetic

# In the child: time EvalPlots.figures on eval's thread, and print it and the reaped children's CPU at exit.
_CHILD = """
import atexit, resource, sys, time
import pyramidflow.inference.report as report
waited = []
figures = report.EvalPlots.figures
def timed(self):
    start = time.perf_counter()
    try:
        return figures(self)
    finally:
        waited.append(time.perf_counter() - start)
report.EvalPlots.figures = timed
def say():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"REPORT-PLOTS cpu {usage.ru_utime + usage.ru_stime:.4f} waited {sum(waited):.4f}", file=sys.__stderr__)
atexit.register(say)
from pyramidflow.cli import main
sys.exit(main(sys.argv[1:]))
"""
_HERE = Path(__file__).resolve().parents[1]


def _plot_costs(demo: Path, category: str, out: Path) -> tuple[float, float]:
    command = [sys.executable, "-c", _CHILD, "eval", "--checkpoint", str(demo / category / "checkpoint.pt"),
               "--data", str(demo / "data"), "--category", category, "--out", str(out), "--device", "cpu"]
    # Run in the checkout: `python -c` puts the working folder first on sys.path, before PYTHONPATH.
    done = subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(_HERE)), cwd=_HERE,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Anywhere in stderr: a line may follow the progress bar's carriage returns.
    cpu, waited = re.findall(r"REPORT-PLOTS cpu ([0-9.]+) waited ([0-9.]+)", done.stderr)[-1]
    return float(cpu), float(waited)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `pyramidflow demo --out DIR`")
    parser.add_argument("--rounds", type=int, default=4, help="evals per category (4)")
    args = parser.parse_args()
    demo = args.demo.resolve()  # the evals run in the checkout's folder
    scratch = Path(tempfile.mkdtemp(prefix="pyramidflow-report-plots-"))
    costs = []
    for round_ in range(args.rounds):
        for category in synthetic.CATEGORIES:
            costs.append(_plot_costs(demo, category, scratch / category))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print(f"report.html's plots in `pyramidflow eval` on {demo}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; medians of {len(costs)} evals ({args.rounds} rounds x "
          f"{len(synthetic.CATEGORIES)} categories)")
    print(f"plot process CPU {statistics.median(c for c, _ in costs):.3f} s   eval waited for the plots "
          f"{statistics.median(w for _, w in costs):.3f} s")


if __name__ == "__main__":
    main()
