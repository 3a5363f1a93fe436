"""The CPU seconds of ``report.html``'s plot thread inside ``pyramidflow eval``, a figure a loaded machine hardly moves.

Run: ``python benchmarks/report_thread_cpu.py --demo demo_out --rounds 4 [--also DIR]`` on a finished
``pyramidflow demo --out demo_out``. Each round runs ``pyramidflow eval`` with the report on each
category, in a fresh process per checkout (this one, and each ``--also DIR`` on ``PYTHONPATH``),
interleaved, and prints the median CPU time (``time.thread_time``) of the plot thread's two jobs of
:class:`pyramidflow.inference.report.EvalPlots`: importing matplotlib and drawing the training loss,
then the ROC, PRO and histogram plots. What the page costs beyond its thread (a busier collector, the
larger interpreter to tear down at exit) is in ``benchmarks/report_cost.py``'s CPU column, which
other jobs on the machine move by more than the page's whole cost.
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

# In the child: time the two jobs EvalPlots submits, on its thread, and print them last.
_CHILD = """
import sys, time
import pyramidflow.inference.report as report
def timed(job, name):
    def run(*args, **kwargs):
        start = time.thread_time()
        try:
            return job(*args, **kwargs)
        finally:
            print(f"REPORT-THREAD {name} {time.thread_time() - start:.4f}", file=sys.__stderr__)
    return run
report._loss_section = timed(report._loss_section, "import+loss")
report._curve_plots = timed(report._curve_plots, "curves")
from pyramidflow.cli import main
sys.exit(main(sys.argv[1:]))
"""
_HERE = Path(__file__).resolve().parents[1]


def _thread_cpu(checkout: Path, demo: Path, category: str, out: Path) -> dict[str, float]:
    command = [sys.executable, "-c", _CHILD, "eval", "--checkpoint", str(demo / category / "checkpoint.pt"),
               "--data", str(demo / "data"), "--category", category, "--out", str(out), "--device", "cpu"]
    # Run in the checkout: `python -c` puts the working folder first on sys.path, before PYTHONPATH.
    done = subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(checkout)), cwd=checkout,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Anywhere in stderr: a line may follow the progress bar's carriage returns.
    return {job: float(seconds) for job, seconds in re.findall(r"REPORT-THREAD (\S+) ([0-9.]+)", done.stderr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `pyramidflow demo --out DIR`")
    parser.add_argument("--rounds", type=int, default=4, help="evals per category and checkout (4)")
    parser.add_argument("--also", type=Path, nargs="*", default=[], metavar="DIR",
                        help="other checkouts whose plot thread to time beside this one's")
    args = parser.parse_args()
    demo = args.demo.resolve()  # the evals run in the checkouts' folders
    scratch = Path(tempfile.mkdtemp(prefix="pyramidflow-report-thread-"))
    checkouts = {"this checkout": _HERE, **{str(path): path.resolve() for path in args.also}}
    jobs: dict = {name: {} for name in checkouts}
    for round_ in range(args.rounds):
        for category in synthetic.CATEGORIES:
            for name, checkout in checkouts.items():
                for job, seconds in _thread_cpu(checkout, demo, category, scratch / category).items():
                    jobs[name].setdefault(job, []).append(seconds)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print(f"plot thread of `pyramidflow eval` on {demo}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; medians over {args.rounds} rounds x {len(synthetic.CATEGORIES)} "
          "categories, CPU seconds")
    for name, times in jobs.items():
        medians = {job: statistics.median(values) for job, values in times.items()}
        print(f"{name:<40} " + "  ".join(f"{job} {value:.3f} s" for job, value in medians.items())
              + f"  both {sum(medians.values()):.3f} s")


if __name__ == "__main__":
    main()
