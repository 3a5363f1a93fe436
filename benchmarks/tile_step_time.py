"""Step time of the tiled invertible step against the untiled one, interleaved (the ratio in benchmarks/README.md).

Run: ``python benchmarks/tile_step_time.py --size 512 --tile 128 --rounds 3`` (the paper's configuration:
C = 16, k = 7, 4 stacks, L = 4, batch 2; the training loop's step and drift policy). Both models take a
warm-up step, then their steps alternate, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train.step import step_on_random_images


def _step(tile, size: int, channels: int, device: str):
    training = step_on_random_images(PyramidFlowConfig(channels=channels, backward_tile=tile), size, 2, device)

    def step() -> float:
        start = time.perf_counter()
        training()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    steps = {"untiled": _step(None, args.size, args.channels, args.device), f"tile {args.tile}": _step(args.tile, args.size, args.channels, args.device)}
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up: Adam's state, allocator
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>10}: median {medians[name]:.2f} s over {args.rounds} ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"ratio tiled / untiled: {medians[f'tile {args.tile}'] / medians['untiled']:.2f} "
          f"({args.size} px, C = {args.channels}, {args.device})")


if __name__ == "__main__":
    main()
