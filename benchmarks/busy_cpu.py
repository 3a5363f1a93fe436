"""The demo's training step on a busy CPU: idle, and while a second 2-thread training runs on the same cores.

Run: ``python benchmarks/busy_cpu.py --steps 8 --settings torch passive one cli`` (the demo's model and
image side, :func:`pyramidflow.train.step.step_on_random_images`, the step ``pyramidflow demo`` trains).
Each setting runs in fresh processes, since OpenMP reads its environment once, when torch loads: first
the step alone ("idle"), then again while a neighbour process trains the same model with 2 threads
("loaded"). The neighbour runs the same setting with ``OMP_NUM_THREADS=2`` (``--neighbour same``), or
torch's own defaults (``--neighbour torch``). Reported: the median step time after one warm-up step, and
loaded / idle. The settings, as environment variables (a variable set here is the user's value, which
:func:`pyramidflow.cpu_threads.apply_cpu_defaults` leaves alone):

- ``torch``: torch's and libgomp's own defaults (one thread per core, spin-wait ``GOMP_SPINCOUNT=300000``);
- ``passive``: one thread per core, ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once at a barrier);
- ``one``: ``OMP_NUM_THREADS=1``;
- ``cli``: nothing set: what ``pyramidflow`` chooses (``apply_cpu_defaults``).

The figures are only comparable within one run of this script on one machine: state the machine and
what else ran on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CORES = str(os.cpu_count() or 1)
SETTINGS = {
    "torch": {"OMP_NUM_THREADS": _CORES, "GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_NUM_THREADS": _CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "one": {"OMP_NUM_THREADS": "1"},
    "cli": {},
}
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def _worker(args: argparse.Namespace) -> None:
    """One process: the CLI's CPU defaults, then the demo's step, one JSON line per step on stdout."""
    from pyramidflow.cpu_threads import apply_cpu_defaults

    chosen = apply_cpu_defaults()  # before torch loads, as the `pyramidflow` command does

    import torch

    from pyramidflow.data import synthetic
    from pyramidflow.experiments.demo import demo_overrides
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.train import TrainConfig
    from pyramidflow.train.step import step_on_random_images

    config = PyramidFlowConfig.for_category(args.category, **demo_overrides(args.category))
    assert args.category in synthetic.CATEGORIES
    settings = TrainConfig(steps=1)
    step = step_on_random_images(config, args.size, settings.batch_size, "cpu", settings)
    print(json.dumps({"threads": torch.get_num_threads(), "chosen": chosen,
                      "env": {k: os.environ.get(k) for k in _THREAD_VARIABLES}}), flush=True)
    taken = 0
    while args.steps == 0 or taken < args.steps:
        start = time.perf_counter()
        step()
        print(json.dumps({"step": time.perf_counter() - start}), flush=True)
        taken += 1


def _command(args: argparse.Namespace, steps: int) -> list:
    return [sys.executable, __file__, "--worker", "--steps", str(steps), "--size", str(args.size),
            "--category", args.category]


def _environment(setting: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARIABLES}
    env.update(setting)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def _measure(args: argparse.Namespace, setting: dict) -> dict:
    """Run the worker to the end; its header and the median of its step times after the first."""
    load = os.getloadavg()[0]
    done = subprocess.run(_command(args, args.steps), env=_environment(setting), capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"busy_cpu: the worker failed:\n{done.stderr}")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    steps = [line["step"] for line in lines[1:]]
    return {**lines[0], "median_s": statistics.median(steps[1:]), "steps_s": [round(s, 3) for s in steps],
            "load_before": load}


def _loaded(args: argparse.Namespace, setting: dict, neighbour: dict) -> dict:
    """Measure while a neighbour trains; the neighbour has taken a step before the measurement starts."""
    process = subprocess.Popen(_command(args, 0), env=_environment(neighbour), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        process.stdout.readline()  # its header
        process.stdout.readline()  # its first step: it is training now
        return _measure(args, setting)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per measurement, the first a warm-up (8)")
    parser.add_argument("--size", type=int, default=None, help="image side (the demo's)")
    parser.add_argument("--category", default=None, help="synthetic category whose demo model is trained (the first)")
    parser.add_argument("--settings", nargs="+", default=["torch", "passive", "one", "cli"], choices=list(SETTINGS))
    parser.add_argument("--neighbour", choices=("same", "torch"), default="same",
                        help="the second training: the measured setting with 2 threads (same), or torch's defaults")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is None or args.category is None:  # the demo's settings, read without loading torch in the parent
        from pyramidflow.data import synthetic
        from pyramidflow.experiments.demo import DEMO_SIZE

        args.size = args.size or DEMO_SIZE
        args.category = args.category or synthetic.CATEGORIES[0]
    if args.worker:
        _worker(args)
        return
    print(f"busy_cpu: demo model of {args.category}, {args.size} px, {os.cpu_count()} cores, "
          f"{args.steps} steps each (median after a warm-up), neighbour: {args.neighbour} with 2 threads")
    for name in args.settings:
        setting = SETTINGS[name]
        neighbour = {**(setting if args.neighbour == "same" else SETTINGS["torch"]), "OMP_NUM_THREADS": "2"}
        idle = _measure(args, setting)
        loaded = _loaded(args, setting, neighbour)
        print(json.dumps({"setting": name, "threads": idle["threads"], "chosen": idle["chosen"],
                          "idle_s": round(idle["median_s"], 3), "loaded_s": round(loaded["median_s"], 3),
                          "ratio": round(loaded["median_s"] / idle["median_s"], 2),
                          "load_before": [round(idle["load_before"], 2), round(loaded["load_before"], 2)],
                          "loaded_steps_s": loaded["steps_s"]}), flush=True)


if __name__ == "__main__":
    main()
