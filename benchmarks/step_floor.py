"""Where a training step's time goes, and the floor that sets for invertible mode's time ratio.

Run: ``python benchmarks/step_floor.py --size 256 --threads 1 2`` (the paper's configuration, batch 2,
the training loop's step: ``pyramidflow.train.step``).

Invertible backward must run the network F once more than autograd (the rebuild), and F is
convolutions: its floor is autograd's step plus one more forward pass of F's convolutions. This
splits each step's operator time (``torch.profiler``, self CPU time of every op, after a warm-up
step) into forward convolutions, convolution backward and the rest, and prints
``floor = (autograd step + autograd's forward convolutions) / autograd step``: the ratio invertible
mode would reach if everything but its second forward pass cost what autograd's does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from pyramidflow.model import PyramidFlowConfig
from pyramidflow.train.step import step_on_random_images


@dataclass(frozen=True)
class StepTime:
    """One step's operator self time in seconds, split three ways."""

    forward_conv: float
    conv_backward: float
    rest: float

    @property
    def total(self) -> float:
        return self.forward_conv + self.conv_backward + self.rest


def _is_conv_backward(name: str) -> bool:
    return "convolution_backward" in name or name.startswith("aten::_slow_conv2d_backward")


def _is_forward_conv(name: str) -> bool:
    return not _is_conv_backward(name) and ("mkldnn_convolution" in name or name.startswith("aten::_slow_conv2d_forward"))


def step_time(mode: str, size: int, batch_size: int) -> StepTime:
    """The operator self time of one warm training step in ``mode``, split (median of three profiled steps)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    step = step_on_random_images(PyramidFlowConfig(mode=mode), size, batch_size)
    step()
    runs = []
    for _ in range(3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        split = [0.0, 0.0, 0.0]
        for event in prof.key_averages():
            kind = 0 if _is_forward_conv(event.key) else 1 if _is_conv_backward(event.key) else 2
            split[kind] += event.self_cpu_time_total / 1e6
        runs.append(StepTime(*split))
    return sorted(runs, key=lambda run: run.total)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"one training step at {args.size} px, batch {args.batch_size}, paper configuration; operator self time, s")
    print(f"{'threads':>7} {'mode':>11} {'fwd conv':>9} {'conv bwd':>9} {'rest':>7} {'total':>7} {'ratio':>6} {'floor':>6}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        base = step_time("autograd", args.size, args.batch_size)
        lean = step_time("invertible", args.size, args.batch_size)
        floor = (base.total + base.forward_conv) / base.total
        for name, run in (("autograd", base), ("invertible", lean)):
            ratio = run.total / base.total
            print(f"{threads:>7} {name:>11} {run.forward_conv:>9.3f} {run.conv_backward:>9.3f} {run.rest:>7.3f} "
                  f"{run.total:>7.3f} {ratio:>6.2f} {floor if name == 'invertible' else 1.0:>6.2f}")


if __name__ == "__main__":
    main()
