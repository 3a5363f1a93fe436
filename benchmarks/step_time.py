"""Step time of the invertible step, untiled and tiled, against autograd's, interleaved (the ratios in benchmarks/README.md).

Run: ``python benchmarks/step_time.py --size 256 --tile 128 --threads 1 2 --rounds 3`` (the paper's
configuration: C = 16, k = 7, 4 stacks, L = 4, batch 2; the training loop's step and drift policy,
:func:`pyramidflow.train.step.step_on_random_images`). Every step takes a warm-up call, then their calls
alternate, so a change in the machine's load hits all alike; each thread count runs in turn in the same
process (``torch.set_num_threads``). ``benchmarks/step_work.py`` counts the same steps' ATen calls and FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train.step import step_on_random_images


def _timed(mode: str, tile, size: int, channels: int, device: str):
    training = step_on_random_images(PyramidFlowConfig(mode=mode, channels=channels, backward_tile=tile), size, 2, device)

    def step() -> float:
        start = time.perf_counter()
        training()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    steps = {
        "autograd": _timed("autograd", None, args.size, args.channels, args.device),
        "invertible": _timed("invertible", None, args.size, args.channels, args.device),
        f"tiles of {args.tile}": _timed("invertible", args.tile, args.size, args.channels, args.device),
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {name: [] for name in steps}
        for step in steps.values():
            step()  # warm-up: Adam's state, allocator, this thread count's pools
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(step())
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"{args.size} px, C = {args.channels}, batch 2, {args.device}, {threads} thread(s), medians of {args.rounds}:")
        for name, t in times.items():
            print(f"{name:>14}: {medians[name]:.2f} s ({', '.join(f'{x:.2f}' for x in t)}), "
                  f"{medians[name] / medians['autograd']:.2f}x autograd")


if __name__ == "__main__":
    main()
