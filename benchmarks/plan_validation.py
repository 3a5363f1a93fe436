"""``pyramidflow plan``'s predicted peak against the measured one, per mode (the table in benchmarks/README.md).

Measured: profiler allocation events in time order on CPU
(:func:`pyramidflow.memory.peak_memory_cpu`), ``max_memory_allocated``
on CUDA, over a run that builds the model and Adam inside the probe and takes
two training steps with the Fourier loss (:func:`pyramidflow.memory.plan.measure_training_peak`).

Run: ``python benchmarks/plan_validation.py 256:16 512:16 1024:4`` (side:channels;
the paper's k = 7, 4 stacks, L = 4, batch 2). ``--json FILE`` appends one line per row.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.memory.plan import MODES, measure_training_peak, predict_peak


def rows(cases, device: str, modes=MODES, batch_size: int = 2):
    for case in cases:
        side, channels = (int(x) for x in case.split(":"))
        for mode in modes:
            config = PyramidFlowConfig(channels=channels, mode=mode)
            predicted = predict_peak(config, side, batch_size).peak
            start = time.perf_counter()
            measured = measure_training_peak(config, side, batch_size, device)
            yield dict(size=side, channels=channels, batch_size=batch_size, mode=mode, predicted_bytes=predicted,
                       measured_bytes=measured, error=predicted / measured - 1, device=device,
                       seconds=round(time.perf_counter() - start, 1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", metavar="SIDE:CHANNELS")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    args = parser.parse_args()
    print(f"{'size':>5} {'C':>3} {'mode':<11} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}")
    for row in rows(args.cases, args.device, args.modes):
        print(f"{row['size']:>5} {row['channels']:>3} {row['mode']:<11} {row['predicted_bytes'] / 2**20:>14.1f} "
              f"{row['measured_bytes'] / 2**20:>13.1f} {row['error']:>+7.1%}", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
