"""Compile the Triton kernels for real NVIDIA GPUs on a machine without one (the compile matrix).

Triton's interpreter (``TRITON_INTERPRET=1``, how the kernel tests run on a
CPU) skips the compiler, which refuses things the interpreter accepts. Here
each kernel variant a launcher can start (each module's ``launch_variants()``)
goes through ``triton.compile`` to a cubin for a GPU target, with the ptxas
shipped inside the triton wheel, and ``cuobjdump`` (also shipped) reads the
cubin's resource usage: registers per thread, stack frame (where ptxas puts
spilled registers) and static shared memory.

The full product of the launchers' choices is thousands of variants per
target (:func:`all_variants`), hours of compiling on two cores; the test
suite compiles a covering subset (:func:`covering_variants`): every pair of
values of any two axes (dtype, VN mode, flags, layout, offsets, block size,
warps) appears together in at least one compiled variant, and for every
block configuration the variant with the most work (every flag on, strided,
64-bit offsets), where registers run out first.

Run ``python -m pyramidflow.kernels.triton._compile`` for the table of kernels/README.md
(``--full`` compiles the whole product).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import itertools
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ._launch import KernelVariant

__all__ = [
    "TARGETS",
    "CompileResult",
    "all_variants",
    "covering_variants",
    "nvidia_backend_missing",
    "compile_variant",
    "compile_matrix",
    "resource_table",
]

# Compute capabilities compiled for: A100, RTX 30xx, RTX 40xx, H100 / H200.
TARGETS = {80: "A100", 86: "RTX 30xx", 89: "RTX 40xx", 90: "H100/H200"}
_MODULES = ("affine_coupling", "volume_norm", "_math")
# Axes that choose how a kernel is launched rather than what it computes.
_LAUNCH_AXES = ("BLOCK_SIZE", "num_warps", "BLOCK_G", "BLOCK_M")
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class CompileResult:
    """What compiling one variant for one target gave.

    Attributes:
        variant: the kernel variant.
        capability: the target's compute capability, e.g. 90.
        error: the compiler's message (last lines), or ``None`` when it compiled.
        registers: registers per thread.
        spill_bytes: stack frame plus local memory per thread, in bytes (0: no spill).
        shared_bytes: shared memory per program, in bytes (Triton's and the cubin's static).
        approximate_divisions: float32 divisions compiled to the approximate instruction (NOTE [atan without libdevice]).
        seconds: compile time.
    """

    variant: KernelVariant
    capability: int
    error: Optional[str] = None
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    approximate_divisions: int = 0
    seconds: float = 0.0


def all_variants() -> List[KernelVariant]:
    """Every variant the launchers of ``pyramidflow.kernels`` can start on a GPU (imports triton)."""
    variants: List[KernelVariant] = []
    for name in _MODULES:
        variants += importlib.import_module(f"{__package__}.{name}").launch_variants()
    return variants


def _work(variant: KernelVariant) -> int:
    """How much a variant does, to find the one most likely to run out of registers."""
    score = 0
    for name, value in variant.constexprs:
        if name in _LAUNCH_AXES:
            continue
        if name == "DENSE":
            score += not value  # strided operands: four strides and the index arithmetic
        elif isinstance(value, bool):
            score += value
        elif isinstance(value, int):
            score += value > 0
    return score


def covering_variants(variants: Sequence[KernelVariant]) -> List[KernelVariant]:
    """A subset of ``variants`` in which every pair of axis values of a kernel occurs together.

    Starts from the most-work variant of each kernel at each launch
    configuration in float32, then adds, greedily, the variant that covers
    the most pairs not yet covered, until every pair that occurs in
    ``variants`` occurs in the subset. Deterministic: ties go to the earlier variant.
    """
    chosen: List[KernelVariant] = []
    for kernel in dict.fromkeys(v.kernel for v in variants):
        rows = [v for v in variants if v.kernel == kernel]
        seeds: Dict[tuple, KernelVariant] = {}
        for v in rows:
            if v.dtype != "fp32" and any(r.dtype == "fp32" for r in rows):
                continue
            config = tuple((k, x) for k, x in sorted(v.axes().items()) if k in _LAUNCH_AXES)
            if config not in seeds or _work(v) > _work(seeds[config]):
                seeds[config] = v
        pairs = [_pairs(v) for v in rows]
        covered = set().union(*(pairs[rows.index(v)] for v in seeds.values()))
        picked = list(seeds.values())
        wanted = set().union(*pairs)
        while covered != wanted:
            best = max(range(len(rows)), key=lambda i: len(pairs[i] - covered))
            picked.append(rows[best])
            covered |= pairs[best]
        chosen += picked
    return chosen


def _pairs(variant: KernelVariant) -> frozenset:
    items = sorted(variant.axes().items())
    return frozenset(itertools.combinations(items, 2))


def nvidia_backend_missing() -> Optional[str]:
    """Why kernels cannot be compiled for NVIDIA GPUs here, or ``None`` when they can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"triton ships its NVIDIA compiler (ptxas) for Linux x86_64 only; this is {sys.platform} {platform.machine()}"
    try:
        import triton  # noqa: F401, PLC0415
        from triton.backends import backends  # noqa: PLC0415
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    if "nvidia" not in backends:
        return f"this triton has no NVIDIA backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        if _tool(tool) is None:
            return f"triton's NVIDIA tool {tool} was not found"
    return None


def _tool(name: str) -> Optional[str]:
    """Path of one of the NVIDIA tools shipped with triton (knobs in triton >= 3.4, else the wheel's bin/)."""
    try:
        from triton import knobs  # noqa: PLC0415

        path = getattr(knobs.nvidia, name.replace("-", "_")).path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    import triton  # noqa: PLC0415

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _signature(kernel, variant: KernelVariant) -> Dict[str, str]:
    constexprs = dict(variant.constexprs)
    wide = "i64" if constexprs.get("USE_INT64") else "i32"
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ("fp32" if name in variant.fp32_pointers else variant.dtype)
        elif name == "clamp":
            signature[name] = "fp32"
        else:
            signature[name] = wide
    return signature


def _attrs(kernel, signature: Dict[str, str]) -> Dict[tuple, list]:
    """Pointers 16-byte aligned, as torch allocates them: the case in which loads vectorise (most registers)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")}


def compile_variant(variant: KernelVariant, capability: int) -> CompileResult:
    """Compile one variant for ``sm_{capability}`` and read its resource usage; errors are returned, not raised.

    Must run in a process where triton was imported without ``TRITON_INTERPRET=1``
    (:func:`compile_matrix` starts such processes).
    """
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(variant.module), variant.kernel)
        constexprs = dict(variant.constexprs)
        signature = _signature(kernel, variant)
        index = {name: i for i, name in enumerate(kernel.arg_names)}
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(index[k],): v for k, v in constexprs.items()}, attrs=_attrs(kernel, signature)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": variant.num_warps})
        registers, stack, shared, local = _resource_usage(compiled.asm["cubin"])
        shared = max(shared, int(getattr(compiled.metadata, "shared", 0) or 0))
        approximate = len(re.findall(r"\bdiv\.(?:full|approx)\.f32", compiled.asm["ptx"]))
        return CompileResult(variant, capability, None, registers, stack + local, shared, approximate, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001  (a compile error is the result being measured)
        message = " | ".join(str(error).strip().splitlines()[-6:])
        return CompileResult(variant, capability, f"{type(error).__name__}: {message}", seconds=time.perf_counter() - start)


def _resource_usage(cubin: bytes) -> Tuple[int, int, int, int]:
    """``(registers, stack bytes, static shared bytes, local bytes)`` of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    match = _USAGE.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for the kernel: {out[-500:]!r}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


# NOTE [Triton interpreter]
# With TRITON_INTERPRET=1 Triton runs the kernels interpreted, on CPU tensors
# (the test suite sets it where there is no CUDA: tests/conftest.py). Triton
# reads the variable when a kernel is defined, that is when an op module is
# first imported, so it must be set or unset before that in each process. The
# compile matrix's workers are spawned processes that compile for real: each
# drops the variable in its initializer, before its first job imports an op
# module, and writes to a cache of its own.
def _init_worker(cache_dir: str) -> None:
    # A worker compiles for real: no interpreter, its own cache (NOTE [Triton interpreter]).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.simplefilter("ignore")


def _compile_job(job: Tuple[KernelVariant, int]) -> CompileResult:
    return compile_variant(*job)


def compile_matrix(
    variants: Sequence[KernelVariant],
    capabilities: Iterable[int] = tuple(TARGETS),
    *,
    cache_dir: Optional[str] = None,
    workers: Optional[int] = None,
) -> List[CompileResult]:
    """Compile every variant for every target in fresh processes, in parallel.

    The processes are spawned (not forked) with ``TRITON_INTERPRET`` unset, so
    they compile even when the caller runs the interpreter, and share
    ``cache_dir`` as Triton's cache (a temporary directory when ``None``).

    Returns:
        one :class:`CompileResult` per (variant, target), in that order.
    """
    jobs = [(v, cc) for v in variants for cc in capabilities]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="pyramidflow-triton-cache-") as scratch:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(cache_dir or scratch,)) as pool:
            return list(pool.map(_compile_job, jobs, chunksize=4))


def resource_table(results: Sequence[CompileResult]) -> str:
    """Markdown table: per kernel and target, the variants compiled and their largest registers, spill and shared memory."""
    capabilities = sorted({r.capability for r in results})
    lines = [
        "| kernel | variants | " + " | ".join(f"sm_{cc} regs / spill B / smem B" for cc in capabilities) + " |",
        "|---|---:|" + "---:|" * len(capabilities),
    ]
    for kernel in dict.fromkeys(r.variant.kernel for r in results):
        mine = [r for r in results if r.variant.kernel == kernel and r.error is None]
        cells = []
        for cc in capabilities:
            at = [r for r in mine if r.capability == cc]
            cells.append(f"{max(r.registers for r in at)} / {max(r.spill_bytes for r in at)} / {max(r.shared_bytes for r in at)}" if at else "-")
        count = len({r.variant for r in results if r.variant.kernel == kernel})
        lines.append(f"| `{kernel}` | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyramidflow.kernels.triton._compile", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="compile every variant, not the covering subset (hours on 2 cores)")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: one per core)")
    args = parser.parse_args(argv)
    missing = nvidia_backend_missing()
    if missing:
        print(f"error: cannot compile for NVIDIA GPUs here: {missing}.", file=sys.stderr)
        return 2
    everything = all_variants()
    variants = everything if args.full else covering_variants(everything)
    start = time.perf_counter()
    results = compile_matrix(variants, workers=args.workers)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if r.error is not None]
    spilled = [r for r in results if r.error is None and r.spill_bytes]
    print(f"compiled {len(variants)} of {len(everything)} variants x {len(TARGETS)} targets = {len(results)} kernels in {elapsed:.0f} s: "
          f"{len(failed)} failures, {len(spilled)} with spills\n")  # fmt: skip
    print(resource_table(results))
    for r in failed + spilled:
        print(f"sm_{r.capability} {r.variant.label()}: {r.error or f'{r.spill_bytes} bytes spilled'}")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
