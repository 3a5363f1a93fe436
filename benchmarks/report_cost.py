"""What ``report.html`` adds to ``pyramidflow eval``'s time on the demo (the closing figure of issue 29).

Run: ``python benchmarks/report_cost.py --demo demo_out --rounds 5`` on a finished ``pyramidflow demo
--out demo_out`` (without ``--demo`` it runs the demo first, into a temporary folder). Each round runs
``pyramidflow eval`` on each of the demo's categories with ``--no-report`` and with the report, each
in a fresh process as a user runs it (matplotlib's import is part of the page's cost), in an order
that reverses every round so that a change in the machine's load hits all alike. ``--also DIR``
adds an arm: the report as the checkout in DIR writes it (e.g. ``--also /path/to/main`` for the code
before a change), run with DIR on ``PYTHONPATH``. Printed per category and for the three together:
the median wall time and CPU time of each arm, and what it adds to eval without the report.

What it measures: wall time, from starting ``pyramidflow eval`` to its exit, is what a user waits
(issue 29's "time"). CPU time is what the page costs in work: user + system time of the eval process
and of its children, which includes the report's plot process
(:class:`pyramidflow.inference.plot_worker.PlotWorker`: eval reaps it before it exits, so its time
is counted). The plot process imports matplotlib and draws while eval imports torch and runs
inference, so it shortens the wait only where a core is spare. On a machine other jobs load, the
wall times say little (and a second runnable process gets the eval a larger share of the CPU):
label such figures so, and read the CPU column.
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

# The console script `pyramidflow`, run by this interpreter with the arm's checkout on PYTHONPATH.
_CLI = "import sys; from pyramidflow.cli import main; sys.exit(main(sys.argv[1:]))"
_HERE = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed_eval(checkout: Path, demo: Path, category: str, out: Path, report: bool) -> tuple[float, float]:
    """``(wall s, CPU s)`` of one ``pyramidflow eval`` of ``checkout``'s code in a fresh process."""
    command = [sys.executable, "-c", _CLI, "eval", "--checkpoint", str(demo / category / "checkpoint.pt"),
               "--data", str(demo / "data"), "--category", category, "--out", str(out), "--device", "cpu"]
    if not report:
        command.append("--no-report")
    environment = dict(os.environ, PYTHONPATH=str(checkout))
    cpu, start = _children_cpu(), time.perf_counter()
    # Run in the checkout: `python -c` puts the working folder first on sys.path, before PYTHONPATH.
    subprocess.run(command, check=True, env=environment, cwd=checkout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def _row(name: str, arm: tuple[float, float], base: tuple[float, float]) -> str:
    wall, cpu = arm
    return (f"{name:<34} {wall:8.2f} s {100 * (wall - base[0]) / base[0]:+7.1f}%   "
            f"{cpu:8.2f} s {100 * (cpu - base[1]) / base[1]:+7.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="a finished `pyramidflow demo --out DIR` (default: run one)")
    parser.add_argument("--rounds", type=int, default=5, help="evals per category and arm (5)")
    parser.add_argument("--also", type=Path, nargs="*", default=[], metavar="DIR",
                        help="other checkouts whose report to time beside this one's")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pyramidflow-report-cost-"))
    demo = None if args.demo is None else args.demo.resolve()  # the evals run in the checkouts' folders
    if demo is None:
        demo = scratch / "demo"
        subprocess.run([sys.executable, "-c", _CLI, "demo", "--out", str(demo), "--device", "cpu"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(_HERE)))
    missing = [c for c in synthetic.CATEGORIES if not (demo / c / "checkpoint.pt").is_file()]
    if missing:
        sys.exit(f"report_cost: {demo} holds no checkpoint of {', '.join(missing)}; give the folder of a finished "
                 "`pyramidflow demo --out DIR`.")
    arms = {"no report": (_HERE, False), "report": (_HERE, True)}
    arms.update({f"report of {path}": (path.resolve(), True) for path in args.also})
    times: dict = {(name, c): [] for name in arms for c in synthetic.CATEGORIES}
    for round_ in range(args.rounds):
        order = list(arms) if round_ % 2 == 0 else list(arms)[::-1]
        for category in synthetic.CATEGORIES:
            for number, name in enumerate(order):
                checkout, report = arms[name]
                out = scratch / f"{category}-{number}"
                times[name, category].append(_timed_eval(checkout, demo, category, out, report))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def medians(name: str, category: str) -> tuple[float, float]:
        return tuple(statistics.median(t[i] for t in times[name, category]) for i in (0, 1))

    settings = json.loads((demo / "demo.json").read_text()) if (demo / "demo.json").is_file() else {}
    print(f"pyramidflow eval on the demo {settings} in {demo}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; medians of {args.rounds}, added: against no report")
    for category in [*synthetic.CATEGORIES, "all three"]:
        print(f"\n{category:<34} {'wall':>10} {'added':>8}   {'CPU':>10} {'added':>8}")
        for name in arms:
            if category == "all three":
                both = [medians(name, c) for c in synthetic.CATEGORIES]
                arm = (sum(w for w, _ in both), sum(c for _, c in both))
                base = [medians("no report", c) for c in synthetic.CATEGORIES]
                print(_row(name, arm, (sum(w for w, _ in base), sum(c for _, c in base))))
            else:
                print(_row(name, medians(name, category), medians("no report", category)))


if __name__ == "__main__":
    main()
