"""ATen calls and FLOPs of one training step: autograd, invertible, invertible in tiles (deterministic counts).

Run: ``python benchmarks/step_work.py --size 128 --tile 64`` (the paper's configuration: C = 16, k = 7,
4 stacks, L = 4, batch 2; the training loop's step and drift policy, ``pyramidflow.train.step``).
``--top 15`` also lists the most frequent ops of each step. ``tests/model/test_step_work.py`` pins the ratios.
"""

from __future__ import annotations

import argparse

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train.step import count_step_work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="list this many of the most frequent ops per step")
    args = parser.parse_args()
    steps = {"autograd": ("autograd", None), "invertible": ("invertible", None), f"invertible, tiles of {args.tile} px": ("invertible", args.tile)}
    rows = {name: count_step_work(PyramidFlowConfig(mode=mode, backward_tile=tile), args.size, args.batch_size)
            for name, (mode, tile) in steps.items()}
    base = rows["autograd"]
    print(f"one training step at {args.size} px, batch {args.batch_size}, paper configuration (every aten:: op, nested ones included)")
    print(f"{'':>28} {'ATen calls':>11} {'ratio':>6} {'GFLOP':>8} {'ratio':>6} {'conv':>5} {'atan':>5}")
    for name, work in rows.items():
        conv = work.by_op.get("aten::convolution", 0)
        print(f"{name:>28} {work.aten_calls:>11,} {work.aten_calls / base.aten_calls:>6.2f} {work.flops / 1e9:>8.1f} "
              f"{work.flops / base.flops:>6.2f} {conv:>5} {work.by_op.get('aten::atan', 0):>5}")
    for name, work in rows.items() if args.top else ():
        common = sorted(work.by_op.items(), key=lambda item: -item[1])[: args.top]
        print(f"{name}: " + ", ".join(f"{op[6:]} {n}" for op, n in common))


if __name__ == "__main__":
    main()
