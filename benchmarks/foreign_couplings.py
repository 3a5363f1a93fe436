"""Other people's flow blocks under InvertibleSequential: step time and peak memory against plain autograd.

Run: ``python benchmarks/foreign_couplings.py`` (issue 26's setting: C = 16, 128 px, batch 4, 8 blocks,
subnets conv3x3-ReLU-conv3x3 with 64 hidden channels; a user's call, no flags; and the hand-written coupling
at 256 px, batch 1, issue 26's table row, unless ``--skip-large``). Per block kind three
modes: plain autograd, invertible with the generic recipe (inverse, then forward again: every subnet
twice in backward) and invertible coupling-aware (each subnet once). Steps alternate between the
modes, so a change in the machine's load hits all alike; times are medians over ``--rounds`` (wall time, or
with ``--clock cpu`` the process's CPU time). ``--rebuild-samples`` sets how many samples the coupling-aware
backward rebuilds at a time (default: chosen from the size; the batch size: all at once). Peak:
bytes allocated during one step (pyramidflow.memory.peak_memory: CPU profiler events in time order, or
CUDA allocator stats). FLOPs (torch's flop counter) and ATen calls (a dispatch mode) of one step:
deterministic, a check on the timings of a busy machine. Kinds whose library is not installed are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from pyramidflow.engine import InvertibleSequential, register_coupling
from pyramidflow.memory import peak_memory

MODES = ("autograd", "generic", "coupling-aware")

#: Issue 26's table row "a FrEIA-style affine coupling written by hand, 8 blocks, 256 px, batch 1": its own image
#: size and batch, whatever ``--size`` and ``--batch`` say (``--skip-large`` leaves it out).
HAND_WRITTEN_LARGE = "hand-written coupling + swap, 256 px, batch 1"
_OWN_SETTINGS = {HAND_WRITTEN_LARGE: (256, 1)}


def _subnet(hidden: int) -> Callable[[int, int], nn.Module]:
    def build(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1))

    return build


def _kinds(channels: int, size: int, hidden: int) -> Dict[str, Callable[[], List[nn.Module]]]:
    """Block kind -> a builder of one block's modules (a block may be several modules, as GLOW + permutation)."""
    net = _subnet(hidden)
    half = channels // 2
    dims = [(channels, size, size)]
    kinds: Dict[str, Callable[[], List[nn.Module]]] = {}
    Fm = _optional("FrEIA.modules")
    if Fm is not None:
        kinds["FrEIA AllInOneBlock"] = lambda: [Fm.AllInOneBlock(dims, subnet_constructor=net)]
        kinds["FrEIA AllInOneBlock, soft permutation"] = lambda: [Fm.AllInOneBlock(dims, subnet_constructor=net, permute_soft=True)]
        kinds["FrEIA GLOWCouplingBlock + PermuteRandom"] = lambda: [
            Fm.GLOWCouplingBlock(dims, subnet_constructor=net), Fm.PermuteRandom(dims)
        ]
        kinds["FrEIA RNVPCouplingBlock"] = lambda: [Fm.RNVPCouplingBlock(dims, subnet_constructor=net)]
        kinds["FrEIA NICECouplingBlock"] = lambda: [Fm.NICECouplingBlock(dims, subnet_constructor=net)]
    nf = _optional("normflows")
    if nf is not None:
        kinds["normflows GlowBlock"] = lambda: [nf.flows.GlowBlock(channels, hidden)]
        kinds["normflows AffineCouplingBlock"] = lambda: [nf.flows.AffineCouplingBlock(net(half, 2 * half))]
    from drift_report import ChannelSwap, TanhAffineCoupling  # a FrEIA-convention coupling written by hand

    register_coupling(TanhAffineCoupling, subnets=("net",), per_sample=True)  # its maths treats each sample alone
    kinds["hand-written coupling (registered) + swap"] = lambda: [TanhAffineCoupling(channels, hidden), ChannelSwap(channels)]
    kinds[HAND_WRITTEN_LARGE] = kinds["hand-written coupling (registered) + swap"]
    memcnn = _optional("memcnn")
    if memcnn is not None:
        kinds["memcnn AffineCoupling"] = lambda: [memcnn.AffineCoupling(Fm=net(half, half), adapter=memcnn.AffineAdapterNaive)]
        kinds["memcnn AdditiveCoupling"] = lambda: [memcnn.AdditiveCoupling(Fm=net(half, half))]
    return kinds


def _optional(name: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        return None


def _flow(build: Callable[[], List[nn.Module]], depth: int, device: str) -> InvertibleSequential:
    modules = [m for _ in range(depth) for m in build()]
    for module in modules:
        for p in module.parameters():  # small weights: unclamped maps (memcnn's) stay well conditioned
            if p.is_floating_point():
                p.data.mul_(0.5)
    return InvertibleSequential(*modules, drift="off").to(device)


def _set_mode(flow: InvertibleSequential, mode: str, couplings: List[Optional[object]], samples: Optional[int] = None) -> None:
    flow.mode = "autograd" if mode == "autograd" else "invertible"
    for block, coupling in zip(flow.blocks, couplings):
        if hasattr(block, "coupling"):
            block.coupling = coupling if mode == "coupling-aware" else None
            block.rebuild_samples = samples


def _step(flow: InvertibleSequential, x: torch.Tensor, release_outputs: bool = False) -> Callable[[], None]:
    def step() -> None:
        flow.zero_grad(set_to_none=True)
        y, logdet = flow(x, release_outputs=release_outputs)
        (0.5 * y.square().mean() - logdet.mean() / y[0].numel()).backward()

    return step


def _flops(step: Callable[[], None]) -> int:
    """FLOPs of one step. FlopCounterMode's module tracker hooks every module's inputs, which autograd.grad
    inside the engine's backward does not allow; its dispatch mode alone counts the same ops, all under "Global"."""
    counter = FlopCounterMode(display=False)
    counter.flop_counts.clear()
    with _FlopCounterMode(counter):
        step()
    return counter.get_total_flops()


class _CallCounter(TorchDispatchMode):
    """ATen calls of one step: with the FLOPs, the work a busy machine's timings cannot show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls(step: Callable[[], None]) -> int:
    with _CallCounter() as counter:
        step()
    return counter.calls


def measure(name: str, build: Callable[[], List[nn.Module]], args: argparse.Namespace) -> Dict[str, dict]:
    torch.manual_seed(0)
    flow = _flow(build, args.depth, args.device)
    couplings = [getattr(block, "coupling", None) for block in flow.blocks]
    size, batch = _OWN_SETTINGS.get(name, (args.size, args.batch))
    x = torch.randn(batch, args.channels, size, size, device=args.device)
    step = _step(flow, x, args.release_outputs)
    rows: Dict[str, dict] = {}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for mode in MODES:
        _set_mode(flow, mode, couplings, args.rebuild_samples)
        step()  # warm-up (and normflows' ActNorm initialisation in the first)
        peak, _ = peak_memory(step, args.device)
        rows[mode] = {"peak": peak, "flops": _flops(step), "calls": _calls(step), "times": []}
    for _ in range(args.rounds):
        for mode in MODES:
            _set_mode(flow, mode, couplings, args.rebuild_samples)
            start = clock()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            rows[mode]["times"].append(clock() - start)
    rows["coupling-aware"]["fused_blocks"] = sum(c is not None for c in couplings)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=None, help="run the kinds whose name contains this text")
    parser.add_argument(
        "--skip-large", action="store_true", help=f"leave out the row {HAND_WRITTEN_LARGE!r} (issue 26's own size and batch)"
    )
    parser.add_argument(
        "--release-outputs", action="store_true", help="a training step's opt-in: backward may reuse the outputs' memory"
    )
    parser.add_argument(
        "--rebuild-samples", type=int, default=None,
        help="samples the coupling-aware backward rebuilds at a time (default: chosen from the size; the batch: all at once)",
    )
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="step time as wall time or as this process's CPU time (less disturbed by other jobs on a busy CPU machine)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        f"{args.depth} blocks, C={args.channels}, {args.size} px, batch {args.batch}, subnets conv3x3-ReLU-conv3x3 "
        f"({args.hidden} hidden), {args.device}, {torch.get_num_threads()} threads, medians of {args.rounds} interleaved steps"
        + (", release_outputs=True" if args.release_outputs else "")
        + (f", rebuild_samples={args.rebuild_samples}" if args.rebuild_samples else "")
        + (", CPU time" if args.clock == "cpu" else "")
    )
    header = f"{'blocks':<48} {'mode':<15} {'step s':>8} {'time x':>7} {'peak MiB':>9} {'peak x':>7} {'FLOPs x':>8} {'ATen calls':>10}"
    print(header)
    print("-" * len(header))
    for name, build in _kinds(args.channels, args.size, args.hidden).items():
        if (args.only and args.only not in name) or (args.skip_large and name in _OWN_SETTINGS):
            continue
        rows = measure(name, build, args)
        base = rows["autograd"]
        base_time = statistics.median(base["times"])
        for mode in MODES:
            row = rows[mode]
            median = statistics.median(row["times"])
            label = name if mode == "autograd" else ""
            print(
                f"{label:<48} {mode:<15} {median:>8.3f} {median / base_time:>7.2f} {row['peak'] / 2**20:>9.1f} "
                f"{row['peak'] / base['peak']:>7.3f} {row['flops'] / base['flops']:>8.3f} {row['calls']:>10}",
                flush=True,
            )


if __name__ == "__main__":
    main()
