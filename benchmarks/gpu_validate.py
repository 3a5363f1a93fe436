"""One command for whoever gets a GPU: kernels, the 1024 / 2048 px step rows and ``plan`` checked on CUDA.

Run: ``python benchmarks/gpu_validate.py`` (about 5 minutes on one GPU; ``--quick`` for a smoke run).
It prints one table (``check | case | result | detail``) that a note can quote:

1. kernels: every Triton op against the PyTorch reference on CUDA, in float32,
   bfloat16 and float16, dense and channels-last, each VN mode
   (tolerances as in tests/kernels/test_affine_coupling.py), the ops that write into their operands included,
   which must keep the operands' storages and allocate less than one level (``max_memory_allocated``);
2. gradients: a small model's step on CUDA (float32, Triton, latents given up) against autograd in float64;
3. step: one training step of the paper's configuration (C = 16, k = 7, 4
   stacks, L = 4, batch 2, the training loop's drift policy) at 1024 and 2048 px, invertible with the
   Triton kernels and with the reference, and autograd at 1024 px, and tiled
   (``backward_tile=256``) at 2048 and 4096 px: peak memory
   (``max_memory_allocated``) and median step time;
4. plan: ``pyramidflow plan``'s predicted peak against ``max_memory_allocated``
   over a run that builds the model and Adam and takes two steps (the
   prediction has no CUDA margin; the check passes within +-15%, or when the
   measurement stays within the margin above the prediction).

Without CUDA it says so and exits with status 0 (nothing was checked).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch

# (dtype, atol, rtol) against the reference evaluated in float32 on the upcast inputs
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2), (torch.float16, 2e-3, 1e-3)]
KERNEL_SHAPE = (2, 16, 67, 131)  # not powers of two: masks and index arithmetic


def kernel_checks(device: str, shape: Sequence[int] = KERNEL_SHAPE, dtypes=DTYPES) -> List[Dict[str, str]]:
    """Each Triton op against the reference, per dtype, layout and VN mode: one row per case."""
    from pyramidflow import kernels
    from pyramidflow.kernels import reference

    rows = []
    for (dtype, atol, rtol), channels_last, volume_norm in itertools.product(dtypes, (False, True), (None, "CVN", "SVN")):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        gen = torch.Generator(device="cpu").manual_seed(0)
        x, r, t, g = (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).to(memory_format=fmt) for _ in range(4))
        up = [a.float() for a in (x, r, t, g)]
        worst = 0.0
        with torch.no_grad():
            pairs = [
                (kernels.affine_coupling(x, r, t, volume_norm=volume_norm, backend="triton")[0],
                 reference.affine_coupling(*up[:3], volume_norm=volume_norm)[0]),
                (kernels.affine_coupling_inverse(x, r, t, volume_norm=volume_norm, backend="triton")[0],
                 reference.affine_coupling_inverse(*up[:3], volume_norm=volume_norm)[0]),
            ]  # fmt: skip
            pairs += list(zip(kernels.affine_coupling_bwd(x, r, t, g, volume_norm=volume_norm, backend="triton"),
                              reference.affine_coupling_bwd(*up, volume_norm=volume_norm)))  # fmt: skip
            # the ops invertible backward and the lean forward call, writing into their operands in place
            into = [a.clone() for a in (x, g, r, t)]
            y_into = x.clone()
            pointers = [a.data_ptr() for a in (*into, y_into)]
            extra = _peak_growth(device, lambda: (
                kernels.affine_coupling_bwd_into(into[0], into[2], into[3], into[1], out=tuple(into), volume_norm=volume_norm, backend="triton"),
                kernels.affine_coupling_into(y_into, r, t, out=y_into, volume_norm=volume_norm, backend="triton"),
            ))  # fmt: skip
            pairs += list(zip(into, reference.affine_coupling_bwd(*up, volume_norm=volume_norm)))
            pairs.append((y_into, reference.affine_coupling(*up[:3], volume_norm=volume_norm)[0]))
        # in place: the same storages, and (on CUDA) nothing of a level's size allocated (NOTE [writing over the operands])
        ok = [a.data_ptr() for a in (*into, y_into)] == pointers and (extra is None or extra < x.nbytes)
        for got, want in pairs:
            error = (got.float() - want).abs()
            allowed = atol + rtol * want.abs()
            ok &= bool((error <= allowed).all())
            worst = max(worst, float((error / allowed).max()))
        name = f"{str(dtype).replace('torch.', '')} {'channels-last' if channels_last else 'dense'} {volume_norm or 'noVN'}"
        detail = f"max error / tolerance {worst:.2f}" + ("" if extra is None else f"; into-ops allocated {extra} B (level {x.nbytes} B)")
        rows.append(dict(check="kernels", case=name, result="pass" if ok else "FAIL", detail=detail))
    return rows


def _peak_growth(device: str, run: Callable[[], object]) -> "int | None":
    """Bytes ``run`` allocated at its peak beyond what was allocated before, on CUDA; ``None`` elsewhere."""
    if torch.device(device).type != "cuda":
        run()
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def gradient_rows(device: str, side: int = 64) -> List[Dict[str, str]]:
    """One training step's parameter gradients on ``device`` (float32, Triton kernels, the latents given up)
    against plain autograd in float64 on the CPU: the lean reconstruct ops as the GPU runs them."""
    import copy
    import os

    from pyramidflow.model import PyramidFlow, PyramidFlowConfig, fourier_loss

    rows = []
    for volume_norm in ("CVN", "SVN"):
        torch.manual_seed(0)
        model = PyramidFlow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, volume_norm=volume_norm)).train()
        with torch.no_grad():
            for block in model.flow.blocks:
                block.net.conv_out.weight.normal_(std=0.02)
        images = torch.randn(2, 3, side, side)
        grads = {}
        for mode, dtype, where in (("autograd", torch.float64, "cpu"), ("invertible", torch.float32, device)):
            m = copy.deepcopy(model).to(device=where, dtype=dtype)
            m.mode = mode
            os.environ["PYRAMIDFLOW_KERNELS"] = "triton" if where != "cpu" else "reference"
            fourier_loss(m(images.to(where, dtype), release_outputs=True)).backward()
            os.environ.pop("PYRAMIDFLOW_KERNELS", None)
            grads[mode] = [p.grad.detach().double().cpu() for p in m.parameters() if p.requires_grad]
        error = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads["invertible"], grads["autograd"]))
        rows.append(dict(check="gradients", case=f"{side} px {volume_norm} invertible triton float32", result="pass" if error <= 1e-3 else "FAIL",
                         detail=f"largest relative error vs autograd float64 {error:.1e}"))  # fmt: skip
    return rows


def _median_time(step: Callable[[], None], rounds: int, device: str) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_rows(device: str, cases: Sequence[tuple], channels: int = 16, rounds: int = 5) -> List[Dict[str, str]]:
    """Peak memory and median time of one training step per ``(side, mode, kernels, backward_tile)`` case."""
    import os

    from pyramidflow.memory import peak_memory
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.train.step import step_on_random_images

    rows = []
    for side, mode, backend, tile in cases:
        os.environ["PYRAMIDFLOW_KERNELS"] = backend
        # the method's optimizer, clipping and drift policy
        step = step_on_random_images(PyramidFlowConfig(channels=channels, mode=mode, backward_tile=tile), side, 2, device)
        step()  # warm-up: autotuning, Adam's state
        peak, _ = peak_memory(step, device)
        median = _median_time(step, rounds, device)
        tiled = "" if tile is None else f" tile {tile}"
        rows.append(dict(check="step", case=f"{side} px {mode}{tiled} {backend} C={channels}", result=f"{median:.3f} s",
                         detail=f"peak {peak / 2**20:.0f} MiB above the model and Adam"))  # fmt: skip
        del step
        os.environ.pop("PYRAMIDFLOW_KERNELS", None)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def plan_rows(device: str, cases: Sequence[tuple], tolerance: float = 0.15) -> List[Dict[str, str]]:
    """``plan``'s prediction against the measured peak (``max_memory_allocated`` on CUDA) per ``(side, channels, mode, tile)``."""
    from pyramidflow.model import PyramidFlowConfig
    from pyramidflow.memory.plan import CUDA_MARGIN, measure_training_peak, predict_peak

    rows = []
    for side, channels, mode, tile in cases:
        config = PyramidFlowConfig(channels=channels, mode=mode, backward_tile=tile)
        predicted = predict_peak(config, side, 2).peak
        measured = measure_training_peak(config, side, 2, device)
        ratio = measured / predicted - 1
        ok = abs(ratio) <= tolerance or (device == "cuda" and 0 <= ratio <= CUDA_MARGIN)
        tiled = "" if tile is None else f" tile {tile}"
        rows.append(dict(check="plan", case=f"{side} px C={channels} {mode}{tiled}", result="pass" if ok else "FAIL",
                         detail=f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({ratio:+.1%})"))  # fmt: skip
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: Sequence[Dict[str, str]]) -> str:
    widths = {key: max(len(key), *(len(r[key]) for r in rows)) for key in ("check", "case", "result", "detail")}
    lines = [" | ".join(key.ljust(widths[key]) for key in widths), "-|-".join("-" * w for w in widths.values())]
    lines += [" | ".join(r[key].ljust(widths[key]) for key in widths) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run of the command)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device here; nothing was checked (run it on a machine with a GPU).")
        return 0
    start = time.perf_counter()
    device = "cuda"
    name = torch.cuda.get_device_name()
    steps = [(256, "invertible", "triton", None), (256, "invertible", "triton", 64)] if args.quick else [
        (1024, "autograd", "reference", None), (1024, "invertible", "reference", None), (1024, "invertible", "triton", None),
        (2048, "invertible", "reference", None), (2048, "invertible", "triton", None),
        (2048, "invertible", "triton", 256), (4096, "invertible", "triton", 256),
    ]  # fmt: skip
    plans = [(256, 16, m, None) for m in ("invertible", "checkpoint", "autograd")]
    if not args.quick:
        plans += [(512, 16, m, None) for m in ("invertible", "checkpoint", "autograd")]
        plans += [(1024, 16, "invertible", None), (2048, 16, "invertible", None), (2048, 16, "invertible", 256), (4096, 16, "invertible", 256)]
    rows = kernel_checks(device) + gradient_rows(device) + step_rows(device, steps, rounds=2 if args.quick else 5) + plan_rows(device, plans)
    print(f"\npyramidflow GPU validation on {name}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s\n")
    print(format_table(rows))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
