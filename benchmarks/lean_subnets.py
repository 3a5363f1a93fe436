"""One coupling subnet's recorded evaluation, with and without the lean activation + convolution step.

Run: ``python benchmarks/lean_subnets.py`` (issue 26's subnet: conv3x3(8→64)-ReLU-conv3x3(64→16), one
sample at 256 px, channels-last as the coupling-aware rebuild runs it on CPU). The evaluation is what the
rebuild does per subnet (NOTE [recorded subnets] in pyramidflow/engine/subnets.py): forward with a graph on
a leaf, the output made contiguous, backward to the leaf and the parameters. Modes alternate, so a change in
the machine's load hits both alike; times are medians of ``--rounds`` in this process's CPU time. Peak: bytes
allocated during one evaluation (profiler events in time order); ATen calls: a dispatch mode (deterministic).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from pyramidflow.engine.lean_subnets import lean_evaluation
from pyramidflow.memory import peak_memory_cpu

from foreign_couplings import _CallCounter  # the ATen calls of one step, as that benchmark counts them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--activation", choices=("relu", "leaky"), default="relu")
    args = parser.parse_args()
    torch.manual_seed(0)
    act = nn.ReLU() if args.activation == "relu" else nn.LeakyReLU(0.1)
    net = nn.Sequential(nn.Conv2d(8, args.hidden, 3, padding=1), act, nn.Conv2d(args.hidden, 16, 3, padding=1))
    x = torch.randn(1, 8, args.size, args.size).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(1, 16, args.size, args.size)

    def evaluation(lean: bool) -> None:
        with lean_evaluation(net, [x]) if lean else contextlib.nullcontext():
            out = net(x).contiguous()
        torch.autograd.grad(out, [x, *net.parameters()], grad)

    level = 16 * args.size * args.size * 4
    rows = {}
    for lean in (False, True):
        evaluation(lean)
        peak, _ = peak_memory_cpu(lambda: evaluation(lean))
        with _CallCounter() as counter:
            evaluation(lean)
        rows[lean] = {"peak": peak, "calls": counter.calls, "times": []}
    for i in range(args.rounds):
        for lean in ((False, True) if i % 2 == 0 else (True, False)):
            start = time.process_time()
            evaluation(lean)
            rows[lean]["times"].append(time.process_time() - start)
    print(f"conv3x3(8->{args.hidden})-{args.activation}-conv3x3({args.hidden}->16), 1 sample, {args.size} px, channels-last, "
          f"{torch.get_num_threads()} threads, CPU time medians of {args.rounds}; level = 16 channels")
    for lean in (False, True):
        row = rows[lean]
        print(f"{'lean' if lean else 'autograd ops':<13} {statistics.median(row['times']) * 1e3:8.1f} ms  "
              f"peak {row['peak'] / 2**20:6.1f} MiB ({row['peak'] / level:5.2f} levels)  {row['calls']:4d} ATen calls")


if __name__ == "__main__":
    main()
