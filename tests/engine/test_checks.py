"""check_inverse and the debug mode find a block that does not invert."""

import pytest
import torch

from pyramidflow import InvertibleSequential, check_inverse
from pyramidflow.engine import InvertibleError

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
