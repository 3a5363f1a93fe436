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
