"""check_inverse and the debug mode find a block that does not invert."""

import pytest
import torch

from pyramidflow import InvertibleSequential, check_inverse
from pyramidflow.engine import InvertibleError, InvertibleModule

from _blocks import NormflowsStyleAffine, perturbed_couplings


class BrokenInverse(NormflowsStyleAffine):
    def inverse(self, z):
        y, logdet = super().inverse(z)
        return y + 1e-2, logdet


def test_check_inverse_reports_each_block():
    seq = perturbed_couplings(4)
    reports = check_inverse(seq, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert [r.index for r in reports] == [0, 1, 2, 3]
    assert all(r.error < 1e-12 and r.logdet_error < 1e-10 for r in reports)


def test_check_inverse_points_at_the_broken_block():
    seq = InvertibleSequential(NormflowsStyleAffine(4), BrokenInverse(4), NormflowsStyleAffine(4))
    errors = [r.error for r in check_inverse(seq, torch.randn(2, 4, 8, 8))]
    assert errors[1] > 1e-3 and errors[0] < 1e-6 and errors[2] < 1e-6


def test_debug_mode_raises_naming_the_block():
    seq = InvertibleSequential(NormflowsStyleAffine(4), BrokenInverse(4), debug=True)
    with pytest.raises(InvertibleError, match=r"block 1 \(NormflowsAdapter\).*relative error"):
        seq(torch.randn(2, 4, 8, 8))


def test_debug_mode_finds_non_finite_outputs():
    seq = InvertibleSequential(NormflowsStyleAffine(4), debug=True)
    x = torch.randn(2, 4, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvertibleError, match="NaN"):
        seq(x)


def test_check_inverse_end_to_end_shows_compounding():
    seq = InvertibleSequential(NormflowsStyleAffine(4), BrokenInverse(4), NormflowsStyleAffine(4))
    report = check_inverse(seq, torch.randn(2, 4, 8, 8, dtype=torch.float64).float())
    assert report[0].index == 0 and len(report) == 3  # still a list of BlockReports
    chain = [r.chain_error for r in report]
    assert chain[2] < 1e-6  # rebuilt from the chain's output, nothing broken above it
    assert chain[1] > 1e-3 and chain[0] > 1e-3  # the broken block's error reaches every block below it
    assert report.end_to_end == chain[0]


def test_check_inverse_on_a_fresh_cvn_pyramidflow_in_training_mode():
    """The lazily sized CVN running mean used to crash the buffer restore (size 0 against 64)."""
    from pyramidflow import PyramidFlow, PyramidFlowConfig

    torch.manual_seed(0)
    model = PyramidFlow(PyramidFlowConfig(channels=4, kernel_size=3, num_stacks=2, num_levels=3, volume_norm="CVN")).train()
    images = torch.randn(2, 3, 32, 32)
    levels = model.pyramid.decompose(model.features(images))
    report = check_inverse(model.flow, levels)
    assert len(report) == len(model.flow) and max(r.error for r in report) < 1e-5
    assert report.end_to_end < 1e-5
    assert all(block.volume_norm.running_mean.numel() == 0 for block in model.flow.blocks)  # left as it was


# ----------------------------------------------------------------------------------------------------
# The block contract (NOTE [contract checks]): structure and shapes of every block's result.


class _Returns(InvertibleModule):
    """A volume-preserving identity whose forward result is replaced by ``result(xs)``."""

    def __init__(self, result):
        super().__init__()
        self.result = result

    def forward(self, xs):
        return self.result(xs)

    def inverse(self, ys):
        return tuple(ys), None


def _identity(xs):
    return tuple(xs), None


@pytest.mark.parametrize("mode", ["invertible", "checkpoint", "autograd"])
def test_a_block_that_changes_the_element_count_is_named(mode):
    grow = _Returns(lambda xs: ((torch.cat([xs[0], xs[0][:, :1]], dim=1),), None))
    seq = InvertibleSequential(_Returns(_identity), grow, mode=mode)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"block 1 \(_Returns\): forward\(\) took shapes \(2, 3, 5, 5\) \(150 elements\) "
                                         r"but returned \(2, 4, 5, 5\) \(200\)"):
        seq(x)
    assert not grow._forward_hooks  # the checks leave nothing behind


@pytest.mark.parametrize("logdet", [lambda x: torch.zeros(x.shape[0], 1), lambda x: torch.zeros(()), lambda x: 0.0])
def test_a_log_determinant_of_the_wrong_shape_is_named(logdet):
    seq = InvertibleSequential(_Returns(_identity), _Returns(lambda xs: (tuple(xs), logdet(xs[0]))))
    with pytest.raises(ValueError, match=r"block 1 \(_Returns\): forward\(\) returned a log-determinant of shape .*"
                                         r"must be a tensor of shape \(2,\)"):
        seq(torch.randn(2, 3, 4, 4, requires_grad=True))


@pytest.mark.parametrize("result", [lambda xs: xs[0], lambda xs: (xs[0], None), lambda xs: ((), None)])
def test_a_result_of_the_wrong_structure_is_a_type_error(result):
    seq = InvertibleSequential(_Returns(result))
    with pytest.raises(TypeError, match=r"block 0 \(_Returns\): forward\(\) returned"):
        seq(torch.randn(2, 3, 4, 4))


def test_checked_once_per_input_signature():
    """Later calls with the same shapes run no check; new shapes are checked again."""
    calls = []

    def odd_width_breaks(xs):
        calls.append(xs[0].shape[-1])
        return ((xs[0][..., :-1],) if xs[0].shape[-1] % 2 else tuple(xs)), None

    block = _Returns(odd_width_breaks)
    seq = InvertibleSequential(block)
    seq(torch.randn(2, 3, 4, 4))
    seq(torch.randn(2, 3, 4, 4))
    assert calls == [4, 4] and not block._forward_hooks and len(seq._checked_signatures) == 1
    with pytest.raises(ValueError, match=r"block 0 \(_Returns\).*\(2, 3, 4, 5\) \(120 elements\)"):
        seq(torch.randn(2, 3, 4, 5))


def test_affine_coupling_refuses_another_channel_count():
    from pyramidflow.engine.coupling import AffineCoupling

    block = AffineCoupling(4, 8)
    with pytest.raises(ValueError, match=r"AffineCoupling.forward: built for \(N, 4, H, W\) inputs, got shape \(2, 3, 6, 6\)"):
        block((torch.randn(2, 3, 6, 6),))
    with pytest.raises(ValueError, match=r"AffineCoupling.inverse: built for \(N, 4, H, W\)"):
        block.inverse((torch.randn(2, 5, 6, 6),))
