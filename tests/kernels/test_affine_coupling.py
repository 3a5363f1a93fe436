"""The Triton affine-coupling kernels against the PyTorch reference (kernels/triton/affine_coupling.py).

Without CUDA every kernel runs under Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported), so the
shapes are small but odd, to exercise the masks and the index arithmetic.

Low-precision tolerances: the kernels load bfloat16 / float16, compute in
float32 and round once, so they are compared with the reference evaluated in
float32 on the same (upcast) inputs, within about one unit in the last place
of the output dtype. The reference run in bfloat16 rounds every intermediate
and is the less accurate of the two.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton cannot be imported: the Triton kernels cannot run here")

from pyramidflow import kernels  # noqa: E402
from pyramidflow.kernels import reference  # noqa: E402

from pyramidflow.kernels.triton import _launch, _math  # noqa: E402
from pyramidflow.kernels.triton import affine_coupling as _impl  # noqa: E402
from pyramidflow.kernels.triton import volume_norm as _vn  # noqa: E402

SHAPES = [(1, 3, 5, 7), (2, 4, 37, 53)]
# (volume_norm, eval): eval passes a running mean, training uses the batch mean
MODES = [(None, False), ("CVN", False), ("CVN", True), ("SVN", False), ("SVN", True)]
LAYOUTS = ["contiguous", "channels_last"]
# (dtype, atol, rtol) against the reference in float32; rtol is about one ulp of the dtype
DTYPES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 1e-5, 2**-7),
    (torch.float16, 1e-5, 2**-10),
]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


def _mode_id(mode):
    volume_norm, eval_ = mode
    return f"{volume_norm or 'noVN'}-{'eval' if eval_ else 'train'}"


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sliced":  # a non-dense view, as the engine's channel slices: the kernels' strided path
        n, c, h, w = x.shape
        padded = torch.zeros(n, c + 2, h, w + 3, dtype=x.dtype)
        padded[:, 1 : c + 1, :, 2 : w + 2] = x
        return padded[:, 1 : c + 1, :, 2 : w + 2]
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _operands(shape, dtype, layout, n: int = 3):
    """``n`` tensors like ``(x, r, t, g)``: r spans the clamp's curved range and its tails."""
    gen = [torch.randn(shape), 2.0 * torch.randn(shape), torch.randn(shape), torch.randn(shape)]
    return [_layout(a.to(dtype), layout) for a in gen[:n]]


def _running_mean(volume_norm, eval_, shape):
    if not eval_:
        return None
    _, c, h, w = shape
    return 0.3 * torch.randn((1, 1, h, w) if volume_norm == "CVN" else (1, c, 1, 1))


def _f32(*tensors):
    return [a.float() for a in tensors]


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _within_ulps_of_exact(actual, exact, terms, ulps, what):
    """``|actual - exact| <= ulps`` float32 ulps of ``terms``, the summed magnitudes, element by element.

    The rounding error of ``exp(s) * x + t`` is bounded relative to ``|exp(s) x| + |t|``, not to the
    result, which cancels; how a CPU's vector unit orders the float32 arithmetic (AVX2, AVX-512)
    moves the result within that bound. Both the kernel and the reference are held to it against
    the float64 value, so neither a CPU's rounding nor a real bug can hide behind the other.
    """
    error = (actual.double() - exact).abs()
    bound = ulps * torch.finfo(torch.float32).eps * terms
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"{what}: off by {worst * ulps:.2f} float32 ulps of the summed terms (allowed {ulps})"


# ----------------------------------------------------------------------------- atan


def test_atan_matches_torch_over_the_real_line():
    """The polynomial atan (NOTE [atan without libdevice]) is within 2 float32 ulps everywhere."""
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45, 1e-38, 3.4e38, 0.66, 1.0, 2.4142135, 0.41421357])
    magnitudes = torch.logspace(-40, 38.5, 20001, dtype=torch.float64).float()
    x = torch.cat([special, magnitudes, -magnitudes, torch.linspace(-8, 8, 20001)])
    got = _math.atan(x).double()
    exact = torch.atan(x.double())
    ulp = torch.nextafter(exact.float().abs(), torch.tensor(math.inf)).double() - exact.float().abs().double()
    error_ulps = ((got - exact).abs() / ulp).max().item()
    assert error_ulps <= 2.0, f"atan is off by {error_ulps:.2f} ulps"
    assert (got - exact).abs().max().item() <= 2.5e-7
    assert torch.isnan(_math.atan(torch.tensor([math.nan]))).all()


# ----------------------------------------------------------------------------- ops against the reference


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_inverse_and_fused_backward_match_reference(shape, layout, mode, dtype, atol, rtol):
    volume_norm, eval_ = mode
    x, r, t, g = _operands(shape, dtype, layout, n=4)
    running_mean = _running_mean(volume_norm, eval_, shape)
    opts = dict(volume_norm=volume_norm, clamp=2.0, running_mean=running_mean)

    y, mean = kernels.affine_coupling(x, r, t, **opts, backend="triton")
    y_ref, mean_ref = reference.affine_coupling(*_f32(x, r, t), **opts)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    _close(y, y_ref, atol, rtol, "y")
    assert (mean is None) == (mean_ref is None)
    if mean is not None:
        assert mean.shape == mean_ref.shape and mean.dtype == dtype
        _close(mean, mean_ref, atol, rtol, "batch mean")

    y = y_ref.to(dtype)  # the exact output, rounded: the inverse and backward start from it
    x_inv, _ = kernels.affine_coupling_inverse(y, r, t, **opts, backend="triton")
    x_ref, _ = reference.affine_coupling_inverse(*_f32(y, r, t), **opts)
    _close(x_inv, x_ref, atol, rtol, "inverse x")

    got = kernels.affine_coupling_bwd(y, r, t, g, **opts, backend="triton")
    want = reference.affine_coupling_bwd(*_f32(y, r, t, g), **opts)
    for name, a, b in zip(("x", "grad_x", "grad_r", "grad_t"), got, want):
        assert a.dtype == dtype
        _close(a, b, atol, rtol, f"fused backward {name}")


def test_channel_slices_and_mixed_dtypes():
    """The engine passes channel slices (non-dense views) and, under autocast, bf16 r, t with a float32 x."""
    both = torch.randn(2, 6, 9, 11)
    x = both[:, 3:]  # (2, 3, 9, 11) view, batch stride 6*9*11
    r, t = (2.0 * torch.randn(2, 6, 9, 11)).to(torch.bfloat16).chunk(2, dim=1)
    y, mean = kernels.affine_coupling(x, r, t, volume_norm="SVN", backend="triton")
    y_ref, mean_ref = reference.affine_coupling(x, r.float(), t.float(), volume_norm="SVN")
    assert y.dtype == torch.float32
    x64, r64, t64 = x.double(), r.double(), t.double()
    y_exact, _ = reference.affine_coupling(x64, r64, t64, volume_norm="SVN")
    terms = (torch.exp(reference.log_scale(r64, volume_norm="SVN", clamp=2.0)[0]) * x64).abs() + t64.abs()
    _within_ulps_of_exact(y, y_exact, terms, 4, "y (kernel)")
    _within_ulps_of_exact(y_ref, y_exact, terms, 4, "y (reference)")
    _close(mean, mean_ref, 1e-2, 2**-7, "batch mean")  # returned in r's dtype, like the reference
    x_cl = torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)[:, :3]
    got = kernels.affine_coupling_bwd(x_cl, r, t, x_cl * 2, volume_norm="CVN", backend="triton")
    want = reference.affine_coupling_bwd(x_cl, r.float(), t.float(), x_cl * 2, volume_norm="CVN")
    for name, a, b in zip(("x", "grad_x", "grad_r", "grad_t"), got, want):
        _close(a, b, 1e-5, 2**-7, f"fused backward {name}")


# ----------------------------------------------------------------------------- autograd binding and reconstruct

# The binding saves y, rounded to the dtype, instead of x: grad_r = g (y - t) ... carries
# y's rounding error, about one ulp of y times |g|, so its atol is on that scale.
GRAD_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 0.1, 2**-7), (torch.float16, 0.02, 2**-10)]


def _grads(fn, x, r, t, g):
    leaves = [a.detach().requires_grad_(True) for a in (x, r, t)]  # detach keeps the layout (clone may not)
    y, _ = fn(*leaves)
    y.backward(g)
    return y, [a.grad for a in leaves]


@pytest.mark.parametrize("dtype, atol, rtol", GRAD_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("layout", LAYOUTS + ["sliced"])
def test_autograd_binding_matches_reference_autograd(layout, mode, dtype, atol, rtol):
    shape = (2, 3, 13, 9)
    volume_norm, eval_ = mode
    x, r, t, g = _operands(shape, dtype, layout, n=4)
    opts = dict(volume_norm=volume_norm, clamp=1.5, running_mean=_running_mean(volume_norm, eval_, shape))
    y, grads = _grads(lambda *a: kernels.affine_coupling(*a, **opts, backend="triton"), x, r, t, g)
    y_ref, grads_ref = _grads(lambda *a: reference.affine_coupling(*a, **opts), *_f32(x, r, t, g))
    _close(y, y_ref, 1e-5, rtol, "y")
    for name, a, b in zip(("x", "r", "t"), grads, grads_ref):
        assert a.dtype == dtype
        _close(a, b, atol, rtol, f"grad of {name}")


def test_autograd_binding_only_computes_requested_grads():
    x, r, t, g = _operands((1, 3, 5, 7), torch.float32, "contiguous", n=4)
    r.requires_grad_(True)
    y, _ = kernels.affine_coupling(x, r, t, volume_norm="CVN", backend="triton")
    (grad_r,) = torch.autograd.grad(y, r, g)
    y_ref, _ = reference.affine_coupling(x, r, t, volume_norm="CVN")
    (grad_r_ref,) = torch.autograd.grad(y_ref, r, g)
    _close(grad_r, grad_r_ref, 1e-6, 1e-5, "grad of r")


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("layout", LAYOUTS + ["sliced"])
def test_reconstruct_fills_x_in_backward_and_matches_reference(layout, mode):
    shape = (2, 4, 11, 7)
    volume_norm, eval_ = mode
    y, r, t, g = _operands(shape, torch.float32, layout, n=4)
    opts = dict(volume_norm=volume_norm, clamp=2.0, running_mean=_running_mean(volume_norm, eval_, shape))
    results = []
    triton_fn = lambda *a: kernels.affine_coupling_reconstruct(*a, **opts, backend="triton")  # noqa: E731
    for fn in (triton_fn, lambda *a: reference.affine_coupling_reconstruct(*a, **opts)):
        r_leaf, t_leaf = r.detach().requires_grad_(True), t.detach().requires_grad_(True)
        x, y_local = fn(y, r_leaf, t_leaf)
        assert x.is_leaf and x.requires_grad and y_local.requires_grad
        exact = fn is triton_fn  # the Triton y_local is a view of y; the reference recomputes it
        _close(y_local.detach(), y, 0.0 if exact else 1e-6, 0.0 if exact else 1e-5, "y_local")
        grad_x, grad_r, grad_t = torch.autograd.grad(y_local, (x, r_leaf, t_leaf), g)
        results.append((x.detach(), grad_x, grad_r, grad_t))  # x is read only after the backward
    for name, a, b in zip(("x", "grad_x", "grad_r", "grad_t"), *results):
        _close(a, b, 1e-6, 1e-5, f"reconstruct {name}")


@pytest.mark.parametrize("volume_norm", [None, "SVN"])
def test_reconstruct_is_one_pass_in_backward(volume_norm, monkeypatch):
    """Counting launches: reconstruct launches nothing; its backward one fused pass (plus the VN reduction)."""
    launches = []
    monkeypatch.setattr(_launch, "elementwise_launch", _counting(launches, _launch.elementwise_launch))
    monkeypatch.setattr(_impl, "volume_norm_means", _counting(launches, _vn.volume_norm_means, "reduction"))
    y, r, t, g = _operands((2, 3, 5, 7), torch.float32, "contiguous", n=4)
    r.requires_grad_(True)
    x, y_local = kernels.affine_coupling_reconstruct(y, r, t, volume_norm=volume_norm, backend="triton")
    assert launches == []
    y_local.backward(g)
    kernel_names = [name for name in launches]
    expected = ["_affine_coupling_bwd_kernel"] if volume_norm is None else ["reduction", "_affine_coupling_bwd_kernel"]
    assert kernel_names == expected
    x_ref, _ = reference.affine_coupling_inverse(y, r.detach(), t, volume_norm=volume_norm)
    _close(x.detach(), x_ref, 1e-6, 1e-5, "x")


def _counting(launches, fn, label=None):
    def wrapper(*args, **kwargs):
        launches.append(label or getattr(args[0], "__name__", None) or args[0].fn.__name__)
        return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- errors and dispatch


def test_launchers_reject_bad_arguments_with_clear_errors(monkeypatch):
    x, r, t = _operands((1, 3, 5, 7), torch.float32, "contiguous")
    with pytest.raises(TypeError, match=r"affine_coupling: r has dtype torch.float64.*\.to\(torch.float32\)"):
        kernels.affine_coupling(x, r.double(), t, backend="triton")
    with pytest.raises(ValueError, match=r"t has shape \(1, 3, 5, 6\) but x has \(1, 3, 5, 7\)"):
        kernels.affine_coupling(x, r, t[..., :6], backend="triton")
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(3, 5, 7\)"):
        kernels.affine_coupling(x[0], r[0], t[0], backend="triton")
    with pytest.raises(ValueError, match=r"volume_norm must be one of .* got 'BN'"):
        kernels.affine_coupling(x, r, t, volume_norm="BN", backend="triton")
    with pytest.raises(ValueError, match=r"clamp must be a positive number, got 0"):
        kernels.affine_coupling(x, r, t, clamp=0, backend="triton")
    with pytest.raises(ValueError, match=r"running_mean has shape \(1, 3, 1, 1\).*CVN mean shape \(1, 1, 5, 7\)"):
        kernels.affine_coupling(x, r, t, volume_norm="CVN", running_mean=torch.zeros(1, 3, 1, 1), backend="triton")
    with pytest.raises(NotImplementedError, match=r"affine_coupling_inverse: the Triton version is not differentiable"):
        kernels.affine_coupling_inverse(x, r.requires_grad_(True), t, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time
    with pytest.raises(ValueError, match=r"x is on cpu, but the Triton kernels need CUDA tensors"):
        kernels.affine_coupling(x, r.detach(), t, backend="triton")


def test_dispatch(monkeypatch):
    x, r, t = _operands((1, 3, 5, 7), torch.float32, "contiguous")
    calls = []
    monkeypatch.setattr(kernels, "_triton_module", lambda: calls.append(1) or _impl)
    monkeypatch.delenv("PYRAMIDFLOW_KERNELS", raising=False)
    kernels.affine_coupling(x, r, t)  # auto: CPU tensors run the reference
    assert calls == []
    monkeypatch.setenv("PYRAMIDFLOW_KERNELS", "triton")
    kernels.affine_coupling(x, r, t)
    assert calls == [1]
    monkeypatch.setenv("PYRAMIDFLOW_KERNELS", "reference")
    kernels.affine_coupling(x, r, t, backend="triton")  # the keyword wins over the environment
    assert calls == [1, 1]
    kernels.affine_coupling(x, r, t)
    assert calls == [1, 1]
    monkeypatch.setenv("PYRAMIDFLOW_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"PYRAMIDFLOW_KERNELS.*must be one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        kernels.affine_coupling(x, r, t)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        kernels.affine_coupling(x, r, t, backend="gpu")


def test_importing_the_triton_module_keeps_the_op():
    """The Triton module (imported above) lives in pyramidflow.kernels.triton: no package attribute named like an op changes."""
    assert sys.modules["pyramidflow.kernels.triton.affine_coupling"] is _impl is kernels.triton.affine_coupling
    assert kernels.affine_coupling.__module__ == "pyramidflow.kernels" and kernels.affine_coupling is not _impl.affine_coupling
    assert kernels._triton_module() is _impl


def test_importing_kernels_does_not_import_triton():
    """Neither the ops' package nor the Triton subpackage and its host-side modules import triton."""
    code = (
        "import sys, pyramidflow.kernels; sys.exit(1) if 'triton' in sys.modules else None; "
        "import pyramidflow.kernels.triton._launch, pyramidflow.kernels.triton._compile; sys.exit(2 if 'triton' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_triton_subpackage_shadowing_triton_says_so():
    """NOTE [a subpackage named triton]: with kernels/ on sys.path, `import triton` fails with the reason, not later."""
    folder = os.path.dirname(kernels.__file__)
    result = subprocess.run([sys.executable, "-c", "import triton"], cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "found pyramidflow's kernels/triton/" in result.stderr and "run Python from another folder" in result.stderr


# ----------------------------------------------------------------------------- the compiled path (no GPU needed)


def test_autotuner_keys_name_kernel_arguments():
    """A misspelt key would be dropped silently by the autotuner and reuse a config across variants."""
    flags = ("SUBTRACT_GRAD_MEAN", "WRITE_X", "WRITE_GRAD_X", "WRITE_GRAD_R", "WRITE_GRAD_T")
    for kernel, key in [
        (_impl._affine_coupling_kernel, _impl._ELEMENTWISE_KEY + ("INVERSE",)),
        (_impl._affine_coupling_bwd_kernel, _impl._ELEMENTWISE_KEY + flags),
    ]:
        assert set(key) <= set(kernel.arg_names)
        tuned = _launch._autotuned(kernel, key)
        assert tuned is _launch._autotuned(kernel, key)  # built once, so its cache of tuned configs is kept
        assert [(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in tuned.configs] == list(_launch.elementwise_configs())
