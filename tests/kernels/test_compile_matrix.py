"""The compile matrix: every Triton kernel compiled for sm_80, sm_86, sm_89 and sm_90, without a GPU.

The interpreter the other kernel tests use skips Triton's compiler; here the
variants the launchers can start go through the real one (kernels/triton/_compile.py)
in fresh processes without ``TRITON_INTERPRET``. A compile error, a register
spill or an approximate division fails the test. Where this triton has no
NVIDIA backend the test skips, unless ``PYRAMIDFLOW_REQUIRE_COMPILE=1`` (CI
sets it in .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import importlib
import itertools
import os
import time

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported: the Triton kernels cannot run here")

from pyramidflow import kernels  # noqa: E402
from pyramidflow.kernels.triton import _compile, _launch  # noqa: E402


@pytest.fixture(scope="session")
def all_variants():
    return _compile.all_variants()


def test_compile_matrix(all_variants, tmp_path_factory, record_property):
    """Covering variants x 4 targets: 0 compile errors, 0 spills, 0 approximate divisions (takes minutes on 2 cores)."""
    missing = _compile.nvidia_backend_missing()
    if missing:
        if os.environ.get("PYRAMIDFLOW_REQUIRE_COMPILE") == "1":
            pytest.fail(f"PYRAMIDFLOW_REQUIRE_COMPILE=1 but the compile matrix cannot run: {missing}")
        pytest.skip(f"compile matrix: {missing}")
    variants = _compile.covering_variants(all_variants)
    start = time.perf_counter()
    results = _compile.compile_matrix(variants, cache_dir=str(tmp_path_factory.mktemp("triton-cache")))
    elapsed = time.perf_counter() - start
    kernels_compiled = sorted({v.kernel for v in variants})
    record_property("compile_matrix", f"{len(kernels_compiled)} kernels, {len(variants)} variants, {len(results)} compiles, {elapsed:.0f} s")
    print(f"\ncompile matrix: {len(kernels_compiled)} kernels, {len(variants)} of {len(all_variants)} variants x "
          f"{len(_compile.TARGETS)} targets = {len(results)} compiles in {elapsed:.0f} s\n{_compile.resource_table(results)}")  # fmt: skip
    assert len(results) == len(variants) * len(_compile.TARGETS)
    assert {r.capability for r in results} == {80, 86, 89, 90}
    failures = [f"sm_{r.capability} {r.variant.label()}: {r.error}" for r in results if r.error]
    assert not failures, "\n".join(failures[:20])
    spills = [f"sm_{r.capability} {r.variant.label()}: {r.spill_bytes} bytes" for r in results if r.spill_bytes]
    assert not spills, "register spills:\n" + "\n".join(spills)
    divisions = [r.variant.label() for r in results if r.approximate_divisions]
    assert not divisions, f"approximate float32 divisions (use tl.math.div_rn): {divisions}"
    assert all(r.registers > 0 for r in results)  # the resource usage was read at all


def test_every_kernel_of_the_package_has_variants(all_variants):
    """A new @triton.jit kernel that no launch_variants() lists would escape the compile matrix."""
    listed = {(v.module.rsplit(".", 1)[-1], v.kernel) for v in all_variants}
    jitted = set()
    for name in ("affine_coupling", "volume_norm", "_math"):
        module = importlib.import_module(f"pyramidflow.kernels.triton.{name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "arg_names"):
                jitted.add((name, attr))
    assert jitted == listed


def test_covering_subset_holds_every_pair(all_variants):
    chosen = _compile.covering_variants(all_variants)
    assert set(chosen) <= set(all_variants) and len(chosen) < len(all_variants) / 10
    for kernel in {v.kernel for v in all_variants}:
        def pairs(rows):
            return set().union(*(itertools.combinations(sorted(v.axes().items()), 2) for v in rows))

        assert pairs(v for v in chosen if v.kernel == kernel) == pairs(v for v in all_variants if v.kernel == kernel)
    # every launch configuration is compiled with the most work (where registers run out first)
    heaviest = [v for v in chosen if v.kernel == "_affine_coupling_bwd_kernel" and dict(v.constexprs)["WRITE_X"]
                and dict(v.constexprs)["USE_INT64"] and not dict(v.constexprs)["DENSE"] and v.dtype == "fp32"]  # fmt: skip
    assert {(dict(v.constexprs)["BLOCK_SIZE"], v.num_warps) for v in heaviest} == set(_launch.elementwise_configs())


def test_elementwise_configs_keep_eight_elements_per_thread_at_most():
    """NOTE [elements per thread]: more spilled registers in the compile matrix."""
    assert all(block // (32 * warps) <= 8 for block, warps in _launch.elementwise_configs())


def test_launches_are_variants_the_matrix_compiles(all_variants, monkeypatch):
    """Every launch of the ops (interpreted here) is a listed variant, so the list cannot drift from the launchers."""
    launch_axes = ("BLOCK_SIZE", "BLOCK_G", "BLOCK_M")
    listed = {(v.kernel, v.dtype, tuple((k, x) for k, x in v.constexprs if k not in launch_axes)) for v in all_variants}
    constexpr_names = {k for v in all_variants for k, _ in v.constexprs} - set(launch_axes)
    seen = []

    def recording(kernel, n_elements, key, args):
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[args["r_ptr"].dtype]
        flags = tuple(sorted((k, v) for k, v in args.items() if k in constexpr_names))
        seen.append((kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__, dtype, flags))

    monkeypatch.setattr(_launch, "elementwise_launch", recording)
    for dtype, volume_norm, channels_last, grads in itertools.product(
        (torch.float32, torch.bfloat16), (None, "CVN", "SVN"), (False, True), ((True, True), (True, False), (False, True))
    ):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x, r, t, g = (torch.randn(2, 3, 5, 7, dtype=dtype).to(memory_format=fmt) for _ in range(4))
        kernels.affine_coupling_bwd(x, r, t, g, volume_norm=volume_norm, backend="triton")
        rt = torch.cat([r, t], dim=1)  # the engine's into-calls: outputs over operands, r and t chunks of one tensor
        r_, t_ = rt.chunk(2, dim=1)
        kernels.affine_coupling_bwd_into(x.clone(), r_, t_, g.clone(), out=(x.clone(), g.clone(), r_, t_), volume_norm=volume_norm, backend="triton")
        y_into = x.clone()
        kernels.affine_coupling_into(y_into, r_, t_, out=y_into, volume_norm=volume_norm, backend="triton")
        with torch.no_grad():
            kernels.affine_coupling_inverse(x, r, t, volume_norm=volume_norm, backend="triton")
        xg, rg = x.clone().requires_grad_(grads[0]), r.clone().requires_grad_(grads[1])
        y, _ = kernels.affine_coupling(xg, rg, t, volume_norm=volume_norm, backend="triton")
        y.backward(g)
        leaf_r = r.clone().requires_grad_(grads[1])
        _, y_local = kernels.affine_coupling_reconstruct(x, leaf_r, t.clone().requires_grad_(True), volume_norm=volume_norm, backend="triton")
        y_local.backward(g)
    assert {name for name, _, _ in seen} == {"_affine_coupling_kernel", "_affine_coupling_bwd_kernel"}
    assert not set(seen) - listed, sorted(set(seen) - listed)[:5]
