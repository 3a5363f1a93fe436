"""Pyramid couplings, the 1×1 conv and volume normalisation: round trip, fused reconstruct, volume."""

import copy

import pytest
import torch
from torch.autograd.functional import jacobian

from pyramidflow.engine.block import CallContext, InvertibleModule

from model._counting import CountedNetwork
from pyramidflow.model.conv1x1 import InvertibleConv1x1
from pyramidflow.model.coupling import ThreeLevelCoupling, TwoLevelCoupling
from pyramidflow.model.volume_norm import VolumeNorm

DTYPE = torch.float64

# (name, factory(channels, **kwargs)) for every block kind, in a 3-level pyramid.
BLOCKS = {
    "up": lambda c, **kw: TwoLevelCoupling(0, "up", c, **kw),
    "down01": lambda c, **kw: TwoLevelCoupling(0, "down", c, **kw),
    "down12": lambda c, **kw: TwoLevelCoupling(1, "down", c, **kw),
    "three": lambda c, **kw: ThreeLevelCoupling(0, c, **kw),
}


def pyramid(batch=2, channels=3, size=8, num_levels=3):
    return tuple(torch.randn(batch, channels, size // 2**i, size // 2**i, dtype=DTYPE) for i in range(num_levels))


def perturb(block, std=0.3):
    """Move the block away from its identity init (and its 1×1 conv away from orthogonal)."""
    with torch.no_grad():
        block.net.conv_out.weight.normal_(0.0, std)
        block.conv.log_diagonal.normal_(0.0, 0.3)
        block.conv.lower.normal_(0.0, 0.3)
    return block


def make_block(kind, channels=3, volume_norm="CVN", perturbed=True, training=True):
    block = BLOCKS[kind](channels, kernel_size=3, volume_norm=volume_norm).to(DTYPE)
    if perturbed:
        perturb(block)
    if not training:
        block.train()
        with torch.no_grad():  # give the running mean some non-zero value first
            block(pyramid(channels=channels))
            block(pyramid(channels=channels))
        block.eval()
    return block.train(training)


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("training", [True, False])
def test_round_trip_and_pass_through(kind, volume_norm, training):
    block = make_block(kind, volume_norm=volume_norm, training=training)
    xs = pyramid()
    with torch.no_grad():
        ys, logdet = block(xs)
        rebuilt, logdet_inverse = block.inverse(ys)
    assert logdet is None and logdet_inverse is None
    for j, (x, y, r) in enumerate(zip(xs, ys, rebuilt)):
        torch.testing.assert_close(r, x, rtol=0, atol=1e-10)
        if j == block.level:
            assert not torch.allclose(y, x)
        else:
            assert y is x, f"level {j} must pass through as the same object"


def test_zero_init_block_is_only_the_1x1_conv():
    block = make_block("three", perturbed=False)
    xs = pyramid()
    with torch.no_grad():
        ys, _ = block(xs)
        torch.testing.assert_close(ys[1], block.conv(xs[1]))


def _count_calls(net):
    counted = CountedNetwork(net)
    return counted, counted


def _grads(block, xs, ys_local, upstream):
    loss = sum((y * g).sum() for y, g in zip(ys_local, upstream))
    params = [p for p in block.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, list(xs) + params, allow_unused=True)


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("volume_norm, training", [("CVN", True), ("SVN", True), ("CVN", False)])
def test_fused_reconstruct_matches_generic(kind, volume_norm, training):
    block = make_block(kind, volume_norm=volume_norm, training=training)
    with torch.no_grad():
        ys, _ = block(pyramid())
    upstream = [torch.randn_like(y) for y in ys]
    buffers = copy.deepcopy(dict(block.named_buffers()))
    calls, handle = _count_calls(block.net)

    xs_fused, ys_fused, logdet = block.reconstruct(tuple(y.detach() for y in ys))
    assert logdet is None
    for name, value in block.named_buffers():  # NOTE [running mean updated once per step]
        assert torch.equal(value, buffers[name]), f"reconstruct changed buffer {name}"
    regions = block._runs_regions(ys, CallContext.now(rebuild=True), reconstruct=True)
    for j in range(len(ys)):
        if j != block.level and not (regions and j in block.cond_levels):
            assert ys_fused[j] is xs_fused[j], "untouched levels must be the identical leaves"
        elif j != block.level:  # outputs of the region op, so their gradients add up in place (NOTE [placeholder outputs] in pyramidflow.model.coupling_regions)
            assert ys_fused[j]._base is xs_fused[j] and torch.equal(ys_fused[j], xs_fused[j])
    grads_fused = _grads(block, xs_fused, ys_fused, upstream)
    assert calls.evaluations(ys[block.level]) == 1, "the fused path must evaluate F once, reconstruct and backward"

    calls.calls.clear()
    xs_generic, ys_generic, _ = InvertibleModule.reconstruct(block, tuple(y.detach() for y in ys))
    assert calls.evaluations(ys[block.level]) == 2, "the generic path evaluates F twice (inverse, then forward)"
    handle.remove()
    grads_generic = _grads(block, xs_generic, ys_generic, upstream)

    for a, b in zip(xs_fused, xs_generic):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(ys_fused, ys):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(grads_fused, grads_generic):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _whole_batch_logabsdet(block, xs):
    shapes = [x.shape for x in xs]
    sizes = [x.numel() for x in xs]

    def flat_map(flat):
        parts = torch.split(flat, sizes)
        ys, _ = block(tuple(p.reshape(s) for p, s in zip(parts, shapes)))
        return torch.cat([y.reshape(-1) for y in ys])

    jac = jacobian(flat_map, torch.cat([x.reshape(-1) for x in xs]), vectorize=True)
    return torch.linalg.slogdet(jac).logabsdet.item()


@pytest.mark.parametrize("kind", ["up", "down01", "three"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("perturbed", [False, True])
def test_block_preserves_volume_over_the_batch(kind, volume_norm, perturbed):
    """Training mode: Σ s = 0 over the batch and |det W| = 1, so the whole-batch map has log|det| = 0."""
    block = make_block(kind, channels=2, volume_norm=volume_norm, perturbed=perturbed)
    xs = pyramid(batch=2, channels=2, size=8, num_levels=3)
    assert abs(_whole_batch_logabsdet(block, xs)) < 1e-8


def test_single_sample_volume_is_not_preserved():
    """The check above is not vacuous: one sample's transformed level alone has log|det| = Σ s_0 ≠ 0."""
    block = make_block("three", channels=2)
    xs = pyramid(batch=2, channels=2)

    def sample0(x0):
        level = torch.cat([x0[None], xs[1][1:]])
        ys, _ = block((xs[0], level, xs[2]))
        return ys[1][0]

    jac = jacobian(sample0, xs[1][0], vectorize=True).reshape(xs[1][0].numel(), -1)
    assert abs(torch.linalg.slogdet(jac).logabsdet.item()) > 1e-3


@pytest.mark.parametrize("init", ["orthogonal", "rotation", "identity"])
def test_conv1x1_inverse_and_unit_determinant(init):
    conv = InvertibleConv1x1(5, init=init).to(DTYPE)
    with torch.no_grad():
        conv.log_diagonal.normal_(0.0, 0.5)
        conv.upper.normal_(0.0, 0.5)
        conv.lower.normal_(0.0, 0.5)
    assert sum(p.numel() for p in conv.parameters()) == 5 * 5
    torch.testing.assert_close(conv.weight() @ conv.inverse_weight(), torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-12)
    assert abs(torch.linalg.slogdet(conv.weight()).logabsdet.item()) < 1e-12
    x = torch.randn(2, 5, 3, 4, dtype=DTYPE)
    torch.testing.assert_close(conv.inverse(conv(x)), x, rtol=0, atol=1e-12)
    jac = jacobian(lambda v: conv(v.reshape(x.shape)).reshape(-1), x.reshape(-1), vectorize=True)
    assert abs(torch.linalg.slogdet(jac).logabsdet.item()) < 1e-8


def test_conv1x1_init_kinds():
    assert torch.equal(InvertibleConv1x1(4, init="identity").weight(), torch.eye(4))
    w = InvertibleConv1x1(4, init="orthogonal").weight().double()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=DTYPE), rtol=0, atol=1e-6)
    for _ in range(4):
        assert torch.linalg.det(InvertibleConv1x1(4, init="rotation").weight().double()) > 0
    with pytest.raises(ValueError, match="init must be one of"):
        InvertibleConv1x1(4, init="random")


def test_running_mean_update_once_with_momentum():
    block = make_block("up", training=True)
    xs = pyramid()
    with torch.no_grad():
        r, _ = block._affine_parameters(xs)
    s = 2.0 * (2 / torch.pi) * torch.atan(r / 2.0)
    with torch.no_grad():
        block(xs)
    expected = 0.1 * s.mean(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(block.volume_norm.running_mean, expected, rtol=1e-12, atol=1e-14)
    assert block.volume_norm.resolution.tolist() == [8, 8]
    with torch.no_grad():
        block.inverse(block(xs)[0])  # inverse never updates
    torch.testing.assert_close(block.volume_norm.running_mean, 0.19 * s.mean(dim=(0, 1), keepdim=True), rtol=1e-12, atol=1e-14)


def test_cvn_eval_at_another_size_raises_and_state_dict_round_trips():
    block = make_block("down01", training=True)
    with torch.no_grad():
        block(pyramid(size=8))
    block.eval()
    with pytest.raises(ValueError, match="trained at 4×4"):
        block(pyramid(size=16))
    fresh = BLOCKS["down01"](3, kernel_size=3).to(DTYPE)
    fresh.load_state_dict(block.state_dict())
    fresh.eval()
    xs = pyramid(size=8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(xs)[0][1], block(xs)[0][1])
    with pytest.raises(ValueError, match="train at one resolution"):
        block.train()(pyramid(size=16))


def test_svn_runs_at_any_size():
    block = make_block("three", volume_norm="SVN", training=False)
    assert block.volume_norm.running_mean.shape == (1, 3, 1, 1)
    with torch.no_grad():
        block(pyramid(size=16))


def test_volume_norm_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        VolumeNorm("BN", 3)
    with pytest.raises(ValueError, match="momentum"):
        VolumeNorm("CVN", 3, momentum=0.0)
    with pytest.raises(ValueError, match="direction"):
        TwoLevelCoupling(0, "left", 3)
    with pytest.raises(ValueError, match="reads level 2"):
        ThreeLevelCoupling(0, 3)(pyramid(num_levels=2))
