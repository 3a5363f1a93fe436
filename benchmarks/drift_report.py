"""Reconstruction drift, measured: the closing figures of issue 9 in one command.

    python benchmarks/drift_report.py            # every table (about 10 minutes on 2 CPU cores)
    python benchmarks/drift_report.py --only pyramidflow --seeds 0 1 2

Tables:

* ``pyramidflow``: the paper's PyramidFlow (C=16, k=7, 4 stacks, L=4, CVN), 128 px, batch 2, every
  parameter moved by N(0, 0.05²) noise (seeded). Float32 gradients of invertible mode under each drift
  policy, and of plain autograd, against a float64 autograd reference of the same model and images;
  whether a DriftWarning / DriftError came; how many blocks were recomputed; largest ``last_drift``;
  and the float32 round trip image -> latents -> image (``check_inverse``'s end-to-end figure).
* ``freia``: 32 FrEIA-convention blocks (16 affine couplings with tanh-bounded log-scales, each
  followed by a channel swap), 16 channels, 64 px, adapted by ``wrap``; same comparison.
* ``cost``: the paper's configuration at 256 px, batch 2, fresh initialisation: ``drift="warn"``
  against ``"off"``: step time (median of interleaved pairs) and peak memory (profiler allocation
  events), and whether the healthy model raised a (false) warning.

Relative gradient error: ``||g - g64|| / ||g64||`` over all parameters together ("all"), and the
largest and median of the same per parameter tensor.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

from pyramidflow import DriftError, DriftWarning, InvertibleSequential, PyramidFlow, PyramidFlowConfig, check_inverse
from pyramidflow.memory import peak_memory_cpu
from pyramidflow.model.loss import fourier_loss

POLICIES = ("warn", "raise", "recompute", "off")


# -- the two ill-conditioned flows -----------------------------------------------------------------


def ill_conditioned_pyramidflow(seed: int, size: int = 128, std: float = 0.05):
    """The paper's PyramidFlow with every parameter moved off its initialisation, and its images."""
    torch.manual_seed(seed)
    model = PyramidFlow(PyramidFlowConfig(channels=16, kernel_size=7, num_stacks=4, num_levels=4, volume_norm="CVN"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    images = torch.randn(2, 3, size, size)
    return model, images


class TanhAffineCoupling(nn.Module):
    """A FrEIA-convention affine coupling: ``y_b = exp(c tanh(r / c)) * x_b + t``, ``r, t`` from ``x_a``."""

    def __init__(self, channels: int, hidden: int, clamp: float = 2.0) -> None:
        super().__init__()
        self.clamp = clamp
        self.half = channels // 2
        self.net = nn.Sequential(
            nn.Conv2d(self.half, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 2 * (channels - self.half), 3, padding=1)
        )

    def forward(self, xs, c=[], rev=False, jac=True):
        (x,) = xs
        a, b = x[:, : self.half], x[:, self.half :]
        r, t = self.net(a).chunk(2, dim=1)
        s = self.clamp * torch.tanh(r / self.clamp)
        b = (b - t) * torch.exp(-s) if rev else b * torch.exp(s) + t
        logdet = s.flatten(1).sum(dim=1)
        return [torch.cat((a, b), dim=1)], (-logdet if rev else logdet)


class ChannelSwap(nn.Module):
    """A FrEIA-convention permutation: the two channel halves trade places (volume preserving)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.channels = channels

    def forward(self, xs, c=[], rev=False, jac=True):
        (x,) = xs
        cut = self.channels - self.half if rev else self.half
        return [torch.cat((x[:, cut:], x[:, :cut]), dim=1)], torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def freia_flow(seed: int, channels: int = 16, size: int = 64, couplings: int = 16, clamp: float = 2.0):
    """The 32-block FrEIA-style flow (coupling, swap, coupling, swap, ...) and its input."""
    torch.manual_seed(seed)
    blocks: List[nn.Module] = []
    for _ in range(couplings):
        blocks += [TanhAffineCoupling(channels, 2 * channels, clamp), ChannelSwap(channels)]
    return InvertibleSequential(*blocks), torch.randn(2, channels, size, size)


# -- measuring ------------------------------------------------------------------------------------


def _errors(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> Dict[str, float]:
    per = [float((g.double() - r).norm() / r.norm().clamp_min(1e-300)) for g, r in zip(grads, reference)]
    num = sum(float((g.double() - r).square().sum()) for g, r in zip(grads, reference))
    den = sum(float(r.square().sum()) for r in reference)
    return {"all": (num / den) ** 0.5, "max": max(per), "median": statistics.median(per)}


def _grads(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> List[Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def compare(model: nn.Module, seq: InvertibleSequential, loss64, loss32, settings: Dict[str, dict]) -> Dict[str, dict]:
    """Float32 gradient errors of each setting (engine attributes) against float64 autograd."""
    model64 = copy.deepcopy(model).double()
    seq64 = model64.flow if isinstance(model64, PyramidFlow) else model64
    seq64.mode = "autograd"
    reference = _grads(model64, loss64)
    rows = {}
    for name, attrs in settings.items():
        trial = copy.deepcopy(model)
        trial_seq = trial.flow if isinstance(trial, PyramidFlow) else trial
        for key, value in attrs.items():
            setattr(trial_seq, key, value)
        row: dict = {"warned": False, "raised": False}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row.update(_errors(_grads(trial, loss32), reference))
            except DriftError:
                row["raised"] = True
        row["warned"] = any(issubclass(w.category, DriftWarning) for w in caught)
        row["max_drift"] = max(trial_seq.last_drift) if trial_seq.last_drift else None
        row["blocks"] = len(trial_seq.last_drift) if trial_seq.last_drift else None
        row["recomputed"] = len(trial_seq.last_recomputed)
        rows[name] = row
    return rows


def _print_rows(title: str, rows: Dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'setting':<34} {'err all':>9} {'err max':>9} {'median':>9} {'warn':>5} {'raise':>5} {'recomp':>6} {'max drift':>9} {'blocks':>6}")
    for name, r in rows.items():
        def f(key):
            v = r.get(key)
            return f"{v:9.2e}" if isinstance(v, float) else f"{'-':>9}"
        print(
            f"{name:<34} {f('all')} {f('max')} {f('median')} {str(r['warned']):>5} {str(r['raised']):>5} "
            f"{r['recomputed']:>6} {f('max_drift')} {str(r['blocks']):>6}"
        )


def pyramidflow_table(seeds: Sequence[int], size: int) -> None:
    settings = {"autograd": {"mode": "autograd"}}
    settings.update({f"invertible, {p}": {"drift": p} for p in POLICIES})
    settings["invertible, anchor_every=4, off"] = {"drift": "off", "anchor_every": 4}
    for seed in seeds:
        model, images = ill_conditioned_pyramidflow(seed, size)
        model.train()
        rows = compare(
            model,
            model.flow,
            lambda m: fourier_loss(m(images.double())),
            lambda m: fourier_loss(m(images)),
            settings,
        )
        _print_rows(f"PyramidFlow 16/7/4 stacks/L=4/CVN, {size} px, batch 2, noise 0.05, seed {seed}", rows)
        with torch.no_grad():
            round_trip = model.inverse(model(images))
        image_error = float((round_trip - images).norm() / images.norm())
        levels = model.pyramid.decompose(model.features(images))
        report = check_inverse(model.flow, levels)
        print(
            f"  float32 round trip image -> latents -> image: {image_error:.2e}; check_inverse: end to end "
            f"{report.end_to_end:.2e}, largest single block {max(r.error for r in report):.2e}"
        )


def freia_table(seeds: Sequence[int], clamp: float) -> None:
    settings = {
        "autograd": {"mode": "autograd"},
        "invertible, off": {"drift": "off"},
        "invertible, warn": {"drift": "warn"},
        "invertible, recompute, tol 1e-7": {"drift": "recompute", "drift_tolerance": 1e-7},
        "invertible, anchor_every=4, off": {"drift": "off", "anchor_every": 4},
        "invertible, recompute (default tol)": {"drift": "recompute"},
    }
    for seed in seeds:
        seq, x = freia_flow(seed, clamp=clamp)

        def loss(m, x=x):
            z, logdet = m(x.to(next(m.parameters()).dtype))
            return 0.5 * z.square().mean() - logdet.mean() / z[0].numel()

        _print_rows(f"FrEIA-style flow, 16 couplings (clamp {clamp}) + 16 swaps, 16 ch, 64 px, batch 2, seed {seed}", compare(seq, seq, loss, loss, settings))


def _monitoring_ops_seconds(model: PyramidFlow, images: Tensor, repeats: int = 20) -> float:
    """Wall time of the monitoring's own work in one step, alone, at its most: every level of every block's
    input fingerprinted in forward and compared in backward (the Fingerprinter and the comparison the engine
    runs). Each block gets fresh copies of the levels, so nothing is remembered between blocks; in a step
    the engine projects a level a block passes through once (NOTE [levels a block passes through])."""
    from pyramidflow.engine.drift import Fingerprinter, fingerprint_drift

    with torch.no_grad():
        xs = model.pyramid.decompose(model.features(images))
    fingerprinter = Fingerprinter()
    blocks = len(model.flow.blocks)
    [fingerprinter.fingerprint(tuple(x.clone() for x in xs)) for _ in range(blocks)]  # warm the index cache
    total = 0.0
    for _ in range(repeats):
        inputs = [tuple(x.clone() for x in xs) for _ in range(blocks)]  # untimed: fresh tensors per block
        start = time.perf_counter()
        fingerprints = [fingerprinter.fingerprint(levels) for levels in inputs]
        drifts = [fingerprint_drift(fingerprinter, levels, fp) for levels, fp in zip(inputs, fingerprints)]
        torch.stack(drifts).tolist()
        total += time.perf_counter() - start
    return total / repeats


def cost_table(size: int, pairs: int, memory: bool = True) -> None:
    torch.manual_seed(0)
    model = PyramidFlow(PyramidFlowConfig())
    model.train()
    images = torch.randn(2, 3, size, size)

    def step():
        model.zero_grad(set_to_none=True)
        fourier_loss(model(images)).backward()

    times: Dict[str, List[float]] = {"warn": [], "off": []}
    cpu_times: Dict[str, List[float]] = {"warn": [], "off": []}
    peaks: Dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for policy in ("warn", "off"):  # warm-up, and the peaks (deterministic)
            model.flow.drift = policy
            step()
            if memory:
                peaks[policy] = peak_memory_cpu(step)[0]
        for pair in range(pairs):
            for policy in ("warn", "off") if pair % 2 == 0 else ("off", "warn"):  # ABBA: no order bias
                model.flow.drift = policy
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                times[policy].append(time.perf_counter() - start)
                cpu_times[policy].append(time.process_time() - cpu_start)
    model.flow.drift = "warn"
    step()
    false_warnings = sum(issubclass(w.category, DriftWarning) for w in caught)
    med = {p: statistics.median(t) for p, t in times.items()}
    print(f"\nCost of monitoring, paper configuration, {size} px, batch 2, fresh initialisation ({pairs} interleaved pairs, alternating order)")
    cpu = {p: statistics.median(t) for p, t in cpu_times.items()}
    print(f"  step wall time: warn {med['warn']:.3f} s, off {med['off']:.3f} s, ratio {med['warn'] / med['off']:.3f}")
    print(f"  step CPU time (process): warn {cpu['warn']:.3f} s, off {cpu['off']:.3f} s, ratio {cpu['warn'] / cpu['off']:.3f}")
    ops = _monitoring_ops_seconds(model, images)
    print(f"  monitoring ops alone, at most (every level of every block fingerprinted and compared): {ops * 1e3:.2f} ms per step, "
          f"{ops / med['off']:.2e} of the 'off' step")
    if memory:
        print(f"  peak memory: warn {peaks['warn'] / 2**20:.1f} MiB, off {peaks['off'] / 2**20:.1f} MiB, ratio {peaks['warn'] / peaks['off']:.4f}")
    print(f"  DriftWarnings on the healthy model: {false_warnings}; largest last_drift {max(model.flow.last_drift):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("pyramidflow", "freia", "cost"), action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=128, help="image size of the ill-conditioned PyramidFlow")
    parser.add_argument("--cost-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true", help="cost table: time only (the profiler pass is slow)")
    parser.add_argument("--clamp", type=float, default=2.0, help="tanh bound of the FrEIA-style couplings' log-scales")
    args = parser.parse_args()
    only = args.only or ["pyramidflow", "freia", "cost"]
    if "pyramidflow" in only:
        pyramidflow_table(args.seeds, args.size)
    if "freia" in only:
        freia_table(args.seeds, args.clamp)
    if "cost" in only:
        cost_table(args.cost_size, args.pairs, memory=not args.skip_memory)


if __name__ == "__main__":
    main()
