"""The demo's training step on a busy CPU: alone, and beside a second 2-thread training on the same cores.

Run: ``python benchmarks/busy_cpu.py --rounds 3`` (5 minutes on 2 cores that other jobs used, most of it
the ``torch`` setting's steps beside the neighbour; the demo's model and image side, batch 2, the step ``pyramidflow train`` takes:
:func:`pyramidflow.train.step.step_on_random_images`). Each setting runs in fresh processes, since
OpenMP reads its environment once, as torch loads. A neighbour process trains the same model with 2
threads, with the measured setting (``--neighbour same``) or torch's own default (``--neighbour torch``);
the measured process's steps alternate between the neighbour paused (SIGSTOP: "alone") and running
("beside"), so that a change in what else runs on the machine hits both alike. Reported: medians of
``--rounds`` steps each after a warm-up step, and beside / alone. The settings, as environment
variables (a variable set here is the user's choice, which
:func:`pyramidflow.cpu_threads.apply_cpu_defaults` leaves alone):

- ``cli``: nothing set: what the ``pyramidflow`` command chooses (``apply_cpu_defaults``);
- ``passive``: one thread per core, ``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all);
- ``spin300``: one thread per core, ``GOMP_SPINCOUNT=300`` (a spin shorter than the command's 1000);
- ``one``: ``OMP_NUM_THREADS=1`` (and the command's wait policy);
- ``torch``: torch's and GNU OpenMP's own defaults (one thread per core, spinning ``GOMP_SPINCOUNT=300000``).

The figures compare within one run on one machine: state the machine and what else ran on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CORES = str(os.cpu_count() or 1)
SETTINGS = {
    "torch": {"OMP_NUM_THREADS": _CORES, "GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_NUM_THREADS": _CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "spin300": {"OMP_NUM_THREADS": _CORES, "GOMP_SPINCOUNT": "300"},
    "one": {"OMP_NUM_THREADS": "1"},
    "cli": {},
}
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def _worker(args: argparse.Namespace) -> None:
    """One process: the CLI's CPU defaults, then the demo's step, one JSON line per step on stdout; with
    ``--paced``, each step waits for a line on stdin, so that the parent can choose what runs beside it."""
    from pyramidflow.cpu_threads import apply_cpu_defaults

    chosen = apply_cpu_defaults()  # before torch loads, as the `pyramidflow` command does

    import torch

    from pyramidflow.data import synthetic
    from pyramidflow.experiments.demo import DEMO_SIZE, demo_overrides
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.train import TrainConfig
    from pyramidflow.train.step import step_on_random_images

    category, size = args.category or synthetic.CATEGORIES[0], args.size or DEMO_SIZE
    config = PyramidFlowConfig.for_category(category, **demo_overrides(category))
    settings = TrainConfig(steps=1)  # the demo's training settings, but for the budget
    step = step_on_random_images(config, size, settings.batch_size, "cpu", settings)
    print(json.dumps({"category": category, "size": size, "threads": torch.get_num_threads(), "chosen": chosen,
                      "env": {k: os.environ.get(k) for k in _THREAD_VARIABLES}}), flush=True)
    while not args.paced or sys.stdin.readline():
        start = time.perf_counter()
        step()
        print(json.dumps({"step": time.perf_counter() - start}), flush=True)


def _start(args: argparse.Namespace, setting: dict, **pipes) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker"]
    command += ["--size", str(args.size)] if args.size else []
    command += ["--category", args.category] if args.category else []
    return subprocess.Popen(command + (["--paced"] if "stdin" in pipes else []), env=_environment(setting),
                            text=True, **pipes)


def _environment(setting: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARIABLES}
    env.update(setting)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def _measure(args: argparse.Namespace, setting: dict, neighbour: dict) -> dict:
    """Interleaved steps of one process, alone and beside a training neighbour (paused in between with
    SIGSTOP), so that the load of other jobs drifts alike over both; medians after a warm-up step each."""
    with tempfile.TemporaryFile("w+") as neighbour_out:
        other = _start(args, neighbour, stdout=neighbour_out, stderr=subprocess.DEVNULL)
        measured = _start(args, setting, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            header = measured.stdout.readline()
            if not header:
                raise SystemExit(f"busy_cpu: the measured worker did not start (status {measured.wait()})")
            header = json.loads(header)
            while neighbour_out.seek(0) is not None and len(neighbour_out.readlines()) < 2:
                if other.poll() is not None:
                    raise SystemExit(f"busy_cpu: the neighbour stopped (status {other.returncode})")
                time.sleep(0.5)  # until it is training: its header and a first step written
            times = {"idle": [], "loaded": []}
            for turn in range(2 * args.rounds + 2):  # idle, loaded, loaded, idle, ...: the first of each warms up
                loaded = turn % 4 in (1, 2)
                other.send_signal(signal.SIGCONT if loaded else signal.SIGSTOP)
                measured.stdin.write("\n")
                measured.stdin.flush()
                line = measured.stdout.readline()
                if not line:
                    raise SystemExit(f"busy_cpu: the measured worker stopped (status {measured.wait()})")
                times["loaded" if loaded else "idle"].append(json.loads(line)["step"])
        finally:
            for process in (measured, other):
                process.kill()  # SIGKILL ends a stopped process too
                process.wait()
    return {**header, **{f"{name}_s": statistics.median(steps[1:]) for name, steps in times.items()},
            **{f"{name}_steps_s": [round(s, 3) for s in steps] for name, steps in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="steps alone and beside the neighbour, each (3)")
    parser.add_argument("--size", type=int, default=None, help="image side (the demo's)")
    parser.add_argument("--category", default=None, help="synthetic category whose demo model is trained (the first)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--neighbour", choices=("same", "torch"), default="same",
                        help="the second training: the measured setting with 2 threads (same), or torch's defaults")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    print(f"busy_cpu: {os.cpu_count()} cores, medians of {args.rounds} "
          f"interleaved steps alone / beside a 2-thread neighbour ({args.neighbour}); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for name in args.settings:
        setting = SETTINGS[name]
        neighbour = {**(setting if args.neighbour == "same" else SETTINGS["torch"]), "OMP_NUM_THREADS": "2"}
        result = _measure(args, setting, neighbour)
        print(json.dumps({"setting": name, "category": result["category"], "size": result["size"],
                          "threads": result["threads"], "chosen": result["chosen"],
                          "idle_s": round(result["idle_s"], 3), "loaded_s": round(result["loaded_s"], 3),
                          "ratio": round(result["loaded_s"] / result["idle_s"], 2),
                          "idle_steps_s": result["idle_steps_s"], "loaded_steps_s": result["loaded_steps_s"]}), flush=True)
    print(f"busy_cpu: load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
