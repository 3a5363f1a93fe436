"""``pyramidflow plan``'s predicted peak against the measured one, per mode (the table in benchmarks/README.md).

Measured: profiler allocation events in time order on CPU
(:func:`pyramidflow.memory.peak_memory_cpu`), ``max_memory_allocated``
on CUDA, over a run that builds the model and Adam inside the probe and takes
two training steps with the Fourier loss (:func:`pyramidflow.memory.plan.measure_training_peak`).

Run: ``python benchmarks/plan_validation.py 256:16 512:16 1024:4`` (side:channels;
the paper's k = 7, 4 stacks, L = 4, batch 2). ``--json FILE`` appends one line per row.
``--backward-tile T`` plans and measures the tiled step (docs/tiling.md). The ``state`` column is the
pyramid and its gradients (2 × the latents' bytes), what every invertible step keeps whatever the tile:
the peak minus it is the working set that tiling makes flat in resolution.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.memory.plan import MODES, measure_training_peak, predict_peak


def pyramid_and_gradient_bytes(config: PyramidFlowConfig, side: int, batch_size: int, itemsize: int = 4) -> int:
    """Bytes of the latent pyramid of a batch, twice (the levels and their gradients)."""
    feature_side = side // config.input_stride
    return 2 * sum(batch_size * config.channels * (feature_side >> i) ** 2 * itemsize for i in range(config.num_levels))


def rows(cases, device: str, modes=MODES, batch_size: int = 2, backward_tile=None):
    for case in cases:
        side, channels = (int(x) for x in case.split(":"))
        for mode in modes:
            config = PyramidFlowConfig(channels=channels, mode=mode, backward_tile=backward_tile)
            predicted = predict_peak(config, side, batch_size).peak
            start = time.perf_counter()
            measured = measure_training_peak(config, side, batch_size, device)
            yield dict(size=side, channels=channels, batch_size=batch_size, mode=mode, predicted_bytes=predicted,
                       measured_bytes=measured, error=predicted / measured - 1, device=device, backward_tile=backward_tile,
                       state_bytes=pyramid_and_gradient_bytes(config, side, batch_size),
                       seconds=round(time.perf_counter() - start, 1))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", metavar="SIDE:CHANNELS")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--backward-tile", type=int, default=None, metavar="PX", help="plan and measure the tiled step")
    args = parser.parse_args()
    print(f"{'size':>5} {'C':>3} {'mode':<11} {'tile':>5} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7} {'state MiB':>10}")
    for row in rows(args.cases, args.device, args.modes, backward_tile=args.backward_tile):
        print(f"{row['size']:>5} {row['channels']:>3} {row['mode']:<11} {str(row['backward_tile']):>5} "
              f"{row['predicted_bytes'] / 2**20:>14.1f} {row['measured_bytes'] / 2**20:>13.1f} {row['error']:>+7.1%} "
              f"{row['state_bytes'] / 2**20:>10.1f}", flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
