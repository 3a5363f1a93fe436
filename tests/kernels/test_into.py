"""The ops that write into their operands (affine_coupling_into, affine_coupling_bwd_into) against autograd."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidflow import kernels
from pyramidflow.kernels import reference

MODES = [(None, False), ("CVN", False), ("CVN", True), ("SVN", False), ("SVN", True)]
SHAPE = (3, 5, 7, 9)  # enough samples and channels for several slices


@pytest.fixture(params=["whole", "sliced"])
def slicing(request, monkeypatch):
    """The reference ops' slices (NOTE [slices of the reference ops]): a tensor this small runs whole;
    without the floor in bytes, as a large level, it is cut into bands of rows or runs of channels."""
    if request.param == "sliced":
        monkeypatch.setattr(reference, "_SLICE_BYTES", 0)
        for dims in ((0, 1), (0, 2, 3)):
            assert len(list(reference._slices(torch.empty(SHAPE), dims))) > 1
    return request.param


def _operands(mode, dtype=torch.float64):
    torch.manual_seed(0)
    x, t, g = (torch.randn(SHAPE, dtype=dtype) for _ in range(3))
    r = 2.0 * torch.randn(SHAPE, dtype=dtype)
    volume_norm, eval_ = mode
    mean = None
    if eval_:
        mean = 0.3 * torch.randn((1, 1, 7, 9) if volume_norm == "CVN" else (1, 5, 1, 1), dtype=dtype)
    return x, r, t, g, dict(volume_norm=volume_norm, clamp=2.0, running_mean=mean)


@pytest.mark.parametrize("scratch", [None, "r", "out"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_into_its_input_matches_affine_coupling(mode, slicing, scratch):
    """y over x (or into a fresh out); with a scratch (NOTE [kept between the passes]) bit for bit the same."""
    x, r, t, _, opts = _operands(mode)
    y, mean = reference.affine_coupling(x, r, t, **opts)
    out = x.clone() if scratch != "out" else torch.empty_like(x)
    x_in = out if scratch != "out" else x.clone()
    r_in = r.clone()
    given = {None: None, "r": r_in, "out": out}[scratch]
    got_mean = kernels.affine_coupling_into(x_in, r_in, t, out=out, **opts, backend="reference", scratch=given)
    torch.testing.assert_close(out, y, rtol=1e-13, atol=1e-13)
    assert (got_mean is None) == (mean is None)
    if mean is not None:
        torch.testing.assert_close(got_mean, mean, rtol=1e-13, atol=1e-13)
    plain = x.clone()
    kernels.affine_coupling_into(plain, r, t, out=plain, **opts, backend="reference")
    assert torch.equal(out, plain)
    if scratch != "r":
        assert torch.equal(r_in, r)  # r is overwritten only where it is given as the scratch


@pytest.mark.parametrize("outputs", ["aliased", "fresh"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_into_its_operands_matches_autograd(mode, slicing, outputs):
    """x over y, grad_x over g, grad_r over r, grad_t over t (or into fresh outputs, the operands untouched):
    the values autograd gives for affine_coupling."""
    x, r, t, g, opts = _operands(mode)
    leaves = [a.clone().requires_grad_(True) for a in (x, r, t)]
    y, _ = reference.affine_coupling(*leaves, **opts)
    want = torch.autograd.grad(y, leaves, g)
    y = y.detach()
    operands = [y.clone(), r.clone(), t.clone(), g.clone()]
    y_, r_, t_, g_ = operands
    out = (y_, g_, r_, t_) if outputs == "aliased" else tuple(torch.empty_like(a) for a in (y_, g_, r_, t_))
    kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=out, **opts, backend="reference")
    torch.testing.assert_close(out[0], x, rtol=1e-12, atol=1e-12)
    for got, expected in zip(out[1:], want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if outputs == "fresh":
        for operand, before in zip(operands, (y, r, t, g)):
            assert torch.equal(operand, before)


def test_backward_into_mixed_dtypes_matches_autograd(slicing):
    """r and t in float32 beside a float64 y and g: nothing is kept over the results (NOTE [kept between the
    passes]), each result is what the eager expression gives."""
    x, r, t, g, opts = _operands(("CVN", False))
    r, t = r.float(), t.float()
    leaves = [a.clone().requires_grad_(True) for a in (x, r, t)]
    y, _ = reference.affine_coupling(*leaves, **opts)
    want = torch.autograd.grad(y, leaves, g)
    results = reference.affine_coupling_bwd(y.detach(), r, t, g, **opts)
    torch.testing.assert_close(results[0], x, rtol=1e-6, atol=1e-6)
    for got, expected in zip(results[1:], want):
        torch.testing.assert_close(got.to(expected.dtype), expected, rtol=1e-5, atol=1e-6)


class _AtanElements(TorchDispatchMode):
    """Counts the elements the soft clamp's atan runs on."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.atan or func.overloadpacket is torch.ops.aten.atan_:
            self.elements += result.numel()
        return result


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_training_ops_clamp_each_element_once(volume_norm, slicing):
    """NOTE [kept between the passes]: with a batch mean the ops run two passes, and the clamp once per element."""
    x, r, t, g, opts = _operands((volume_norm, False))
    y, _ = reference.affine_coupling(x, r, t, **opts)
    out, r_ = x.clone(), r.clone()
    with _AtanElements() as forward:
        kernels.affine_coupling_into(out, r_, t, out=out, **opts, backend="reference", scratch=r_)
    y_, r_, t_, g_ = (a.clone() for a in (y, r, t, g))
    with _AtanElements() as backward:
        kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=(y_, g_, r_, t_), **opts, backend="reference")
    assert (forward.elements, backward.elements) == (r.numel(), r.numel())


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_fills_the_same_outputs(mode):
    """Under the interpreter on CPU (tests/conftest.py), the Triton backend writes what the reference writes."""
    pytest.importorskip("triton", reason="triton cannot be imported")
    x, r, t, g, opts = _operands(mode, torch.float32)
    y, _ = reference.affine_coupling(x, r, t, **opts)
    results = []
    for backend in ("reference", "triton"):
        y_, r_, t_, g_ = (a.clone() for a in (y, r, t, g))
        kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=(y_, g_, r_, t_), **opts, backend=backend)
        out = x.clone()
        kernels.affine_coupling_into(out, r, t, out=out, **opts, backend=backend)
        results.append((y_, g_, r_, t_, out))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the Triton into-kernels
# NOTE [writing over the operands] (kernels/triton/affine_coupling.py): the kernels write into `out`
# themselves; these tests run them under the interpreter (tests/conftest.py) on CPU tensors.

ODD_SHAPE = (2, 5, 37, 53)  # not powers of two: the masks and the index arithmetic
F32 = dict(rtol=1e-5, atol=1e-6)  # float32, as tests/kernels/test_affine_coupling.py
LAYOUTS = ["contiguous", "channels_last", "chunks"]


def _triton_modules():
    pytest.importorskip("triton", reason="triton cannot be imported")
    from pyramidflow.kernels.triton import _launch  # noqa: PLC0415
    from pyramidflow.kernels.triton import affine_coupling as impl  # noqa: PLC0415

    return _launch, impl


def _laid_out(layout, device="cpu"):
    """``(x, r, t, g)`` of ODD_SHAPE: dense, channels-last, or r and t the channel chunks of one tensor (the engine's rt)."""
    n, c, h, w = ODD_SHAPE
    x, g = (torch.randn(ODD_SHAPE, device=device) for _ in range(2))
    rt = torch.randn(n, 2 * c, h, w, device=device)
    rt[:, :c] *= 2.0  # r spans the clamp's curved range and its tails
    if layout == "channels_last":
        x, g, rt = (a.contiguous(memory_format=torch.channels_last) for a in (x, g, rt))
    r, t = rt.chunk(2, dim=1)
    if layout != "chunks":
        r, t = r.clone(memory_format=torch.preserve_format), t.clone(memory_format=torch.preserve_format)
    return x, r, t, g


def _options(mode, device="cpu"):
    volume_norm, eval_ = mode
    _, c, h, w = ODD_SHAPE
    mean = 0.3 * torch.randn((1, 1, h, w) if volume_norm == "CVN" else (1, c, 1, 1), device=device) if eval_ else None
    return dict(volume_norm=volume_norm, clamp=2.0, running_mean=mean)


def _refuse_result_allocation(monkeypatch, launch):
    def refused(*args, **kwargs):
        raise AssertionError("an into-kernel allocated a result tensor")

    monkeypatch.setattr(launch, "empty_in_order", refused)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_forward_into_writes_over_x_in_place(mode, layout, monkeypatch):
    """y over x: the result is x's own storage, nothing of its size is allocated, and it equals the reference."""
    from pyramidflow.memory.plan import _LiveBytes  # noqa: PLC0415  (the planner's count)

    launch, _ = _triton_modules()
    counter = _LiveBytes()  # the operands are made under it: it counts a storage when it first sees one
    with counter:
        x, r, t, _ = _laid_out(layout)
        opts = _options(mode)
        want, want_mean = reference.affine_coupling(x, r, t, **opts)
        _refuse_result_allocation(monkeypatch, launch)
        out = x.clone(memory_format=torch.preserve_format)
        pointer, strides, version = out.data_ptr(), out.stride(), out._version
        base = counter.peak = counter.live
        got_mean = kernels.affine_coupling_into(out, r, t, out=out, **opts, backend="triton")
    assert (out.data_ptr(), out.stride()) == (pointer, strides)
    assert out._version > version  # autograd sees the write, as it sees the reference's copy_
    assert counter.peak - base < out.nbytes, f"{counter.peak - base} bytes allocated for a {out.nbytes}-byte level"
    torch.testing.assert_close(out, want, **F32)
    assert (got_mean is None) == (want_mean is None)
    if want_mean is not None:
        torch.testing.assert_close(got_mean, want_mean, **F32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_backward_into_writes_over_its_operands_in_place(mode, layout, monkeypatch):
    """x over y, grad_x over g, grad_r over r, grad_t over t (the engine's call): same storages, the reference's values."""
    from pyramidflow.memory.plan import _LiveBytes  # noqa: PLC0415

    launch, _ = _triton_modules()
    counter = _LiveBytes()
    with counter:
        x, r, t, g = _laid_out(layout)
        opts = _options(mode)
        y, _ = reference.affine_coupling(x, r, t, **opts)
        want = reference.affine_coupling_bwd(y, r, t, g, **opts)
        _refuse_result_allocation(monkeypatch, launch)
        y_, g_ = (a.clone(memory_format=torch.preserve_format) for a in (y, g))
        rt = torch.cat([r, t], dim=1) if layout == "chunks" else None  # r and t stay chunks of one tensor
        r_, t_ = rt.chunk(2, dim=1) if rt is not None else (a.clone(memory_format=torch.preserve_format) for a in (r, t))
        out = (y_, g_, r_, t_)
        before = [(a.data_ptr(), a.stride()) for a in out]
        base = counter.peak = counter.live
        kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=out, **opts, backend="triton")
    assert [(a.data_ptr(), a.stride()) for a in out] == before
    assert counter.peak - base < y_.nbytes, f"{counter.peak - base} bytes allocated for a {y_.nbytes}-byte level"
    for name, got, expected in zip(("x", "grad_x", "grad_r", "grad_t"), out, want):
        torch.testing.assert_close(got, expected, **F32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 1e-5, 2**-7), (torch.float16, 1e-5, 2**-10)], ids=["bfloat16", "float16"])
def test_triton_into_in_low_precision_rounds_once(dtype, atol, rtol):
    """In place in 16 bits: within one unit in the last place of the reference in float32 on the same inputs."""
    _triton_modules()
    mode = ("CVN", False)
    x, r, t, g = (a.to(dtype) for a in _laid_out("contiguous"))
    opts = _options(mode)
    want_y = reference.affine_coupling(x.float(), r.float(), t.float(), **opts)[0]
    y = want_y.to(dtype)  # the exact output, rounded: the backward starts from it
    want = reference.affine_coupling_bwd(y.float(), r.float(), t.float(), g.float(), **opts)
    out = x.clone()
    kernels.affine_coupling_into(out, r, t, out=out, **opts, backend="triton")
    torch.testing.assert_close(out.float(), want_y, atol=atol, rtol=rtol)
    y_, r_, t_, g_ = (a.clone() for a in (y, r, t, g))
    kernels.affine_coupling_bwd_into(y_, r_, t_, g_, out=(y_, g_, r_, t_), **opts, backend="triton")
    for name, got, expected in zip(("x", "grad_x", "grad_r", "grad_t"), (y_, g_, r_, t_), want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_triton_into_separate_strided_outputs(mode):
    """Outputs apart from the operands, in another layout and as non-dense views: written there, operands untouched."""
    _triton_modules()
    x, r, t, g = _laid_out("contiguous")
    opts = _options(mode)
    y, _ = reference.affine_coupling(x, r, t, **opts)
    operands = [a.clone() for a in (x, y, r, t, g)]

    def outputs(count):
        padded = [torch.full((ODD_SHAPE[0], ODD_SHAPE[1] + 1, ODD_SHAPE[2], ODD_SHAPE[3] + 2), float("nan")) for _ in range(count)]
        views = [p[:, 1:, :, 2:] for p in padded]  # strided: neither contiguous nor channels-last
        return [v.contiguous(memory_format=torch.channels_last) if i % 2 else v for i, v in enumerate(views)]

    (fwd_out,) = outputs(1)
    kernels.affine_coupling_into(x, r, t, out=fwd_out, **opts, backend="triton")
    torch.testing.assert_close(fwd_out, y, **F32)
    bwd_out = tuple(outputs(4))
    kernels.affine_coupling_bwd_into(y, r, t, g, out=bwd_out, **opts, backend="triton")
    for got, expected in zip(bwd_out, reference.affine_coupling_bwd(y, r, t, g, **opts)):
        torch.testing.assert_close(got, expected, **F32)
    for before, after in zip(operands, (x, y, r, t, g)):
        assert torch.equal(before, after)


def test_triton_into_refuses_overlapping_outputs():
    """An output over an operand shifted, or two outputs on one tensor, would race: refused with the rule."""
    _triton_modules()
    x, r, t, g = (torch.randn(3, 2, 5, 7) for _ in range(4))
    with pytest.raises(ValueError, match="out overlaps the operand x without being it"):
        big = torch.randn(4, 2, 5, 7)
        kernels.affine_coupling_into(big[:3], r, t, out=big[1:], backend="triton")
    with pytest.raises(ValueError, match="out grad_x and out grad_t share memory"):
        kernels.affine_coupling_bwd_into(x, r, t, g, out=(x, g, r, g), backend="triton")
    with pytest.raises(ValueError, match="out grad_x has shape"):
        kernels.affine_coupling_bwd_into(x, r, t, g, out=(x, g[:2], r, t), backend="triton")


def _forward_into(x, r, t, g, opts, backend):
    return kernels.affine_coupling_into(x, r, t, out=x, **opts, backend=backend)


def _backward_into(x, r, t, g, opts, backend):
    kernels.affine_coupling_bwd_into(x, r, t, g, out=(x, g, r, t), **opts, backend=backend)


def _inverse(x, r, t, g, opts, backend):
    with torch.no_grad():
        return kernels.affine_coupling_inverse(x, r, t, **opts, backend=backend)


def _autograd(x, r, t, g, opts, backend):
    leaves = [a.detach().requires_grad_(True) for a in (x, r, t)]
    y, _ = kernels.affine_coupling(*leaves, **opts, backend=backend)
    return torch.autograd.grad(y, leaves, g)


def _reconstruct(x, r, t, g, opts, backend):
    r, t = (a.detach().requires_grad_(True) for a in (r, t))
    rebuilt, y_local = kernels.affine_coupling_reconstruct(x, r, t, **opts, backend=backend)
    return (rebuilt, *torch.autograd.grad(y_local, [rebuilt, r, t], g))


@pytest.mark.parametrize("op", [_forward_into, _backward_into, _inverse, _autograd, _reconstruct], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("mode", MODES)
def test_triton_allocates_within_the_planners_count(op, mode, monkeypatch):
    """What the CUDA dispatch allocates in an op is within what `plan` counts for it on meta.

    The planner runs the reference on ``meta`` (memory/plan.py); on a GPU the Triton kernels run
    instead. Beyond the results the reference makes too, their only allocations are the VN means
    and partial sums, sized here as on an H100 (the GPU's reduction tiles, 132 multiprocessors):
    at the op's peak and after it, no more bytes than the reference's counted on meta, so the meta
    step bounds the GPU's. The into-ops allocate nothing of a level's size at all.
    """
    from pyramidflow.memory.plan import _LiveBytes  # noqa: PLC0415

    launch, _ = _triton_modules()
    tile = launch._reduction_tile
    monkeypatch.setattr(launch, "_reduction_tile", lambda groups, members, interpreted: tile(groups, members, False))
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    counts = {}
    for device, backend in (("meta", "reference"), ("cpu", "triton")):
        counter = _LiveBytes()
        with counter:
            x, r, t, g = _laid_out("chunks", device)
            opts = _options(mode, device)
            base = counter.peak = counter.live
            result = op(x, r, t, g, opts, backend)
            gc.collect()  # the interpreter leaves reference cycles that hold its arguments until collected
            counts[backend] = (counter.peak - base, counter.live - base)
            del result
    (gpu_peak, gpu_kept), (meta_peak, meta_kept) = counts["triton"], counts["reference"]
    assert gpu_peak <= meta_peak and gpu_kept <= meta_kept, f"(peak, kept) bytes: GPU {counts['triton']} > meta {counts['reference']}"
    if op in (_forward_into, _backward_into):
        assert gpu_peak < math.prod(ODD_SHAPE) * 4  # the VN means and partial sums only: nothing of a level's size
